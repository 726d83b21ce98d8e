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


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (SIGTERM from a scheduler or `kill`, SIGINT), raised by
    sparselab's own handlers and caught wherever Ctrl-C is (it is a KeyboardInterrupt).

    Why a subclass: under `python -m sparselab`, CPython remembers a plain KeyboardInterrupt
    that passed through any exec() or eval() of a string (dataclass and namedtuple creation do
    that during imports) and then kills the process with SIGINT at exit, overriding the
    `sys.exit(130)` that follows the clean-up. The interpreter checks for exactly
    KeyboardInterrupt, so a subclass keeps the exit code the command chose."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close valid name exists, else ''."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    return f"unknown {kind} '{name}'.{did_you_mean(name, valid)} Valid: {', '.join(valid)}."
