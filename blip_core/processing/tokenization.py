"""Tokenizers for BLIP and BLIP-2 on the `tokenizers` package, matching transformers 4.57's fast ones.

* `BertTokenizer`  - WordPiece, lower-case (BLIP text and the Q-Former); `add_blip_special_tokens`
  adds BLIP's `[DEC]` (bos) and `[ENC]`.
* `GPT2Tokenizer`  - byte-level BPE (OPT: `</s>` prepended as bos when the post-processor says so).
* `T5Tokenizer`    - SentencePiece-style unigram from `tokenizer.json`; `</s>` appended.

Each loads `tokenizer.json` or the classic files (`vocab.txt`; `vocab.json` + `merges.txt`) plus
`tokenizer_config.json` / `special_tokens_map.json`, and saves files transformers' `AutoTokenizer`
reads. Calls follow `PreTrainedTokenizerFast.__call__`: padding and truncation are delegated to the
Rust backend with the same settings transformers gives it, so ids and masks agree by construction.
`load_tokenizer(dir)` picks the class.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from ..jsonfile import INDEX_LIMIT, read_json_file
from .image import BatchFeature

__all__ = ["BatchEncoding", "PreTrainedTokenizer"]

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no maximum length" marker
LARGE_INTEGER = int(1e20)
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIAL_TOKENS_MAP, ADDED_TOKENS = "special_tokens_map.json", "added_tokens.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PADDING = {True: "longest", False: "do_not_pad", "longest": "longest", "max_length": "max_length",
            "do_not_pad": "do_not_pad"}
_TRUNCATION = {True: "longest_first", False: "do_not_truncate", None: "do_not_truncate",
               "longest_first": "longest_first", "only_first": "only_first", "only_second": "only_second",
               "do_not_truncate": "do_not_truncate"}
# Config keys that describe files or loading, never written back.
_DROP_ON_SAVE = {"name_or_path", "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file",
                 "added_tokens_decoder", "tokenizer_class", "tokenizer_object"}


class BatchEncoding(BatchFeature):
    """Tokenizer output: `input_ids`, `attention_mask` (and `token_type_ids` for BERT)."""


def _added_token(spec, special: Optional[bool] = None) -> AddedToken:
    """A str, a JSON dict (`{"content": ..., "__type": "AddedToken"}`) or an AddedToken -> AddedToken."""
    if isinstance(spec, AddedToken):
        tok = copy.deepcopy(spec)
    elif isinstance(spec, dict):
        fields = {k: v for k, v in spec.items() if k in ("content", "single_word", "lstrip", "rstrip",
                                                          "normalized", "special")}
        tok = AddedToken(**fields)
    else:
        tok = AddedToken(str(spec), special=bool(special))
    if special is not None:
        tok.special = special
    return tok


def _content(token) -> Optional[str]:
    if token is None:
        return None
    if isinstance(token, dict):
        return token["content"]
    return token.content if isinstance(token, AddedToken) else str(token)


def _to_list(ids):
    """Token ids from lists, numpy arrays or framework tensors -> nested Python ints."""
    if hasattr(ids, "numpy") and not hasattr(ids, "tolist"):
        ids = ids.numpy()
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_list(i) for i in ids]
    return int(ids)


def _is_text(t) -> bool:
    if isinstance(t, str):
        return True
    if isinstance(t, (list, tuple)):
        if not t or isinstance(t[0], str):
            return all(isinstance(x, str) for x in t)
        if isinstance(t[0], (list, tuple)):
            return all(isinstance(x, (list, tuple)) and all(isinstance(w, str) for w in x) for x in t)
    return False


class PreTrainedTokenizer:
    """Shared behaviour of the three tokenizers (call, decode, special tokens, save/load)."""

    model_input_names = ["input_ids", "attention_mask"]
    default_special_tokens: dict = {}
    add_prefix_space_default: Optional[bool] = False
    _CLASS_NAME = "PreTrainedTokenizerFast"

    def __init__(self, backend: Tokenizer, added_tokens_decoder: Optional[dict] = None, **kwargs):
        self._tokenizer = backend
        # Padding / truncation stored in tokenizer.json only provide defaults (as in transformers).
        pad, trunc = backend.padding, backend.truncation
        if pad is not None:
            kwargs.setdefault("pad_token", pad["pad_token"])
            kwargs.setdefault("padding_side", pad["direction"].lower())
            kwargs.setdefault("pad_to_multiple_of", pad["pad_to_multiple_of"])
        if trunc is not None:
            kwargs.setdefault("max_length", trunc["max_length"])
            kwargs.setdefault("truncation_side", trunc["direction"].lower())
        backend.no_padding()
        backend.no_truncation()
        for key, value in self.default_special_tokens.items():
            kwargs.setdefault(key, value)
        self.init_kwargs = {k: v for k, v in kwargs.items() if k not in ("tokenizer_object",)}
        self.model_max_length = int(kwargs.get("model_max_length") or VERY_LARGE_INTEGER)
        self.padding_side = kwargs.get("padding_side") or "right"
        self.truncation_side = kwargs.get("truncation_side") or "right"
        if self.padding_side not in ("left", "right") or self.truncation_side not in ("left", "right"):
            raise ValueError(f"padding_side and truncation_side must be 'left' or 'right', got "
                             f"{self.padding_side!r} and {self.truncation_side!r}")
        self.clean_up_tokenization_spaces = bool(kwargs.get("clean_up_tokenization_spaces", False))
        self.split_special_tokens = bool(kwargs.get("split_special_tokens", False))
        self.model_input_names = list(kwargs.get("model_input_names") or self.model_input_names)
        self.extra_special_tokens = dict(kwargs.get("extra_special_tokens") or {})
        self._special = {k: kwargs.get(k) for k in SPECIAL_KEYS}
        self._additional = list(kwargs.get("additional_special_tokens") or [])
        backend.encode_special_tokens = self.split_special_tokens
        self._register_added_tokens(added_tokens_decoder or {})
        self._sync_prefix_space(kwargs.get("add_prefix_space", self.add_prefix_space_default))

    # ----------------------------------------------------------------- construction helpers

    def _register_added_tokens(self, added_tokens_decoder: dict) -> None:
        """Add config-declared tokens, then every special token the backend does not know yet."""
        have = {repr(t) for t in self._tokenizer.get_added_tokens_decoder().values()}
        special_strs = set(self.all_special_tokens)
        to_add = [_added_token(t) for _, t in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0]))]
        to_add = [t for t in to_add if repr(t) not in have]
        known = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        known |= {t.content for t in to_add}
        for tok in self._special_tokens_extended():
            if _content(tok) not in known:
                to_add.append(_added_token(tok, special=True))
                known.add(_content(tok))
        for tok in to_add:
            tok.special = tok.special or tok.content in special_strs
        if to_add:
            self._tokenizer.add_tokens(to_add)

    def _special_tokens_extended(self) -> list:
        out, seen = [], set()
        for tok in [self._special[k] for k in SPECIAL_KEYS] + self._additional:
            if tok and _content(tok) not in seen:
                seen.add(_content(tok))
                out.append(tok)
        return out

    def _sync_prefix_space(self, add_prefix_space) -> None:
        # transformers rebuilds a byte-level pre-tokenizer whose add_prefix_space disagrees with the config.
        pre = self._tokenizer.pre_tokenizer
        if pre is None:
            return
        try:
            state = json.loads(pre.__getstate__())
            if "add_prefix_space" in state and state["add_prefix_space"] != add_prefix_space:
                cls = getattr(pre_tokenizers, state.pop("type"))
                state["add_prefix_space"] = add_prefix_space
                self._tokenizer.pre_tokenizer = cls(**state)
        except Exception:  # custom or compound pre-tokenizers are left alone, like transformers does
            pass

    # ----------------------------------------------------------------- special tokens

    def __getattr__(self, name: str):
        special = self.__dict__.get("_special")
        if special is not None:
            if name in SPECIAL_KEYS:
                return _content(special[name])
            if name.endswith("_token_id") and name[:-3] in SPECIAL_KEYS:
                token = _content(special[name[:-3]])
                return None if token is None else self.convert_tokens_to_ids(token)
            extra = self.__dict__.get("extra_special_tokens", {})
            if name in extra:
                return _content(extra[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def additional_special_tokens(self) -> list:
        return [_content(t) for t in self._additional]

    @property
    def additional_special_tokens_ids(self) -> list:
        return self.convert_tokens_to_ids(self.additional_special_tokens)

    @property
    def special_tokens_map(self) -> dict:
        out = {k: _content(self._special[k]) for k in SPECIAL_KEYS if self._special[k]}
        if self._additional:
            out["additional_special_tokens"] = self.additional_special_tokens
        return out

    @property
    def all_special_tokens(self) -> list:
        return [_content(t) for t in self._special_tokens_extended()]

    @property
    def all_special_ids(self) -> list:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        new_tokens = [t if isinstance(t, (str, AddedToken)) else _added_token(t) for t in new_tokens]
        if special_tokens:
            return self._tokenizer.add_special_tokens(new_tokens)
        return self._tokenizer.add_tokens(new_tokens)

    def add_special_tokens(self, tokens: dict, replace_additional_special_tokens: bool = True) -> int:
        """Set special tokens (`{"bos_token": "[DEC]"}`) and add the unknown ones to the vocabulary."""
        to_add = []
        for key, value in tokens.items():
            if key == "additional_special_tokens":
                new = [_added_token(t, special=True) if isinstance(t, str) else t for t in value]
                if not replace_additional_special_tokens:
                    new = [t for t in new if _content(t) not in self.additional_special_tokens]
                    self._additional.extend(new)
                elif new:
                    self._additional = list(new)
                to_add += new
            elif key in SPECIAL_KEYS:
                tok = _added_token(value, special=True) if isinstance(value, str) else value
                self._special[key] = tok
                to_add.append(tok)
            else:
                raise ValueError(f"Unknown special token key {key!r}; use one of {SPECIAL_KEYS} or "
                                 "'additional_special_tokens'")
        return self.add_tokens(to_add, special_tokens=True)

    # ----------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return index if index is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ----------------------------------------------------------------- encoding

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """transformers' `_get_padding_truncation_strategies`, same defaults and errors."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # transformers' legacy default (it warns)
        if padding not in _PADDING:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in _TRUNCATION:
            raise ValueError(f"truncation must be a bool or one of 'longest_first', 'only_first', "
                             f"'only_second', 'do_not_truncate', got {truncation!r}")
        pad, trunc = _PADDING[padding], _TRUNCATION[truncation]
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = "do_not_pad"  # no length to pad to
                else:
                    max_length = self.model_max_length
            if trunc != "do_not_truncate":
                if self.model_max_length > LARGE_INTEGER:
                    trunc = "do_not_truncate"
                else:
                    max_length = self.model_max_length
        if pad != "do_not_pad" and (self.pad_token is None or self.pad_token_id < 0):
            raise ValueError("Asking to pad but the tokenizer has no pad_token; set one with "
                             "add_special_tokens({'pad_token': ...})")
        if (trunc != "do_not_truncate" and pad != "do_not_pad" and pad_to_multiple_of is not None
                and max_length is not None and max_length % pad_to_multiple_of != 0):
            raise ValueError(f"Truncation and padding are both on but max_length ({max_length}) is not a "
                             f"multiple of pad_to_multiple_of ({pad_to_multiple_of})")
        return pad, trunc, max_length

    def _check_batch(self, is_split_into_words: bool) -> None:
        """Hook for per-class input checks."""

    def __call__(self, text=None, text_pair=None, *, add_special_tokens: bool = True, padding=False,
                 truncation=None, max_length: Optional[int] = None, stride: int = 0,
                 is_split_into_words: bool = False, pad_to_multiple_of: Optional[int] = None,
                 padding_side: Optional[str] = None, return_tensors: Optional[str] = None,
                 return_token_type_ids: Optional[bool] = None, return_attention_mask: Optional[bool] = None,
                 return_overflowing_tokens: bool = False, return_special_tokens_mask: bool = False,
                 return_offsets_mapping: bool = False, return_length: bool = False, verbose: bool = True,
                 split_special_tokens: Optional[bool] = None) -> BatchEncoding:
        """Encode one text or a batch; returns `input_ids`, `attention_mask` (+ `token_type_ids`)."""
        if text is None:
            raise ValueError("You need to specify `text` (a string or a list of strings)")
        for value in (text, text_pair):
            if value is not None and not _is_text(value):
                raise ValueError("text must be a str, a list of str, or a list of lists of str "
                                 f"(pre-tokenized); got {type(value).__name__}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._check_batch(is_split_into_words)
        batched = (isinstance(text, (list, tuple)) and bool(text) and isinstance(text[0], (list, tuple))
                   if is_split_into_words else isinstance(text, (list, tuple)))
        if batched:
            if isinstance(text_pair, str):
                raise TypeError("when tokenizing a batch, text_pair must be a list as long as text")
            if text_pair is not None and len(text) != len(text_pair):
                raise ValueError(f"batch length of text ({len(text)}) does not match text_pair ({len(text_pair)})")
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
            if not inputs:
                raise ValueError("text is an empty list: nothing to tokenize")
        else:
            inputs = [(text, text_pair)] if text_pair else [text]
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)

        backend = self._tokenizer
        backend.no_truncation()
        backend.no_padding()
        if trunc != "do_not_truncate":
            backend.enable_truncation(max_length, stride=stride, strategy=trunc, direction=self.truncation_side)
        if pad != "do_not_pad":
            backend.enable_padding(direction=padding_side or self.padding_side, pad_id=self.pad_token_id,
                                   pad_type_id=0, pad_token=self.pad_token,
                                   length=max_length if pad == "max_length" else None,
                                   pad_to_multiple_of=pad_to_multiple_of)
        backend.encode_special_tokens = (self.split_special_tokens if split_special_tokens is None
                                         else bool(split_special_tokens))
        try:
            encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens,
                                             is_pretokenized=is_split_into_words)
        finally:
            backend.no_truncation()
            backend.no_padding()

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        fields = [("input_ids", True, "ids"), ("token_type_ids", return_token_type_ids, "type_ids"),
                  ("attention_mask", return_attention_mask, "attention_mask"),
                  ("special_tokens_mask", return_special_tokens_mask, "special_tokens_mask"),
                  ("offset_mapping", return_offsets_mapping, "offsets")]
        data = {name: [] for name, wanted, _ in fields if wanted}
        if return_length:
            data["length"] = []
        mapping = []
        for i, enc in enumerate(encodings):
            parts = [enc] + (list(enc.overflowing) if return_overflowing_tokens else [])
            for part in parts:
                mapping.append(i)
                for name, wanted, attr in fields:
                    if wanted:
                        data[name].append(list(getattr(part, attr)))
                if return_length:
                    data["length"].append(len(part.ids))
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = mapping
        if not batched and return_tensors is None and not return_overflowing_tokens:
            data = {k: (v[0] if v and isinstance(v[0], list) else v) for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    # ----------------------------------------------------------------- decoding

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """Remove the spaces a word-level detokenizer leaves before punctuation and contractions."""
        for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(old, new)
        return text

    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        ids = _to_list(token_ids)
        ids = [ids] if isinstance(ids, int) else ids
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list:
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces)
                for seq in _to_list(sequences)]

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str) -> tuple:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ classic vocab files)."""
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        files = [os.path.join(directory, n) for n in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_FILE)]
        config = {k: v for k, v in self.init_kwargs.items() if k not in _DROP_ON_SAVE}
        config.update(model_max_length=self.model_max_length, padding_side=self.padding_side,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                      extra_special_tokens={k: _content(v) for k, v in self.extra_special_tokens.items()})
        config.update(self.special_tokens_map)
        config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in
                                          sorted(self._tokenizer.get_added_tokens_decoder().items())}
        config["tokenizer_class"] = self._CLASS_NAME
        with open(files[0], "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        with open(files[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(self.special_tokens_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        self._tokenizer.save(files[2])
        if isinstance(self._tokenizer.model, (models.WordPiece, models.BPE)):
            files += self._tokenizer.model.save(directory)  # vocab.txt / vocab.json + merges.txt
        return tuple(files)

    @classmethod
    def _from_classic_files(cls, directory: str, config: dict) -> Tokenizer:
        raise ValueError(f"No {TOKENIZER_FILE} in {directory}, and {cls.__name__} cannot be built from "
                         "classic vocabulary files")

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> "PreTrainedTokenizer":
        """Load from a directory with tokenizer.json and/or classic vocab files plus configs."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Tokenizer directory not found: {directory}")
        config = _read_json(os.path.join(directory, TOKENIZER_CONFIG)) or {}
        config.pop("tokenizer_class", None)
        config.update(overrides)
        tokenizer_file = os.path.join(directory, TOKENIZER_FILE)
        added: dict = {}
        if "added_tokens_decoder" in config:
            added = {int(i): t for i, t in config.pop("added_tokens_decoder").items()}
        else:  # legacy layout: special tokens and added tokens live in their own files
            for key, value in (_read_json(os.path.join(directory, SPECIAL_TOKENS_MAP)) or {}).items():
                if key in overrides and overrides[key]:
                    continue
                if key == "additional_special_tokens":
                    merged = list(config.get("additional_special_tokens") or [])
                    merged += [t for t in value if _content(t) not in {_content(m) for m in merged}]
                    value = merged
                config[key] = value
            specials = {_content(config.get(k)) for k in SPECIAL_KEYS}
            specials |= {_content(t) for t in config.get("additional_special_tokens") or []}
            for content, index in (_read_json(os.path.join(directory, ADDED_TOKENS)) or {}).items():
                special = content in specials
                added[index] = AddedToken(content, normalized=not special, special=special)
            if os.path.isfile(tokenizer_file):
                for spec in _read_json(tokenizer_file).get("added_tokens", []):
                    added[spec["id"]] = _added_token(spec)
        if os.path.isfile(tokenizer_file):
            backend = Tokenizer.from_file(tokenizer_file)
        else:
            backend = cls._from_classic_files(directory, config)
        return cls(backend, added_tokens_decoder=added, **config)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    return read_json_file(path, limit=INDEX_LIMIT, expect=None, what=os.path.basename(path))
