"""The TF ``BlipVisionModel`` forward runs its tower as one XLA program per input shape.

Numbers against transformers are ``test_tf_blip.py::test_vision_model``'s (it now runs this path);
here: the compiled path agrees with the op-by-op tower (which still serves hidden states and
attentions), and programs are reused per shape, not retraced per call.
"""
import numpy as np

from fixture_utils import require

tf = require("tensorflow")

from blip_core.numerics import max_abs_diff, tolerance  # noqa: E402
from benchmarks.vision import config  # noqa: E402

ATOL = tolerance("default", "float32")[0]


def test_vision_forward_is_one_program_per_shape_and_matches_the_op_by_op_tower():
    import backends.tf as B
    cfg = config(quick=True)
    model = B.BlipVisionModel(cfg, seed=0)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    out = model(pixel_values=px)
    eager = model(pixel_values=px, output_hidden_states=True)      # a recorder: the op-by-op path
    assert max_abs_diff(out.last_hidden_state, eager.last_hidden_state) <= ATOL
    assert max_abs_diff(out.pooler_output, eager.pooler_output) <= ATOL
    assert len(model._compiled) == 1
    model(pixel_values=px[:1] + 1.0)
    model(pixel_values=px[1:])
    assert len(model._compiled) == 2                                # one more shape, one more program
    assert [p.experimental_get_tracing_count() for p in model._compiled.values()] == [1, 1]
