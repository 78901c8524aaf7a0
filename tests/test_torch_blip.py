"""PyTorch BLIP against transformers 4.57: every class, losses, generation, checkpoints, training, errors.

Reference models are built and saved by transformers (tiny random configs that vary depth, heads,
widths, image and patch size, vocabulary and activation), with weights spread wider than the
default init so that outputs depend on every input. Ours load the same directory.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import backends.torch as bt
from blip_core.numerics import max_abs_diff, tolerance

from fixture_utils import require
transformers = require("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_configs import blip_config  # noqa: E402

ATOL = tolerance("default", "float32")[0]
BOS, SEP, PAD = 96, 97, 0

# A is the shared tiny config; B changes every dimension and the activation; C is B with equal tower
# widths, which VQA needs (its answer decoder cross-attends question states through image-width weights).
CONFIGS = {
    "A": dict(),
    "B": dict(vision=dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=20,
                          image_size=24, patch_size=6),
              text=dict(vocab_size=101, hidden_size=24, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=30, hidden_act="gelu_new", label_smoothing=0.1)),
}
CONFIGS["C"] = dict(CONFIGS["B"], vision=dict(CONFIGS["B"]["vision"], hidden_size=24, num_attention_heads=3))
SIZES = {"A": (32, 8), "B": (24, 6), "C": (24, 6)}
CLASSES = ["BlipVisionModel", "BlipTextModel", "BlipModel", "BlipForConditionalGeneration",
           "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]


@pytest.fixture(autouse=True)
def _strict_numerics():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _hf_config(name):
    return blip_config(**CONFIGS[name])


def _spread(model, seed):
    """Re-draw every weight (wider than transformers' init) so the test sees real signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name != "logit_scale":
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(config, class): (transformers model, directory)} built lazily and cached."""
    cache = {}

    def get(cfg_name, cls_name):
        key = (cfg_name, cls_name)
        if key not in cache:
            cfg = _hf_config(cfg_name)
            sub = {"BlipVisionModel": cfg.vision_config, "BlipTextModel": cfg.text_config}.get(cls_name, cfg)
            torch.manual_seed(0)
            hf = _spread(getattr(transformers, cls_name)(sub), seed=len(cache) + 1).eval()
            path = tmp_path_factory.mktemp(f"{cfg_name}_{cls_name}")
            hf.save_pretrained(path)
            cache[key] = (hf, str(path))
        return cache[key]
    return get


def _inputs(cfg_name, batch=2, seq=7, seed=0, pad_row=None):
    size, _ = SIZES[cfg_name]
    vocab = _hf_config(cfg_name).text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1, 90, (batch, seq), generator=g) % vocab
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    if pad_row is not None:
        ids[pad_row, -3:], mask[pad_row, -3:] = PAD, 0
    return px, ids, mask


def _close(a, b, what=""):
    d = max_abs_diff(a, b)
    assert d <= ATOL, f"{what}: max abs diff {d}"


def _close_tuple(a, b, what):
    assert a is not None and b is not None and len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        _close(x, y, f"{what}[{i}]")


# -- forward parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ["A", "B"])
def test_vision_model(saved, cfg):
    hf, path = saved(cfg, "BlipVisionModel")
    ours = bt.BlipVisionModel.from_pretrained(path)
    px, _, _ = _inputs(cfg)
    a = hf(px, output_attentions=True, output_hidden_states=True)
    b = ours(px.numpy(), output_attentions=True, output_hidden_states=True)
    for k in ("last_hidden_state", "pooler_output"):
        _close(a[k], b[k], k)
    _close_tuple(a.hidden_states, b.hidden_states, "hidden_states")
    _close_tuple(a.attentions, b.attentions, "attentions")
    # another, non-square resolution through the bicubic position-grid resize
    _, p = SIZES[cfg]
    px2 = torch.randn(1, 3, 5 * p, 3 * p)
    _close(hf(px2, interpolate_pos_encoding=True).last_hidden_state,
           ours(px2, interpolate_pos_encoding=True).last_hidden_state, "interpolated")


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_vision_model_resizes_a_non_square_grid_of_the_tables_patch_count(saved, cfg):
    """A non-square image with as many patches as the table (an 8x2 grid from a 4x4 table) still gets its
    positions resized to its own grid, as transformers: only a square image of that count keeps the table."""
    hf, path = saved(cfg, "BlipVisionModel")
    ours = bt.BlipVisionModel.from_pretrained(path)
    size, p = SIZES[cfg]
    g = size // p
    px = torch.randn(2, 3, 2 * g * p, g * p // 2, generator=torch.Generator().manual_seed(3))
    assert (px.shape[2] // p) * (px.shape[3] // p) == g * g
    a = hf(px, interpolate_pos_encoding=True)
    b = ours(px, interpolate_pos_encoding=True)
    _close(a.last_hidden_state, b.last_hidden_state, "non-square last_hidden_state")
    _close(a.pooler_output, b.pooler_output, "non-square pooler_output")


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_text_model_encoder_and_cross_attention(saved, cfg):
    hf, path = saved(cfg, "BlipTextModel")
    ours = bt.BlipTextModel.from_pretrained(path)
    _, ids, mask = _inputs(cfg, pad_row=1)
    enc = torch.randn(2, 5, hf.config.encoder_hidden_size)
    for kw in (dict(), dict(encoder_hidden_states=enc), dict(encoder_hidden_states=enc, is_decoder=True)):
        a = hf(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True, **kw)
        b = ours(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True, **kw)
        _close(a.last_hidden_state, b.last_hidden_state, f"last {list(kw)}")
        _close(a.pooler_output, b.pooler_output, "pooler")
        _close_tuple(a.hidden_states, b.hidden_states, "hidden_states")
        _close_tuple(a.attentions, b.attentions, "attentions")
        if kw:
            _close_tuple(a.cross_attentions, b.cross_attentions, "cross_attentions")


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_blip_model(saved, cfg):
    hf, path = saved(cfg, "BlipModel")
    ours = bt.BlipModel.from_pretrained(path)
    px, ids, mask = _inputs(cfg, batch=3, pad_row=2)
    a = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    b = ours(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    for k in ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        _close(a[k], b[k], k)
    _close(a.text_model_output.pooler_output, b.text_model_output.pooler_output, "text pooler")
    _close(hf.get_text_features(ids, mask), ours.get_text_features(ids, mask), "text features")
    _close(hf.get_image_features(px), ours.get_image_features(px), "image features")
    _close(hf.get_multimodal_features(ids, px, mask), ours.get_multimodal_features(ids, px, mask), "multimodal")


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_contrastive_scores_of_unequal_image_and_text_batches(saved, cfg):
    """BlipModel and the ITC head of BlipForImageTextRetrieval score every image against every text: 2 images
    and 3 texts give (2, 3) logits, as transformers; only the ITM head pairs rows and needs equal batches."""
    px, _, _ = _inputs(cfg, batch=2)
    _, ids, mask = _inputs(cfg, batch=3, seed=1, pad_row=2)
    hf, path = saved(cfg, "BlipModel")
    ours = bt.BlipModel.from_pretrained(path)
    a = hf(input_ids=ids, pixel_values=px, attention_mask=mask)
    b = ours(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert tuple(b.logits_per_image.shape) == (2, 3) and tuple(b.logits_per_text.shape) == (3, 2)
    for k in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        _close(a[k], b[k], k)
    hf, path = saved(cfg, "BlipForImageTextRetrieval")
    ours = bt.BlipForImageTextRetrieval.from_pretrained(path)
    a = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False)
    b = ours(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False)
    assert tuple(b.itm_score.shape) == (2, 3)
    _close(a.itm_score, b.itm_score, "itc scores")
    with pytest.raises(ValueError, match="batch"):
        ours(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True)


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_captioning_forward_and_loss(saved, cfg):
    hf, path = saved(cfg, "BlipForConditionalGeneration")
    ours = bt.BlipForConditionalGeneration.from_pretrained(path)
    px, ids, mask = _inputs(cfg, pad_row=1)
    labels = ids.masked_fill(mask == 0, -100)
    a = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True,
           output_hidden_states=True)
    b = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True,
             output_hidden_states=True)
    for k in ("loss", "logits", "image_embeds", "last_hidden_state"):
        _close(a[k], b[k], k)
    _close_tuple(a.hidden_states, b.hidden_states, "vision hidden_states")
    _close_tuple(a.attentions, b.attentions, "vision attentions")
    st = ours.stages(px, ids, mask, labels=labels)
    assert set(st) == {"vision", "lm_hidden", "logits", "loss"}
    _close(st["logits"], a.logits, "stage logits")


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_retrieval_itm_and_itc(saved, cfg):
    hf, path = saved(cfg, "BlipForImageTextRetrieval")
    ours = bt.BlipForImageTextRetrieval.from_pretrained(path)
    px, ids, mask = _inputs(cfg, pad_row=0)
    for use_itm in (True, False):
        a = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm)
        b = ours(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm)
        assert tuple(b.itm_score.shape) == (2, 2)
        _close(a.itm_score, b.itm_score, f"itm_score use_itm_head={use_itm}")
        _close(a.question_embeds, b.question_embeds, "question_embeds")


@pytest.mark.parametrize("cfg", ["A", "C"])
def test_vqa_forward_loss(saved, cfg):
    hf, path = saved(cfg, "BlipForQuestionAnswering")
    ours = bt.BlipForQuestionAnswering.from_pretrained(path)
    px, ids, _ = _inputs(cfg)                      # unpadded question: the reference's cross mask bug is moot
    _, answers, _ = _inputs(cfg, seq=4, seed=3)
    a = hf(input_ids=ids, pixel_values=px, labels=answers)
    b = ours(input_ids=ids, pixel_values=px, labels=answers)
    _close(a.loss, b.loss, "loss")
    _close(a.image_embeds, b.image_embeds, "image_embeds")
    ref_logits = hf.text_decoder(answers, encoder_hidden_states=hf.text_encoder(
        ids, encoder_hidden_states=a.image_embeds).last_hidden_state).logits
    _close(ours.stages(ids, px, labels=answers)["logits"], ref_logits, "answer logits")


@pytest.mark.parametrize("cfg", ["A", "C"])
def test_vqa_loss_applies_the_decoder_attention_mask(saved, cfg):
    """With decoder_input_ids, VQA's answer loss attends only the answer tokens decoder_attention_mask keeps, as
    transformers; masking a token changes the reference's loss, so the mask is not a no-op here."""
    hf, path = saved(cfg, "BlipForQuestionAnswering")
    ours = bt.BlipForQuestionAnswering.from_pretrained(path)
    px, ids, _ = _inputs(cfg)                      # unpadded question: the reference's cross mask bug is moot
    _, answers, _ = _inputs(cfg, seq=5, seed=3)
    dec_mask = torch.ones_like(answers)
    dec_mask[0, 2], dec_mask[1, 1] = 0, 0
    kw = dict(input_ids=ids, pixel_values=px, decoder_input_ids=answers, labels=answers)
    a = hf(decoder_attention_mask=dec_mask, **kw)
    b = ours(decoder_attention_mask=dec_mask, **kw)
    _close(a.loss, b.loss, "masked answer loss")
    assert abs(hf(**kw).loss.item() - a.loss.item()) > 1e-3


@pytest.mark.parametrize("cls_name", CLASSES[2:])
def test_task_models_interpolate_pos_encoding(saved, cls_name):
    """Every task class hands interpolate_pos_encoding to its vision tower: 48x40 pixels (a 6x5 grid from the
    4x4 table) give transformers' outputs; the same pixels without the option are refused."""
    hf, path = saved("A", cls_name)
    ours = getattr(bt, cls_name).from_pretrained(path)
    g = torch.Generator().manual_seed(6)
    px = torch.randn(2, 3, 48, 40, generator=g)
    _, ids, mask = _inputs("A", seq=5, seed=6)
    kw = {"BlipModel": dict(input_ids=ids, attention_mask=mask),
          "BlipForConditionalGeneration": dict(input_ids=ids, attention_mask=mask),
          "BlipForImageTextRetrieval": dict(input_ids=ids, attention_mask=mask),
          "BlipForQuestionAnswering": dict(input_ids=ids, labels=ids)}[cls_name]
    fields = {"BlipModel": ("logits_per_image", "image_embeds"),
              "BlipForConditionalGeneration": ("logits", "image_embeds"),
              "BlipForImageTextRetrieval": ("itm_score", "last_hidden_state"),
              "BlipForQuestionAnswering": ("loss", "image_embeds")}[cls_name]
    a = hf(pixel_values=px, interpolate_pos_encoding=True, **kw)
    b = ours(pixel_values=px, interpolate_pos_encoding=True, **kw)
    for k in fields:
        _close(a[k], b[k], f"{k} (interpolated)")
    if cls_name == "BlipForConditionalGeneration":
        np.testing.assert_array_equal(ours.generate(px, interpolate_pos_encoding=True, max_new_tokens=5).numpy(),
                                      hf.generate(pixel_values=px, interpolate_pos_encoding=True,
                                                  max_new_tokens=5).numpy())
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixel_values=px, **kw)


STAGES = {"BlipVisionModel": {"vision", "vision_pooled"}, "BlipTextModel": {"text"},
          "BlipModel": {"vision", "vision_pooled", "text", "image_embeds", "text_embeds", "logits_per_image"},
          "BlipForConditionalGeneration": {"vision", "lm_hidden", "logits"},
          "BlipForImageTextRetrieval": {"vision", "text", "itm_score"},
          "BlipForQuestionAnswering": {"vision", "text", "lm_hidden", "logits"}}


@pytest.mark.parametrize("cls_name", CLASSES)
def test_stages_named_intermediates(saved, cls_name):
    hf, path = saved("A", cls_name)
    model = getattr(bt, cls_name).from_pretrained(path)
    px, ids, mask = _inputs("A")
    inputs = {"BlipVisionModel": dict(pixel_values=px), "BlipTextModel": dict(input_ids=ids, attention_mask=mask)}
    st = model.stages(**inputs.get(cls_name, dict(pixel_values=px, input_ids=ids, attention_mask=mask)))
    assert set(st) == STAGES[cls_name]
    assert all(torch.isfinite(v).all() for v in st.values())
    if "vision" in st:
        vision = hf if cls_name == "BlipVisionModel" else hf.vision_model
        _close(st["vision"], vision(px).last_hidden_state, "vision stage")


# -- generation -----------------------------------------------------------------------------------
GEN = [dict(max_new_tokens=12), dict(num_beams=3, max_new_tokens=8),
       dict(num_beams=3, num_return_sequences=2, length_penalty=0.6, max_new_tokens=7, early_stopping=True),
       dict(max_new_tokens=9, min_new_tokens=5, repetition_penalty=1.5)]


@pytest.mark.parametrize("kw", GEN, ids=str)
def test_caption_generate_matches_transformers(saved, kw):
    hf, path = saved("A", "BlipForConditionalGeneration")
    ours = bt.BlipForConditionalGeneration.from_pretrained(path)
    px, ids, mask = _inputs("A", batch=3, seq=5, seed=4)
    ids[:, -1] = SEP
    ref = hf.generate(pixel_values=px, **kw)
    got = ours.generate(pixel_values=px, **kw)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    assert (got[:, 0] == BOS).all()
    # with a (batched) prompt, and a right-padded one: positions follow the mask as in transformers
    ids[2, 3:], mask[2, 3:] = torch.tensor([SEP, PAD]), torch.tensor([1, 0])
    ref = hf.generate(pixel_values=px, input_ids=ids.clone(), attention_mask=mask, **kw)
    got = ours.generate(pixel_values=px.numpy(), input_ids=ids.numpy(), attention_mask=mask.numpy(), **kw)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    assert torch.equal(got[:, 1:4], ids.repeat_interleave(kw.get("num_return_sequences", 1), 0)[:, 1:4])


def test_caption_generate_config_b_and_sampling(saved):
    hf, path = saved("B", "BlipForConditionalGeneration")
    ours = bt.BlipForConditionalGeneration.from_pretrained(path)
    px, _, _ = _inputs("B", batch=2)
    for kw in (dict(max_new_tokens=6), dict(num_beams=2, max_new_tokens=6)):
        np.testing.assert_array_equal(ours.generate(px, **kw).numpy(), hf.generate(pixel_values=px, **kw).numpy())
    a = ours.generate(px, do_sample=True, seed=11, top_k=20, max_new_tokens=8)
    assert torch.equal(a, ours.generate(px, do_sample=True, seed=11, top_k=20, max_new_tokens=8))
    torch.manual_seed(11)
    np.testing.assert_array_equal(a.numpy(), hf.generate(pixel_values=px, do_sample=True, top_k=20,
                                                         max_new_tokens=8).numpy())


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")
def test_default_length_is_twenty_new_tokens(saved):
    hf, path = saved("A", "BlipForConditionalGeneration")
    px = _inputs("A")[0]
    ours = bt.BlipForConditionalGeneration.from_pretrained(path).generate(px, min_new_tokens=30)
    assert ours.shape == hf.generate(pixel_values=px, min_new_tokens=30).shape == (2, 21)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=10), dict(num_beams=3, max_new_tokens=6)], ids=str)
def test_vqa_generate_matches_transformers(saved, kw):
    hf, path = saved("A", "BlipForQuestionAnswering")
    ours = bt.BlipForQuestionAnswering.from_pretrained(path)
    px, ids, _ = _inputs("A", batch=3)
    np.testing.assert_array_equal(ours.generate(ids, px, **kw).numpy(),
                                  hf.generate(input_ids=ids, pixel_values=px, **kw).numpy())


def test_generation_caches_cross_attention_once(saved, monkeypatch):
    _, path = saved("A", "BlipForConditionalGeneration")
    ours = bt.BlipForConditionalGeneration.from_pretrained(path)
    calls = []
    key = ours.text_decoder.bert.encoder.layer[0].crossattention.self.key
    monkeypatch.setattr(key, "forward", lambda x, f=key.forward: calls.append(x.shape) or f(x))
    out = ours.generate(_inputs("A")[0], num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert out.shape[1] == 7 and len(calls) == 1      # image keys projected once for six steps


# -- the cross-attention mask (applied here; transformers 4.57 drops it) --------------------------
def test_vqa_padded_question_equals_unpadded(saved):
    hf, path = saved("A", "BlipForQuestionAnswering")
    ours = bt.BlipForQuestionAnswering.from_pretrained(path)
    px, ids, mask = _inputs("A", batch=2, seq=8, pad_row=0)
    short = ids[:1, :5]
    answers = torch.tensor([[BOS, 5, 9, 13], [BOS, 5, 9, 13]])
    padded = ours.stages(ids, px, mask, labels=answers)["logits"][0]
    alone = ours.stages(short, px[:1], None, labels=answers[:1])["logits"][0]
    _close(padded, alone, "padded vs unpadded question")
    # the padding does matter to a decoder that ignores the mask (transformers): the test has teeth
    img = hf.vision_model(px).last_hidden_state
    q_pad = hf.text_encoder(ids, attention_mask=mask, encoder_hidden_states=img).last_hidden_state
    ref_pad = hf.text_decoder(answers, encoder_hidden_states=q_pad, encoder_attention_mask=mask).logits[0]
    assert max_abs_diff(ref_pad, alone) > 1e-3
    np.testing.assert_array_equal(ours.generate(ids, px, attention_mask=mask)[0].numpy(),
                                  ours.generate(short, px[:1])[0].numpy())


# -- checkpoints ------------------------------------------------------------------------------------
def test_safetensors_and_bin_checkpoints(saved, tmp_path):
    hf, path = saved("A", "BlipForQuestionAnswering")
    with open(os.path.join(path, "model.safetensors"), "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert "text_decoder.cls.predictions.decoder.weight" not in header
    hf.save_pretrained(tmp_path, safe_serialization=False)
    keys = torch.load(tmp_path / "pytorch_model.bin", weights_only=True).keys()
    assert "text_decoder.cls.predictions.decoder.weight" in keys
    a = bt.BlipForQuestionAnswering.from_pretrained(path)
    b = bt.BlipForQuestionAnswering.from_pretrained(str(tmp_path), allow_pickle_bin=True)
    for m in (a, b):
        assert m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight
    px, ids, _ = _inputs("A")
    _close(a(ids, px, labels=ids).loss, b(ids, px, labels=ids).loss, "bin vs safetensors")
    with pytest.raises(Exception, match="(?i)pickle|bin"):
        bt.BlipForQuestionAnswering.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("cls_name", CLASSES)
def test_save_pretrained_loads_in_transformers(saved, tmp_path, cls_name):
    hf, path = saved("C" if cls_name == "BlipForQuestionAnswering" else "B", cls_name)
    ours = getattr(bt, cls_name).from_pretrained(path)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, cls_name).from_pretrained(tmp_path).eval()
    ref = hf.state_dict()
    got = back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_seeded_init_is_deterministic_and_tied():
    from blip_core.configs import config_from_dict
    cfg = config_from_dict(_hf_config("A").to_dict())
    a = bt.BlipForConditionalGeneration(cfg, seed=1)
    b = bt.BlipForConditionalGeneration(cfg, seed=1)
    c = bt.BlipForConditionalGeneration(cfg, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["text_decoder.bert.encoder.layer.0.attention.self.query.weight"],
                           sc["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])
    assert a.text_decoder.cls.predictions.decoder.weight is a.text_decoder.bert.embeddings.word_embeddings.weight
    assert float(sa["text_decoder.bert.embeddings.LayerNorm.weight"].mean()) == 1.0
    std = float(sa["text_decoder.bert.encoder.layer.0.attention.self.query.weight"].std())
    assert 0.01 < std < 0.03                          # normal(0, initializer_range=0.02)
    assert set(sa) == set(transformers.BlipForConditionalGeneration(_hf_config("A")).state_dict())


# -- training, dtypes, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_optimisation_reduces_caption_loss(saved, opt):
    _, path = saved("A", "BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path).train()
    px, ids, mask = _inputs("A", batch=2, seq=6, seed=9)
    optim = (torch.optim.SGD(model.parameters(), lr=0.05) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=3e-3))
    losses = []
    for _ in range(5):
        optim.zero_grad()
        loss = model(px, ids, mask, labels=ids).loss
        loss.backward()
        if not losses:   # gradients reach the image tower through cross-attention
            assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bfloat16_forward_and_generate(saved):
    hf, path = saved("A", "BlipForConditionalGeneration")
    px, ids, mask = _inputs("A")
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    model = bt.BlipForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    logits = model(px, ids, mask).logits
    assert logits.dtype == torch.bfloat16
    atol, rtol = tolerance("default", "bfloat16")
    ref = ref.detach()
    np.testing.assert_allclose(logits.detach().float().numpy(), ref.numpy(), atol=atol * float(ref.abs().max()),
                               rtol=rtol)
    assert model.generate(px, max_new_tokens=4).shape[0] == 2
    half = bt.BlipVisionModel(_cfg_vision(), dtype="float16")
    assert half.dtype == torch.float16
    assert half(torch.randn(1, 3, 16, 16)).last_hidden_state.dtype == torch.float16


def _cfg_vision():
    from blip_core.configs import BlipVisionConfig
    return BlipVisionConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8)


def test_bad_inputs_raise_clear_errors(saved):
    _, path = saved("A", "BlipForConditionalGeneration")
    model = bt.BlipForConditionalGeneration.from_pretrained(path)
    px, ids, mask = _inputs("A")
    cases = [
        (dict(pixel_values=px[:, :, :24, :24], input_ids=ids), "interpolate_pos_encoding"),
        (dict(pixel_values=px[:, :1], input_ids=ids), "3 channels"),
        (dict(pixel_values=px[0], input_ids=ids), "NCHW|dimensions"),
        (dict(pixel_values=(px * 100).long(), input_ids=ids), "floating-point"),
        (dict(pixel_values=px, input_ids=ids.float()), "integer token ids"),
        (dict(pixel_values=px, input_ids=ids + 1000), "outside the vocabulary"),
        (dict(pixel_values=px, input_ids=ids[None]), "2 dimensions"),
        (dict(pixel_values=px, input_ids=ids, attention_mask=mask[:, :3]), "attention_mask"),
        (dict(pixel_values=px, input_ids=ids, labels=ids[:, :3]), "labels shape"),
        (dict(pixel_values=px[:1], input_ids=ids), "batch"),
        (dict(pixel_values=px), "input_ids"),
    ]
    ran = []
    model.vision_model.encoder.forward = lambda *a, **k: ran.append(1)   # errors come before any layer runs
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(**kw)
    assert not ran
    with pytest.raises(ValueError, match="unknown option"):
        model.generate(px, beams=3)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.generate(px[:, :, :16, :16])
    vqa = bt.BlipForQuestionAnswering.from_pretrained(saved("A", "BlipForQuestionAnswering")[1])
    vqa.vision_model.encoder.forward = lambda *a, **k: ran.append(1)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        vqa(ids, px)
    with pytest.raises(ValueError, match="labels .decoder inputs. contains token id -100"):
        vqa(ids, px, labels=ids.masked_fill(mask == 1, -100))
    with pytest.raises(ValueError, match="decoder_attention_mask shape"):
        vqa(ids, px, decoder_input_ids=ids, decoder_attention_mask=mask[:, :2])
    assert not ran
    with pytest.raises(ValueError, match="text_config.hidden_size"):
        bad = _hf_config("B")
        bt.BlipForQuestionAnswering(__import__("blip_core.configs").configs.config_from_dict(bad.to_dict()))


def test_blip2_vision_config_tower():
    """The shared tower also runs BLIP-2's vision config (qkv bias on or off) like transformers."""
    from blip_core.configs import config_from_dict
    for qkv_bias in (True, False):
        cfg = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=28, patch_size=7, qkv_bias=qkv_bias)
        torch.manual_seed(0)
        hf = _spread(transformers.Blip2VisionModel(cfg), seed=5).eval()
        tower = bt.vision.BlipVisionTransformer(config_from_dict(cfg.to_dict()))
        missing = tower.load_state_dict(hf.state_dict(), strict=True)
        assert not missing.missing_keys and (tower.encoder.layers[0].self_attn.qkv.bias is not None) == qkv_bias
        px = torch.randn(2, 3, 28, 28)
        a, b = hf(px), tower(px)
        _close(a.last_hidden_state, b.last_hidden_state, "blip2 vision")
        _close(a.pooler_output, b.pooler_output, "blip2 pooled")


def test_import_does_not_load_other_frameworks():
    code = ("import sys, backends.torch; bad = [m for m in ('tensorflow', 'jax', 'flax', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
