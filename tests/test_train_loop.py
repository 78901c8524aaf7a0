"""The training loop: a tiny run lowers the loss, an interrupted run resumed from its checkpoint
ends with the same weights as an uninterrupted one (a ``blip train`` process really killed with
SIGKILL in torch; stopped in-process in tf and jax), and ``blip train`` / ``blip synthetic`` work."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fixture_utils import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from blip_apps import synthetic
from blip_apps.cli import main
from blip_apps.train import TrainConfig, train
from blip_apps.train.loop import learning_rate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write_dataset(str(tmp_path_factory.mktemp("shapes")), n_train=24, n_test=4, seed=11)


def _cfg(backend, **kw):
    base = dict(task="caption", backend=backend, steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup=2,
                seed=2, save_every=0, eval_size=4, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _same_weights(dir_a, dir_b):
    a = load_file(os.path.join(dir_a, "model.safetensors"))
    b = load_file(os.path.join(dir_b, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k                      # bit for bit


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(1, 40), extra=st.integers(0, 40), lr=st.floats(1e-6, 1.0))
def test_learning_rate_warm_up_properties(warmup, extra, lr):
    """No step trains at rate 0 during warm-up; the peak comes on the warm-up's last step; the rate rises
    through the warm-up and never rises after it."""
    cfg = TrainConfig(steps=warmup + extra, warmup=warmup, lr=lr)
    rates = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert rates[0] == pytest.approx(lr / warmup, rel=1e-12)
    assert rates[warmup - 1] == pytest.approx(lr, rel=1e-12)
    assert all(a < b for a, b in zip(rates[:warmup - 1], rates[1:warmup]))
    ulp = 4 * math.ulp(lr)         # lr * warmup / warmup may round one ulp below the cosine's lr * 1.0
    assert all(a >= b - ulp for a, b in zip(rates[warmup - 1:], rates[warmup:]))


KILL_STEPS, KILL_AFTER = 40, 3     # steps of the run; the checkpoint after which it is killed


def test_killed_cli_run_resumes_to_the_uninterrupted_weights(shapes, tmp_path):
    """``blip train`` killed with SIGKILL once ``checkpoint-3`` is on disk, then ``blip train --resume``:
    the final weights equal an uninterrupted run's bit for bit, and the loss curve step for step."""
    args = ["--task", "caption", "--backend", "torch", "--data", shapes, "--steps", str(KILL_STEPS),
            "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--seed", "2", "--save-every", str(KILL_AFTER),
            "--eval-size", "4", "--threads", "1", "--no-progress"]
    part = str(tmp_path / "part")
    cmd = [sys.executable, "-m", "blip_apps.cli", "train", *args, "--out", part]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = os.path.join(part, f"checkpoint-{KILL_AFTER}", "trainer_state.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(state) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (exit {proc.returncode}): {err}"
    assert os.path.exists(state) and not os.path.exists(os.path.join(part, "model.safetensors"))
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    full = train(None, shapes, str(tmp_path / "full"), _cfg("torch", steps=KILL_STEPS, grad_accum=1),
                 progress=False, log=lambda m: None)
    with open(os.path.join(part, "training_log.json")) as fh:
        log = json.load(fh)
    assert [h["loss"] for h in log["history"]] == [h["loss"] for h in full["history"]]
    _same_weights(str(tmp_path / "full"), part)


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=pytest.mark.slow),
                                     pytest.param("jax", marks=pytest.mark.slow)])
def test_resume_gives_the_uninterrupted_weights(backend, shapes, tmp_path):
    full = train(None, shapes, str(tmp_path / "full"), _cfg(backend), progress=False, log=lambda m: None)
    losses = [h["loss"] for h in full["history"]]
    assert losses[-1] < losses[0]
    part = str(tmp_path / "part")
    first = train(None, shapes, part, _cfg(backend), progress=False, log=lambda m: None, stop_after=3)
    assert first["final"] is None and os.path.isdir(os.path.join(part, "checkpoint-3"))
    rest = train(None, shapes, part, _cfg(backend), resume=True, progress=False, log=lambda m: None)
    assert [h["loss"] for h in rest["history"]] == losses          # same loss curve, step for step
    _same_weights(str(tmp_path / "full"), part)


def test_resume_refuses_other_settings(shapes, tmp_path):
    out = str(tmp_path / "run")
    train(None, shapes, out, _cfg("torch"), progress=False, log=lambda m: None, stop_after=1)
    with pytest.raises(ValueError, match="lr"):
        train(None, shapes, out, _cfg("torch", lr=1e-2), resume=True, progress=False, log=lambda m: None)


@pytest.mark.parametrize("field, value", [("seed", 3), ("batch_size", 2), ("warmup", 3), ("task", "vqa")])
def test_resume_refuses_each_training_setting(shapes, tmp_path, field, value):
    """A setting that shapes the training (seed, batch size, warm-up, task) differs from the checkpoint's:
    ``--resume`` is refused, naming it."""
    out = str(tmp_path / "run")
    train(None, shapes, out, _cfg("torch"), progress=False, log=lambda m: None, stop_after=1)
    with pytest.raises(ValueError, match=field):
        train(None, shapes, out, _cfg("torch", **{field: value}), resume=True, progress=False, log=lambda m: None)


def test_a_resumed_runs_log_holds_every_step(shapes, tmp_path):
    """Stopped after 2 of 6 steps and resumed: the returned history and training_log.json list steps 1..6,
    the first two with the losses the first run recorded."""
    out = str(tmp_path / "run")
    first = train(None, shapes, out, _cfg("torch"), progress=False, log=lambda m: None, stop_after=2)
    rest = train(None, shapes, out, _cfg("torch"), resume=True, progress=False, log=lambda m: None)
    with open(os.path.join(out, "training_log.json")) as fh:
        log = json.load(fh)
    for history in (rest["history"], log["history"]):
        assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
        assert [h["loss"] for h in history[:2]] == [h["loss"] for h in first["history"]]


@pytest.mark.parametrize("stop_after", [None, 3])
def test_step_s_trains_at_the_rate_of_step_s(shapes, tmp_path, monkeypatch, stop_after):
    """The rate of the schedule for step s (0-based) is the one step s trains at, in a fresh run and in the
    part of a run resumed after step 3."""
    import importlib
    run_mod = importlib.import_module("blip_apps.train.run")
    asked = []

    def spy(step, cfg):
        asked.append(step)
        return learning_rate(step, cfg)
    out = str(tmp_path / "run")
    if stop_after:
        train(None, shapes, out, _cfg("torch"), progress=False, log=lambda m: None, stop_after=stop_after)
    monkeypatch.setattr(run_mod, "learning_rate", spy)
    train(None, shapes, out, _cfg("torch"), resume=bool(stop_after), progress=False, log=lambda m: None)
    assert asked == list(range(stop_after or 0, 6))


def test_cli_synthetic_and_train(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert main(["synthetic", data, "--train", "16", "--test", "4", "--seed", "1"]) == 0
    out = str(tmp_path / "out")
    assert main(["train", "--task", "vqa", "--backend", "torch", "--data", data, "--out", out, "--steps", "4",
                 "--batch-size", "4", "--warmup", "1", "--save-every", "2", "--eval-every", "2",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "fresh tiny vqa model" in captured.err and "vqa_accuracy" in captured.err
    assert {"config.json", "model.safetensors", "vocab.txt", "preprocessor_config.json",
            "training_log.json"} <= set(os.listdir(out))
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "optimizer.pt"))
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert log["steps"] == 4 and len(log["history"]) == 4 and "eval" in log["history"][1]
    assert main(["train", "--task", "caption", "--data", str(tmp_path / "nowhere"), "--out", out,
                 "--steps", "1", "--no-progress"]) == 1
    assert "train/ folder" in capsys.readouterr().err


# Settings outside their range, each of which was taken (a negative warm-up or clip), trained nothing (a batch of 0
# rows) or failed deep in the loop or a framework (0 micro-batches a step, a negative learning rate, -2 threads).
_BAD_SETTINGS = [("steps", 0), ("batch_size", 0), ("grad_accum", 0), ("warmup", -3), ("eval_every", -1),
                 ("save_every", -1), ("eval_size", -1), ("threads", -2), ("lr", -1.0), ("lr", 0.0),
                 ("lr", float("nan")), ("weight_decay", -0.5), ("clip", -1.0), ("eps", 0.0),
                 ("itc_temperature", 0.0), ("betas", (0.9, 1.0)), ("steps", 2.5), ("task", "detect"),
                 ("backend", "mxnet")]


@pytest.mark.parametrize("field,value", _BAD_SETTINGS)
def test_a_setting_out_of_range_is_refused_before_training(field, value):
    kw = {"backend": "torch", field: value}
    with pytest.raises(ValueError, match=field):
        _cfg(**kw)


def test_train_and_synthetic_commands_refuse_bad_numbers_in_one_line(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert main(["synthetic", data, "--train", "-5"]) == 1
    assert "error: n_train must be an integer >= 0, got -5" in capsys.readouterr().err
    assert not os.path.exists(data)
    assert main(["synthetic", data, "--train", "4", "--test", "2"]) == 0
    for flag, value in (("--grad-accum", "0"), ("--batch-size", "0"), ("--lr", "-1"), ("--threads", "-2")):
        out = str(tmp_path / "out")
        argv = ["train", "--task", "caption", "--data", data, "--out", out, "--steps", "2", "--no-progress", flag,
                value]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"error: {flag[2:].replace('-', '_')} must be" in err and "Traceback" not in err
        assert not os.path.exists(out)


def _adamw_state(checkpoint):
    import torch
    return torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)["state"]


@pytest.mark.parametrize("stop_after", [2, 3])
def test_resume_restores_the_optimizer_state(shapes, tmp_path, stop_after):
    """Stopped after k of 6 steps and resumed for one step: the checkpoint after step k + 1 holds the AdamW
    state of an uninterrupted run at that step: every parameter's step count is k + 1 (torch.optim counts
    one per step taken) and its two moments equal the uninterrupted run's bit for bit."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(None, shapes, full, _cfg("torch", save_every=1), progress=False, log=lambda m: None)
    train(None, shapes, part, _cfg("torch"), progress=False, log=lambda m: None, stop_after=stop_after)
    train(None, shapes, part, _cfg("torch"), resume=True, progress=False, log=lambda m: None, stop_after=1)
    name = f"checkpoint-{stop_after + 1}"
    want, got = _adamw_state(os.path.join(full, name)), _adamw_state(os.path.join(part, name))
    assert set(got) == set(want) and len(want) > 0
    for i, state in got.items():
        assert float(state["step"]) == stop_after + 1, i
        for moment in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(state[moment].numpy(), want[i][moment].numpy()), (i, moment)


TRAIN_FLAGS = {     # blip train flag and value -> the TrainConfig field and value it sets
    ("--task", "vqa"): ("task", "vqa"), ("--backend", "jax"): ("backend", "jax"), ("--steps", "5"): ("steps", 5),
    ("--batch-size", "6"): ("batch_size", 6), ("--grad-accum", "3"): ("grad_accum", 3), ("--lr", "0.01"): ("lr", 0.01),
    ("--warmup", "4"): ("warmup", 4), ("--weight-decay", "0.5"): ("weight_decay", 0.5), ("--clip", "0"): ("clip", 0.0),
    ("--freeze-vision",): ("freeze_vision", True), ("--eval-every", "2"): ("eval_every", 2),
    ("--save-every", "3"): ("save_every", 3), ("--eval-size", "7"): ("eval_size", 7), ("--seed", "9"): ("seed", 9),
    ("--threads", "2"): ("threads", 2), ("--bf16",): ("mixed_precision", "bf16"),
}


def test_train_command_passes_every_flag_to_the_config(tmp_path, monkeypatch, capsys):
    """Each ``blip train`` flag reaches its TrainConfig field (a table of flag -> field), and ``--resume``
    the resume argument; without flags the config is TrainConfig's defaults but for ``--threads``, whose
    default is 1."""
    import importlib
    run_mod = importlib.import_module("blip_apps.train.run")
    seen = []

    def fake_train(model_dir, data_dir, out, cfg, resume=False, **kw):
        seen.append((model_dir, data_dir, out, cfg, resume))
        return {"history": [], "final": None, "seconds": 0.0}
    monkeypatch.setattr(run_mod, "train", fake_train)
    argv = ["train", "--data", "d", "--out", str(tmp_path / "o"), "--resume", "--no-progress"]
    for flag in TRAIN_FLAGS:
        argv += list(flag)
    assert main(argv) == 0
    [(model_dir, data_dir, out, cfg, resume)] = seen
    assert (model_dir, data_dir, out, resume) == (None, "d", str(tmp_path / "o"), True)
    assert {field: getattr(cfg, field) for field, _ in TRAIN_FLAGS.values()} == dict(TRAIN_FLAGS.values())
    seen.clear()
    assert main(["train", "--task", "caption", "--data", "d", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert seen[0][3] == TrainConfig(task="caption", threads=1) and seen[0][4] is False


def test_train_command_with_grad_accum_is_the_api_run(shapes, tmp_path):
    """``blip train --grad-accum 2`` trains what ``train(...)`` with ``grad_accum=2`` does: the same loss curve and
    bit-for-bit the same final weights."""
    args = ["--task", "caption", "--backend", "torch", "--data", shapes, "--steps", "3", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup", "2", "--seed", "2", "--eval-size", "4",
            "--threads", "1", "--no-progress"]
    cli = str(tmp_path / "cli")
    assert main(["train", *args, "--out", cli]) == 0
    api = train(None, shapes, str(tmp_path / "api"), _cfg("torch", steps=3, batch_size=2, grad_accum=2),
                progress=False, log=lambda m: None)
    with open(os.path.join(cli, "training_log.json")) as fh:
        log = json.load(fh)
    assert log["config"]["grad_accum"] == 2
    assert [h["loss"] for h in log["history"]] == [h["loss"] for h in api["history"]]
    _same_weights(str(tmp_path / "api"), cli)
