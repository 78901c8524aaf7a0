"""Smoke test of the benchmark suite: ``run_all.py --quick`` end to end in a subprocess, JSON structure only.

No timing is asserted (figures depend on the machine and its load). What is asserted: every
workload and case is present, every requested impl has a status with a reason when it did not run,
the figures of a run that did are complete, and our PyTorch backend's outputs in the benchmark
agree with transformers' (the benchmark compares like with like). To stay fast the run uses our
PyTorch backend and both transformers references (TF included, whose BLIP-2 absence and beam-search
failure exercise the skip and error paths); JAX and TF backends only add compile time here.
"""
import json
import os
import subprocess
import sys

from blip_core.numerics import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["torch", "hf-torch", "hf-tf"]
CASES = {("vision", "forward"), ("caption", "greedy"), ("caption", "beam3"), ("itm", "forward"),
         ("blip2-qformer", "forward"), ("blip2-generate", "greedy"), ("throughput", "greedy")}
FIGURES = ("framework", "version", "device", "dtype", "threads", "median_s", "min_s", "n", "first_call_s",
           "peak_rss_delta_mb", "floor_s", "floor_fraction", "achieved_gflops_per_s")


def test_run_all_quick_writes_complete_results(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--quick", "--threads", "1",
                           "--backends", ",".join(IMPLS), "--out", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary" in proc.stdout and "issue targets" in proc.stdout
    data = json.loads(out.read_text())

    assert data["schema"] == "blip-bench/1" and data["options"]["quick"] is True and not data["workload_errors"]
    env = data["environment"]
    assert env["dtype"] == "float32" and env["usable_cpus"] >= 1
    for fw in ("torch", "tensorflow"):
        assert env["frameworks"][fw]["available"] and env["frameworks"][fw]["version"]
        assert data["matmul"][fw]["best_flops_per_s"] > 0
    assert data["memory_bandwidth"]["best_bytes_per_s"] > 0

    assert {(c["workload"], c["mode"]) for c in data["cases"]} == CASES
    for case in data["cases"]:
        assert case["flops"] > 0 and abs(sum(case["flops_breakdown"].values()) - case["flops"]) <= 1e-6 * case["flops"]
        assert list(case["results"]) == IMPLS
        for impl, r in case["results"].items():
            assert r["status"] in ("ok", "skipped", "error"), (case["case"], impl, r)
            if r["status"] != "ok":
                assert r["reason"], (case["case"], impl)
                continue
            missing = [k for k in FIGURES if r.get(k) is None and not (k == "peak_rss_delta_mb" and sys.platform != "linux")]
            assert not missing, (case["case"], impl, missing)
            assert r["n"] == len(r["times_s"]) >= 1 and r["median_s"] > 0 and r["floor_s"] > 0
            if case["mode"] != "forward":   # decoding also has a weight-bandwidth floor
                assert case["weight_bytes"] > 0 and r["bandwidth_floor_s"] > 0
        for impl in ("torch", "hf-torch"):
            assert case["results"][impl]["status"] == "ok", (case["case"], impl, case["results"][impl])
        check = case["results"]["torch"]["check"]
        assert check["against"] == "hf-torch"
        if case["mode"] == "forward":
            assert check["max_abs_diff"] <= tolerance("default", "float32")[0], (case["case"], check)
        else:
            assert check["ids_equal"], (case["case"], check)
        assert case["ratios"]["torch/hf-torch"] > 0
        if case["workload"].startswith("blip2"):   # transformers has no TF BLIP-2
            assert case["results"]["hf-tf"]["status"] == "skipped" and "TFBlip2" in case["results"]["hf-tf"]["reason"]

    targets = data["targets"]
    assert targets and all({"target", "impl", "value", "threshold", "met"} <= set(t) for t in targets)

    # the workload that keeps its own table: low precision (with agreement)
    low = data["sections"]["lowprec"]
    assert [r["variant"] for r in low["rows"]] == ["float32", "bfloat16", "int8"]
    for r in low["rows"]:
        assert not r["error"] and r["generate_s"] > 0 and 0.0 <= r["heldout_agreement"] <= 1.0, r
    from benchmarks.report import render
    table = render(data)
    assert "PyTorch low precision" in table


def test_isolated_run_gathers_each_workloads_process(tmp_path):
    """``--isolate`` runs every workload in a fresh process of its own: the parent gathers their cases, their
    extra tables and every matmul / bandwidth measurement, and takes the best of them for the floors."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--quick", "--threads", "1",
                           "--backends", "torch,hf-torch", "--only", "itm,lowprec", "--isolate", "--out", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("in a fresh process") == 2 and proc.stdout.count("== summary") == 1
    data = json.loads(out.read_text())
    assert data["options"]["isolate"] is True and not data["workload_errors"]
    assert set(data["workload_wall_s"]) == {"itm", "lowprec"}
    assert [(c["workload"], c["mode"]) for c in data["cases"]] == [("itm", "forward")]
    assert [r["variant"] for r in data["sections"]["lowprec"]["rows"]] == ["float32", "bfloat16", "int8"]
    seen = data["matmul"]["torch"]["measured_flops_per_s"]
    assert len(seen) == 4 and data["matmul"]["torch"]["best_flops_per_s"] == max(seen)   # before and after each
    bw = data["memory_bandwidth"]
    assert len(bw["measured_bytes_per_s"]) == 4 and bw["best_bytes_per_s"] == max(bw["measured_bytes_per_s"])
    itm = data["cases"][0]["results"]
    assert itm["torch"]["status"] == itm["hf-torch"]["status"] == "ok"
    assert itm["torch"]["floor_s"] == data["cases"][0]["flops"] / max(seen)   # floors from the merged best rate
    assert itm["torch"]["check"]["max_abs_diff"] <= tolerance("default", "float32")[0]


def test_results_path_never_replaces_a_run(tmp_path, monkeypatch):
    """The default results file of a partial run is named after its workloads, and a second run the same
    day gets a file of its own instead of replacing the first."""
    import datetime
    from benchmarks import run_all
    monkeypatch.setattr(run_all, "RESULTS_DIR", str(tmp_path))
    day = datetime.date.today().isoformat()
    full = run_all.results_path("m", run_all.WORKLOADS, False)
    assert full == str(tmp_path / f"{day}-m.json")
    assert run_all.results_path("m", ["lowprec"], False) == str(tmp_path / f"{day}-m-lowprec.json")
    partial = run_all.results_path("m", ["caption", "vision"], True)
    assert partial == str(tmp_path / f"{day}-m-vision-caption-quick.json")
    (tmp_path / f"{day}-m.json").write_text("{}")
    second = run_all.results_path("m", run_all.WORKLOADS, False)
    assert second != full and second.startswith(str(tmp_path / f"{day}-m-")) and second.endswith(".json")


def test_gpu_workload_runs_its_code_on_the_cpu(tmp_path):
    """``benchmarks/gpu.py`` is run where a GPU is lent, rarely: its code paths run here on the CPU (tiny configs,
    ``--device cpu``) so that it still works then. Timings are not asserted; the checks it prints are, against
    transformers (float32 logits of every impl, greedy ids equal at float32), and the README table renders."""
    out, prof = tmp_path / "gpu.json", tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--device", "cpu", "--quick",
                           "--batches", "1,2", "--budget", "0.2", "--min-reps", "1", "--max-reps", "2", "--heldout", "4",
                           "--profile", "--profile-out", str(prof), "--out", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    impls = ["torch", "tf", "jax", "hf-torch"]
    assert [data["impls"][n]["status"] for n in impls] == ["ok"] * 4
    assert [(c["dtype"], c["batch"]) for c in data["cases"]] == [("float32", 1), ("float32", 2), ("bfloat16", 1),
                                                                   ("bfloat16", 2)]
    for case in data["cases"]:
        assert case["floor_s"] > 0
        for n in impls:
            row = case["results"][n]
            assert row["error"] is None and row["median_s"] > 0 and row["captions_per_s"] > 0, (case["dtype"], n, row)
            if case["dtype"] == "float32":
                assert row["ids_equal_hf_torch"] == 1.0, (case["batch"], n)
    for n in impls:
        assert data["checks"]["logits"][n]["max_abs_diff"] <= tolerance("default", "float32")[0], n
    agree = data["checks"]["bundled_agreement"]
    assert agree["images"] == 4 and set(agree["bfloat16_vs_float32"]) == set(impls)
    assert agree["float32_vs_hf_torch"]["hf-torch"] == 1.0
    assert set(data["profile"]) == {"torch:float32", "torch:bfloat16", "hf-torch:float32", "hf-torch:bfloat16"}
    assert all(p["aten_calls"] > 0 for p in data["profile"].values()) and "== torch float32" in prof.read_text()
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--markdown", str(out)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "| float32 | 2 |" in table and "| bfloat16 | 1 |" in table


def test_coldstart_times_the_torch_model_users_run():
    """The cold-start, per-token and memory children build their models from a config; torch's is put in eval mode
    (what ``from_pretrained`` returns), since in training mode decoding runs without its weight layouts and the
    figures would not be those of the model users run."""
    from backends.torch import layout
    from benchmarks import coldstart
    model, size = coldstart._model("torch", quick=True)
    assert not any(m.training for m in model.modules())
    import numpy as np
    import torch
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        model.generate(pixel_values=px, max_new_tokens=3, min_new_tokens=3)
    lins = [m for m in model.text_decoder.modules() if isinstance(m, layout.Linear)]
    assert any(m._layout is not None for m in lins), f"no decoding layout among {len(lins)} layers"


def test_onnx_benchmark_times_the_torch_model_users_run():
    """The ONNX workload's torch column is built from a config and exported; it is timed in eval mode (the export
    leaves the caller's modes as they were, so the benchmark sets it itself)."""
    import backends.torch as bt
    from benchmarks import onnx
    from benchmarks.caption import config
    model = onnx.torch_model(bt.BlipForConditionalGeneration, config(True))
    assert not any(m.training for m in model.modules())
