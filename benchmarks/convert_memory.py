"""Peak memory of ``converters.convert`` on a multi-GB synthetic checkpoint (not run in tests).

    python benchmarks/convert_memory.py [--size-gb 2] [--source-shard 500MB] [--workdir DIR] [--keep]

Builds a random BLIP-2 (OPT) checkpoint of about ``--size-gb`` GB, written as sharded safetensors
tensor by tensor (the builder itself never holds the model), then converts it along the chain
safetensors -> tf -> jax -> torch and safetensors -> torch, each conversion in a fresh process.
For each it prints the peak resident memory (``ru_maxrss``) above the process's baseline after
imports, next to the checkpoint size, the largest tensor and the largest source file: streaming
means the extra stays near one tensor for safetensors and h5 sources, and one file for msgpack
(a format without random access).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from converters import convert
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
base = rss_kb()
t = time.time()
report = convert(sys.argv[2], sys.argv[3], to=sys.argv[4], max_shard_size=sys.argv[5] or None, progress=False)
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.time() - t, "files": report.files, "verified": report.verified}))
"""


def build_config(size_gb: float):
    from blip_core.configs import Blip2Config
    hidden, ffn, vocab = 2048, 8192, 50272
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn + 9 * hidden + ffn
    fixed = vocab * hidden + 2050 * hidden
    layers = max(1, int((size_gb * 1e9 / 4 - fixed) / per_layer))
    text = dict(model_type="opt", vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    qformer = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=8)


def build_checkpoint(directory: str, size_gb: float, shard: str) -> dict:
    """Write the synthetic checkpoint one tensor at a time; return its sizes."""
    from blip_core.weights import weight_table
    from converters.sinks import stored_rows, write_torch

    cfg = build_config(size_gb)
    arch = "Blip2ForConditionalGeneration"
    table = weight_table(arch, cfg)
    rows = [(n, tuple(table[n].shape), np.dtype(np.float32)) for n in stored_rows("torch", table, arch)]
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    files = write_torch(directory, rows, lambda n: rng.random(table[n].shape, dtype=np.float32), shard)
    cfg.extra["architectures"] = [arch]
    cfg.save_pretrained(directory)
    sizes = [os.path.getsize(os.path.join(directory, f)) for f in files if f.endswith(".safetensors")]
    largest = max(int(np.prod(s)) * 4 for _, s, _ in rows)
    return {"bytes": sum(sizes), "largest_file": max(sizes), "largest_tensor": largest, "tensors": len(rows)}


def measure(src: str, dst: str, to: str, shard: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, ROOT, src, dst, to, shard], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--source-shard", default="500MB", help="shard size of the synthetic source and of outputs")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)
    import h5py
    import msgpack
    print(f"python {platform.python_version()}, numpy {np.__version__}, h5py {h5py.__version__}, "
          f"msgpack {'.'.join(map(str, msgpack.version))}, {os.cpu_count()} CPUs, {platform.platform()}")
    work = args.workdir or tempfile.mkdtemp(prefix="blip-convert-mem-")
    try:
        info = build_checkpoint(os.path.join(work, "src"), args.size_gb, args.source_shard)
        mb = 1e6
        print(f"synthetic Blip2ForConditionalGeneration: {info['tensors']} float32 tensors, "
              f"{info['bytes'] / 1e9:.2f} GB; largest tensor {info['largest_tensor'] / mb:.0f} MB, "
              f"largest source file {info['largest_file'] / mb:.0f} MB")
        steps = [("src", "tf", "tf", args.source_shard), ("tf", "jax", "jax", ""), ("jax", "pt", "torch", args.source_shard),
                 ("src", "pt2", "torch", args.source_shard)]
        print(f"{'conversion':<28} {'baseline MB':>12} {'peak MB':>9} {'extra MB':>9} {'extra/ckpt':>10} {'s':>7}")
        for a, b, to, shard in steps:
            r = measure(os.path.join(work, a), os.path.join(work, b), to, shard)
            extra = (r["peak_kb"] - r["base_kb"]) * 1024
            name = f"{a} -> {b} ({to}{', sharded' if shard else ''})"
            print(f"{name:<28} {r['base_kb'] * 1024 / mb:>12.0f} {r['peak_kb'] * 1024 / mb:>9.0f} "
                  f"{extra / mb:>9.0f} {extra / info['bytes']:>10.2f} {r['seconds']:>7.1f}"
                  f"{'' if r['verified'] else '  NOT VERIFIED'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
