"""`BlipProcessor` / `Blip2Processor` against transformers' processors on tiny tokenizers.

Same images, texts and keyword arguments through both: every output key, dtype and value must
agree, including BLIP-2's `<image>` placeholders prepended after padding and truncation.
"""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import transformers

import backends.torch  # noqa: F401  registers return_tensors="pt", which the comparisons use
from blip_core.processing import Blip2Processor, BlipImageProcessor, BlipProcessor, load_tokenizer
from test_tokenization import make_bpe_dir, make_unigram_dir, make_wordpiece_dir, random_texts

SIZE = {"height": 32, "width": 32}


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def assert_same(ours, ref):
    assert list(ours.keys()) == list(ref.keys())
    for key in ref:
        a, b = ours[key], ref[key]
        if isinstance(b, list) and not (b and isinstance(b[0], np.ndarray)):
            assert a == b, key
            continue
        a, b = (np.asarray(x) if isinstance(x, (list, np.ndarray)) else x.numpy() for x in (a, b))
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    return {"bert": make_wordpiece_dir(root / "bert"), "opt": make_bpe_dir(root / "opt"),
            "t5": make_unigram_dir(root / "t5")}


def pair(kind, dirs, num_query_tokens=None):
    """(ours, transformers') processor over the same files."""
    ours_ip, ref_ip = BlipImageProcessor(size=SIZE), transformers.BlipImageProcessor(size=SIZE)
    ours_tok, ref_tok = load_tokenizer(str(dirs[kind])), transformers.AutoTokenizer.from_pretrained(str(dirs[kind]))
    if kind == "bert":
        return BlipProcessor(ours_ip, ours_tok), transformers.BlipProcessor(ref_ip, ref_tok)
    return (Blip2Processor(ours_ip, ours_tok, num_query_tokens=num_query_tokens),
            transformers.Blip2Processor(ref_ip, ref_tok, num_query_tokens=num_query_tokens))


BLIP_CALLS = [{}, {"padding": True}, {"padding": "max_length", "max_length": 9, "truncation": True},
              {"padding": True, "return_tensors": "np"}, {"padding": True, "return_tensors": "pt"}]


def test_blip_processor_matches(dirs):
    ours, ref = pair("bert", dirs)
    texts, ims = random_texts(3, seed=3), images()
    for kwargs in BLIP_CALLS:
        assert_same(ours(images=ims, text=texts, **kwargs), ref(images=ims, text=texts, **kwargs))
        assert_same(ours(text=texts[0], **kwargs), ref(text=texts[0], **kwargs))
        assert_same(ours(images=ims[0], **kwargs), ref(images=ims[0], **kwargs))
    out = ours(images=ims, text=texts, padding=True, return_tensors="np")
    assert "token_type_ids" not in out and out["pixel_values"].shape == (3, 3, 32, 32)
    assert ours.batch_decode(out["input_ids"], skip_special_tokens=True) == \
        ref.batch_decode(out["input_ids"], skip_special_tokens=True)
    assert ours.model_input_names == ref.model_input_names


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("num_query_tokens", [None, 4])
def test_blip2_processor_matches(dirs, kind, num_query_tokens):
    ours, ref = pair(kind, dirs, num_query_tokens)
    assert ours.image_token_id == ref.tokenizer.convert_tokens_to_ids("<image>") == len(ref.tokenizer) - 1
    texts, ims = random_texts(3, seed=4), images()
    calls = [{}, {"padding": True}, {"padding": True, "return_tensors": "np"},
             {"padding": "max_length", "max_length": 10, "truncation": True, "return_tensors": "pt"},
             {"padding": True, "padding_side": "left", "max_length": 8, "truncation": True}]
    for kwargs in calls:
        if num_query_tokens is None and "max_length" in kwargs:
            # transformers raises TypeError (max_length - None); we apply max_length to the text alone.
            text_kwargs = {k: v for k, v in kwargs.items() if k != "return_tensors"}
            want = ref.tokenizer(texts, **text_kwargs, return_token_type_ids=False)
            assert np.asarray(ours(text=texts, **kwargs)["input_ids"]).tolist() == want["input_ids"]
            continue
        got, want = ours(images=ims, text=texts, **kwargs), ref(images=ims, text=texts, **kwargs)
        assert_same(got, want)
        assert_same(ours(text=texts, **kwargs), ref(text=texts, **kwargs))
    assert_same(ours(images=ims, return_tensors="np"), ref(images=ims, return_tensors="np"))
    got = ours(images=ims, text=texts, padding=True, truncation=True, max_length=9, return_tensors="np")
    if num_query_tokens:  # placeholders survive truncation and sit before the (padded) text
        assert (got["input_ids"][:, :4] == ours.image_token_id).all() and got["input_ids"].shape[1] <= 9
        assert (got["attention_mask"][:, :4] == 1).all()
    for skip in (False, True):
        assert ours.batch_decode(got["input_ids"], skip_special_tokens=skip) == \
            ref.batch_decode(got["input_ids"], skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["bert", "opt", "t5"])
def test_save_pretrained_round_trips_through_transformers(dirs, tmp_path, kind):
    ours, _ = pair(kind, dirs, num_query_tokens=3)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref_cls = transformers.BlipProcessor if kind == "bert" else transformers.Blip2Processor
    ref = ref_cls.from_pretrained(str(tmp_path / "ours"))
    if kind != "bert":
        assert ref.num_query_tokens == 3
    texts, ims = random_texts(3, seed=6), images(seed=6)
    kwargs = {"padding": True, "return_tensors": "np"}
    assert_same(ours(images=ims, text=texts, **kwargs), ref(images=ims, text=texts, **kwargs))
    ref.save_pretrained(str(tmp_path / "ref"))
    again = type(ours).from_pretrained(str(tmp_path / "ref"))
    assert_same(again(images=ims, text=texts, **kwargs), ref(images=ims, text=texts, **kwargs))
    if kind != "bert":
        assert again.num_query_tokens == 3 and len(again.tokenizer) == len(ref.tokenizer)


@pytest.mark.parametrize("kind", ["bert", "opt"])
def test_text_options_saved_with_the_tokenizer_are_the_processors_defaults(dirs, tmp_path, kind):
    """Text options in tokenizer_config.json (padding to max_length 7, truncation) are the processor's
    defaults, as transformers' processors take them, though the tokenizer alone does not apply them."""
    folder = tmp_path / kind
    shutil.copytree(dirs[kind], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(padding="max_length", max_length=7, truncation=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = pair(kind, {kind: folder}, num_query_tokens=2)
    texts = random_texts(3, seed=8)
    ims = images(len(texts), seed=8)
    got, want = ours(images=ims, text=texts, return_tensors="np"), ref(images=ims, text=texts, return_tensors="np")
    assert_same(got, want)
    assert got["input_ids"].shape == (len(texts), 7)          # BLIP-2: 2 placeholders + 5 tokens


def test_bad_calls_raise(dirs):
    blip, _ = pair("bert", dirs)
    blip2, _ = pair("opt", dirs, num_query_tokens=2)
    for proc in (blip, blip2):
        with pytest.raises(ValueError, match="images or text"):
            proc()
        with pytest.raises(ValueError):
            proc(images=[])
    with pytest.raises(ValueError, match="Invalid input text"):
        blip2(text=[1, 2])
    with pytest.raises(ValueError, match="num_query_tokens"):
        Blip2Processor(BlipImageProcessor(), load_tokenizer(str(dirs["opt"])), num_query_tokens=-1)
    with pytest.warns(UserWarning, match="not a valid argument"):
        blip(text="a cat", not_an_option=1)
