"""What XLA makes of the JAX backend's compiled programs: no per-step copies into another layout.

Decoding one token at batch 1 is bound by memory traffic, so an array the step re-lays out every token
costs as much as reading it: before the cache and cross-attention layouts of ``backends/jax/text.py``,
XLA's CPU compiler transposed every layer's image keys/values and the whole word-embedding table (the
LM head) inside the decoding loop, and the vision tower transposed every layer's attention
probabilities. These tests read the optimized HLO of the tiny captioner and vision tower (compile
only, nothing timed; the speed itself is measured by ``benchmarks/coldstart.py``).
"""
import re

import numpy as np

from fixture_utils import require

jax = require("jax")

from benchmarks.caption import config as caption_config  # noqa: E402
from benchmarks.vision import config as vision_config  # noqa: E402


def _computations(hlo: str) -> dict:
    return {m.group(1): m.group(0) for m in re.finditer(r"^(%[\w.\-]+) \(.*?^}", hlo, re.S | re.M)}


def _elements(shape: str) -> int:
    return int(np.prod([int(d) for d in re.findall(r"\d+", shape)] or [1]))


def loop_relayouts(hlo: str) -> list:
    """Ops of every while-loop body that transpose an array carried through the loop unchanged in size
    (a cache, the image keys/values or a weight) into another layout: work repeated every step."""
    comps = _computations(hlo)
    found = []
    for body in set(re.findall(r"body=(%[\w.\-]+)", hlo)):
        lines = comps[body].splitlines()[1:]
        carried = {m.group(1): m.group(2) for line in lines
                   for m in [re.match(r"\s*%([\w.\-]+) = \w+\[([\d,]*)\]\S* get-tuple-element\(", line)] if m}
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* (fusion|transpose)\((.*?)\)", line)
            if not m or "kind=kCustom" in line:
                continue
            if m.group(2) == "fusion":
                called = re.search(r"calls=(%[\w.\-]+)", line).group(1)
                if " transpose(" not in comps.get(called, ""):
                    continue
            size = _elements(m.group(1))
            args = [a.strip().lstrip("%") for a in m.group(3).split(",")]
            if size > 1 and any(a in carried and _elements(carried[a]) == size for a in args):
                found.append(line.split(", metadata")[0].strip())
    return found


def test_relayout_finder_sees_a_transposed_loop_operand():
    """The finder itself: a loop that multiplies by a transposed weight each step is reported."""
    def prog(w, x):
        return jax.lax.fori_loop(0, 3, lambda i, x: x @ w.T, x)
    w = np.ones((7, 7), np.float32)
    hlo = jax.jit(prog).lower(w, np.ones((1, 7), np.float32)).compile().as_text()
    assert loop_relayouts(hlo), "the finder missed the per-step transpose of the weight"


def test_caption_decoding_loop_copies_no_array_into_another_layout(monkeypatch):
    import backends.jax as J
    from backends.jax._base import JaxModel
    model = J.BlipForConditionalGeneration(caption_config(quick=True), seed=0)
    size = model.config.vision_config.image_size
    captured = {}
    program = JaxModel._program

    def capture(self, name, method, args, **static):
        captured.update(fn=program(self, name, method, args, **static), args=args, static=static)
        return captured["fn"]
    monkeypatch.setattr(JaxModel, "_program", capture)
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    model.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6)
    fn = getattr(captured["fn"], "jitted", captured["fn"])     # a program stored on disk keeps its jitted method
    hlo = fn.lower(*captured["args"], **captured["static"]).compile().as_text()
    assert "while" in hlo
    assert loop_relayouts(hlo) == []


def test_vision_attention_probabilities_are_not_transposed():
    import backends.jax as J
    cfg = vision_config(quick=True)
    model = J.BlipVisionModel(cfg, seed=0)
    fn = model._jit("forward", "_forward", ("interpolate", "output_hidden_states", "output_attentions"))
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    pixels = np.zeros((1, 3, cfg.image_size, cfg.image_size), np.float32)
    hlo = fn.lower(model.params, pixels, interpolate=False).compile().as_text()
    probs = re.compile(rf"= f32\[(?:\d+,)*{n},{n}\]\S* (?:transpose|copy)\(")
    assert [line for line in hlo.splitlines() if probs.search(line)] == []
