"""Suggested `deadneuron patch` commands end with their own ``--out PATH`` (named after the fix, beside the
checkpoint: tests/test_suggested_outputs.py runs them); tests of their other words read them without it."""

from __future__ import annotations

import shlex
from collections.abc import Iterable


def without_out(command: str) -> str:
    """``command`` without its closing ``--out PATH`` (which it must have)."""
    words = shlex.split(command)
    assert words[-2:-1] == ["--out"], command
    return shlex.join(words[:-2])


def all_without_out(commands: Iterable[str]) -> tuple[str, ...]:
    return tuple(without_out(c) for c in commands)
