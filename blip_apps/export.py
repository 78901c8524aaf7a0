"""``blip export``: deployable artifacts (ONNX, TensorFlow SavedModel, StableHLO) from a checkpoint.

    blip export MODEL_DIR OUT --format onnx|savedmodel|stablehlo [--task caption|vqa|itm|embed]
                [--dtype float32|bfloat16|float16] [--num-beams N] [--max-new-tokens N] [--prompt-length N]
                [--image-size N]
    blip export-parity ARTIFACT MODEL_DIR [--seed S] [--json]

Which backend writes which format: ONNX from torch (``backends/torch/onnx_export.py``; run with
``blip_runtime.OnnxBlip``), SavedModel from TensorFlow (``backends/tf/export.py``,
``saved_model_export.py``, ``blip2_export.py``), StableHLO from JAX (``backends/jax/stablehlo_export.py``;
run with ``blip_runtime.stablehlo_runner.StableHLOBlip``). The task is the checkpoint's class;
``--task`` states the expectation and fails on a mismatch. Generating artifacts (captioning, VQA)
fix ``--num-beams`` / ``--max-new-tokens`` at export, except ONNX, whose runner takes any option.
Every artifact directory gets ``blip_export.json`` (format, architecture, task, options), the
checkpoint's ``config.json`` and processor files; ``blip export-parity`` compares it with the library.
``--image-size N`` exports an artifact taking N x N pixels (every format: the position table is
resized as the library's ``interpolate_pos_encoding=True`` does); its processor files resize to N.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from blip_core import architecture_of
from blip_core.artifact_files import PROCESSOR_FILES, export_image_size, write_image_size
from blip_core.configs import load_config
from converters.safety import make_partial, remove_stale_partials

FORMATS = {"onnx": "torch", "savedmodel": "tf", "stablehlo": "jax"}
TASK_OF = {"BlipForConditionalGeneration": "caption", "BlipForQuestionAnswering": "vqa",
           "BlipForImageTextRetrieval": "itm", "BlipModel": "embed", "Blip2ForConditionalGeneration": "caption"}
SUPPORTED = {"onnx": {"BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval",
                      "BlipModel", "Blip2ForConditionalGeneration"},
             "savedmodel": {"BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval",
                            "BlipModel", "Blip2ForConditionalGeneration"},
             "stablehlo": {"BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval",
                           "BlipModel", "Blip2ForConditionalGeneration"}}
META = "blip_export.json"
# Why ``--format onnx`` stays float32 (measured: ``python benchmarks/onnx_lowprec.py``, results in
# benchmarks/results/2026-12-03-onnx-lowprec-loaded.txt).
ONNX_LOW_PRECISION = {
    "bfloat16": "ONNX graphs are exported in float32: onnxruntime's CPU provider has no bfloat16 kernels "
                "(MatMul, Add, Softmax: NOT_IMPLEMENTED in onnxruntime 1.32)",
    "float16": "ONNX graphs are exported in float32: float16 graphs run slower on onnxruntime's CPU provider, which "
               "has float16 kernels for few operators and wraps the rest in Cast nodes (benchmarks/onnx_lowprec.py, "
               "onnxruntime 1.32, 2 threads, load ~8: BLIP base vision tower 1.10x float32's time, demo captioner "
               "batch 8 1.20x; caption ids equal to float32's on 200/200 held-out images). For another runtime, "
               "backends.torch.onnx_export.export_onnx writes float16 graphs from a float16 torch model",
}


def _generation_options(arch, num_beams, max_new_tokens) -> dict:
    return dict(num_beams=num_beams, max_new_tokens=max_new_tokens) if TASK_OF.get(arch) in ("caption", "vqa") else {}


def export(model_dir: str, out: str, fmt: str, task: str | None = None, dtype: str | None = None,
           num_beams: int = 1, max_new_tokens: int = 20, prompt_length: int | None = None,
           image_size: int | None = None) -> dict:
    """Write the artifact; returns the metadata written to ``OUT/blip_export.json``. ``image_size``: the
    square pixel size the artifact takes (default: the config's)."""
    import blip_apps
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    arch = architecture_of(model_dir)
    if task is not None and TASK_OF.get(arch) != task:
        raise ValueError(f"{model_dir} holds a {arch} (task {TASK_OF.get(arch, 'none')}), not a {task} model")
    if arch not in SUPPORTED[fmt]:
        raise ValueError(f"--format {fmt} supports {', '.join(sorted(SUPPORTED[fmt]))}; {model_dir} holds {arch}")
    if fmt == "onnx" and dtype not in (None, "float32"):
        raise ValueError(ONNX_LOW_PRECISION[dtype])
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} exists and is not an empty directory")
    vision = load_config(model_dir).vision_config
    size = export_image_size(vision, image_size)
    model = blip_apps.load(model_dir, backend=FORMATS[fmt], **({"dtype": dtype} if dtype else {}))
    # Written into a partial directory beside OUT (``converters.safety``'s, as conversions do) and renamed to OUT
    # once complete: an export that fails or is interrupted leaves nothing at OUT, nor a half-written directory a
    # runner could pick up; a killed export's leftovers are removed by the next export to OUT.
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_partials(out)
    work = make_partial(out)
    try:
        meta = _write(model, model_dir, arch, work, fmt, dtype, num_beams, max_new_tokens, prompt_length,
                      image_size, size, vision.image_size)
        if os.path.isdir(out):
            os.rmdir(out)             # empty (checked above); one that has filled since fails here
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta


def _write(model, model_dir, arch, out, fmt, dtype, num_beams, max_new_tokens, prompt_length, image_size, size,
           config_size) -> dict:
    """``export``'s files, written into the directory ``out``."""
    sized = {} if image_size is None else {"image_size": size}
    options = _generation_options(arch, num_beams, max_new_tokens)
    if fmt == "onnx":
        from backends.torch.onnx_export import export_onnx
        export_onnx(model, out, processor_dir=model_dir, **sized)
        options = {}                                    # the runner takes any generation option
    elif fmt == "stablehlo":
        from backends.jax.stablehlo_export import export_stablehlo
        if arch == "Blip2ForConditionalGeneration":
            if prompt_length is None:
                raise ValueError("BLIP-2 programs take prompts of one length: pass --prompt-length "
                                 "(placeholders included)")
            options["prompt_length"] = prompt_length
        export_stablehlo(model, out, processor_dir=model_dir, **sized, **options)
    elif arch == "Blip2ForConditionalGeneration":
        from backends.tf.blip2_export import export_blip2_captioner
        if prompt_length is None:
            raise ValueError("BLIP-2 SavedModels take prompts of one length: pass --prompt-length "
                             "(placeholders included)")
        export_blip2_captioner(model, out, prompt_length=prompt_length, height=size, width=size, **options)
        options["prompt_length"] = prompt_length
    else:
        from backends.tf.saved_model_export import export_saved_model
        export_saved_model(model, out, **sized, **options)
    for name in PROCESSOR_FILES + ("config.json",):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(out, name)):
            shutil.copyfile(src, os.path.join(out, name))
    if size != config_size:
        write_image_size(out, size)
    meta = {"format": fmt, "architecture": arch, "task": TASK_OF[arch], "dtype": dtype or "float32",
            "image_size": size, "generation": options}
    with open(os.path.join(out, META), "w") as fh:
        json.dump(meta, fh, indent=2)
    return meta


def read_meta(artifact: str) -> dict:
    path = os.path.join(artifact, META)
    if not os.path.isfile(path):
        raise ValueError(f"{artifact}: no {META} (not written by blip export)")
    with open(path) as fh:
        return json.load(fh)


# -- command line ---------------------------------------------------------------------------------
def _fail(exc) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def cmd_export(args) -> int:
    try:
        meta = export(args.model_dir, args.out, args.format, args.task, args.dtype, args.num_beams,
                      args.max_new_tokens, args.prompt_length, args.image_size)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        return _fail(exc)
    print(f"wrote {args.format} {meta['task']} artifact of {meta['architecture']} to {args.out}")
    return 0


def cmd_export_parity(args) -> int:
    from .export_parity import compare
    try:
        rows = compare(args.artifact, args.model_dir, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'stage':<28} {'max |diff|':>12} {'tolerance':>10}  result")
        for r in rows:
            diff = "ids" if r["kind"] == "ids" else f"{r['max_abs_diff']:.3e}"
            tol = "equal" if r["kind"] == "ids" else f"{r['atol']:.0e}"
            print(f"{r['stage']:<28} {diff:>12} {tol:>10}  {'ok' if r['ok'] else 'FAIL'}")
        print(f"{len(rows) - len(failed)}/{len(rows)} stages agree")
    return 1 if failed else 0


def add_export_parsers(sub) -> None:
    from .cli import _positive_int
    p = sub.add_parser("export", help="write an ONNX, SavedModel or StableHLO artifact of a checkpoint")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--task", default=None, choices=["caption", "vqa", "itm", "embed"],
                   help="the task the checkpoint must hold (default: whatever it holds)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-beams", type=_positive_int, default=1, help="generating SavedModel / StableHLO only")
    p.add_argument("--max-new-tokens", type=_positive_int, default=20, help="generating SavedModel / StableHLO only")
    p.add_argument("--prompt-length", type=_positive_int, default=None, help="BLIP-2 SavedModel: prompt length")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="square pixel size the artifact takes (default: the config's; another size resizes the "
                        "position table as interpolate_pos_encoding does)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-parity", help="compare an exported artifact with the library, stage by stage and ids")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.set_defaults(func=cmd_export_parity)
