"""The three tokenizer kinds BLIP and BLIP-2 use, on the shared ``PreTrainedTokenizer`` base.

* ``BertTokenizer``: WordPiece for BLIP and the Q-Former (plus BLIP's ``[DEC]`` / ``[ENC]``).
* ``GPT2Tokenizer``: byte-level BPE for OPT.
* ``T5Tokenizer``: SentencePiece-unigram for T5 / Flan-T5, from ``tokenizer.json``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .tokenization import (SPECIAL_KEYS, TOKENIZER_CONFIG, TOKENIZER_FILE, PreTrainedTokenizer, _content,
                           _read_json)

# --------------------------------------------------------------------------- the three kinds


class BertTokenizer(PreTrainedTokenizer):
    """WordPiece as `BertTokenizerFast`: `[CLS] text [SEP]`, lower-cased, `token_type_ids` returned.

    Example::

        tok = add_blip_special_tokens(BertTokenizer.from_pretrained("blip_dir"))
        tok(["a dog", "two cats"], padding=True, return_tensors="np")["input_ids"]
    """

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    default_special_tokens = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                              "cls_token": "[CLS]", "mask_token": "[MASK]"}
    _CLASS_NAME = "BertTokenizer"

    def __init__(self, backend: Tokenizer, added_tokens_decoder: Optional[dict] = None, **kwargs):
        kwargs.setdefault("do_lower_case", True)
        kwargs.setdefault("tokenize_chinese_chars", True)
        kwargs.setdefault("strip_accents", None)
        super().__init__(backend, added_tokens_decoder, **kwargs)
        # As BertTokenizerFast: the config's casing/accents options win over tokenizer.json's normalizer.
        state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else {}
        wanted = {"lowercase": kwargs["do_lower_case"], "strip_accents": kwargs["strip_accents"],
                  "handle_chinese_chars": kwargs["tokenize_chinese_chars"]}
        if any(state.get(k, v) != v for k, v in wanted.items()):
            cls = getattr(normalizers, state.pop("type"))
            state.update(wanted)
            backend.normalizer = cls(**state)

    @classmethod
    def _from_classic_files(cls, directory: str, config: dict) -> Tokenizer:
        path = os.path.join(directory, "vocab.txt")
        if not os.path.isfile(path):
            raise ValueError(f"{directory} has neither {TOKENIZER_FILE} nor vocab.txt")
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}
        # Built like transformers' BertConverter; the slow tokenizer also cleans up decoded spaces.
        config.setdefault("clean_up_tokenization_spaces", True)
        merged = {**cls.default_special_tokens, **config}
        unk, cls_tok, sep = (_content(merged[k]) for k in ("unk_token", "cls_token", "sep_token"))
        for name, tok in (("cls_token", cls_tok), ("sep_token", sep)):
            if tok not in vocab:
                raise ValueError(f"{name} {tok!r} is not in {path}")
        backend = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
            strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_tok}:0 $A:0 {sep}:0", pair=f"{cls_tok}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls_tok, vocab[cls_tok]), (sep, vocab[sep])])
        backend.decoder = decoders.WordPiece(prefix="##")
        return backend


class GPT2Tokenizer(PreTrainedTokenizer):
    """Byte-level BPE as `GPT2TokenizerFast` (OPT: bos `</s>` prepended when `add_bos_token`)."""

    default_special_tokens = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                              "eos_token": "<|endoftext|>"}
    _CLASS_NAME = "GPT2Tokenizer"

    def _check_batch(self, is_split_into_words: bool) -> None:
        if is_split_into_words and not self.init_kwargs.get("add_prefix_space"):
            raise ValueError("GPT2Tokenizer needs add_prefix_space=True for pre-tokenized inputs")

    @classmethod
    def _from_classic_files(cls, directory: str, config: dict) -> Tokenizer:
        vocab_path, merges_path = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
        if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
            raise ValueError(f"{directory} has neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
        vocab = _read_json(vocab_path)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for i, line in enumerate(lines)
                  if line.strip() and not (i == 0 and line.startswith("#version"))]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")))
        backend.decoder = decoders.ByteLevel()
        if config.get("add_bos_token"):
            bos = _content(config.get("bos_token", cls.default_special_tokens["bos_token"]))
            if bos not in vocab:
                raise ValueError(f"bos_token {bos!r} is not in {vocab_path}")
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab[bos])])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        # The slow GPT-2 tokenizer wraps its special tokens as normalized AddedTokens; keep those flags.
        for key in SPECIAL_KEYS:
            if isinstance(config.get(key), str):
                config[key] = AddedToken(config[key], normalized=True, special=True)
        return backend


class T5Tokenizer(PreTrainedTokenizer):
    """SentencePiece-unigram as `T5TokenizerFast` (from tokenizer.json): `text </s>`, 100 sentinels."""

    default_special_tokens = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    add_prefix_space_default = None
    _CLASS_NAME = "T5TokenizerFast"  # no spiece.model is written, so only the fast class can load it

    def __init__(self, backend: Tokenizer, added_tokens_decoder: Optional[dict] = None, extra_ids: int = 100,
                 additional_special_tokens: Optional[list] = None, **kwargs):
        if additional_special_tokens is not None:
            extra = [t for t in additional_special_tokens if "<extra_id_" in str(_content(t))]
            if not extra:
                additional_special_tokens = list(additional_special_tokens) + \
                    [f"<extra_id_{i}>" for i in range(extra_ids)]
            elif extra_ids > 0 and extra_ids != len(extra):
                raise ValueError(f"extra_ids ({extra_ids}) does not match the {len(extra)} <extra_id_*> tokens "
                                 "in additional_special_tokens")
        else:
            additional_special_tokens = [f"<extra_id_{i}>" for i in range(extra_ids)]
        super().__init__(backend, added_tokens_decoder, extra_ids=extra_ids,
                         additional_special_tokens=additional_special_tokens, **kwargs)


def add_blip_special_tokens(tokenizer: BertTokenizer) -> BertTokenizer:
    """Give a bert-base-uncased tokenizer BLIP's extra tokens: bos `[DEC]` and `[ENC]` (30522, 30523)."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


_BY_CLASS = {"bert": BertTokenizer, "distilbert": BertTokenizer, "gpt2": GPT2Tokenizer, "opt": GPT2Tokenizer,
             "t5": T5Tokenizer}
_BY_MODEL = {"WordPiece": BertTokenizer, "BPE": GPT2Tokenizer, "Unigram": T5Tokenizer}


def load_tokenizer(directory: str, **overrides) -> PreTrainedTokenizer:
    """Pick the tokenizer kind from tokenizer_config.json's `tokenizer_class`, else from the files."""
    config = _read_json(os.path.join(directory, TOKENIZER_CONFIG)) or {}
    name = str(config.get("tokenizer_class") or "").lower().replace("tokenizerfast", "").replace("tokenizer", "")
    cls = _BY_CLASS.get(name)
    if cls is None and os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        cls = _BY_MODEL.get(_read_json(os.path.join(directory, TOKENIZER_FILE))["model"].get("type"))
    if cls is None and os.path.isfile(os.path.join(directory, "vocab.txt")):
        cls = BertTokenizer
    if cls is None and os.path.isfile(os.path.join(directory, "merges.txt")):
        cls = GPT2Tokenizer
    if cls is None:
        raise ValueError(f"Cannot tell which tokenizer {directory} holds (tokenizer_class "
                         f"{config.get('tokenizer_class')!r}); expected BERT, GPT-2/OPT or T5 files")
    return cls.from_pretrained(directory, **overrides)
