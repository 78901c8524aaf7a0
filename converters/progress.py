"""The conversion progress bar: tqdm on stderr, shown only when stderr is a terminal (never in logs or pipes)."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """``Progress(total_bytes, label)``; ``update(n)`` after each tensor; ``close()`` at the end."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None):
        stream = stream or sys.stderr
        enabled = stream.isatty() if enabled is None else bool(enabled)
        self._bar = tqdm(total=max(int(total), 1), desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                         file=stream, disable=not enabled, mininterval=0.1, leave=True, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        self._bar.update(int(nbytes))

    def close(self) -> None:
        self._bar.close()
