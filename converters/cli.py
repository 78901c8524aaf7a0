"""``blip convert`` and ``blip parity``: sub-commands registered into ``blip_apps.cli``'s parser.

    blip convert SRC DST --to {torch,tf,jax} [--dtype D] [--max-shard-size 2GB] [--allow-pickle-bin]
                 [--image-size N] [--source-format F] [--architecture CLS] [--config PATH]
                 [--preset NAME] [--set FIELD=VALUE ...] [--vision-model PATH] [--qformer PATH]
                 [--language-model PATH] [--overwrite] [--no-progress]
    blip parity PATH [--backends torch,tf,jax] [--dtype float32] [--reference transformers]
                [--against OTHER] [--seed 0]

``python -m converters.cli ...`` runs the same commands without the rest of ``blip``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from blip_core import BACKENDS
from blip_core.presets import preset_names

DTYPES = ["float32", "float16", "bfloat16"]


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint to another framework's format",
        description="Convert a Hugging Face PyTorch (safetensors, sharded, .bin), TF tf_model.h5, Flax msgpack "
                    "or original BLIP/LAVIS .pth checkpoint to PyTorch safetensors, TF tf_model.h5 or Flax "
                    "msgpack. The output is written atomically and verified after writing.")
    p.add_argument("src", help="checkpoint directory or weights file")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=BACKENDS, help="target framework")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating tensors")
    p.add_argument("--max-shard-size", default=None, help="e.g. 2GB (default 5GB, as transformers)")
    p.add_argument("--allow-pickle-bin", action="store_true",
                   help="read pickle-based .bin/.pth files (restricted unpickler: tensors only, no code)")
    p.add_argument("--image-size", type=int, default=None,
                   help="vision resolution of the output; the position embedding is resized bicubically")
    p.add_argument("--source-format", choices=["safetensors", "bin", "tf", "flax", "original"], default=None)
    p.add_argument("--architecture", default=None, help="class name, when config.json does not name one")
    p.add_argument("--config", default=None, help="config.json (or its directory) for sources without one")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="config of a released model family (original .pth files): " + ", ".join(preset_names()))
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="FIELD=VALUE",
                   help="override one config field of --preset or of the config inferred from an original "
                        ".pth, e.g. vision_config.image_size=480 (repeatable)")
    p.add_argument("--vision-model", default=None, metavar="PATH",
                   help="checkpoint supplying the vision tower the source leaves out (EVA ViT-g .pth, a "
                        "BLIP-2 Hugging Face directory, an original .pth)")
    p.add_argument("--qformer", default=None, metavar="PATH", help="checkpoint supplying the Q-Former and queries")
    p.add_argument("--language-model", default=None, metavar="PATH",
                   help="Hugging Face OPT/T5 checkpoint (safetensors, sharded, or .bin with --allow-pickle-bin) "
                        "for LAVIS .pth files that leave the LM out")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    p.set_defaults(func=run_convert)
    return p


# API argument -> command-line flag, for error messages (the API names arguments, the CLI flags).
_FLAGS = {"allow_pickle_bin=True": "--allow-pickle-bin", "overwrite=True": "--overwrite",
          "source_format=": "--source-format", "architecture=": "--architecture", "config=": "--config",
          "preset=": "--preset", "overrides=": "--set", "image_size=": "--image-size",
          "vision_model=": "--vision-model", "qformer=": "--qformer", "language_model=": "--language-model",
          "max_shard_size=": "--max-shard-size", "dtype=": "--dtype"}
_FLAG_RE = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(_FLAGS, key=len, reverse=True)) + ")")


def flag_message(message: str) -> str:
    """An API error message with each ``argument=`` spelled as the CLI flag that sets it."""
    return _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], message)


def run_convert(args) -> int:
    from blip_core.checkpoint import CheckpointError

    from .convert import ConversionError, convert
    from .presets import parse_overrides
    try:
        report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         allow_pickle_bin=args.allow_pickle_bin, source_format=args.source_format,
                         architecture=args.architecture, image_size=args.image_size, config=args.config,
                         language_model=args.language_model, overwrite=args.overwrite,
                         progress=False if args.no_progress else None, preset=args.preset,
                         overrides=parse_overrides(args.overrides), vision_model=args.vision_model,
                         qformer=args.qformer)
    except (CheckpointError, ConversionError, FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"blip convert: error: {flag_message(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:      # read-only or full destination, permissions: one line, nothing left behind
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"blip convert: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


def add_parity_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "parity", help="compare a checkpoint's stages across backends (exit 1 on drift)",
        description="Run every named stage of a checkpoint on fixed seeded inputs in several backends and "
                    "compare each pair against the tolerance table. Exit 0: all within tolerance; 1: a stage "
                    "drifts; 2: a requested backend could not run.")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, in column order")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--reference", choices=["transformers"], default=None,
                   help="add transformers' PyTorch model as a column (if installed)")
    p.add_argument("--against", default=None, metavar="OTHER",
                   help="compare OTHER (e.g. a conversion of PATH) to PATH stage by stage instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument("--allow-pickle-bin", action="store_true")
    p.set_defaults(func=run_parity)
    return p


def run_parity(args) -> int:
    from . import parity as harness

    if args.reference and "transformers" not in sys.modules:
        # The reference is transformers' PyTorch model: do not pay for importing its TF/Flax side.
        os.environ.setdefault("USE_TF", "0")
        os.environ.setdefault("USE_FLAX", "0")
    try:
        if args.against:
            result = harness.against(args.path, args.against, dtype=args.dtype, seed=args.seed,
                                     allow_pickle_bin=args.allow_pickle_bin)
        else:
            backends = [b.strip() for b in args.backends.split(",") if b.strip()]
            unknown = [b for b in backends if b not in BACKENDS]
            if unknown:
                print(f"blip parity: error: unknown backend(s) {', '.join(unknown)}; choose from "
                      f"{', '.join(BACKENDS)}", file=sys.stderr)
                return 2
            result = harness.parity(args.path, backends=backends, dtype=args.dtype, reference=args.reference,
                                    seed=args.seed, allow_pickle_bin=args.allow_pickle_bin)
    except (FileNotFoundError, ValueError) as exc:
        print(f"blip parity: error: {flag_message(str(exc))}", file=sys.stderr)
        return 2
    return result.exit_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_convert_parser(sub)
    add_parity_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
