"""The cross-backend parity matrix: every class's fixture in every backend that ships it, compared
stage by stage with each other and with transformers, through the same harness users run
(`blip parity`). float32 uses the float32 row of the tolerance table; bfloat16 its own row.
"""
import io

import pytest

from blip_core import BACKENDS
from converters.parity import parity
from fixture_utils import CLASSES, fixture

BLIP = [c for c in CLASSES if not c.startswith("Blip2")]
BLIP2 = [c for c in CLASSES if c.startswith("Blip2")]
# What each backend ships (the README's status table says the same); a gap here fails, never skips.
SUPPORT = {name: BACKENDS for name in BLIP}
SUPPORT.update({name: BACKENDS for name in BLIP2})


def _run(name, dtype, reference):
    directory, _, _ = fixture(name)
    out = io.StringIO()
    result = parity(directory, backends=SUPPORT[name], dtype=dtype, reference=reference, out=out)
    return result, out.getvalue()


@pytest.mark.parametrize("name", CLASSES)
def test_float32_every_backend_and_transformers(name):
    result, text = _run(name, "float32", "transformers")
    assert not result.unavailable, text
    columns = {c.left for c in result.comparisons} | {c.right for c in result.comparisons}
    assert columns == set(SUPPORT[name]) | {"transformers"}, text
    assert result.exit_code == 0, text


@pytest.mark.parametrize("name", ["BlipForConditionalGeneration", "BlipModel", "Blip2ForConditionalGeneration"])
def test_bfloat16_within_its_own_tolerance(name):
    result, text = _run(name, "bfloat16", "transformers")
    assert not result.unavailable, text
    columns = {c.left for c in result.comparisons} | {c.right for c in result.comparisons}
    assert columns == set(SUPPORT[name]) | {"transformers"}, text
    assert result.exit_code == 0, text
