"""Data-set scale captioning, VQA, embedding and matching, on one machine or a Ray cluster.

``run(TaskSpec(task, model, ...), inputs, out, engine="local" | "ray", resume=...)`` processes
every item of ``inputs`` (directories, globs, file lists, Parquet / CSV tables, tar shards:
``sources``) and writes ``out`` (Parquet or JSON Lines, sorted by item id) and an errors file
(``output``). The two engines (``engines``) run the same per-batch code (``tasks``) and write the
same bytes. ``index`` builds and searches an index over the ITC embeddings. The command line
(``blip caption/vqa/match ... --out``, ``blip embed``, ``blip index``, ``blip search``) is ``cli``.

Nothing here imports a framework at import time; Ray and pyarrow are imported when used.
"""
from __future__ import annotations

from .run import ENGINES, Summary, run
from .tasks import TASKS, TaskSpec

__all__ = ["run", "TaskSpec", "Summary", "TASKS", "ENGINES"]
