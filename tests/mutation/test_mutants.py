"""The mutation suite as slow tests (out of the default run): ``pytest -m slow tests/mutation``.

Only the snippet check runs by default: a mutant whose snippet no longer occurs exactly once in its file
cannot be planted, and the slow run would fail on it long after the code moved (two did, found in stop 37).
"""
import os

import pytest

from mutants import MUTANTS
from run_mutants import ROOT, run


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_snippet_occurs_once(mutant):
    with open(os.path.join(ROOT, mutant.path)) as f:
        text = f.read()
    assert text.count(mutant.old) == 1, f"{mutant.path}: the snippet occurs {text.count(mutant.old)} times"
    assert mutant.new != mutant.old


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(mutant):
    failed, passed, _, last = run(mutant)
    assert failed >= mutant.min_failures, last
