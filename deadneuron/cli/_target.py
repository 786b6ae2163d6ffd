"""The subject of an audit as `deadneuron patch` reaches it: the words of the command line (the checkpoint
and the audit's own subject flags) and, for a deadneuron checkpoint, what its config can change --
measured by building the model of the changed config and comparing its activation sites."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deadneuron.reach import ConfigPreview, ModelPreview
from deadneuron.rules import PatchTarget

if TYPE_CHECKING:
    from deadneuron.cli._subject import Subject

WHOLE_MODEL = ("a model saved whole (a pickled module) cannot be patched from the command line: audit its "
               "state_dict with --model MODULE:FACTORY, or patch it in Python with deadneuron.patch.apply_plan")


@dataclass(frozen=True)
class AuditFlags:
    """The audit's command-line flags that name its subject, as the user typed them."""

    checkpoint: Path
    model: str | None = None
    model_args: tuple[str, ...] = ()
    data: str | None = None
    input_shape: str | None = None
    batches: int | None = None
    train: str | None = None
    max_steps: int | None = None
    allow_globals: tuple[str, ...] = ()
    trust_code: bool = False
    limits: tuple[str, ...] = ()  # flags patch does not take: --mask, --no-mask, --channel-axis, --mask-dims


@dataclass(frozen=True)
class Peeked:
    """What the suggested commands need from the data before the audit: its first batch (to find the
    layers around dead channels) and, for an adapter subject audited on fewer batches than all, how many
    samples those batches hold (the commands audit as many held-out samples, ``--audit-grids``)."""

    example: Any = None
    samples: int | None = None


def peek_data(subject: Subject, batches: int | None) -> Peeked:
    """The first batch of ``subject.data`` (put back in front), and the sample count described above."""
    from deadneuron._inputs import batch_size, batches_of

    if subject.data is None:
        return Peeked()
    if subject.adapter is not None and batches is not None:
        taken = list(batches_of(subject.data, batches))
        subject.data = taken
        return Peeked(taken[0] if taken else None, sum(batch_size(b) for b in taken))
    rest = batches_of(subject.data, None)
    first = next(rest, None)
    subject.data = chain([first], rest) if first is not None else []
    return Peeked(first)


def patch_target(flags: AuditFlags, subject: Subject, data: Peeked, *,
                 train: Callable[..., Any] | None = None) -> PatchTarget:  # fmt: skip
    """How `deadneuron patch` reaches ``subject``: the words that name it and what a fix would change.
    ``train``: the function of ``flags.train`` (the commands retrain with it, on ``flags.max_steps`` steps)."""
    if subject.adapter is not None:
        words = [str(flags.checkpoint), *_repeat("--allow-global", flags.allow_globals)]
        if data.samples is not None:
            words += ["--audit-grids", str(data.samples)]
        return PatchTarget(tuple(words), config=True, preview=ConfigPreview(subject.adapter, subject.checkpoint),
                           limits=flags.limits)  # fmt: skip
    if flags.model is None:
        return PatchTarget(None, unreachable=WHOLE_MODEL)
    words = [str(flags.checkpoint), "--model", flags.model, *_repeat("--model-arg", flags.model_args)]
    words += ["--data", flags.data] if flags.data is not None else ["--input-shape", str(flags.input_shape)]
    if flags.batches is not None:
        words += ["--batches", str(flags.batches)]
    if flags.train is not None:
        words += ["--train", flags.train, "--max-steps", str(flags.max_steps)]
    words += [*_repeat("--allow-global", flags.allow_globals), *(["--trust-code"] if flags.trust_code else [])]
    preview = ModelPreview(subject.model, data.example, train=train if flags.train is not None else None)
    return PatchTarget(tuple(words), preview=preview, limits=flags.limits, retrains=flags.train is not None)


def _repeat(flag: str, values: Iterable[str]) -> list[str]:
    return [word for value in values for word in (flag, value)]


def audit_args(flags: AuditFlags, *, measure: Sequence[str] = ()) -> tuple[str, ...]:
    """The arguments of `deadneuron audit` that audit the same subject again, as the user typed them: the
    checkpoint and its subject flags, then ``measure`` (the flags that chose what was measured)."""
    words = [str(flags.checkpoint), *(["--model", flags.model] if flags.model is not None else [])]
    words += _repeat("--model-arg", flags.model_args)
    words += ["--data", flags.data] if flags.data is not None else []
    words += ["--input-shape", flags.input_shape] if flags.input_shape is not None else []
    words += ["--batches", str(flags.batches)] if flags.batches is not None else []
    words += ["--train", flags.train, "--max-steps", str(flags.max_steps)] if flags.train is not None else []
    words += [*_repeat("--allow-global", flags.allow_globals), *(["--trust-code"] if flags.trust_code else [])]
    return (*words, *measure)


def measure_args(*, select: Sequence[str], mask: str | None, no_mask: bool, channel_axis: Sequence[str],
                 mask_dims: Sequence[str] = (), eps: str | None, delta: str | None) -> tuple[str, ...]:  # fmt: skip
    """The audit flags that chose what was measured, as words (``eps``/``delta``: None where the default)."""
    words = _repeat("--select", select) + (["--mask", mask] if mask is not None else [])
    words += ["--no-mask"] if no_mask else []
    words += _repeat("--channel-axis", channel_axis) + _repeat("--mask-dims", mask_dims)
    words += (["--eps", eps] if eps is not None else []) + (["--delta", delta] if delta is not None else [])
    return tuple(words)


def subject_limits(*, mask: str | None, no_mask: bool, channel_axis: Sequence[str],
                   mask_dims: Sequence[str] = ()) -> tuple[str, ...]:  # fmt: skip
    """The audit flags that change which channels count as dead and that `deadneuron patch` does not take."""
    out = [f"--mask {mask}"] if mask is not None else []
    out += ["--no-mask"] if no_mask else []
    out += [f"--channel-axis {item}" for item in channel_axis] + [f"--mask-dims {item}" for item in mask_dims]
    return tuple(out)


__all__ = ["AuditFlags", "Peeked", "audit_args", "measure_args", "patch_target", "peek_data", "subject_limits"]
