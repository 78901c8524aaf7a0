"""Generation argument resolution follows transformers 4.57's length conventions."""
import numpy as np
import pytest

from blip_core.generation import blip_caption_prompt, check_pixel_values, check_token_ids, resolve_generation


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


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_length=3), "max_length"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(beams=3), "unknown option"),
])
def test_bad_options_raise_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_generation(4, **kwargs)


def test_blip_caption_prompt_as_transformers_builds_it():
    ids, mask = blip_caption_prompt(None, None, 2, bos_token_id=30522, eos_token_id=102)
    assert ids.tolist() == [[30522], [30522]] and mask is None
    ids, mask = blip_caption_prompt(np.array([[101, 7, 8, 102]]), np.array([[1, 1, 1, 1]]), 1, 30522, 102)
    assert ids.tolist() == [[30522, 7, 8]] and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="batch"):
        blip_caption_prompt(np.array([[101, 7, 102]]), None, 2, 30522, 102)


def test_input_checks_say_what_is_wrong():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_token_ids(np.array([[1, 99]]), 99)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        check_pixel_values((1, 3, 48, 48), 32, 8, False)
    with pytest.raises(ValueError, match="NCHW"):
        check_pixel_values((1, 32, 32, 3), 32, 8, False)
    check_pixel_values((1, 3, 48, 40), 32, 8, True)
