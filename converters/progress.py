"""A minimal progress bar on stderr, shown only when stderr is a terminal (never in logs or pipes)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total_bytes, label)``; ``update(n)`` after each tensor; ``close()`` at the end."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else bool(enabled)
        self.total, self.done, self.label = max(int(total), 1), 0, label
        self._last = 0.0

    def update(self, nbytes: int) -> None:
        self.done += int(nbytes)
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% "
                              f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
