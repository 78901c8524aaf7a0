"""Generation argument resolution follows transformers 4.57's length conventions; bad options and inputs are
refused with a message, by the rulebook and by every backend's ``generate``."""
import importlib

import numpy as np
import pytest

from blip_core.configs import BlipConfig
from blip_core.generation import (blip_caption_prompt, check_pixel_values, check_special_token_id, check_token_ids,
                                  resolve_generation)
from hf_configs import core_blip_config, tiny_pixels


def test_default_is_twenty_new_tokens_capped_by_positions():
    assert resolve_generation(1).max_new_tokens == 20
    assert resolve_generation(7).max_new_tokens == 20
    assert resolve_generation(30, max_positions=40).max_new_tokens == 10


def test_max_length_counts_the_prompt_and_max_new_tokens_wins():
    s = resolve_generation(5, max_length=12, min_length=8)
    assert (s.max_new_tokens, s.min_new_tokens, s.max_length) == (7, 3, 12)
    s = resolve_generation(5, max_length=12, max_new_tokens=3, min_new_tokens=2)
    assert (s.max_new_tokens, s.min_new_tokens) == (3, 2)


def test_model_defaults_fill_in_and_caller_overrides():
    s = resolve_generation(1, defaults={"eos_token_id": 102, "pad_token_id": 0}, eos_token_id=[5, 6])
    assert s.eos_token_id == (5, 6) and s.pad_token_id == 0
    assert resolve_generation(1, num_beams=3).mode == "beam"
    assert resolve_generation(1, do_sample=True).mode == "sample"


BAD_OPTIONS = [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be <= num_beams"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(beams=3), "unknown option"),
]


@pytest.mark.parametrize("kwargs, match", BAD_OPTIONS + [(dict(max_length=3), "max_length")])
def test_bad_options_raise_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_generation(4, **kwargs)


@pytest.fixture(scope="module", params=["torch", "tf", "jax"])
def captioner(request):
    return importlib.import_module(f"backends.{request.param}").BlipForConditionalGeneration(core_blip_config(), seed=0)


def test_every_backend_refuses_bad_options_and_inputs(captioner):
    """The same refusals through each backend's ``generate``: options, an image smaller than a patch, a
    prompt mask of another shape than its ids."""
    px = tiny_pixels(batch=1)
    for kwargs, match in BAD_OPTIONS:
        with pytest.raises(ValueError, match=match):
            captioner.generate(pixel_values=px, **kwargs)
    with pytest.raises(ValueError, match="is not a positive multiple of patch_size"):
        captioner.generate(pixel_values=np.zeros((1, 3, 0, 0), np.float32), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) does not match input_ids shape \(1, 4\)"):
        captioner.generate(pixel_values=px, input_ids=np.array([[1, 7, 8, 2]]), attention_mask=np.ones((1, 3), np.int64))


@pytest.mark.parametrize("backend", ["torch", "tf", "jax"])
def test_a_boolean_special_id_in_a_config_is_refused(backend):
    """``"pad_token_id": true`` in config.json is not token 1: ``generate`` refuses it by name."""
    data = core_blip_config().to_dict()
    data["text_config"]["pad_token_id"] = True
    model = importlib.import_module(f"backends.{backend}").BlipForConditionalGeneration(BlipConfig.from_dict(data), seed=0)
    with pytest.raises(ValueError, match="text_config.pad_token_id=True"):
        model.generate(pixel_values=tiny_pixels(batch=1), max_new_tokens=2)


def test_blip_caption_prompt_as_transformers_builds_it():
    ids, mask = blip_caption_prompt(None, None, 2, bos_token_id=30522, eos_token_id=102)
    assert ids.tolist() == [[30522], [30522]] and mask is None
    ids, mask = blip_caption_prompt(np.array([[101, 7, 8, 102]]), np.array([[1, 1, 1, 1]]), 1, 30522, 102)
    assert ids.tolist() == [[30522, 7, 8]] and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="batch"):
        blip_caption_prompt(np.array([[101, 7, 102]]), None, 2, 30522, 102)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) does not match input_ids shape \(1, 4\)"):
        blip_caption_prompt(np.array([[101, 7, 8, 102]]), np.array([[1, 1, 1]]), 1, 30522, 102)


def test_input_checks_say_what_is_wrong():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_token_ids(np.array([[1, 99]]), 99)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        check_pixel_values((1, 3, 48, 48), 32, 8, False)
    with pytest.raises(ValueError, match="NCHW"):
        check_pixel_values((1, 32, 32, 3), 32, 8, False)
    check_pixel_values((1, 3, 48, 40), 32, 8, True)
    for shape in ((1, 3, 0, 8), (1, 3, 8, 0), (1, 3, 12, 8)):
        with pytest.raises(ValueError, match="not a positive multiple of patch_size 8"):
            check_pixel_values(shape, 32, 8, True)
    for value in (True, np.bool_(False), 10, -1, 2.0):
        with pytest.raises(ValueError, match="outside the vocabulary of size 10"):
            check_special_token_id(value, "pad_token_id", 10)
    assert check_special_token_id(np.int64(9), "pad_token_id", 10) == 9
