"""The main job on the bundled default (`blip demo` / `make demo`) runs in every backend and they agree."""
from blip_core.demo import run_demo


def test_demo_captions_agree_in_every_backend(capsys, tmp_path):
    assert run_demo(backends=("torch", "jax", "tf"), out=str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "ids=" in line]
    assert len(lines) == 6                                  # 3 backends x (greedy, beam-3)
    assert "backends agree on every decoding mode (beam-3, greedy): True" in out
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= files
