"""The JAX vision tower's attention loop (``blip_core.numerics.attention_head_group`` heads per step) against
transformers, with one head per step as well as the default (all heads of the tiny config in one step)."""
import numpy as np

from fixture_utils import require

jax = require("jax")
torch = require("torch")
require("transformers")

import backends.jax._base as jax_base  # noqa: E402
import blip_core.numerics as numerics  # noqa: E402
from blip_core.numerics import attention_head_group  # noqa: E402
from test_jax_blip import build, close, inputs, strict_numerics, t  # noqa: E402,F401


def test_head_group_rule():
    assert attention_head_group(12, 577) == 3            # ViT-B/16 at 384 px: 3 x 577 x 577 float32 = 4 MB
    assert attention_head_group(16, 257) == 8             # ViT-g at 224 px
    assert attention_head_group(4, 17) == 4               # tiny: every head in one step
    assert attention_head_group(5, 10_000) == 1           # nothing fits: one head per step


def test_vision_attention_in_single_head_steps_matches_transformers(tmp_path, monkeypatch):
    hf, ours = build("BlipVisionModel", str(tmp_path / "vision"))
    pv, _, _ = inputs(batch=2)
    n = (pv.shape[-1] // ours.config.patch_size) ** 2 + 1
    heads = ours.config.num_attention_heads
    assert attention_head_group(heads, n) == heads > 1
    monkeypatch.setattr(numerics, "ATTENTION_BLOCK_BYTES", n * n * 4)    # one head of scores per step
    monkeypatch.setattr(jax_base, "_JITTED", {})                         # traced afresh, not another test's program
    assert attention_head_group(heads, n) == 1
    ref = hf(pixel_values=t(pv), output_attentions=True)
    out = ours(pixel_values=pv, output_attentions=True)
    close(out.last_hidden_state, ref.last_hidden_state)
    close(out.pooler_output, ref.pooler_output)
    close(out.attentions[-1], ref.attentions[-1])
