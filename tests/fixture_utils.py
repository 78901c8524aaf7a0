"""Access to the committed fixtures (tests/fixtures/models) and the repository's pyproject.toml.

A missing fixture fails, never skips.
"""
import os
import sys

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:   # the 'test' extra installs tomli on Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
CLASSES = ["BlipVisionModel", "BlipTextModel", "BlipModel", "BlipForConditionalGeneration", "BlipForImageTextRetrieval",
           "BlipForQuestionAnswering", "Blip2VisionModel", "Blip2QFormerModel", "Blip2Model",
           "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection",
           "Blip2VisionModelWithProjection"]


def fixture(name: str):
    """``(directory, inputs, reference)`` of one class's fixture."""
    d = os.path.join(MODELS, name)
    for f in ("config.json", "model.safetensors", "inputs.npz", "reference.npz"):
        if not os.path.exists(os.path.join(d, f)):
            raise FileNotFoundError(f"fixture file {d}/{f} is missing: run python tests/fixtures/make_fixtures.py")
    with np.load(os.path.join(d, "inputs.npz")) as a, np.load(os.path.join(d, "reference.npz")) as b:
        return d, dict(a), dict(b)


def pyproject() -> dict:
    """The repository's ``pyproject.toml`` (console scripts, packages, package data)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


# Set to 1 only on a developer machine that lacks the reference (transformers, tf-keras, ...): the
# modules that need it are then skipped. CI never sets it, so a missing reference fails the run.
ALLOW_MISSING = "BLIP_ALLOW_MISSING_REFERENCE"


def require(module: str):
    """Import ``module`` (the test-only reference or an optional framework) or fail the run.

    Unlike ``pytest.importorskip`` a missing module is an error, unless the developer sets
    ``BLIP_ALLOW_MISSING_REFERENCE=1``, which turns it into a skip of the module that asked.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get(ALLOW_MISSING) == "1":
            import pytest
            pytest.skip(f"{module} is not importable and {ALLOW_MISSING}=1: {exc}", allow_module_level=True)
        raise ImportError(f"{module} is required by the test suite ({exc}); install the 'test' extra, or set "
                          f"{ALLOW_MISSING}=1 to skip the tests that need it on a developer machine") from exc
