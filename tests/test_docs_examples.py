"""The documentation's examples, in our words, run with only the import changed.

Each example is written once as a function of a module ``M`` (``transformers`` or one of our
backends) and run on small local models; transformers' PyTorch classes give the reference
numbers. The TF examples use transformers' ``TFBlip...`` names, which the TF backend answers to.
"""
import importlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from blip_apps.demo import build_demo_model
from blip_core import BACKENDS, to_numpy
from blip_core.numerics import tolerance
from test_tokenization import make_bpe_dir

ATOL, RTOL = tolerance("default", "float32")


def _module(name):
    return transformers if name == "transformers" else importlib.import_module(f"backends.{name}")


def _cls(M, name, backend):
    """transformers' TF examples spell the classes TFBlip...; our TF backend answers to both."""
    return getattr(M, "TF" + name if backend == "tf" else name)


def _tensors(backend):
    return {"transformers": "pt", "torch": "pt", "tf": "tf", "jax": "jax"}[backend]


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return {arch: build_demo_model(str(root / arch), seed=1, architecture=arch)
            for arch in ("BlipModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval",
                         "BlipForQuestionAnswering")}


# -- the examples ---------------------------------------------------------------------------------------
def zero_shot_classification(M, backend, path):
    processor = M.AutoProcessor.from_pretrained(path)
    model = _cls(M, "BlipModel", backend).from_pretrained(path)
    inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=_image(), return_tensors=_tensors(backend),
                       padding=True)
    outputs = model(**inputs)
    return {"logits_per_image": outputs.logits_per_image}


def text_and_image_features(M, backend, path):
    processor = M.AutoProcessor.from_pretrained(path)
    model = _cls(M, "BlipModel", backend).from_pretrained(path)
    inputs = processor(text=["a photo of a cat", "a photo of a dog"], padding=True, return_tensors=_tensors(backend))
    text_features = model.get_text_features(**inputs)
    inputs = processor(images=_image(1), return_tensors=_tensors(backend))
    return {"text": text_features, "image": model.get_image_features(**inputs)}


def conditional_captioning(M, backend, path):
    processor = M.BlipProcessor.from_pretrained(path)
    model = _cls(M, "BlipForConditionalGeneration", backend).from_pretrained(path)
    inputs = processor(images=_image(2), text="a picture of", return_tensors=_tensors(backend))
    outputs = model(**inputs)
    ids = model.generate(**inputs, max_new_tokens=8)
    return {"logits": outputs.logits, "ids": ids, "text": processor.decode(to_numpy(ids)[0], skip_special_tokens=True)}


def image_text_matching(M, backend, path):
    processor = M.AutoProcessor.from_pretrained(path)
    model = _cls(M, "BlipForImageTextRetrieval", backend).from_pretrained(path)
    inputs = processor(images=_image(3), text="a photo of a cat", return_tensors=_tensors(backend))
    itm = model(**inputs).itm_score
    cosine = model(**inputs, use_itm_head=False).itm_score
    return {"itm": itm, "cosine": cosine}


def visual_question_answering(M, backend, path):
    processor = M.AutoProcessor.from_pretrained(path)
    model = _cls(M, "BlipForQuestionAnswering", backend).from_pretrained(path)
    inputs = processor(images=_image(4), text="is the photo of a cat", return_tensors=_tensors(backend))
    ids = model.generate(**inputs, max_new_tokens=5)
    labels = processor(text="a cat", return_tensors=_tensors(backend)).input_ids
    loss = model(**inputs, labels=labels).loss
    return {"ids": ids, "loss": loss, "answer": processor.decode(to_numpy(ids)[0], skip_special_tokens=True)}


EXAMPLES = {
    "zero_shot_classification": ("BlipModel", zero_shot_classification),
    "text_and_image_features": ("BlipModel", text_and_image_features),
    "conditional_captioning": ("BlipForConditionalGeneration", conditional_captioning),
    "image_text_matching": ("BlipForImageTextRetrieval", image_text_matching),
    "visual_question_answering": ("BlipForQuestionAnswering", visual_question_answering),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_blip_examples_match_transformers(blip_dirs, example, backend):
    arch, run = EXAMPLES[example]
    with torch.no_grad():
        want = run(transformers, "transformers", blip_dirs[arch])
    got = run(_module(backend), backend, blip_dirs[arch])
    assert set(got) == set(want)
    for key in want:
        if isinstance(want[key], str):
            assert got[key] == want[key], key
        elif key == "ids":
            np.testing.assert_array_equal(np.asarray(to_numpy(got[key])), want[key].numpy())
        else:
            np.testing.assert_allclose(np.asarray(to_numpy(got[key]), np.float32),
                                       np.asarray(to_numpy(want[key]), np.float32), atol=ATOL, rtol=RTOL,
                                       err_msg=key)


# -- BLIP-2 ---------------------------------------------------------------------------------------------
Q = 4


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """transformers' random BLIP-2 OPT captioner with a Blip2Processor over a small BPE vocabulary."""
    root = tmp_path_factory.mktemp("docs2")
    tok = transformers.AutoTokenizer.from_pretrained(str(make_bpe_dir(root / "tok")))
    processor = transformers.Blip2Processor(transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tok,
                                            num_query_tokens=Q)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=99),
        text_config=dict(model_type="opt", vocab_size=len(processor.tokenizer), hidden_size=32, ffn_dim=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=Q, image_token_index=image_token)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else None
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return str(root / "model")


def blip2_captioning(M, backend, path, dtype=None):
    processor = M.Blip2Processor.from_pretrained(path)
    cls = _cls(M, "Blip2ForConditionalGeneration", backend)
    model = cls.from_pretrained(path) if dtype is None else cls.from_pretrained(path, torch_dtype=dtype)
    inputs = processor(images=_image(5, 48), text="Question: how many cats are there? Answer:",
                       return_tensors=_tensors(backend))
    if backend in ("transformers", "torch"):
        inputs = inputs.to("cpu", dtype or torch.float32)
    ids = model.generate(**inputs, max_new_tokens=6)
    return ids, processor.batch_decode(to_numpy(ids), skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("backend", BACKENDS)
def test_blip2_example_matches_transformers(blip2_dir, backend):
    M = _module(backend)
    if not hasattr(M, "Blip2ForConditionalGeneration"):
        pytest.fail(f"the {backend} backend has no Blip2ForConditionalGeneration")
    with torch.no_grad():
        want_ids, want_text = blip2_captioning(transformers, "transformers", blip2_dir)
    ids, text = blip2_captioning(M, backend, blip2_dir)
    np.testing.assert_array_equal(np.asarray(to_numpy(ids)), want_ids.numpy())
    assert text == want_text


def test_blip2_half_precision_example_runs_in_torch(blip2_dir):
    """The documented float16 call: processor outputs moved with ``.to(device, torch.float16)``."""
    ids, text = blip2_captioning(_module("torch"), "torch", blip2_dir, dtype=torch.float16)
    with torch.no_grad():
        want, _ = blip2_captioning(transformers, "transformers", blip2_dir, dtype=torch.float16)
    assert ids.shape[0] == 1 and isinstance(text, str)
    np.testing.assert_array_equal(ids.numpy(), want.numpy())
