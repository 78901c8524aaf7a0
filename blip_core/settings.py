"""The words that switch a ``BLIP_*`` environment setting on or off, spelled once for every setting."""
from __future__ import annotations

import os

OFF = frozenset({"0", "false", "no", "off"})
ON = frozenset({"1", "true", "yes", "on"})


def env_word(name: str, default: str = "") -> str:
    """The environment variable ``name`` (``default`` when unset), stripped and lower-cased."""
    return os.environ.get(name, default).strip().lower()
