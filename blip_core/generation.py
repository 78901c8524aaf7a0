"""Framework-neutral generation settings: argument resolution and validation, prompt preparation.

Every backend's ``generate`` calls ``resolve_generation(...)`` once and then runs its own compiled
or eager loop on the returned ``GenerationSettings``; the rules for defaults, ``max_length`` versus
``max_new_tokens`` and input checks therefore live here once.

Length conventions follow transformers 4.57: ``max_length`` and ``min_length`` count the whole
decoder sequence including the prompt, ``max_new_tokens`` and ``min_new_tokens`` only the new
tokens; when neither maximum is given, 20 new tokens are generated, capped so the sequence fits
the model's position table (``max_positions``) when it has one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

DEFAULT_MAX_LENGTH = 20

_KNOWN = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "do_sample", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "early_stopping", "num_return_sequences",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "seed", "generator", "prng_key",
    "use_cache", "no_repeat_ngram_size", "bad_words_ids", "output_scores", "return_dict_in_generate",
}


@dataclass(frozen=True)
class GenerationSettings:
    """Resolved options for one ``generate`` call (prompt length already taken into account)."""

    prompt_length: int                 # decoder tokens given before generation starts
    max_new_tokens: int                # decode steps at most
    min_new_tokens: int                # eos is forbidden before this many new tokens
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1
    eos_token_id: tuple = field(default_factory=tuple)   # any of these ends a sequence
    pad_token_id: Optional[int] = None
    seed: Optional[int] = None
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple = field(default_factory=tuple)   # tuples of token ids that must not be generated
    output_scores: bool = False
    return_dict_in_generate: bool = False

    @property
    def max_length(self) -> int:
        """Total decoder length the output is padded to (prompt + new tokens)."""
        return self.prompt_length + self.max_new_tokens

    @property
    def mode(self) -> str:
        if self.do_sample:
            return "beam_sample" if self.num_beams > 1 else "sample"
        return "beam" if self.num_beams > 1 else "greedy"


def integer_option(value, name: str) -> int:
    """An integral option: ints (numpy's too) and integral floats; strings, bools, 3.7 are refused. The rule for every
    count a caller gives: generation's settings here, training's (``blip_apps.train.TrainConfig``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def real_option(value, name: str) -> float:
    """A finite real option (NaN and infinities would silently turn every score into garbage)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _flag(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _as_eos_tuple(eos) -> tuple:
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer, float, np.floating, str, bytes)):
        return (integer_option(eos, "eos_token_id"),)
    return tuple(integer_option(e, "eos_token_id") for e in eos)


def fed_positions(length: int) -> int:
    """The decoder positions an output of ``length`` tokens (prompt and new tokens) takes: it is fed every token
    but the last."""
    return length - 1


def check_position_limit(prompt_length: int, max_new_tokens: int, max_positions: Optional[int]) -> None:
    """The one length rule of every backend, checked before anything runs: the model's table must hold the
    ``fed_positions`` of the prompt and the new tokens."""
    if max_positions is None:
        return
    need = fed_positions(prompt_length + max_new_tokens)
    if need > max_positions:
        raise ValueError(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) needs {need} decoder "
                         f"positions, more than max_position_embeddings={max_positions}; at most "
                         f"{max_positions + 1 - prompt_length} new tokens fit")


def resolve_generation(prompt_length: int, *, defaults: Optional[dict] = None, max_positions: Optional[int] = None,
                       **kwargs) -> GenerationSettings:
    """Turn ``generate`` keyword arguments into ``GenerationSettings``.

    ``defaults`` holds the model's own values (eos, pad, ...) used where the caller gives none.
    Unknown options and inconsistent values raise ``ValueError`` before any compute happens:
    counts must be integers (``3.7`` and ``"5"`` are refused, not truncated), real options finite,
    and the sequence must fit ``max_positions`` (``check_position_limit``).
    """
    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown:
        raise ValueError(f"generate() got unknown option(s): {', '.join(unknown)}")
    opts = dict(defaults or {})
    opts.update({k: v for k, v in kwargs.items() if v is not None})

    if opts.get("max_new_tokens") is not None:
        max_new = integer_option(opts["max_new_tokens"], "max_new_tokens")
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    else:
        if opts.get("max_length") is not None:
            max_length = integer_option(opts["max_length"], "max_length")
        else:   # transformers' default: 20 new tokens, within the position table
            max_length = DEFAULT_MAX_LENGTH + prompt_length
            if max_positions is not None:
                max_length = min(max_length, int(max_positions))
        max_new = max_length - prompt_length
        if max_new < 1:
            raise ValueError(f"max_length={max_length} leaves no room to generate after a prompt of "
                             f"{prompt_length} tokens; pass max_new_tokens instead")
    check_position_limit(int(prompt_length), max_new, max_positions)
    if opts.get("min_new_tokens") is not None:
        min_new = integer_option(opts["min_new_tokens"], "min_new_tokens")
    else:
        min_new = max(0, integer_option(opts.get("min_length", 0), "min_length") - prompt_length)
    if min_new < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new}")

    num_beams = integer_option(opts.get("num_beams", 1), "num_beams")
    do_sample = _flag(opts.get("do_sample", False), "do_sample")
    nrs = integer_option(opts.get("num_return_sequences", 1), "num_return_sequences")
    temperature = real_option(opts.get("temperature", 1.0), "temperature")
    top_k = integer_option(opts.get("top_k", 50), "top_k")
    top_p = real_option(opts.get("top_p", 1.0), "top_p")
    rep = real_option(opts.get("repetition_penalty", 1.0), "repetition_penalty")
    length_penalty = real_option(opts.get("length_penalty", 1.0), "length_penalty")
    seed = opts.get("seed")
    if seed is not None:
        seed = integer_option(seed, "seed")
    pad = opts.get("pad_token_id")
    if pad is not None:
        pad = integer_option(pad, "pad_token_id")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if nrs < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {nrs}")
    if not do_sample and nrs > num_beams:
        raise ValueError(f"num_return_sequences ({nrs}) must be <= num_beams ({num_beams}) without sampling")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if rep <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {rep}")
    ngram = integer_option(opts.get("no_repeat_ngram_size", 0), "no_repeat_ngram_size")
    if ngram < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {ngram}")
    bad = opts.get("bad_words_ids") or ()
    if isinstance(bad, (str, bytes)) or not all(isinstance(w, (list, tuple)) and w for w in bad):
        raise ValueError("bad_words_ids must be a list of non-empty lists of token ids, e.g. [[12], [7, 9]]")
    bad = tuple(tuple(integer_option(t, "bad_words_ids") for t in w) for w in bad)
    early = opts.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")

    return GenerationSettings(
        prompt_length=int(prompt_length), max_new_tokens=max_new, min_new_tokens=min_new, num_beams=num_beams,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=rep,
        length_penalty=length_penalty, early_stopping=early, num_return_sequences=nrs,
        eos_token_id=_as_eos_tuple(opts.get("eos_token_id")), pad_token_id=pad,
        seed=seed, no_repeat_ngram_size=ngram, bad_words_ids=bad,
        output_scores=bool(opts.get("output_scores", False)),
        return_dict_in_generate=bool(opts.get("return_dict_in_generate", False)),
    )


def resolve_blip_generation(text_config, prompt_length: int, **kwargs) -> GenerationSettings:
    """``resolve_generation`` with BLIP's text-decoder conventions: generation ends at ``[SEP]``
    (``sep_token_id``, not ``eos_token_id``), pads with ``pad_token_id``, and the default length
    is capped by the decoder's position table. The config's own start token must lie in the
    vocabulary (a compiled embedding lookup would otherwise read garbage)."""
    for name in ("bos_token_id", "sep_token_id", "pad_token_id"):
        check_special_token_id(getattr(text_config, name), f"text_config.{name}", text_config.vocab_size)
    return resolve_generation(prompt_length,
                              defaults={"eos_token_id": text_config.sep_token_id, "pad_token_id": text_config.pad_token_id},
                              max_positions=text_config.max_position_embeddings, **kwargs)


def blip_caption_prompt(input_ids: Optional[np.ndarray], attention_mask: Optional[np.ndarray], batch_size: int,
                        bos_token_id: int, eos_token_id: int):
    """Decoder prompt of BLIP captioning, as transformers builds it.

    No prompt: ``[bos]`` per image. With a tokenized prompt (``[CLS] ... [SEP]``): position 0 is
    replaced by bos and the trailing token dropped, the mask likewise. Returns int64 arrays
    ``(ids, mask)``; ``mask`` is None when none was given.
    """
    if input_ids is None:
        ids = np.tile(np.array([[bos_token_id, eos_token_id]], dtype=np.int64), (batch_size, 1))
    else:
        ids = np.array(input_ids, dtype=np.int64, copy=True)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"input_ids must have shape (batch, length >= 2), got {ids.shape}")
        if ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch {ids.shape[0]} but pixel_values has batch {batch_size}")
    ids[:, 0] = bos_token_id
    mask = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask, dtype=np.int64)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        mask = mask[:, :-1]
    return ids[:, :-1], mask


def check_special_token_id(value, name: str, vocab_size: int) -> int:
    """A special token id (from a config or an option) that the model embeds must index its table: a compiled
    lookup would read a NaN or clamped row instead of failing. Returns it as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value!r} is outside the vocabulary of size {vocab_size}")
    return int(value)


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a clear error for ids outside the vocabulary (instead of an index error deep inside)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary of size {vocab_size}")


def check_label_ids(labels: np.ndarray, vocab_size: int, name: str = "labels") -> None:
    """Labels are token ids of the vocabulary or -100 (an ignored position)."""
    labels = np.asarray(labels)
    check_token_ids(labels[labels != -100], vocab_size, name)


def check_pixel_values(shape: Sequence[int], image_size: int, patch_size: int, interpolate_pos_encoding: bool) -> None:
    """Validate an NCHW ``pixel_values`` shape against the vision config."""
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"pixel_values must be NCHW with 3 channels, got shape {tuple(shape)}")
    h, w = int(shape[2]), int(shape[3])
    if interpolate_pos_encoding:
        if h % patch_size or w % patch_size or h < patch_size or w < patch_size:
            raise ValueError(f"pixel_values {h}x{w} is not a positive multiple of patch_size {patch_size}")
    elif (h, w) != (image_size, image_size):
        raise ValueError(f"pixel_values are {h}x{w} but the model expects {image_size}x{image_size}; "
                         "resize the image or pass interpolate_pos_encoding=True")
