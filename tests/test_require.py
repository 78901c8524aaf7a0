"""A missing reference or optional framework fails the run; only the developer switch makes it a skip."""
import pytest

from fixture_utils import ALLOW_MISSING, require


def test_missing_module_fails(monkeypatch):
    monkeypatch.delenv(ALLOW_MISSING, raising=False)
    with pytest.raises(ImportError, match=ALLOW_MISSING):
        require("blip_no_such_reference_module")


def test_developer_switch_turns_it_into_a_skip(monkeypatch):
    monkeypatch.setenv(ALLOW_MISSING, "1")
    with pytest.raises(pytest.skip.Exception, match="blip_no_such_reference_module"):
        require("blip_no_such_reference_module")


def test_present_module_is_returned():
    import numpy
    assert require("numpy") is numpy


def test_no_test_module_skips_on_a_missing_import():
    import pathlib
    here = pathlib.Path(__file__).parent
    offenders = [p.name for p in here.rglob("test_*.py") if "importor" "skip(" in p.read_text()]
    assert offenders == []
