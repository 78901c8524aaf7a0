"""BLIP-2 language-model attention maps and T5 encoder states (``output_attentions`` /
``output_hidden_states``) of the JAX and TF backends against transformers 4.57 (eager attention, which
returns its maps) and the torch backend, for OPT (concatenated queries) and Flan-T5 (placeholders), on the
tiny models of test_jax_blip2.py."""
import numpy as np
import pytest

from fixture_utils import require

torch = require("torch")
transformers = require("transformers")

from test_jax_blip2 import _case_inputs, close, make_built, strict_numerics, t  # noqa: E402,F401


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_built(tmp_path_factory)


def _eager(model):
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("case", ["opt_concat", "t5_placeholders"])
def test_language_model_attentions_match_transformers_and_torch(built, case):
    ref_model, ours, torch_model, path = built(case)
    tf_model = require("backends.tf").Blip2ForConditionalGeneration.from_pretrained(path)
    px, ids, mask, full_ids, full_mask, labels = _case_inputs(case)
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        ref = _eager(ref_model)(pixel_values=t(px), input_ids=t(full_ids), attention_mask=t(full_mask),
                                labels=t(labels), **flags).language_model_outputs
        tb = torch_model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels,
                         **flags).language_model_outputs
    outs = {"jax": ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels,
                        **flags).language_model_outputs,
            "tf": tf_model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels,
                           **flags).language_model_outputs}
    if case == "opt_concat":
        real = (full_mask == 1)[:, None, :, None]       # padded query rows are not compared (no real token)
        names = ("attentions",)
    else:
        real = None
        names = ("encoder_attentions", "decoder_attentions", "cross_attentions", "encoder_hidden_states")
    for backend, out in outs.items():
        for name in names:
            for other in (ref, tb):
                theirs = other[name]
                assert out[name] is not None and len(out[name]) == len(theirs) > 0, (backend, name)
                for a, b in zip(out[name], theirs):
                    a = np.asarray(a)
                    assert a.shape == tuple(b.shape), (backend, name)
                    close(a, b, where=None if name.endswith("hidden_states") else
                          (np.broadcast_to(real, a.shape) if real is not None else None))
