"""``run(...)``: one data-set job from inputs to the final output file, in either engine."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .output import Parts, errors_path
from .sources import plan
from .tasks import TaskSpec

ENGINES = ("local", "ray")
TASK_CLASSES = {"caption": ("BlipForConditionalGeneration", "Blip2ForConditionalGeneration"),
                "vqa": ("BlipForQuestionAnswering", "Blip2ForConditionalGeneration"),
                "match": ("BlipForImageTextRetrieval", "Blip2ForImageTextRetrieval"),
                "embed": ("BlipForImageTextRetrieval",)}


@dataclass
class Summary:
    out: str
    errors_file: str
    results: int
    errors: int
    engine: str

    @property
    def ok(self) -> bool:
        return self.errors == 0


def embedding_dim(model_dir: str):
    from blip_core.configs import load_config
    return getattr(load_config(model_dir), "image_text_hidden_size", None)


def check_model(spec: TaskSpec) -> None:
    """Refuse a model of the wrong class before any engine starts (one line, not a Ray traceback)."""
    from blip_core import architecture_of
    if not os.path.isdir(spec.model):
        raise ValueError(f"{spec.model}: not a model directory")
    arch = architecture_of(spec.model)
    if arch not in TASK_CLASSES[spec.task]:
        raise ValueError(f"{spec.model}: '{spec.task}' needs a {' or '.join(TASK_CLASSES[spec.task])} checkpoint, "
                         f"this one is a {arch}")


def run(spec: TaskSpec, inputs, out: str, *, engine="local", resume=False, overwrite=False, path_column=None,
        bytes_column=None, id_column=None, text_column=None, part_size=512, threads=2, num_workers=1,
        address=None, cpus_per_worker=1.0, progress=True) -> Summary:
    """Process every item of ``inputs`` with ``spec``; write ``out`` (.parquet / .jsonl) and its errors file."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    check_model(spec)
    dim = embedding_dim(spec.model) if spec.task == "embed" else None
    parts = Parts(out, spec.task, spec.settings(), dim=dim, resume=resume, overwrite=overwrite)
    units, total = plan(list(inputs), path_column=path_column, bytes_column=bytes_column, id_column=id_column,
                        text_column=text_column, skip=parts.done,
                        files_per_unit=min(1024, max(16, 2 * spec.batch_size)))
    if parts.finished_before:
        units = []
    if units:
        if engine == "local":
            from .engines import run_local
            run_local(spec, units, parts, total, part_size=part_size, threads=threads, progress=progress)
        else:
            from .engines import run_ray
            run_ray(spec, units, parts, total, part_size=part_size, num_workers=num_workers, address=address,
                    cpus_per_worker=cpus_per_worker, progress=progress, dim=dim)
    n_ok, n_err = parts.merge()
    return Summary(out=os.path.abspath(out), errors_file=os.path.abspath(errors_path(out)), results=n_ok,
                   errors=n_err, engine=engine)
