"""``blip bench``: the benchmark suite from the ``blip`` command line (same options as ``run_all.py``)."""
from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    """Register ``blip bench [--quick] [--backends ...] [--only ...] [--threads N] ...``."""
    from . import run_all
    p = subparsers.add_parser("bench", help="benchmark every backend against transformers and the compute floor",
                              description=run_all.__doc__.split("\n", 1)[0])
    run_all.add_arguments(p)
    p.set_defaults(func=run_all.run)
