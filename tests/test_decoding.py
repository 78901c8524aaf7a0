"""The decoding rulebook (blip_core.decoding) through each backend's engine, against transformers 4.57.

A tiny "table model" whose next-token logits depend on the last token, the token before it and its
position (``A[tok] + B[prev] + C[pos]``) is written once per framework and once as a transformers
``PreTrainedModel``. Every decoding option then has to give the same ids (and scores) in the torch,
tf and jax engines as transformers' own ``generate``: no eos, several eos ids, left and right padded
batch prompts, beams with several returned sequences, length penalty and early stopping, repetition
penalty, no-repeat n-grams, bad words, min length, ``return_dict_in_generate`` with scores.
"""
import numpy as np
import pytest
import torch

from blip_core import decoding
from blip_core.generation import resolve_generation

from fixture_utils import require
transformers = require("transformers")

V, POS = 24, 64
_rng = np.random.default_rng(0)
A, B, C = (_rng.normal(size=s).astype(np.float32) * 2.0 for s in [(V, V), (V, V), (POS, V)])


class TableConfig(transformers.PretrainedConfig):
    model_type = "blip-test-table"


class TableLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """transformers' side: the same logits over the whole sequence, no cache."""

    config_class = TableConfig

    def __init__(self, config):
        super().__init__(config)
        self.a, self.b, self.c = (torch.nn.Parameter(torch.from_numpy(x)) for x in (A, B, C))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_):
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        logits = self.a[input_ids] + self.b[prev] + self.c[position_ids]
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)


@pytest.fixture(scope="module")
def reference():
    return TableLM(TableConfig(vocab_size=V)).eval()


# -- the same model as a step function in each backend ---------------------------------------------------
def _torch(ids, mask, settings):
    from backends.torch import generation
    a, b, c = (torch.from_numpy(x) for x in (A, B, C))

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if cache is None else cache          # prompts have more than one token
        return a[tok[:, -1]] + b[prev[:, 0]] + c[pos[:, -1]], tok[:, -1:]

    out = generation.generate(step, torch.from_numpy(ids), settings, vocab_size=V, attention_mask=torch.from_numpy(mask))
    return _as_result(out)


def _jax(ids, mask, settings):
    import jax
    import jax.numpy as jnp

    from backends.jax import generation
    a, b, c = (jnp.asarray(x) for x in (A, B, C))
    plan, numbers = decoding.make_plan(settings, V, settings.output_scores)

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if tok.shape[1] > 1 else cache        # prompts have more than one token
        return a[tok[:, -1]] + b[prev[:, 0]] + c[pos[:, -1]], tok[:, -1:]

    def init_cache(rows, total):
        return jnp.zeros((rows, 1), jnp.int32)

    def run(ids, mask, key, numbers):
        return generation.decode(step, init_cache, None, ids, mask, key, plan, numbers)

    out = jax.jit(run)(ids, mask, jax.random.key(0), generation.traced_numbers(numbers))
    return _as_result(generation.result(settings, *out))


def _tf(ids, mask, settings):
    import tensorflow as tf

    from backends.tf import generation
    a, b, c = (tf.constant(x) for x in (A, B, C))
    plan, numbers, seed = generation.plan_inputs(settings, V)

    def step(tok, pos, key_mask, cache, index, context):
        prev = tok[:, -2:-1] if cache is None else cache
        logits = tf.gather(a, tok[:, -1]) + tf.gather(b, prev[:, 0]) + tf.gather(c, pos[:, -1])
        return logits, tok[:, -1:]

    def run(ids, mask, seed, numbers):
        return generation.decode(step, None, ids, mask, seed, plan, numbers)

    out = tf.function(run, jit_compile=True, autograph=False)(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32),
                                                               seed, numbers)
    return _as_result(generation.result(settings, *out))


ENGINES = {"torch": _torch, "tf": _tf, "jax": _jax}


def _as_result(out):
    from blip_core import to_numpy
    if hasattr(out, "sequences"):
        return {"sequences": to_numpy(out.sequences).astype(np.int64),
                "scores": None if out.scores is None else np.stack([to_numpy(s) for s in out.scores], 1),
                "sequences_scores": None if getattr(out, "sequences_scores", None) is None
                else to_numpy(out.sequences_scores)}
    return {"sequences": to_numpy(out).astype(np.int64)}


def _transformers(model, ids, mask, kw):
    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False,
                         **kw)
    return _as_result(out)


PROMPT = np.array([[3, 7, 11, 5], [9, 2, 2, 14], [1, 6, 19, 8]], np.int64)
LEFT = np.array([[0, 0, 7, 11], [9, 2, 2, 14], [0, 6, 19, 8]], np.int64)
RIGHT = np.array([[3, 7, 0, 0], [9, 2, 2, 14], [1, 6, 19, 0]], np.int64)

CASES = {
    "greedy_no_eos": dict(max_new_tokens=9),
    "greedy_eos": dict(max_new_tokens=12, eos_token_id=4),
    "greedy_several_eos": dict(max_new_tokens=12, eos_token_id=[4, 10, 13]),
    "left_padded": dict(max_new_tokens=8, eos_token_id=4, prompt=LEFT),
    "right_padded": dict(max_new_tokens=8, eos_token_id=4, prompt=RIGHT),
    "penalties": dict(max_new_tokens=12, eos_token_id=[4, 10], repetition_penalty=1.6, min_new_tokens=5),
    "no_repeat_ngram": dict(max_new_tokens=14, no_repeat_ngram_size=2),
    "bad_words": dict(max_new_tokens=12, eos_token_id=4, bad_words_ids=[[5], [17, 12], [4]]),
    "beam": dict(max_new_tokens=10, eos_token_id=[4, 10], num_beams=3),
    "beam_nrs_length_penalty": dict(max_new_tokens=10, eos_token_id=4, num_beams=4, num_return_sequences=3,
                                    length_penalty=0.4),
    "beam_early_true": dict(max_new_tokens=10, eos_token_id=[4, 13], num_beams=3, early_stopping=True),
    "beam_never_no_eos": dict(max_new_tokens=7, num_beams=2, early_stopping="never", length_penalty=1.5),
    "beam_padded_penalties": dict(max_new_tokens=9, eos_token_id=4, num_beams=3, num_return_sequences=2,
                                  repetition_penalty=1.3, no_repeat_ngram_size=3, prompt=LEFT),
    "scores_greedy": dict(max_new_tokens=6, eos_token_id=4, return_dict_in_generate=True, output_scores=True,
                          repetition_penalty=1.2),
    "scores_beam": dict(max_new_tokens=6, eos_token_id=4, num_beams=3, num_return_sequences=2,
                        return_dict_in_generate=True, output_scores=True),
    # The rows below each hinge on one rule (``test_boundary_cases_are_informative`` checks that transformers'
    # ids change when the rule is moved): row 1 emits eos 17 exactly when min length allows it, counted in new
    # tokens or in the whole sequence (prompt of 4); the beams end differently with early_stopping=True, or the
    # same but after fewer steps (the search stops once every row is done: 8 score steps, not 10), and with
    # "never" (its heuristic divides by the longest possible length) than with the default.
    "min_new_boundary": dict(max_new_tokens=12, eos_token_id=17, min_new_tokens=5),
    "min_length_boundary": dict(max_new_tokens=12, eos_token_id=17, min_length=9),
    "beam_early_true_decides": dict(max_new_tokens=10, eos_token_id=16, num_beams=2, early_stopping=True),
    "beam_early_true_stops": dict(max_new_tokens=10, eos_token_id=23, num_beams=2, early_stopping=True,
                                  return_dict_in_generate=True, output_scores=True),
    "beam_never_decides": dict(max_new_tokens=10, eos_token_id=22, num_beams=2, length_penalty=2.0,
                               early_stopping="never"),
}
# Each boundary row with the rule it hinges on moved: transformers gives other ids.
MOVED = {"min_new_boundary": dict(min_new_tokens=6), "min_length_boundary": dict(min_length=10),
         "beam_early_true_decides": dict(early_stopping=False), "beam_early_true_stops": dict(early_stopping=False),
         "beam_never_decides": dict(early_stopping=False)}


# Every case runs in every engine; the compiled engines (one XLA program per case) run the cases
# below by default and the rest with -m slow, torch runs them all by default.
COMPILED_DEFAULT = {"greedy_several_eos", "left_padded", "right_padded", "no_repeat_ngram", "bad_words",
                    "beam_nrs_length_penalty", "beam_padded_penalties", "scores_beam", "min_new_boundary",
                    "min_length_boundary", "beam_early_true_decides", "beam_early_true_stops",
                    "beam_never_decides"}
ENGINE_CASES = [pytest.param(b, c, marks=[pytest.mark.slow] if b != "torch" and c not in COMPILED_DEFAULT else [])
                for b in sorted(ENGINES) for c in sorted(CASES)]


@pytest.mark.parametrize("backend,case", ENGINE_CASES)
def test_engines_match_transformers(reference, backend, case):
    kw = dict(CASES[case])
    ids = kw.pop("prompt", PROMPT)
    mask = (ids != 0).astype(np.int64)
    settings = resolve_generation(ids.shape[1], defaults={"pad_token_id": 0}, **kw)
    ref = _transformers(reference, ids, mask, dict(kw, pad_token_id=0))
    got = ENGINES[backend](ids, mask, settings)
    np.testing.assert_array_equal(got["sequences"], ref["sequences"])
    if kw.get("output_scores"):
        assert got["scores"].shape == ref["scores"].shape
        finite = np.isfinite(ref["scores"])
        np.testing.assert_array_equal(np.isfinite(got["scores"]), finite)
        np.testing.assert_allclose(got["scores"][finite], ref["scores"][finite], rtol=1e-5, atol=1e-5)
    if ref.get("sequences_scores") is not None:
        np.testing.assert_allclose(got["sequences_scores"], ref["sequences_scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(MOVED))
def test_boundary_cases_are_informative(reference, case):
    kw = dict(CASES[case], pad_token_id=0)
    mask = np.ones_like(PROMPT)
    here = _transformers(reference, PROMPT, mask, kw)
    moved = _transformers(reference, PROMPT, mask, dict(kw, **MOVED[case]))
    a, b = here["sequences"], moved["sequences"]
    if kw.get("output_scores"):         # the number of steps taken
        a, b = here["scores"], moved["scores"]
    assert a.shape != b.shape or (a != b).any()


@pytest.mark.parametrize("backend", sorted(ENGINES))
def test_top_k_one_sampling_is_greedy(backend):
    ids, mask = PROMPT, np.ones_like(PROMPT)
    greedy = ENGINES[backend](ids, mask, resolve_generation(4, max_new_tokens=8, eos_token_id=4, pad_token_id=0))
    sampled = ENGINES[backend](ids, mask, resolve_generation(4, max_new_tokens=8, eos_token_id=4, pad_token_id=0,
                                                             do_sample=True, top_k=1, seed=3))
    np.testing.assert_array_equal(sampled["sequences"], greedy["sequences"])


# -- the processor chain on random scores ----------------------------------------------------------------
def _ops(backend):
    if backend == "torch":
        from backends.torch.generation import TorchOps
        return TorchOps("cpu", None), lambda a: torch.from_numpy(np.asarray(a)), int
    if backend == "jax":
        import jax.numpy as jnp

        from backends.jax.generation import JaxOps
        return JaxOps, jnp.asarray, lambda c: jnp.int32(c)
    import tensorflow as tf

    from backends.tf.generation import TFOps
    return TFOps, tf.constant, lambda c: tf.constant(c, tf.int32)


def _process(backend, plan, numbers, scores, seqs, cur):
    """``decoding.process_scores`` in one backend's array namespace, back as numpy."""
    from blip_core import to_numpy
    xp, arr, scalar = _ops(backend)
    num = {k: arr(x.astype(np.int64) if backend == "torch" and x.dtype.kind == "i" else x) for k, x in numbers.items()}
    seq_arr = arr(seqs.astype(np.int64 if backend == "torch" else np.int32))
    return to_numpy(decoding.process_scores(xp, plan, num, arr(scores), seq_arr, scalar(cur)))


@pytest.mark.parametrize("backend", sorted(ENGINES))
@pytest.mark.parametrize("sample", [False, True])
def test_processors_match_transformers(backend, sample):
    """Repetition penalty, no-repeat n-grams, bad words, min new tokens, temperature, top-k, top-p."""
    from transformers.generation import logits_process as lp
    rng = np.random.default_rng(1)
    n, v, p, cur, eos = 4, 50, 3, 9, 7
    scores = (rng.normal(size=(n, v)) * 3).astype(np.float32)
    seqs = rng.integers(0, 6, size=(n, 12))            # a small alphabet so that n-grams repeat
    bad = [[11], [seqs[0, cur - 1], 12], [eos]]
    kw = dict(repetition_penalty=1.3, min_new_tokens=9, eos_token_id=eos, pad_token_id=0, max_new_tokens=9,
              no_repeat_ngram_size=2, bad_words_ids=bad)
    if sample:
        kw.update(do_sample=True, temperature=0.7, top_k=9, top_p=0.8)
    plan, numbers = decoding.make_plan(resolve_generation(p, **kw), v)
    ours = _process(backend, plan, numbers, scores, seqs, cur)
    chain = [lp.RepetitionPenaltyLogitsProcessor(1.3), lp.NoRepeatNGramLogitsProcessor(2),
             lp.NoBadWordsLogitsProcessor(bad, eos), lp.MinNewTokensLengthLogitsProcessor(p, 9, eos)]
    if sample:
        chain += [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(9), lp.TopPLogitsWarper(0.8)]
    ref = lp.LogitsProcessorList(chain)(torch.from_numpy(seqs[:, :cur]), torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    assert np.isinf(ref).sum() > n            # the chain banned something in every variant
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", sorted(ENGINES))
def test_min_new_tokens_ends_exactly_at_its_count(backend):
    """eos is banned while fewer than ``min_new_tokens`` tokens are new, and allowed from then on."""
    from transformers.generation import logits_process as lp
    rng = np.random.default_rng(2)
    n, v, p, min_new, eos = 3, 20, 4, 5, 6
    scores = rng.normal(size=(n, v)).astype(np.float32)
    seqs = rng.integers(0, v, size=(n, p + 9))
    plan, numbers = decoding.make_plan(resolve_generation(p, max_new_tokens=9, min_new_tokens=min_new, eos_token_id=eos), v)
    for cur in (p + min_new - 1, p + min_new):
        ref = lp.MinNewTokensLengthLogitsProcessor(p, min_new, eos)(torch.from_numpy(seqs[:, :cur]),
                                                                    torch.from_numpy(scores)).numpy()
        np.testing.assert_array_equal(_process(backend, plan, numbers, scores, seqs, cur), ref, err_msg=f"cur={cur}")


@pytest.mark.parametrize("backend", sorted(ENGINES))
@pytest.mark.parametrize("top_k", [2, 0])
def test_beam_sampling_keeps_a_token_beyond_the_eos_ids(reference, backend, top_k):
    """Beam sampling keeps at least ``1 + len(eos)`` tokens through top-k and top-p (transformers'
    ``min_tokens_to_keep``); the warpers come from transformers' own ``_get_logits_processor``."""
    from transformers import GenerationConfig, LogitsProcessorList
    rng = np.random.default_rng(3)
    n, v, p, eos = 6, V, 3, [7, 8]
    scores = (rng.normal(size=(n, v)) * 4).astype(np.float32)
    seqs = rng.integers(0, v, size=(n, p + 4))
    kw = dict(do_sample=True, num_beams=3, top_k=top_k, top_p=0.05, temperature=0.7, eos_token_id=eos, pad_token_id=0)
    gc = GenerationConfig(**kw)
    reference._prepare_special_tokens(gc, True, device="cpu")
    chain = reference._get_logits_processor(gc, input_ids_seq_length=p, encoder_input_ids=torch.from_numpy(seqs[:, :p]),
                                            logits_processor=LogitsProcessorList(), device="cpu")
    ref = chain(torch.from_numpy(seqs[:, :p]), torch.from_numpy(scores)).numpy()
    assert (np.isfinite(ref).sum(1) == 3).all()         # the cut leaves exactly min_tokens_to_keep
    plan, numbers = decoding.make_plan(resolve_generation(p, max_new_tokens=4, **kw), v)
    ours = _process(backend, plan, numbers, scores, seqs, p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6, atol=1e-6)


def test_engines_name_no_model():
    """The engines drive a step function: no model, tower or config name appears in them."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    words = re.compile(r"\b(blip|opt|t5|bert|qformer|vision|text_decoder|text_config|encoder_hidden_states)\b", re.I)
    for path in [root / "blip_core" / "decoding.py"] + sorted(root.glob("backends/*/generation.py")):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""[\s\S]*?"""', "", code)             # docstrings may explain, code may not depend
        assert not words.findall(code), (path.name, sorted(set(words.findall(code))))
