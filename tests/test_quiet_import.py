"""The command line keeps TensorFlow's C++ start-up lines off stderr (``blip_apps.quiet``), and only those."""
import os
import subprocess
import sys

import pytest

from blip_apps.quiet import _QuietFinder, quiet_import
from fixture_utils import ROOT


def _module(tmp_path, monkeypatch, name: str, body: str):
    (tmp_path / f"{name}.py").write_text("import os, sys\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def _finders(name):
    return [f for f in sys.meta_path if isinstance(f, _QuietFinder) and f.name == name]


def test_the_first_import_writes_nothing_to_stderr(tmp_path, monkeypatch, capfd):
    _module(tmp_path, monkeypatch, "noisy_ok", "os.write(2, b'a C++ note\\n')\nVALUE = 42\n")
    quiet_import("noisy_ok")
    try:
        import noisy_ok
    finally:
        for f in _finders("noisy_ok"):
            sys.meta_path.remove(f)
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert noisy_ok.VALUE == 42
    assert "note" not in err and err == "after\n"       # descriptor 2 is back where it was
    assert not _finders("noisy_ok")                     # the finder served one import and left


def test_a_failed_import_shows_what_it_wrote_then_its_error(tmp_path, monkeypatch, capfd):
    _module(tmp_path, monkeypatch, "noisy_bad", "os.write(2, b'libfoo.so: cannot open shared object\\n')\n"
            "raise ImportError('broken build')\n")
    quiet_import("noisy_bad")
    with pytest.raises(ImportError, match="broken build"):
        import noisy_bad  # noqa: F401
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "libfoo.so: cannot open shared object\nafter\n"
    assert "noisy_bad" not in sys.modules and not _finders("noisy_bad")


def test_a_module_already_imported_is_left_alone():
    quiet_import("os")
    quiet_import("json")
    assert not _finders("os") and not _finders("json")


def _caption(cache, env_extra=(), **run) -> subprocess.CompletedProcess:
    """``blip caption`` of the demo image with TensorFlow in a new process, TF_CPP_MIN_LOG_LEVEL as the user set it
    (here: unset unless ``env_extra`` sets it)."""
    from blip_apps.demo import DEMO_IMAGE
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_extra, BLIP_COMPILE_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "blip_apps.cli", "caption", DEMO_IMAGE, "--backend", "tf",
                          "--max-new-tokens", "3"], cwd=ROOT, env=env, text=True, timeout=300, **run)
    assert out.returncode == 0, out.stderr[-2000:] if out.stderr else None
    assert out.stdout.startswith(DEMO_IMAGE + "\t")
    return out


def _caption_stderr(cache, env_extra=()) -> list:
    out = _caption(cache, env_extra, capture_output=True)
    return [line for line in out.stderr.splitlines() if not line.startswith("no --model: using the bundled")]


def test_blip_caption_with_tensorflow_prints_only_its_own_lines(tmp_path):
    """A new process, a cold and then a warm compilation cache (TensorFlow logs reading a cached entry): stderr holds
    only the command's own line. The same command with TF_CPP_MIN_LOG_LEVEL chosen by the user shows TensorFlow's
    logging as it is (which is what the quiet runs hide)."""
    assert _caption_stderr(tmp_path) == []           # cold cache: compiles and stores
    assert _caption_stderr(tmp_path) == []           # warm cache
    assert _caption_stderr(tmp_path, {"TF_CPP_MIN_LOG_LEVEL": "0"}) != []


def test_blip_caption_with_tensorflow_runs_without_a_stderr(tmp_path):
    """Started with descriptor 2 closed (``2>&-``; Python's ``sys.stderr`` is then None), the command still captions
    (there is nothing to set aside), and stdout holds the caption alone: the notes meant for stderr are dropped, not
    printed to stdout in its place."""
    out = _caption(tmp_path, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert len(out.stdout.splitlines()) == 1
