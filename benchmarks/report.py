"""Render a results JSON written by ``run_all.py`` as the README's markdown tables.

    python benchmarks/report.py benchmarks/results/<file>.json
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__" and not __package__:   # a plain script: import as the package (PEP 366)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

from .common import IMPLS   # noqa: E402

IMPL_ORDER = IMPLS   # our backends, then the transformers references


def _cell(r: dict) -> str:
    if r.get("status") != "ok":
        return "n/a" if r.get("status") == "skipped" else "error"
    if r.get("floor_fraction") is None:      # no floor for this impl (onnxruntime's column)
        return f"{r['median_s']:.3f} s"
    return f"{r['median_s']:.3f} s ({100 * r['floor_fraction']:.0f}%)"


def render(results: dict) -> str:
    # the onnxruntime column appears when the run has it (run_all.py --only ...,onnx)
    IMPL_ORDER = IMPLS + tuple(i for i in ("onnxruntime",) if any(i in c["results"] for c in results["cases"]))
    env = results["environment"]
    fw = env["frameworks"]
    lines = [
        f"Machine: {env['cpu']}, {env['usable_cpus']} cores, {env['memory_gb']:.0f} GiB; "
        f"{results['options'].get('dtype', 'float32')}; threads: "
        + ", ".join(f"{k} {v.get('threads')}" for k, v in fw.items() if v.get("available"))
        + "; versions: " + ", ".join(f"{k} {v.get('version')}" for k, v in fw.items() if v.get("available")),
        f"Command: `{results['command']}` ({results['created']}, {results['wall_s']:.0f} s).",
        "Matmul rate used for the floors (best of 5, GFLOP/s, float32 2048x2048): "
        + ", ".join(f"{k} {v['best_flops_per_s'] / 1e9:.0f}" for k, v in results["matmul"].items()),
        "",
        "Median seconds per call (percentage: the framework's own compute floor / measured time).",
        "",
        "| workload | case | " + " | ".join(IMPL_ORDER) + " |",
        "| --- | --- | " + " | ".join("---" for _ in IMPL_ORDER) + " |",
    ]
    for c in results["cases"]:
        cells = [_cell(c["results"].get(i, {"status": "skipped"})) for i in IMPL_ORDER]
        lines.append(f"| {c['workload']} | {c['case']} | " + " | ".join(cells) + " |")
    lines += ["", "Peak resident memory added by the first call (MB):", "",
              "| workload | case | " + " | ".join(IMPL_ORDER) + " |",
              "| --- | --- | " + " | ".join("---" for _ in IMPL_ORDER) + " |"]
    for c in results["cases"]:
        cells = []
        for i in IMPL_ORDER:
            r = c["results"].get(i, {})
            mb = r.get("first_call_peak_rss_delta_mb") if r.get("status") == "ok" else None
            cells.append("n/a" if mb is None else f"{mb:.0f}")
        lines.append(f"| {c['workload']} | {c['case']} | " + " | ".join(cells) + " |")
    lines += ["", "Targets of issues 8 and 19:", "", "| target | impl | value | threshold | met |", "| --- | --- | --- | --- | --- |"]
    for t in results.get("targets", []):
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['impl']} | {value} | {t['comparison']} {t['threshold']} | {met} |")
    lines += _sections(results.get("sections", {}))
    return "\n".join(lines) + "\n"


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _sections(sections: dict) -> list:
    """Tables of the workloads that record their own rows (``lowprec``)."""
    lines = []
    low = sections.get("lowprec")
    if low:
        lines += ["", f"{low['title']}; load average {low['load_average'][0]:.1f}:", "",
                  "| variant | generate s | vision s | decode ms/token | speed-up (generate) | speed-up (decode) "
                  f"| captions equal to float32 ({low['heldout_images']} held-out images) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in low["rows"]:
            lines.append(f"| {r['variant']} | {_f(r['generate_s'])} | {_f(r['vision_s'])} | "
                         f"{_f(r['decode_per_token_s'] and 1e3 * r['decode_per_token_s'], '{:.1f}')} | "
                         f"{_f(r['speedup_generate'], '{:.2f}x')} | {_f(r['speedup_decode'], '{:.2f}x')} | "
                         f"{_f(r['heldout_agreement'] and 100 * r['heldout_agreement'], '{:.1f}%')} |")
    return lines


START, END = "<!-- benchmark-table:start", "<!-- benchmark-table:end -->"


def update_readme(path: str, results: dict) -> bool:
    """Replace the README's text between the benchmark-table markers with ``render(results)``."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return False
    i = text.index("\n", i) + 1
    table = render(results)                     # rendered before the file is opened: a failure leaves it whole
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:i] + table + text[j:])
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        sys.stdout.write(render(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
