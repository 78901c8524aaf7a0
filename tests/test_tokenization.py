"""The three tokenizers against transformers' own (fast, and slow where one exists) on tiny vocabularies.

The vocabularies are built here: a hand-written WordPiece vocab.txt, a byte-level BPE trained with
the `tokenizers` library (saved as vocab.json + merges.txt with OPT's tokenizer_config), and a
T5-style unigram tokenizer.json. transformers loads the same files; ids, masks and decoded text
must be identical.
"""
import json
import random

import numpy as np
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from blip_core.processing import (BertTokenizer, GPT2Tokenizer, T5Tokenizer, add_blip_special_tokens,
                                  load_tokenizer)

WORDPIECE_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
                   "a", "dog", "##s", "##ing", "run", "photo", "of", ".", ",", "!", "?", "'", "s", "t", "don",
                   "##t", "hello", "world", "h", "##e", "##l", "##o", "caf", "1", "##2", "中"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "dogs", "running", "photo", "of", "The", "CAT", "Hello!",
         "world,", "don't", "café", "naïve", "12", "?", "...", "中文", "[CLS]", "[SEP]", "</s>", "<pad>", "xyzzy",
         "  ", "\t", "park", "how", "are", "you"]


def random_texts(n=24, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]
    return texts + ["", "a", "The cat sat on the mat."]


def make_wordpiece_dir(path):
    """A BERT-style directory with only vocab.txt (plus a BLIP-like tokenizer_config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                            "do_lower_case": True}))
    return path


def make_bpe_dir(path, padding_side=None):
    """An OPT-style directory: byte-level BPE vocab.json + merges.txt, bos `</s>` (id 2), pad id 1."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(random_texts(60, seed=1), trainer)
    tok.model.save(str(path))
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
              "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
              "errors": "replace"}
    if padding_side:
        config["padding_side"] = padding_side
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def make_unigram_dir(path):
    """A T5-style tokenizer.json: unigram model, Metaspace, `$A </s>` post-processor."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(random_texts(60, seed=2), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    return path


def assert_same_encoding(ours, ref):
    assert list(ours.keys()) == list(ref.keys())
    for key in ref:
        a, b = ours[key], ref[key]
        if isinstance(b, list):
            assert a == b, key
        else:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key


CALLS = [{}, {"padding": True}, {"padding": "longest", "padding_side": "left"},
         {"padding": "max_length", "max_length": 12, "truncation": True}, {"max_length": 5},
         {"truncation": True, "max_length": 6, "padding": True}, {"add_special_tokens": False},
         {"padding": True, "pad_to_multiple_of": 4}, {"return_token_type_ids": False, "return_length": True},
         {"return_special_tokens_mask": True, "return_offsets_mapping": True},
         {"padding": True, "return_tensors": "np"}]


def _check_against(ours, ref, texts):
    for kwargs in CALLS:
        assert_same_encoding(ours(texts, **kwargs), ref(texts, **kwargs))
        assert_same_encoding(ours(texts[0], **kwargs), ref(texts[0], **kwargs))
    pairs = texts[::-1]          # and as pairs: the template's second segment, its truncation
    for kwargs in ({}, {"padding": True, "truncation": True, "max_length": 10}):
        assert_same_encoding(ours(texts, pairs, **kwargs), ref(texts, pairs, **kwargs))
    for skip in (False, True):
        batch = ours(texts, padding=True)["input_ids"]
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.decode(np.array(batch[1]), skip_special_tokens=skip) == ref.decode(batch[1],
                                                                                      skip_special_tokens=skip)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"bert": make_wordpiece_dir(root / "bert"), "bpe": make_bpe_dir(root / "bpe"),
            "t5": make_unigram_dir(root / "t5")}


def test_wordpiece_matches_bert_fast_and_slow(dirs):
    ours = BertTokenizer.from_pretrained(str(dirs["bert"]))
    fast = transformers.BertTokenizerFast.from_pretrained(str(dirs["bert"]))
    slow = transformers.BertTokenizer.from_pretrained(str(dirs["bert"]))
    texts = random_texts()
    _check_against(ours, fast, texts)
    for text in texts:
        assert ours(text)["input_ids"] == slow(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == slow.decode(slow(text)["input_ids"])


def test_blip_special_tokens(dirs):
    ours = add_blip_special_tokens(BertTokenizer.from_pretrained(str(dirs["bert"])))
    ref = transformers.BertTokenizerFast.from_pretrained(str(dirs["bert"]))
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ref.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    n = len(WORDPIECE_VOCAB)
    assert (ours.bos_token_id, ours.additional_special_tokens_ids) == (n, [n + 1])
    assert (ref.bos_token_id, ref.additional_special_tokens_ids) == (n, [n + 1])
    assert ours.all_special_ids == ref.all_special_ids and len(ours) == len(ref) == n + 2
    _check_against(ours, ref, random_texts() + ["[DEC] a photo of [ENC]"])


def test_bpe_matches_gpt2_fast_and_slow(dirs):
    ours = load_tokenizer(str(dirs["bpe"]))
    assert isinstance(ours, GPT2Tokenizer)
    fast = transformers.AutoTokenizer.from_pretrained(str(dirs["bpe"]))
    slow = transformers.GPT2Tokenizer.from_pretrained(str(dirs["bpe"]))
    assert isinstance(fast, transformers.GPT2TokenizerFast)
    texts = random_texts()
    assert ours("a cat")["input_ids"][0] == 2 and ours.pad_token_id == 1  # OPT: bos </s> first, pad 1
    _check_against(ours, fast, texts)
    for text in texts:
        assert ours(text)["input_ids"] == slow(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == \
            slow.decode(slow(text)["input_ids"], skip_special_tokens=True)


def test_bpe_left_padding_from_config(tmp_path):
    path = make_bpe_dir(tmp_path / "opt", padding_side="left")
    ours, ref = load_tokenizer(str(path)), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.padding_side == ref.padding_side == "left"
    texts = ["a", "the cat sat on the mat"] + random_texts(6)
    assert_same_encoding(ours(texts, padding=True), ref(texts, padding=True))
    assert ours(texts, padding=True)["attention_mask"][0][0] == 0  # the short sample is padded on the left


def test_unigram_matches_t5_fast(dirs):
    ours = load_tokenizer(str(dirs["t5"]))
    assert isinstance(ours, T5Tokenizer)
    ref = transformers.T5TokenizerFast(tokenizer_file=str(dirs["t5"] / "tokenizer.json"))
    assert len(ours) == len(ref) and ours.additional_special_tokens_ids == ref.additional_special_tokens_ids
    assert ours("a cat")["input_ids"][-1] == ours.eos_token_id == 1
    _check_against(ours, ref, random_texts() + ["<extra_id_0> a <extra_id_1>"])


@pytest.mark.parametrize("kind", ["bert", "bpe", "t5"])
def test_save_pretrained_round_trips_through_transformers(dirs, tmp_path, kind):
    ours = load_tokenizer(str(dirs[kind]))
    if kind == "bert":
        add_blip_special_tokens(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert ref.is_fast and ref.all_special_tokens == ours.all_special_tokens
    texts = random_texts(10, seed=5)
    _check_against(ours, ref, texts)
    if kind != "t5":  # the slow classes read the classic vocab files written beside tokenizer.json
        slow_cls = transformers.BertTokenizer if kind == "bert" else transformers.GPT2Tokenizer
        slow = slow_cls.from_pretrained(str(tmp_path / "ours"))
        assert [slow(t)["input_ids"] for t in texts] == [ours(t)["input_ids"] for t in texts]
    # ... and the other way: transformers' own save is read by load_tokenizer.
    ref.save_pretrained(str(tmp_path / "ref"))
    again = load_tokenizer(str(tmp_path / "ref"))
    assert type(again) is type(ours)
    _check_against(again, ref, texts)


def test_tokenizer_json_only_directory(dirs, tmp_path):
    fast = transformers.BertTokenizerFast.from_pretrained(str(dirs["bert"]))
    fast.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(str(tmp_path))
    ref = transformers.BertTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert isinstance(ours, BertTokenizer)
    _check_against(ours, ref, random_texts(8))


def test_return_tensors_dtypes(dirs):
    import backends.torch  # noqa: F401  registers return_tensors="pt"
    tok = load_tokenizer(str(dirs["bpe"]))
    ref = transformers.AutoTokenizer.from_pretrained(str(dirs["bpe"]))
    texts = ["a cat", "the dog is running"]
    for rt in ("np", "pt"):
        a, b = tok(texts, padding=True, return_tensors=rt), ref(texts, padding=True, return_tensors=rt)
        assert type(a["input_ids"]) is type(b["input_ids"]) and a["input_ids"].dtype == b["input_ids"].dtype
        assert np.array_equal(np.asarray(a["input_ids"]), np.asarray(b["input_ids"]))


def test_bad_inputs_raise(dirs):
    tok = load_tokenizer(str(dirs["bert"]))
    ref = transformers.BertTokenizerFast.from_pretrained(str(dirs["bert"]))
    for bad in (None, 3, [1, 2], {"a": 1}):
        with pytest.raises(ValueError):
            tok(bad)
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError):
        ref("a", padding="sideways")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "a cat sat"], return_tensors="np")
    with pytest.raises(TypeError):
        tok("a", not_an_option=True)
    no_pad = load_tokenizer(str(dirs["bpe"]))
    no_pad._special["pad_token"] = None
    with pytest.raises(ValueError, match="pad_token"):
        no_pad(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="Cannot tell"):
        load_tokenizer(str(dirs["bert"].parent))


PAIR_CALLS = [{}, {"padding": True}, {"truncation": "longest_first", "max_length": 9, "padding": True},
              {"truncation": True, "max_length": 8}, {"return_special_tokens_mask": True},
              {"add_special_tokens": False, "padding": True}]


@pytest.mark.parametrize("kind", ["bert", "bpe", "t5"])
def test_text_pairs_match_transformers(dirs, kind):
    """``tok(text, text_pair)``: the pair template (BERT: [CLS] a [SEP] b [SEP], second segment's token types 1),
    truncation of pairs, and batches of pairs, as transformers' fast tokenizer builds them from the same files."""
    ours = load_tokenizer(str(dirs[kind]))
    ref = (transformers.T5TokenizerFast(tokenizer_file=str(dirs["t5"] / "tokenizer.json")) if kind == "t5"
           else transformers.AutoTokenizer.from_pretrained(str(dirs[kind])))
    firsts, seconds = random_texts(8, seed=3), random_texts(8, seed=4)
    for kwargs in PAIR_CALLS:
        assert_same_encoding(ours(firsts, seconds, **kwargs), ref(firsts, seconds, **kwargs))
        assert_same_encoding(ours(firsts[2], seconds[2], **kwargs), ref(firsts[2], seconds[2], **kwargs))
    if kind == "bert":       # the slow class builds pairs by its own code: the same ids ...
        slow = transformers.BertTokenizer.from_pretrained(str(dirs["bert"]))
        pairs = [(a, b) for a, b in zip(firsts, seconds) if b]   # ... except that a single call with an empty
        # second text is a pair there ([CLS] a [SEP] [SEP]) and one text in the fast class and here ([CLS] a [SEP])
        assert [ours(a, b)["input_ids"] for a, b in pairs] == [slow(a, b)["input_ids"] for a, b in pairs]


@pytest.mark.parametrize("lower, accents", [(True, None), (False, False), (True, False)])
def test_casing_options_of_the_config_win_over_tokenizer_json(dirs, tmp_path, lower, accents):
    """As ``BertTokenizerFast``: ``do_lower_case`` / ``strip_accents`` in tokenizer_config.json replace what
    tokenizer.json's normalizer says (a saved tokenizer.json lower-cases; the config may say otherwise)."""
    fast = transformers.BertTokenizerFast.from_pretrained(str(dirs["bert"]))
    fast.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "strip_accents": accents}))
    ours = load_tokenizer(str(tmp_path))
    ref = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    texts = random_texts(8) + ["The CAT café naïve Hello!"]
    _check_against(ours, ref, texts)
    assert (ours("The CAT")["input_ids"] != ours("the cat")["input_ids"]) == (not lower)
    assert (ours("café")["input_ids"] != ours("cafe")["input_ids"]) == (accents is False)


def _with_reference(dirs, kind):
    """(ours, transformers' fast tokenizer) over the same files of ``dirs[kind]``."""
    ours = load_tokenizer(str(dirs[kind]))
    ref = (transformers.T5TokenizerFast(tokenizer_file=str(dirs["t5"] / "tokenizer.json")) if kind == "t5"
           else transformers.AutoTokenizer.from_pretrained(str(dirs[kind])))
    return ours, ref


OVERFLOW_CALLS = [{"truncation": True, "max_length": 6, "stride": 2, "return_overflowing_tokens": True},
                  {"truncation": True, "max_length": 7, "return_overflowing_tokens": True, "padding": True},
                  {"truncation": True, "max_length": 5, "stride": 1, "return_overflowing_tokens": True,
                   "return_length": True, "return_tensors": "np", "padding": True}]


@pytest.mark.parametrize("kind", ["bert", "bpe", "t5"])
def test_overflowing_tokens_match_transformers(dirs, kind):
    """``return_overflowing_tokens=True``: each window cut off by truncation (overlapping by ``stride``) is a
    row of its own and ``overflow_to_sample_mapping`` names the text it came from, as in transformers."""
    ours, ref = _with_reference(dirs, kind)
    texts = random_texts(6, seed=9)
    for kwargs in OVERFLOW_CALLS:
        assert_same_encoding(ours(texts, **kwargs), ref(texts, **kwargs))
        assert_same_encoding(ours(texts[1], **kwargs), ref(texts[1], **kwargs))
    rows = ours(texts, **OVERFLOW_CALLS[0])
    assert len(rows["input_ids"]) > len(texts)
    assert sorted(set(rows["overflow_to_sample_mapping"])) == list(range(len(texts)))


@pytest.mark.parametrize("kind", ["bert", "bpe", "t5"])
def test_split_special_tokens_per_call_matches_transformers(dirs, kind):
    """``split_special_tokens=True`` in a call encodes special tokens written in the text as plain text (and
    ``False`` as the special tokens), whatever the tokenizer's own setting, as in transformers."""
    ours, ref = _with_reference(dirs, kind)
    texts = ["[CLS] a cat </s> <pad>", "the [SEP] dog [MASK] </s>", "a photo of"]
    for split in (True, False):
        assert_same_encoding(ours(texts, split_special_tokens=split), ref(texts, split_special_tokens=split))
        assert_same_encoding(ours(texts[0], split_special_tokens=split), ref(texts[0], split_special_tokens=split))
    split, whole = (ours(texts[0], split_special_tokens=s)["input_ids"] for s in (True, False))
    assert split != whole


@pytest.mark.parametrize("kind", ["bert", "bpe", "t5"])
def test_decode_cleanup_argument_matches_transformers(dirs, kind):
    """``clean_up_tokenization_spaces=True/False`` given to ``decode`` / ``batch_decode`` wins over the tokenizer's
    own default (None keeps it), as in transformers."""
    ours, ref = _with_reference(dirs, kind)
    texts = ["don't . the cat , sat !", "a dog ' s photo ?", "hello world"]
    batch = ours(texts, padding=True)["input_ids"]
    for clean in (True, False, None):
        for skip in (False, True):
            assert ours.batch_decode(batch, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                ref.batch_decode(batch, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
        assert ours.decode(batch[0], clean_up_tokenization_spaces=clean) == \
            ref.decode(batch[0], clean_up_tokenization_spaces=clean)
    assert ours.decode(batch[0], clean_up_tokenization_spaces=True) != \
        ours.decode(batch[0], clean_up_tokenization_spaces=False)


MODEL_MAX_CALLS = [{"truncation": True}, {"padding": "max_length"}, {"padding": "max_length", "truncation": True},
                   {"truncation": True, "padding": True, "return_tensors": "np"}]


@pytest.mark.parametrize("kind", ["bert", "bpe"])
def test_model_max_length_of_the_config_bounds_truncation_and_padding(dirs, tmp_path, kind):
    """``model_max_length`` in tokenizer_config.json is the length that truncation and ``padding="max_length"``
    use when a call gives no ``max_length``, as in transformers."""
    import shutil
    folder = tmp_path / kind
    shutil.copytree(dirs[kind], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 6
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = load_tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.model_max_length == ref.model_max_length == 6
    texts = random_texts(8, seed=10)
    for kwargs in MODEL_MAX_CALLS:
        assert_same_encoding(ours(texts, **kwargs), ref(texts, **kwargs))
        assert_same_encoding(ours(texts[0], **kwargs), ref(texts[0], **kwargs))
    assert max(len(ids) for ids in ours(texts, truncation=True)["input_ids"]) == 6
