"""Hostile config.json files: bounded reading, typed errors, sanity limits before any allocation."""
import json
import os
import shutil
import threading
import time

import pytest

from blip_core import architecture_of, load_config
from blip_core.configs import MAX_LAYERS, BlipTextConfig
from blip_core.jsonfile import JsonFileError, read_json_file
from blip_core.pretrained import read_pretrained
from fixture_utils import fixture


@pytest.fixture()
def model_dir(tmp_path):
    d, _, _ = fixture("BlipForConditionalGeneration")
    out = tmp_path / "m"
    shutil.copytree(d, out)
    return out


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "must hold a JSON object, got array"),
    ("null", "must hold a JSON object, got null"),
    ('"blip"', "must hold a JSON object, got string"),
    ("{", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON"),
])
def test_config_of_the_wrong_shape_is_a_typed_error(model_dir, content, match):
    (model_dir / "config.json").write_text(content)
    with pytest.raises(JsonFileError, match=match) as info:
        load_config(str(model_dir))
    assert "config.json" in str(info.value)
    with pytest.raises(ValueError, match=match):
        architecture_of(str(model_dir))


def test_invalid_utf8_names_the_file(model_dir):
    (model_dir / "config.json").write_bytes(b'{"model_type": "bl\xffip"}')
    with pytest.raises(JsonFileError, match="config.json: config file is not UTF-8"):
        load_config(str(model_dir))


def test_dev_zero_and_oversized_files_are_refused_without_reading_them(model_dir, tmp_path):
    cfg = model_dir / "config.json"
    cfg.unlink()
    os.symlink("/dev/zero", cfg)
    t0 = time.perf_counter()
    with pytest.raises(JsonFileError, match="not a regular file"):
        load_config(str(model_dir))
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)     # sparse: costs no disk
    with pytest.raises(JsonFileError, match="more than the limit"):
        read_json_file(big)
    assert time.perf_counter() - t0 < 5


def test_a_fifo_does_not_hang(model_dir):
    cfg = model_dir / "config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    result = []
    worker = threading.Thread(target=lambda: result.append(_error_of(load_config, str(model_dir))), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO config hung"
    assert isinstance(result[0], JsonFileError) and "not a regular file" in str(result[0])


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as exc:   # returned to the test thread
        return exc
    return None


def _edit_config(model_dir, edit) -> None:
    """Rewrite ``model_dir/config.json`` with ``edit(data)`` applied to its dict."""
    data = json.loads((model_dir / "config.json").read_text())
    edit(data)
    (model_dir / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("field", ["num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings"])
def test_absurd_sizes_are_refused_before_any_table_is_built(model_dir, field):
    _edit_config(model_dir, lambda d: d["text_config"].update({field: 10**9}))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"invalid config field '{field}'.*sanity limit"):
        read_pretrained(str(model_dir), "BlipForConditionalGeneration", "torch")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_attention_heads"])
def test_a_boolean_count_in_a_file_is_refused(model_dir, field):
    """``true`` is not the count 1 (json's booleans are Python ints): refused by name on loading."""
    _edit_config(model_dir, lambda d: d["text_config"].update({field: True}))
    with pytest.raises(ValueError, match=f"invalid config field '{field}': must be a positive integer, got True"):
        read_pretrained(str(model_dir), "BlipForConditionalGeneration", "torch")


def test_a_width_its_heads_do_not_divide_is_refused(model_dir):
    heads = json.loads((model_dir / "config.json").read_text())["text_config"]["num_attention_heads"]
    _edit_config(model_dir, lambda d: d["text_config"].update(hidden_size=8 * heads + 1))
    with pytest.raises(ValueError, match=f"'hidden_size': {8 * heads + 1} is not divisible by num_attention_heads={heads}"):
        read_pretrained(str(model_dir), "BlipForConditionalGeneration", "torch")


def test_a_dropout_outside_0_1_in_a_file_is_refused(model_dir):
    _edit_config(model_dir, lambda d: d["text_config"].update(hidden_dropout_prob=1.5))
    with pytest.raises(ValueError, match=r"'hidden_dropout_prob': must be in \[0, 1\], got 1.5"):
        read_pretrained(str(model_dir), "BlipForConditionalGeneration", "torch")


def test_a_blip2_image_token_outside_the_vocabulary_is_refused(tmp_path):
    d, _, _ = fixture("Blip2ForConditionalGeneration")
    shutil.copytree(d, tmp_path / "m")
    vocab = json.loads((tmp_path / "m" / "config.json").read_text())["text_config"]["vocab_size"]
    _edit_config(tmp_path / "m", lambda data: data.update(image_token_index=vocab))
    with pytest.raises(ValueError, match=f"'image_token_index': {vocab} is outside the language model's vocabulary"):
        read_pretrained(str(tmp_path / "m"), "Blip2ForConditionalGeneration", "torch")


def test_limits_leave_real_sizes_alone():
    cfg = BlipTextConfig(num_hidden_layers=MAX_LAYERS, vocab_size=250_000, hidden_size=8192, num_attention_heads=64,
                         intermediate_size=32768)
    assert cfg.num_hidden_layers == MAX_LAYERS
    with pytest.raises(ValueError, match="num_hidden_layers"):
        BlipTextConfig(num_hidden_layers=MAX_LAYERS + 1)
    with pytest.raises(ValueError, match="positive integer"):
        BlipTextConfig(num_hidden_layers=1e9)


def test_nested_config_of_the_wrong_type(model_dir):
    data = json.loads((model_dir / "config.json").read_text())
    data["text_config"] = [1, 2]
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="expected a dict"):
        load_config(str(model_dir))


def test_blip_info_gives_one_line_for_hostile_files(model_dir, capsys):
    from blip_apps.cli import main
    data = json.loads((model_dir / "config.json").read_text())
    data["text_config"]["num_hidden_layers"] = 10**9
    (model_dir / "config.json").write_text(json.dumps(data))
    assert main(["info", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_hidden_layers" in err and "sanity limit" in err
    (model_dir / "config.json").write_text("null")
    assert main(["info", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JSON object" in err


@pytest.mark.parametrize("backend", ["torch", "tf", "jax"])
def test_blip2_over_a_projected_opt_is_refused_by_every_backend(tmp_path, backend):
    """An OPT whose input embeddings are narrower than its hidden size cannot take BLIP-2's query rows
    (transformers loads it and scatters the rows element by element); every backend refuses the file and
    names the field, while the vision tower of the same file (declaring no class) still loads."""
    import importlib
    d, _, _ = fixture("Blip2ForConditionalGeneration")
    out = tmp_path / "m"
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["word_embed_proj_dim"] = cfg["text_config"]["hidden_size"] // 2
    cfg.pop("architectures", None)        # the class asked for decides, not the one the file declares
    (out / "config.json").write_text(json.dumps(cfg))
    module = importlib.import_module(f"backends.{backend}")
    with pytest.raises(ValueError, match="text_config.word_embed_proj_dim"):
        module.Blip2ForConditionalGeneration.from_pretrained(str(out))
    assert module.Blip2VisionModel.from_pretrained(str(out)) is not None


@pytest.mark.parametrize("content, expect", [('{"a": [1, 2], "b": "\u00e9"}', dict), ('[1, {"b": null}]', None)])
def test_a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_not(tmp_path, content, expect):
    """``limit`` is the largest size read: a file of exactly ``limit`` bytes parses, one byte over is refused."""
    path = tmp_path / "f.json"
    path.write_text(content, encoding="utf-8")
    size = len(content.encode("utf-8"))
    assert read_json_file(path, limit=size, expect=expect) == json.loads(content)
    with pytest.raises(JsonFileError, match=f"is {size} bytes, more than the limit of {size - 1}"):
        read_json_file(path, limit=size - 1, expect=expect)
