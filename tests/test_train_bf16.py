"""bfloat16 mixed-precision training (``TrainConfig(mixed_precision="bf16")``, ``blip train --bf16``):
it trains (the loss falls) and stays close to the float32 run, the master weights stay float32.

Each backend's own mechanism (see ``torch_step``, ``tf_step``, ``jax_step``): ``torch.autocast``
on the CPU, a bfloat16 twin of the TF model fed the casts of the float32 variables, and a jmp-style
cast of the float32 params inside the differentiated JAX function.

Measured (tiny captioner, 32 synthetic images, 10 steps of batch 8, lr 3e-3, seed 5): the float32
loss falls from 3.466 to 2.156; the bfloat16 losses differ from it by at most 9.0e-4 (torch),
2.5e-3 (tf) and 2.4e-3 (jax), relative 0.035%, 0.10% and 0.094%. ``LOSS_RTOL`` below leaves about
3x room. The float32 runs themselves agree across backends to ~1e-6 (``test_train_parity``).
"""
import importlib
import os

import numpy as np
import pytest

from blip_apps import load, synthetic
from blip_apps.train import TrainConfig, learning_rate, tiny_model
from blip_apps.train import data as data_mod
from blip_core.processing import BlipProcessor

STEPS = 10
LOSS_RTOL = 3e-3        # |loss_bf16 - loss_f32| / loss_f32 at every step


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    synthetic.write_split(str(root / "train"), 32, seed=3, split="train")
    model_dir = tiny_model("caption", str(root / "init"), seed=1)
    processor = BlipProcessor.from_pretrained(model_dir)
    split = data_mod.read_split(str(root / "train"), processor.image_processor)
    lengths = data_mod.lengths_for("caption", processor.tokenizer, split)
    bos = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    return model_dir, data_mod.TaskData(split, "caption", processor.tokenizer, bos, lengths)


def _run(backend, model_dir, data, mixed_precision):
    cfg = TrainConfig(task="caption", backend=backend, steps=STEPS, batch_size=8, lr=3e-3, warmup=2, seed=5,
                      threads=1, mixed_precision=mixed_precision)
    model = load(model_dir, backend=backend)
    trainer = importlib.import_module(f"blip_apps.train.{backend}_step").Trainer(model, cfg)
    losses = [trainer.step(data_mod.step_batches(data, cfg.seed, s, cfg.batch_size, 1), learning_rate(s, cfg))
              for s in range(STEPS)]
    out = os.path.join(model_dir, f"after-{backend}-{mixed_precision}")
    model.save_pretrained(out)
    from safetensors.numpy import load_file
    return np.array(losses), load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("tf", marks=pytest.mark.slow),
                                     pytest.param("jax", marks=pytest.mark.slow)])
def test_bf16_trains_and_stays_close_to_float32(backend, caption_data):
    model_dir, data = caption_data
    f32, w32 = _run(backend, model_dir, data, "no")
    bf16, w16 = _run(backend, model_dir, data, "bf16")
    assert bf16[-1] < 0.7 * bf16[0]                                  # it trains
    assert not np.array_equal(bf16, f32)                             # and really computed in bfloat16
    np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL, atol=0)
    assert all(w.dtype == np.float32 for w in w16.values())          # float32 master weights
    apart = max(float(np.abs(w16[k] - w32[k]).max()) for k in w32)
    budget = 2 * sum(learning_rate(s, TrainConfig(steps=STEPS, lr=3e-3, warmup=2)) for s in range(STEPS))
    assert 0 < apart < budget                     # each AdamW step moves a weight by about lr at most


def test_bf16_option_is_checked():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
