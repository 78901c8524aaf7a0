"""Generation in the parity matrix: greedy and beam token ids of every generating class, in every
backend that ships it (``SUPPORT`` of tests/test_parity_matrix.py) and in transformers 4.57.

Expected ids come from transformers only: the committed goldens of tests/fixtures/models/*/reference.npz
(``greedy_ids``, ``beam_ids``, written by make_fixtures.py), or transformers' ``generate`` run here on
the same checkpoint. The transformers column is also checked against the committed goldens, so a
stale fixture shows as a failure of its own.

Rows:
- captioning greedy and beam (committed goldens), greedy from right-padded prompts given without a mask
  (transformers infers it from the pad tokens), and beam search with an eos that the model emits
  early and ``length_penalty=3.0`` (transformers ranks finished hypotheses by score / length ** 3;
  with the default penalty it picks other ids, so an engine that ignores the penalty fails here);
- VQA greedy (committed golden) and VQA greedy and beam over a right-padded question batch. transformers
  4.57 drops the cross-attention mask (REFERENCE.md), so the expected answer of a padded question is
  transformers' answer to the same question without its padding, asked alone; an implementation
  that drops the mask answers differently;
- BLIP-2 with OPT (left-padded prompts with image placeholders; committed greedy golden) and with T5
  (the Blip2Model fixture's weights, loaded as Blip2ForConditionalGeneration), greedy and beam.
"""
import importlib
import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest

from blip_core import to_numpy
from fixture_utils import fixture, require
from test_parity_matrix import SUPPORT

torch = require("torch")
transformers = require("transformers")

CAPTIONER, VQA, BLIP2 = "BlipForConditionalGeneration", "BlipForQuestionAnswering", "Blip2ForConditionalGeneration"


@dataclass(frozen=True)
class Case:
    cls: str                      # the class each backend generates with
    source: str                   # the fixture whose checkpoint and inputs the case uses
    inputs: tuple                 # which fixture inputs generate() gets
    kwargs: dict
    golden: str = ""              # a committed reference.npz key, or "" for transformers run here
    config: dict = field(default_factory=dict)   # text_config keys changed in a copy of the checkpoint
    pad_question: bool = False    # right-pad the second question (VQA)


CASES = {
    "caption-greedy": Case(CAPTIONER, CAPTIONER, ("pixel_values",), dict(max_new_tokens=6), golden="greedy_ids"),
    "caption-beam": Case(CAPTIONER, CAPTIONER, ("pixel_values",), dict(max_new_tokens=6, num_beams=3),
                         golden="beam_ids"),
    "caption-beam-length-penalty": Case(CAPTIONER, CAPTIONER, ("pixel_values",),
                                        dict(max_new_tokens=6, num_beams=3, length_penalty=3.0),
                                        config={"sep_token_id": 45}),
    "caption-prompt-inferred-mask": Case(CAPTIONER, CAPTIONER, ("pixel_values", "input_ids"), dict(max_new_tokens=5)),
    "vqa-greedy": Case(VQA, VQA, ("pixel_values", "input_ids"), dict(max_new_tokens=5), golden="greedy_ids"),
    "vqa-padded-greedy": Case(VQA, VQA, ("pixel_values", "input_ids", "attention_mask"), dict(max_new_tokens=5),
                              pad_question=True),
    "vqa-padded-beam": Case(VQA, VQA, ("pixel_values", "input_ids", "attention_mask"),
                            dict(max_new_tokens=5, num_beams=2), pad_question=True),
    "blip2-opt-greedy": Case(BLIP2, BLIP2, ("pixel_values", "input_ids", "attention_mask"), dict(max_new_tokens=5),
                             golden="greedy_ids"),
    "blip2-opt-beam": Case(BLIP2, BLIP2, ("pixel_values", "input_ids", "attention_mask"),
                           dict(max_new_tokens=5, num_beams=2)),
    "blip2-t5-greedy": Case(BLIP2, "Blip2Model", ("pixel_values", "input_ids", "attention_mask"),
                            dict(max_new_tokens=5)),
    "blip2-t5-beam": Case(BLIP2, "Blip2Model", ("pixel_values", "input_ids", "attention_mask"),
                          dict(max_new_tokens=5, num_beams=2)),
}
PAD = 2            # padded tokens at the end of the second question


class Runs:
    """Checkpoints, models and transformers' ids, made once per module and shared by the rows."""

    def __init__(self, tmp):
        self.tmp, self.models, self.expected = tmp, {}, {}

    def directory(self, case: Case) -> str:
        d, _, _ = fixture(case.source)
        if case.cls == case.source and not case.config:
            return d
        dst = self.tmp / f"{case.source}-as-{case.cls}-{'-'.join(f'{k}{v}' for k, v in case.config.items())}"
        if not dst.exists():
            shutil.copytree(d, dst)
            cfg = json.loads((dst / "config.json").read_text())
            cfg["architectures"] = [case.cls]
            cfg["text_config"].update(case.config)
            (dst / "config.json").write_text(json.dumps(cfg))
        return str(dst)

    def inputs(self, case: Case) -> dict:
        _, inp, _ = fixture(case.source)
        inp = {k: inp[k] for k in case.inputs if k in inp}
        if case.pad_question:
            inp["input_ids"], inp["attention_mask"] = padded_question(inp["input_ids"])
        return inp

    def model(self, backend: str, case: Case):
        key = (backend, self.directory(case))
        if key not in self.models:
            if backend == "transformers":
                self.models[key] = getattr(transformers, case.cls).from_pretrained(key[1]).eval()
            else:
                module = importlib.import_module(f"backends.{backend}")
                self.models[key] = getattr(module, case.cls).from_pretrained(key[1])
        return self.models[key]

    def generate(self, backend: str, case: Case, inputs: dict) -> np.ndarray:
        model = self.model(backend, case)
        if backend == "transformers":
            with torch.no_grad():
                return model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **case.kwargs).numpy()
        return np.asarray(to_numpy(model.generate(**inputs, **case.kwargs)))

    def want(self, name: str) -> np.ndarray:
        """The expected ids of a case: the committed golden, or transformers' ids computed here."""
        case = CASES[name]
        if case.golden:
            return fixture(case.source)[2][case.golden]
        if name not in self.expected:
            inp = self.inputs(case)
            if case.pad_question:   # each question alone, without its padding (see the module docstring)
                rows = [self.generate("transformers", case, {"pixel_values": inp["pixel_values"][i:i + 1],
                                                              "input_ids": inp["input_ids"][i:i + 1, :n]})
                        for i, n in enumerate(inp["attention_mask"].sum(1))]
                self.expected[name] = np.concatenate(rows, 0)
            else:
                self.expected[name] = self.generate("transformers", case, inp)
        return self.expected[name]


def padded_question(ids: np.ndarray) -> tuple:
    """The second question shortened by PAD tokens and right-padded back to the batch's length."""
    ids, mask = ids.copy(), np.ones_like(ids)
    ids[1, -PAD:], mask[1, -PAD:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("generation"))


# Each compiled engine costs tf and jax 10-25 s of tracing on 2 cores. Their plain greedy and beam BLIP
# captions and VQA answers are also checked against transformers by tests/test_{tf,jax}_generation.py,
# so in tf and jax those rows run only with ``pytest -m slow tests/test_parity_generation.py``; the
# length-penalty, padded-beam and every BLIP-2 row run by default.
COVERED_ELSEWHERE = {"caption-greedy", "caption-beam", "vqa-greedy", "vqa-padded-greedy"}
ROWS = [pytest.param(name, backend, id=f"{name}-{backend}",
                     marks=[pytest.mark.slow] if backend in ("tf", "jax") and name in COVERED_ELSEWHERE else [])
        for name, case in CASES.items() for backend in SUPPORT[case.cls]]


@pytest.mark.parametrize("name, backend", ROWS)
def test_backend_ids_equal_transformers(runs, name, backend):
    case = CASES[name]
    got = runs.generate(backend, case, runs.inputs(case))
    want = runs.want(name)
    assert got.tolist() == want.tolist(), f"{backend} {name}: {got.tolist()} != transformers {want.tolist()}"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.golden])
def test_transformers_reproduces_the_committed_goldens(runs, name):
    case = CASES[name]
    got = runs.generate("transformers", case, runs.inputs(case))
    assert got.tolist() == runs.want(name).tolist()


def test_length_penalty_row_is_informative(runs):
    """The length-penalty row only tests the penalty if, with the default penalty, transformers picks other ids."""
    plain = Case(CAPTIONER, CAPTIONER, ("pixel_values",), dict(max_new_tokens=6, num_beams=3),
                 config={"sep_token_id": 45})
    default = runs.generate("transformers", plain, runs.inputs(plain))
    assert default.tolist() != runs.want("caption-beam-length-penalty").tolist()


def test_inferred_mask_row_is_informative(runs):
    """The captioning prompts' second row ends in pad tokens and no mask is given: transformers masks them
    out (pad is no eos); attending to them gives other ids, so an engine that skips the rule fails the row."""
    case = CASES["caption-prompt-inferred-mask"]
    inputs = runs.inputs(case)
    assert (inputs["input_ids"][1, -2:] == 0).all()
    attended = runs.generate("transformers", case, dict(inputs, attention_mask=np.ones_like(inputs["input_ids"])))
    assert attended.tolist() != runs.want("caption-prompt-inferred-mask").tolist()


@pytest.mark.parametrize("backend", SUPPORT[CAPTIONER])
def test_length_penalty_prefers_longer_hypotheses(runs, backend):
    """Behaviour, without a reference: the eos row's beams finish early with no length reward
    (``length_penalty=0``) and run on when long hypotheses are rewarded (``3.0``)."""
    case = CASES["caption-beam-length-penalty"]
    inputs = runs.inputs(case)
    short = runs.generate(backend, Case(**{**case.__dict__, "kwargs": {**case.kwargs, "length_penalty": 0.0}}), inputs)
    long = runs.generate(backend, case, inputs)
    assert short.shape[1] < long.shape[1], (short.tolist(), long.tolist())
    assert (short[:, -1] == case.config["sep_token_id"]).all(), short.tolist()
