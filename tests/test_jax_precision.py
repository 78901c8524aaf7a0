"""A float32 JAX model multiplies in float32 on every device (``backends.jax._base.float32_products``).

XLA's default precision for float32 products on a GPU is TF32 (BLIP-large's float32 logits were 2e-3 from
transformers' on an H200; 3e-6 with float32 products). So every program a float32 model traces carries the
HIGHEST precision on its products; a bfloat16 model's carry none, and a precision the caller chose is kept.
On the CPU the two are the same program numerically; the test reads the traced program, not a device.
"""
import re

import numpy as np
import pytest

from fixture_utils import require

require("jax")
import jax  # noqa: E402

import backends.jax as BJ  # noqa: E402
from blip_core import persistent_cache  # noqa: E402
from blip_core.configs import BlipConfig  # noqa: E402
from hf_configs import blip_dicts  # noqa: E402


def _precisions(model, **context) -> set:
    px = np.zeros((3, 3, 32, 32), np.float32)     # a batch no other test traces: jax's trace cache is shared
    fn = lambda p: model.get_image_features(pixel_values=px, params=p)   # noqa: E731  (tracers: the jitted method)
    if context:
        with jax.default_matmul_precision(context["precision"]):
            text = str(jax.make_jaxpr(fn)(model.params))
    else:
        text = str(jax.make_jaxpr(fn)(model.params))
    assert "dot_general" in text
    return set(re.findall(r"precision=(\S+)", text))


@pytest.fixture(scope="module")
def model():
    vc, tc = blip_dicts()
    return BJ.BlipModel(BlipConfig(vision_config=vc, text_config=tc, projection_dim=16, image_text_hidden_size=24), seed=0)


def test_float32_models_trace_float32_products(model):
    assert _precisions(model) == {"(Precision.HIGHEST,"}


def test_bfloat16_models_keep_the_default_precision(model):
    assert not any("HIGHEST" in p for p in _precisions(model.astype("bfloat16")))


def test_a_precision_the_caller_chose_is_kept(model):
    got = _precisions(model, precision="tensorfloat32")
    assert got == {"(Precision.HIGH,"}       # TF32, as asked


def test_a_precision_chosen_after_the_first_call_gets_its_own_program(model, tmp_path, monkeypatch):
    """The in-process programs are keyed by the caller's precision too: a call under another precision traces
    again instead of reusing the float32 program of an earlier call with the same shapes. (An empty persistent
    cache: a program stored on disk by an earlier run would be loaded without a trace.)"""
    monkeypatch.setattr(persistent_cache, "_setting", str(tmp_path))
    px = np.zeros((5, 3, 32, 32), np.float32)
    first = np.asarray(model.get_image_features(pixel_values=px))
    before = model.trace_count("features")
    with jax.default_matmul_precision("tensorfloat32"):
        model.get_image_features(pixel_values=px)
    assert model.trace_count("features") == before + 1
    again = np.asarray(model.get_image_features(pixel_values=px))        # the float32 program, not traced again
    assert model.trace_count("features") == before + 1
    np.testing.assert_array_equal(again, first)
