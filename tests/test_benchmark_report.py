"""The README table writer (benchmarks/report.py) on results where a case compares only some impls
(the ONNX Runtime rows: torch vs onnxruntime), and a failed render leaves the README untouched."""
import pytest

from benchmarks import report


def _results(cases):
    fw = {"available": True, "threads": 2, "version": "1"}
    return {"environment": {"cpu": "cpu", "usable_cpus": 2, "memory_gb": 24.0,
                            "frameworks": {"torch": fw, "tensorflow": fw, "jax": fw}},
            "options": {"dtype": "float32"}, "command": "python benchmarks/run_all.py", "created": "now",
            "wall_s": 1.0, "matmul": {"torch": {"best_flops_per_s": 2e11}}, "cases": cases, "targets": []}


def _ok(median, floor=None, mb=None):
    r = {"status": "ok", "median_s": median, "floor_fraction": floor}
    if mb is not None:
        r["first_call_peak_rss_delta_mb"] = mb
    return r


def test_onnx_rows_without_floor_or_memory_render_their_own_column():
    cases = [{"workload": "caption", "case": "greedy", "results": {"torch": _ok(1.5, 0.4, 10), "tf": _ok(1.2, 0.5, 3)}},
             {"workload": "caption-onnx", "case": "greedy", "results": {"torch": _ok(1.7), "onnxruntime": _ok(1.1)}}]
    text = report.render(_results(cases))
    header = next(line for line in text.splitlines() if line.startswith("| workload"))
    assert header.rstrip(" |").endswith("onnxruntime")
    onnx = next(line for line in text.splitlines() if line.startswith("| caption-onnx"))
    assert "1.100 s" in onnx and "1.700 s" in onnx and "(" not in onnx
    first = next(line for line in text.splitlines() if line.startswith("| caption | greedy"))
    assert "1.500 s (40%)" in first


def test_a_failed_render_leaves_the_readme_whole(tmp_path):
    readme = tmp_path / "README.md"
    body = f"intro\n{report.START} -->\nold table\n{report.END}\nrest\n"
    readme.write_text(body)
    broken = _results([{"workload": "caption", "case": "greedy", "results": {"torch": {"status": "ok"}}}])
    with pytest.raises(KeyError):
        report.update_readme(str(readme), broken)
    assert readme.read_text() == body
