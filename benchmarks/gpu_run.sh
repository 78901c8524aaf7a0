#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine whose image has torch, jax and transformers (no tensorflow).
#   bash benchmarks/gpu_run.sh [stage[:seconds] ...]      default: checks table load-large load-2.7b
# Stages: checks (float32 logits on the device, profiles, bundled-captioner agreement), table (the timed cases),
# load-large / load-2.7b (from_pretrained onto the device: BLIP-large float32, BLIP-2 OPT-2.7b both dtypes).
# Each stage runs under its own time limit (default 240 s); everything goes under $OUT (default ./gpu-out): all.log
# and JSON files. Stop 31 on an H200 (16 host cores): checks needed more than 115 s (57 s before its first check:
# loads, the first CUDA and XLA work), table 95 s for the float32 rows, load-large ~25 s per dtype,
# load-2.7b ~50 s per dtype including the 7.5 GB checkpoint's writing (7 s).
set -u -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/all.log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
$PY -c "import torch, jax, flax, transformers; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| transformers', transformers.__version__)"
LOAD="benchmarks/load.py --device cuda --impls torch,jax,hf-torch --repeats 1 --workdir /tmp/blip-load"
for stage in "${@:-checks table load-large load-2.7b}"; do
  for one in $stage; do
    name=${one%%:*}; limit=${one#*:}; [ "$limit" = "$one" ] && limit=240
    echo "== stage $name (limit $limit s) $(date +%T)"
    case $name in
      checks) timeout "$limit" $PY benchmarks/gpu.py --checks-only --profile --profile-out "$OUT/profile.txt" --out "$OUT/gpu_checks.json" ;;
      table) timeout "$limit" $PY benchmarks/gpu.py --budget "${GPU_BUDGET:-3}" --min-reps 3 --out "$OUT/gpu_table.json" ;;
      load-large) timeout "$limit" $PY $LOAD --models blip-large --check-logits --out "$OUT/load_large.json" ;;
      load-2.7b) timeout "$limit" $PY $LOAD --models blip2-opt-2.7b --dtypes "${LOAD_DTYPES:-bfloat16,float32}" --out "$OUT/load_27.json" ;;
      *) echo "unknown stage $name" ;;
    esac
    echo "== stage $name exit $? $(date +%T)"
  done
done
