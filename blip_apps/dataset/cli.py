"""Command-line glue: data-set options for ``caption`` / ``vqa`` / ``match``, and ``embed``, ``index``, ``search``.

``blip caption SRC... --out results.parquet`` (and ``vqa``, ``match``, ``embed``) runs a data-set
job; without ``--out``, ``caption`` / ``vqa`` / ``match`` keep their one-image behaviour. The exit
status is 1 when some items failed (they are listed in the errors file), 0 otherwise.
"""
from __future__ import annotations

import json
import os
import sys

from .tasks import TASK_MODEL, TaskSpec


def _bundled(args, task):
    from ..cli import _model_dir
    return _model_dir(args, TASK_MODEL[task])


def add_dataset_args(p, out_required=False, with_out=True) -> None:
    """The options of a data-set run (a parser that already has --model/--backend/--dtype)."""
    from ..cli import _positive_int
    g = p.add_argument_group("data set (with --out)")
    if with_out:
        g.add_argument("--out", required=out_required, default=None,
                       help="results file (.parquet or .jsonl); makes the inputs a data set: directories "
                            "(recursive), globs, file lists (.txt), Parquet / CSV tables, tar shards")
    g.add_argument("--engine", default="local", choices=("local", "ray"))
    g.add_argument("--resume", action="store_true", help="finish an interrupted run: only the missing items")
    g.add_argument("--overwrite", action="store_true", help="start again, replacing --out and its parts")
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--num-workers", type=_positive_int, default=1, help="ray: model actors (one model each)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs each model actor reserves")
    g.add_argument("--address", default=None, help="ray: join this cluster (default: start a local Ray)")
    g.add_argument("--threads", type=_positive_int, default=2, help="local: decoding threads")
    g.add_argument("--part-size", type=_positive_int, default=512, help="rows per committed part")
    g.add_argument("--path-column", default=None, help="table column with image paths")
    g.add_argument("--bytes-column", default=None, help="Parquet column with encoded image bytes")
    g.add_argument("--id-column", default=None, help="table column with item ids")
    g.add_argument("--text-column", default=None,
                   help="table column (or tar member extension) with a text per item: vqa question, match text, "
                        "embed text")
    g.add_argument("--text-length", type=int, default=0, help="tokens texts are padded to (default: the model's limit)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args, task: str, inputs, out=None, **spec_kwargs) -> int:
    from ..cli import CliError
    from .output import OutputError
    from .run import run
    from .sources import SourceError
    model = _bundled(args, task)
    try:
        spec = TaskSpec(task=task, model=model, backend=args.backend, dtype=args.dtype, batch_size=args.batch_size,
                        text_length=args.text_length, **spec_kwargs)
        summary = run(spec, inputs, out or args.out, engine=args.engine, resume=args.resume, overwrite=args.overwrite,
                      path_column=args.path_column, bytes_column=args.bytes_column, id_column=args.id_column,
                      text_column=args.text_column, part_size=args.part_size, threads=args.threads,
                      num_workers=args.num_workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
                      progress=not args.no_progress)
    except (SourceError, OutputError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:      # a wrong model class, a bad setting
        raise CliError(str(exc)) from None
    print(f"{summary.results} result(s) in {summary.out}; {summary.errors} error(s) in {summary.errors_file}",
          file=sys.stderr)
    return 1 if summary.errors else 0


def dataset_caption(args) -> int:
    return run_from_args(args, "caption", args.images, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                         prompt=args.prompt)


def dataset_vqa(args) -> int:
    from ..cli import CliError
    if not args.question and not args.text_column:
        raise CliError("vqa over a data set needs a QUESTION or --text-column")
    return run_from_args(args, "vqa", [args.image], num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                         question=args.question or None)


def dataset_match(args) -> int:
    from ..cli import CliError
    if not args.texts and not args.text_column:
        raise CliError("match over a data set needs TEXT arguments or --text-column")
    return run_from_args(args, "match", [args.image], texts=tuple(args.texts))


def cmd_embed(args) -> int:
    return run_from_args(args, "embed", args.inputs)


def cmd_index(args) -> int:
    from ..cli import CliError
    from .index import build_index
    from .output import read_rows
    src = args.inputs[0] if len(args.inputs) == 1 else None
    status = 0
    if src and src.lower().endswith((".parquet", ".jsonl")) and os.path.isfile(src) and _is_embeddings(src, read_rows):
        embeddings = src
    else:
        os.makedirs(args.out, exist_ok=True)
        embeddings = os.path.join(args.out, "embeddings.parquet")
        status = run_from_args(args, "embed", args.inputs, out=embeddings)
    try:
        info = build_index(embeddings, args.out, kind=args.kind)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"index {args.out}: {info['images']} image(s), {info['texts']} text(s), {info['kind']}", file=sys.stderr)
    return status


def _is_embeddings(path, read_rows):
    for r in read_rows(path):
        return "image_embedding" in r
    return False


def cmd_search(args) -> int:
    from ..cli import CliError
    from .index import Index
    try:
        index = Index(args.index)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if (args.query is None) == (args.image is None):
        raise CliError("give a query TEXT or --image IMG (one of them)")
    model = args.model or index.info.get("model")
    backend = args.backend or index.info.get("backend") or "torch"
    if args.model is None:
        print(f"using the index's model {model} ({backend})", file=sys.stderr)
    from .tasks import Worker
    worker = Worker(TaskSpec(task="embed", model=model, backend=backend, batch_size=1))
    if args.image is None:
        vec = worker.embed_texts([args.query])[0]
        hits = [{"id": i, "score": s} for i, s in index.search_images(vec, args.k)]
    else:
        try:
            with open(args.image, "rb") as fh:
                rec = worker.prepare({"id": args.image, "data": fh.read(), "text": None, "error": None})
        except OSError as exc:
            raise CliError(f"{args.image}: {exc.strerror or exc}") from None
        if rec.get("error"):
            raise CliError(f"{args.image}: {rec['error']}")
        vec = worker.run([rec])[0]["image_embedding"]
        if index.text_vecs is not None and not args.images_only:
            hits = [{"id": i, "text": t, "score": s} for i, t, s in index.search_texts(vec, args.k)]
        else:
            hits = [{"id": i, "score": s} for i, s in index.search_images(vec, args.k)]
    for h in hits:
        if args.json:
            print(json.dumps(h))
        else:
            print(f"{h['score']:.4f}\t{h['id']}" + (f"\t{h['text']}" if "text" in h else ""))
    return 0


def add_dataset_parsers(sub) -> None:
    """Register ``embed``, ``index`` and ``search``."""
    from blip_core import BACKENDS
    from ..cli import _positive_int
    from .index import KINDS

    def model_args(p, backend_default="torch"):
        p.add_argument("--model", default=None, help="BlipForImageTextRetrieval directory (default: the bundled one)")
        p.add_argument("--backend", default=backend_default, choices=BACKENDS)
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("embed", help="ITC image (and text) embeddings of a data set")
    p.add_argument("inputs", nargs="+", metavar="SRC")
    model_args(p)
    add_dataset_args(p, out_required=True)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="a search index from 'blip embed' output or from images")
    p.add_argument("inputs", nargs="+", metavar="SRC", help="an embed output (.parquet/.jsonl) or image sources")
    p.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    p.add_argument("--kind", default="auto", choices=KINDS,
                   help="numpy brute force, faiss HNSW, or auto (faiss when installed and the index is large)")
    model_args(p)
    add_dataset_args(p, with_out=False)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="top-k images for a text, or texts (else images) for an image")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("query", nargs="?", default=None, metavar="TEXT")
    p.add_argument("--image", default=None, metavar="IMG")
    p.add_argument("-k", "--top-k", dest="k", type=_positive_int, default=5)
    p.add_argument("--images-only", action="store_true", help="an image query searches images even if texts exist")
    p.add_argument("--json", action="store_true")
    model_args(p, backend_default=None)
    p.set_defaults(func=cmd_search)
