"""Out-of-table ids at every BLIP-2 entry point, in every backend: one host-side rule
(``blip_core.generation.check_token_ids`` / ``check_special_token_id``), a ValueError that names the argument
or config field, before any compiled code runs (inside it, TF would clamp and JAX read NaN rows).

Entry points: ``Blip2ForConditionalGeneration`` forward and ``generate`` (OPT fixture), ``Blip2Model``
forward, ``get_text_features`` (T5 fixture: encoder and decoder ids), ``Blip2ForImageTextRetrieval`` ITC and
ITM, ``Blip2TextModelWithProjection``; ``generate``'s pad / eos options; a config whose bos, pad or
decoder-start id lies outside the vocabulary; T5's ``decoder_start_token_id`` option. (``get_qformer_features``
and ``get_image_features`` take pixels only.)
"""
import importlib
import json
import shutil

import numpy as np
import pytest

from fixture_utils import fixture

BACKENDS = ["torch", "tf", "jax"]
BAD = [-1, 99]                       # every fixture's vocabularies (language model and Q-Former) hold 99 ids
_CACHE = {}


def _model(backend, name, path=None):
    key = (backend, name, path)
    if key not in _CACHE:
        cls = getattr(importlib.import_module(f"backends.{backend}"), name)
        _CACHE[key] = cls.from_pretrained(path or fixture(name)[0])
    return _CACHE[key]


def _with_bad(ids, bad, col=-1):
    ids = np.array(ids, copy=True)
    ids[0, col] = bad
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD)
def test_conditional_generation_ids(backend, bad):
    _, inputs, _ = fixture("Blip2ForConditionalGeneration")
    model = _model(backend, "Blip2ForConditionalGeneration")
    px, mask = inputs["pixel_values"], inputs["attention_mask"]
    ids = _with_bad(inputs["input_ids"], bad)
    msg = f"input_ids contains token id {bad}, outside the vocabulary of size 99"
    with pytest.raises(ValueError, match=msg):
        model(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=msg):
        model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    for option in ("pad_token_id", "eos_token_id"):
        with pytest.raises(ValueError, match=f"{option} {bad} is outside the vocabulary of size 99"):
            model.generate(pixel_values=px, input_ids=inputs["input_ids"], attention_mask=mask, max_new_tokens=2,
                           **{option: bad})
    label = bad if bad != -1 else -2             # -100 is the ignored position, any other negative id is refused
    with pytest.raises(ValueError, match=f"labels contains token id {label}, outside the vocabulary of size 99"):
        model(pixel_values=px, input_ids=inputs["input_ids"], attention_mask=mask,
              labels=_with_bad(inputs["input_ids"], label))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD)
def test_t5_model_ids_and_text_features(backend, bad):
    _, inputs, _ = fixture("Blip2Model")
    model = _model(backend, "Blip2Model")
    kw = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids")}
    for name in ("input_ids", "decoder_input_ids"):
        with pytest.raises(ValueError, match=f"{name} contains token id {bad}, outside the vocabulary of size 99"):
            model(**dict(kw, **{name: _with_bad(kw[name], bad)}))
    text = inputs["input_ids"][:, 4:]                # without the image placeholders
    with pytest.raises(ValueError, match=f"input_ids contains token id {bad}"):
        model.get_text_features(input_ids=_with_bad(text, bad), decoder_input_ids=inputs["decoder_input_ids"])
    with pytest.raises(ValueError, match=f"decoder_input_ids contains token id {bad}"):
        model.get_text_features(input_ids=text, decoder_input_ids=_with_bad(inputs["decoder_input_ids"], bad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD)
def test_qformer_text_ids(backend, bad):
    """Retrieval (ITC and ITM, behind the Q placeholders) and the text projection model: the Q-Former's table."""
    _, inputs, _ = fixture("Blip2ForImageTextRetrieval")
    model = _model(backend, "Blip2ForImageTextRetrieval")
    ids = np.array(inputs["input_ids"], copy=True)
    ids[:, :4] = model.config.image_token_index
    msg = f"input_ids contains token id {bad}, outside the vocabulary of size 99"
    for itm in (False, True):
        with pytest.raises(ValueError, match=msg):
            model(pixel_values=inputs["pixel_values"], input_ids=_with_bad(ids, bad),
                  attention_mask=inputs["attention_mask"], use_image_text_matching_head=itm)
    _, text_inputs, _ = fixture("Blip2TextModelWithProjection")
    with pytest.raises(ValueError, match=msg):
        _model(backend, "Blip2TextModelWithProjection")(input_ids=_with_bad(text_inputs["input_ids"], bad),
                                                         attention_mask=text_inputs["attention_mask"])


def _broken_config(tmp_path, name, **text_config):
    d, _, _ = fixture(name)
    out = tmp_path / name
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"].update(text_config)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_special_ids_outside_the_vocabulary(tmp_path, backend):
    """OPT's bos (the default prompt), T5's decoder start (generate, and labels shifted into decoder inputs)
    and pad: refused with the config field's name instead of decoding garbage (TF / JAX) or an IndexError.
    (-1 and vocab_size alternate over the fields, so that each backend loads three broken models, not six.)"""
    bad = -1
    _, inputs, _ = fixture("Blip2ForConditionalGeneration")
    opt = _model(backend, "Blip2ForConditionalGeneration", _broken_config(tmp_path, "Blip2ForConditionalGeneration",
                                                                          bos_token_id=bad))
    with pytest.raises(ValueError, match=f"text_config.bos_token_id={bad} is outside the vocabulary of size 99"):
        opt.generate(pixel_values=inputs["pixel_values"], max_new_tokens=2)
    _, t5_inputs, _ = fixture("Blip2Model")
    px = t5_inputs["pixel_values"]
    labels = np.full((2, 3), 5)
    for field, bad in (("decoder_start_token_id", 99), ("pad_token_id", -1)):
        t5 = _model(backend, "Blip2ForConditionalGeneration", _broken_config(tmp_path / field, "Blip2Model",
                                                                             **{field: bad}))
        msg = f"text_config.{field}={bad} is outside the vocabulary of size 99"
        with pytest.raises(ValueError, match=msg):
            t5(pixel_values=px, input_ids=t5_inputs["input_ids"], attention_mask=t5_inputs["attention_mask"],
               labels=labels)
        if field == "decoder_start_token_id":
            with pytest.raises(ValueError, match=msg):
                t5.generate(pixel_values=px, max_new_tokens=2)
    good = _model(backend, "Blip2ForConditionalGeneration", fixture("Blip2Model")[0])
    for bad in BAD:
        with pytest.raises(ValueError, match=f"decoder_start_token_id={bad} is outside the vocabulary of size 99"):
            good.generate(pixel_values=px, max_new_tokens=2, decoder_start_token_id=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_placeholder_count_is_exactly_the_queries(backend):
    """A row holding one placeholder more than ``num_query_tokens`` (a text id replaced by the image id) is
    refused like one holding fewer: the forward and ``generate`` raise instead of placing the queries."""
    _, inputs, _ = fixture("Blip2ForConditionalGeneration")
    model = _model(backend, "Blip2ForConditionalGeneration")
    ids = np.array(inputs["input_ids"], copy=True)
    q = model.config.num_query_tokens
    assert (ids == model.config.image_token_index).sum(1).tolist() == [q, q]
    ids[1, -1] = model.config.image_token_index              # q + 1 placeholders in the second row
    px, mask = inputs["pixel_values"], inputs["attention_mask"]
    with pytest.raises(ValueError, match=r"exactly num_query_tokens=4 image placeholder tokens.*\[4, 5\]"):
        model(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"exactly num_query_tokens=4 image placeholder tokens.*\[4, 5\]"):
        model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_text_must_start_with_every_placeholder(backend):
    """The Q-Former text behind the placeholders: the first ``num_query_tokens`` ids must all be
    placeholders; a row where one of them is a text id is refused, not stripped."""
    _, inputs, _ = fixture("Blip2ForImageTextRetrieval")
    model = _model(backend, "Blip2ForImageTextRetrieval")
    ids = np.array(inputs["input_ids"], copy=True)
    ids[:, :4] = model.config.image_token_index
    ids[0, 0] = 5                                             # three placeholders, then text
    for itm in (False, True):
        with pytest.raises(ValueError, match="must start with num_query_tokens=4 placeholder ids"):
            model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=inputs["attention_mask"],
                  use_image_text_matching_head=itm)
