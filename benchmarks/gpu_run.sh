#!/usr/bin/env bash
# The GPU checks in one call (for a lent GPU machine whose image has torch, jax and transformers, no tensorflow):
# the captioning table (benchmarks/gpu.py) and loading onto the device (benchmarks/load.py --device cuda).
# Output under $OUT (default ./gpu-out): gpu.json / gpu.log, load.json / load.log.
set -u -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/env.log"
$PY -c "import torch, jax, flax, transformers; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/env.log"
timeout "${GPU_TABLE_S:-240}" $PY benchmarks/gpu.py --out "$OUT/gpu.json" ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
echo "gpu.py exit: $?"
timeout "${GPU_LOAD_S:-160}" $PY benchmarks/load.py --device cuda --impls torch,jax,hf-torch --repeats 1 \
    --models ${GPU_LOAD_MODELS:-blip-large,blip2-opt-2.7b} --check-logits --workdir /tmp/blip-load --out "$OUT/load.json" 2>&1 \
    | grep -v "^   #" | tee "$OUT/load.log"
echo "load.py exit: $?"
