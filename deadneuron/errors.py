"""Errors a user can act on, each with the CLI exit code it maps to.

Exit codes (documented in the README and ``deadneuron --help``):

0 ok, 1 a health gate failed, 2 usage, 3 refused as unsafe, 4 unreadable, corrupt or unsupported
input, 5 model/checkpoint mismatch, 6 runtime failure, 7 write failed.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    GATE_FAILED = 1
    USAGE = 2
    UNSAFE = 3
    UNREADABLE = 4
    MISMATCH = 5
    RUNTIME = 6
    WRITE_FAILED = 7


class DeadneuronError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user (what is wrong, what to do)."""

    exit_code: ExitCode = ExitCode.RUNTIME


class UsageError(DeadneuronError):
    exit_code = ExitCode.USAGE


class UnsafeCheckpointError(DeadneuronError):
    exit_code = ExitCode.UNSAFE


class UnreadableInputError(DeadneuronError):
    exit_code = ExitCode.UNREADABLE


class ModelMismatchError(DeadneuronError):
    exit_code = ExitCode.MISMATCH


class AuditRuntimeError(DeadneuronError):
    """A forward pass failed; the message names the last site that ran."""

    exit_code = ExitCode.RUNTIME


class PatchError(DeadneuronError):
    """Part of a plan could not be applied; the message lists every site or op and why."""

    exit_code = ExitCode.USAGE


class WriteError(DeadneuronError):
    exit_code = ExitCode.WRITE_FAILED
