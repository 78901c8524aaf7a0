"""`from_pretrained` reads Hugging Face TF (tf_model.h5) and Flax (flax_model.msgpack) directories too."""
import os

import numpy as np
import pytest
import torch

import backends.torch as bt
from converters import convert
from fixture_utils import fixture


@pytest.mark.parametrize("to, filename", [("tf", "tf_model.h5"), ("jax", "flax_model.msgpack")])
def test_torch_loads_tf_and_flax_directories(tmp_path, to, filename):
    src, inputs, ref = fixture("BlipForConditionalGeneration")
    dst = tmp_path / to
    convert(src, str(dst), to=to)
    assert filename in os.listdir(dst) and "model.safetensors" not in os.listdir(dst)
    model = bt.BlipForConditionalGeneration.from_pretrained(str(dst))
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(inputs["pixel_values"]), input_ids=torch.from_numpy(inputs["input_ids"]),
                    attention_mask=torch.from_numpy(inputs["attention_mask"]))
    # The weights are the same bits, so the outputs equal transformers' reference (LM head tied correctly).
    np.testing.assert_allclose(out.logits.numpy(), ref["logits"], rtol=0, atol=1e-4)
