"""The mutation suite as slow tests (out of the default run): ``pytest -m slow tests/mutation``."""
import pytest

from mutants import MUTANTS
from run_mutants import run


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(mutant):
    failed, passed, _, last = run(mutant)
    assert failed >= mutant.min_failures, last
