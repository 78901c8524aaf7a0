"""Property tests (hypothesis) of the spec layer's id and length checks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip_core.generation import check_position_limit, check_token_ids, resolve_generation


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(1, 64), new=st.integers(1, 64), positions=st.integers(1, 128))
def test_position_rule_accepts_exactly_what_the_decoder_can_hold(prompt, new, positions):
    fits = prompt + new - 1 <= positions
    try:
        s = resolve_generation(prompt, max_positions=positions, max_new_tokens=new)
    except ValueError as exc:
        assert not fits and "decoder positions" in str(exc)
    else:
        assert fits and s.max_new_tokens == new
        check_position_limit(prompt, new, positions)


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(1, 40), positions=st.integers(1, 80))
def test_default_length_always_fits(prompt, positions):
    try:
        s = resolve_generation(prompt, max_positions=positions)
    except ValueError:
        assert prompt >= positions
    else:
        assert s.max_new_tokens >= 1 and s.max_length <= max(positions, prompt + 1)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.lists(st.integers(-5, 60), min_size=1, max_size=6), min_size=1, max_size=4),
       vocab=st.integers(1, 50))
def test_token_check_raises_iff_an_id_is_outside(ids, vocab):
    width = min(len(r) for r in ids)
    arr = np.array([r[:width] for r in ids], np.int64)
    outside = bool(((arr < 0) | (arr >= vocab)).any())
    try:
        check_token_ids(arr, vocab)
    except ValueError as exc:
        assert outside and "outside the vocabulary" in str(exc)
    else:
        assert not outside


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 50), st.text(max_size=3),
                       st.booleans()))
def test_max_new_tokens_is_used_exactly_or_refused(value):
    try:
        s = resolve_generation(1, max_new_tokens=value)
    except ValueError:
        ok = (not isinstance(value, (bool, str)) and isinstance(value, (int, float)) and np.isfinite(value)
              and float(value).is_integer() and value >= 1)
        assert not ok
    else:
        assert not isinstance(value, (bool, str)) and s.max_new_tokens == value >= 1


@settings(max_examples=60, deadline=None)
@given(t=st.floats(allow_nan=True, allow_infinity=True))
def test_temperature_is_finite_and_positive_when_sampling(t):
    try:
        s = resolve_generation(1, do_sample=True, temperature=t, max_new_tokens=2)
    except ValueError:
        assert not (np.isfinite(t) and t > 0)
    else:
        assert s.temperature == t and t > 0
