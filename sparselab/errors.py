"""User-facing errors: one paragraph that names the file, the key and what would be valid.

The CLI prints these without a traceback and exits with code 2; anything else is a bug.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (matrix file, command line, data directory)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"{self.file}" + (f", line {self.line}" if self.line else ""))
        if self.key:
            where.append(f"key '{self.key}'")
        prefix = ": ".join([" ".join(where)]) + ": " if where else ""
        return prefix + self.message


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close valid name exists, else ''."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    return f"unknown {kind} '{name}'.{did_you_mean(name, valid)} Valid: {', '.join(valid)}."
