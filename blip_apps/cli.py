"""The ``blip`` command line: inspect, run, convert and compare checkpoints in any backend.

Frameworks are imported only inside the subcommand that needs them, so ``blip info`` and
``blip --version`` work with the core alone. ``convert`` and ``parity`` come from ``converters``,
``bench`` from ``benchmarks`` (in a source checkout). Errors a user can cause (bad paths,
unreadable images, unknown architectures) print one line on stderr and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# TensorFlow's C++ logging is not for the user of the command. What it logs as a caption runs is all ERROR level
# and harmless here: a CUDA probe failing on a machine without a GPU, its compilation cache trying an entry as text
# before reading it as the binary it is, compiler tuning flags (+prefer-no-scatter) named as CPU features the host
# lacks. Level 3 keeps those out; its errors that matter reach us as Python exceptions, which the command reports.
# The notes it writes while it is imported ignore the level (``blip_apps.quiet``). A user who sets
# TF_CPP_MIN_LOG_LEVEL gets TensorFlow's logging as it is. The level must be set before tensorflow is first
# imported, which happens inside a subcommand.
_TF_LOGGING_CHOSEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from blip_core import BACKENDS, __version__

from . import load
from .dataset.cli import add_dataset_args, add_dataset_parsers
from .quiet import quiet_import


class CliError(Exception):
    """An error reported to the user as one line, without a traceback."""


# -- helpers -----------------------------------------------------------------------------------
def _progress(paths: list):
    """``paths`` under a tqdm bar on stderr, shown only on a terminal and for more than one image."""
    from tqdm import tqdm
    return tqdm(paths, unit="img", file=sys.stderr, disable=len(paths) <= 1 or not sys.stderr.isatty())


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory; give --out FILE to run over every image in it (see 'Data sets')")
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CliError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def _model_dir(args, task: str) -> str:
    """``--model``, or the bundled model for ``task`` (said on stderr)."""
    if args.model:
        return args.model
    path = os.path.join(BUNDLED, task)
    print(f"no --model: using the bundled {task} model ({path}), a tiny BLIP trained on synthetic shapes",
          file=sys.stderr)
    return path


def _load(model_path: str, backend: str, dtype=None, quantize=None):
    if not os.path.isdir(model_path):
        raise CliError(f"{model_path}: not a model directory")
    try:
        kwargs = {"dtype": dtype} if dtype else {}
        if quantize:
            kwargs["quantize"] = quantize
        model = load(model_path, backend=backend, **kwargs)
    except ModuleNotFoundError as exc:
        raise CliError(f"backend {backend!r} is not installed ({exc}); install the '{backend}' extra") from None
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        raise CliError(f"{model_path}: {exc}") from None
    return model


def _processor(model_path: str, model):
    from blip_core.configs import Blip2Config
    from blip_core.processing import Blip2Processor, BlipProcessor
    is_blip2 = isinstance(getattr(model, "config", None), Blip2Config)
    cls = Blip2Processor if is_blip2 else BlipProcessor
    try:
        return cls.from_pretrained(model_path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CliError(f"{model_path}: cannot load the tokenizer/image processor ({exc})") from None


# Which classes each command runs (a model of another class gives a one-line error, not a traceback).
_COMMAND_CLASSES = {
    "caption": ("BlipForConditionalGeneration", "Blip2ForConditionalGeneration"),
    "vqa": ("BlipForQuestionAnswering", "Blip2ForConditionalGeneration"),
    "match": ("BlipForImageTextRetrieval", "Blip2ForImageTextRetrieval"),
}


def _check_class(model, command: str, model_path: str) -> None:
    name = type(model).__name__.removeprefix("TF")
    if name not in _COMMAND_CLASSES[command]:
        raise CliError(f"{model_path}: '{command}' needs a {' or '.join(_COMMAND_CLASSES[command])} checkpoint, "
                       f"this one is a {name}")


def _run(what: str, fn, *args, **kwargs):
    """Call the model; a bad input (too long a text, a length past the position table) is one line."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{what}: {exc}") from None


def _finite(x):
    """JSON has no NaN or infinity: such a score is written as null."""
    return x if math.isfinite(x) else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ids(x):
    from blip_core.numerics import to_numpy
    return to_numpy(x).tolist()


# -- subcommands -------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from blip_core.checkpoint import checkpoint_info
    from blip_core.configs import load_config
    from blip_core.weights import ARCHITECTURES, weight_table
    path = args.path
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file or directory")
    try:
        cfg = load_config(path)
        info = checkpoint_info(path, allow_pickle_bin=args.allow_pickle_bin)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from None
    arch = (cfg.architectures or ["?"])[0]
    arch = arch if isinstance(arch, str) else "?"
    report = {"architecture": arch, "model_type": cfg.model_type, "format": info.get("format"),
              "parameters": info.get("total_parameters"), "bytes": info.get("total_bytes"),
              "dtypes": {k: v.get("parameters") for k, v in (info.get("dtypes") or {}).items()},
              "shards": info.get("num_shards"), "files": [f["name"] for f in info.get("files", [])]}
    if arch in ARCHITECTURES:
        table = weight_table(arch, cfg)
        report["table_parameters"] = int(sum(
            (1 if not s.shape else math.prod(s.shape)) for s in table.values() if s.tied_to is None))
        report["tied"] = [k for k, s in table.items() if s.tied_to is not None]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:18s} {v}")
    return 0


def cmd_caption(args) -> int:
    if args.out:        # a data set (blip_apps/dataset)
        from .dataset.cli import dataset_caption
        return dataset_caption(args)
    args.model = _model_dir(args, "caption")
    model = _load(args.model, args.backend, args.dtype, getattr(args, "quantize", None))
    _check_class(model, "caption", args.model)
    processor = _processor(args.model, model)
    failures = 0
    n = len(args.images)
    for path in _progress(args.images):
        try:
            image = _open_image(path)
            enc = processor(images=image, text=args.prompt, return_tensors="np")
            kwargs = {k: enc[k] for k in ("input_ids", "attention_mask") if args.prompt and k in enc}
            t0 = time.perf_counter()
            out = model.generate(pixel_values=enc["pixel_values"], num_beams=args.num_beams,
                                 max_new_tokens=args.max_new_tokens, **kwargs)
            seconds = time.perf_counter() - t0
            ids = _ids(out)[0]
            text = processor.decode(ids, skip_special_tokens=True).strip()
        except CliError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        except (ValueError, TypeError, OSError, MemoryError) as exc:   # this image only; the others go on
            failures += 1
            print(f"error: {path}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": path, "caption": text, "ids": ids, "backend": args.backend,
                              "seconds": round(seconds, 4)}), flush=True)
        else:
            print(f"{path}\t{text}", flush=True)
    if failures:
        print(f"error: {failures} of {n} image(s) failed", file=sys.stderr)
    return 1 if failures else 0


def cmd_vqa(args) -> int:
    if args.out:
        from .dataset.cli import dataset_vqa
        return dataset_vqa(args)
    if args.question is None:
        raise CliError("vqa needs a QUESTION")
    args.model = _model_dir(args, "vqa")
    model = _load(args.model, args.backend, args.dtype, getattr(args, "quantize", None))
    _check_class(model, "vqa", args.model)
    processor = _processor(args.model, model)
    image = _open_image(args.image)
    enc = _run(args.image, processor, images=image, text=args.question, return_tensors="np")
    out = _run("question", model.generate, pixel_values=enc["pixel_values"], input_ids=enc["input_ids"],
               attention_mask=enc["attention_mask"], num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    answer = processor.decode(_ids(out)[0], skip_special_tokens=True).strip()
    if args.json:
        print(json.dumps({"image": args.image, "question": args.question, "answer": answer}))
    else:
        print(answer)
    return 0


def cmd_match(args) -> int:
    import numpy as np
    from blip_core.numerics import to_numpy
    if args.out:
        from .dataset.cli import dataset_match
        return dataset_match(args)
    if not args.texts:
        raise CliError("match needs at least one TEXT")
    args.model = _model_dir(args, "retrieval")
    model = _load(args.model, args.backend, args.dtype, getattr(args, "quantize", None))
    _check_class(model, "match", args.model)
    processor = _processor(args.model, model)
    image = _open_image(args.image)
    enc = _run(args.image, processor, images=[image] * len(args.texts), text=list(args.texts), padding=True,
               return_tensors="np")
    inputs = {k: enc[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    itm = to_numpy(_run("text", model, **inputs, use_itm_head=True).itm_score).astype(np.float64)
    itm = np.exp(itm - itm.max(-1, keepdims=True))
    itm = itm / itm.sum(-1, keepdims=True)
    itc = to_numpy(model(**inputs, use_itm_head=False).itm_score)
    rows = [{"text": t, "itm_probability": _finite(float(itm[i, 1])), "itc_score": _finite(float(itc[i, i]))}
            for i, t in enumerate(args.texts)]
    if args.json:
        for r in rows:
            print(json.dumps(dict(image=args.image, **r), allow_nan=False))
    else:
        print(f"{'ITM p(match)':>12}  {'ITC cosine':>10}  text")
        for r in rows:
            p, c = (float("nan") if v is None else v for v in (r["itm_probability"], r["itc_score"]))
            print(f"{p:12.4f}  {c:10.4f}  {r['text']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    if args.out is not None and os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"{args.out}: exists and is not a directory; choose another --out")
    return run_demo(backends=args.backends.split(","), out=args.out)


# -- parser ------------------------------------------------------------------------------------
def _model_args(p, beams=True):
    p.add_argument("--model", default=None,
                   help="model directory (config.json, weights, tokenizer files); default: the bundled model")
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="torch backend: int8 weights for every linear layer (about 3x faster on x86 CPUs)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    if beams:
        p.add_argument("--num-beams", type=_positive_int, default=1)
        p.add_argument("--max-new-tokens", type=_positive_int, default=20)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip", description="BLIP and BLIP-2 in PyTorch, TensorFlow and JAX")
    parser.add_argument("--version", action="version", version=f"blip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="architecture, parameter count, dtypes and shards of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-pickle-bin", action="store_true", help="also inspect pytorch_model.bin files")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", default=None, help="text the caption starts with")
    _model_args(p)
    add_dataset_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("vqa", help="answer a question about an image (or a data set, with --out)")
    p.add_argument("image")
    p.add_argument("question", nargs="?", default=None)
    _model_args(p)
    add_dataset_args(p)
    p.set_defaults(func=cmd_vqa)

    p = sub.add_parser("match", help="image-text matching probabilities and ITC scores")
    p.add_argument("image")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    _model_args(p, beams=False)
    add_dataset_args(p)
    p.set_defaults(func=cmd_match)
    add_dataset_parsers(sub)      # embed, index, search

    p = sub.add_parser("demo", help="caption, question and match held-out synthetic images with the bundled "
                                    "models in every backend")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default=None, help="keep the demo model in this directory")
    p.set_defaults(func=cmd_demo)

    from .train.cli import add_train_parsers
    add_train_parsers(sub)
    from .export import add_export_parsers
    add_export_parsers(sub)
    from .cache_cli import add_cache_parser
    add_cache_parser(sub)

    try:
        from converters.cli import add_convert_parser, add_parity_parser
    except ImportError:
        pass
    else:
        add_convert_parser(sub)
        add_parity_parser(sub)
    try:
        from benchmarks.cli import add_bench_parser   # a source checkout (benchmarks/ is not installed)
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if sys.stderr is None:      # started without descriptor 2 (``2>&-``): print(file=None) would write to stdout
        sys.stderr = open(os.devnull, "w")
    if not _TF_LOGGING_CHOSEN:
        quiet_import("tensorflow")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`blip caption ... | head -1`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:      # read-only or full disk, permissions
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
