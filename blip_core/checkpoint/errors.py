"""Errors raised by checkpoint reading, writing and strict checking."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or state dict is unreadable, corrupt, refused or does not fit its table.

    The message always names the file (or the source) and the problem, so a user can act on it
    without a debugger.
    """


class StateDictMismatchError(CheckpointError):
    """Strict check failed: carries the three problem lists as attributes as well as the message.

    missing:    canonical names in the table but not in the state dict.
    unexpected: names in the state dict but not in the table.
    mismatched: (name, expected_shape, found_shape) triples.
    wrong_dtype: (name, dtype name) of integer or bool data where the table has a float parameter.
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=(), wrong_dtype=()):
        super().__init__(message)
        self.wrong_dtype = list(wrong_dtype)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
