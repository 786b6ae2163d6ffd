"""A patched generic model on disk: its state_dict with the plan recorded beside it, and back.

The file is a ``torch.save``d dict of plain types (``weights_only`` loads it); a model retrained by
``deadneuron patch --train`` also holds ``verification``, ``budget`` and ``seed``::

    {"format": "deadneuron-patched-state", "version": 2, "state_dict": {...},
     "plan": <the resolved plan>, "earlier_plans": [<resolved plans of earlier patches>, ...],
     "requested_plan": <the plan as asked>, "record": <what changed>,
     "source": "...", "source_sha256": "...", "model": "MODULE:FACTORY", "model_args": {...}}

The *resolved* plan names exactly the modules and functional calls that were changed
(``module:encoder.relu``, ``function:<root>.relu``), so :func:`load_patched` rebuilds the same
architecture from the factory and then loads the weights strictly. A patched file patched again keeps
the earlier plans (``earlier_plans``, oldest first; version 2), and they are re-applied first. Version 1
files (no ``earlier_plans``) are read too. The factory is always passed in: a file never decides which
code is imported.

Where a recorded plan cannot be re-applied to what the factory builds, :func:`load_patched` raises a
:class:`~deadneuron.errors.PatchError` (exit 2), never returning the unpatched model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from deadneuron.errors import DeadneuronError, ModelMismatchError, PatchError, UnreadableInputError
from deadneuron.ops import ReinitDead
from deadneuron.patch.plan import Plan

PATCHED_FORMAT = "deadneuron-patched-state"
PATCHED_VERSION = 2
READABLE_VERSIONS = (1, 2)


def patched_state(
    model: nn.Module,
    *,
    resolved: Plan,
    requested: Plan,
    record: Mapping[str, Any],
    source: str,
    source_sha256: str | None = None,
    model_spec: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    earlier_plans: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict to save for a patched generic model (``earlier_plans``: those of the patched input;
    ``extra``: more plain entries, such as ``verification`` and ``budget`` of a retrained one)."""
    return {
        **dict(extra or {}),
        "format": PATCHED_FORMAT,
        "version": PATCHED_VERSION,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "plan": resolved.to_dict(),
        "earlier_plans": [dict(p) for p in earlier_plans],
        "requested_plan": requested.to_dict(),
        "record": dict(record),
        "source": source,
        "source_sha256": source_sha256,
        "model": model_spec,
        "model_args": dict(model_args or {}),
    }


def is_patched_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == PATCHED_FORMAT


def recorded_plan_dicts(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every plan a patched state records, in the order they were applied (the earliest first), as
    stored; what a file patched from this one keeps as its ``earlier_plans``."""
    earlier = obj.get("earlier_plans") or []
    plans = [*earlier, obj.get("plan")] if isinstance(earlier, list) else [None]
    return [dict(p) if isinstance(p, Mapping) else {"malformed": repr(p)[:60]} for p in plans]


def recorded_args(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments a patched state records (``{}`` where none or malformed)."""
    args = obj.get("model_args")
    return {str(k): v for k, v in args.items()} if isinstance(args, Mapping) else {}


def load_patched(
    source: str | os.PathLike[str] | Mapping[str, Any],
    factory: Callable[..., nn.Module],
    *,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The patched model: ``factory(**model_args)`` (default: the arguments recorded in the file), every
    recorded plan applied to it, then the saved weights loaded strictly.

    ``source`` is a file written by ``deadneuron patch --model ...`` (loaded with ``weights_only``) or its
    loaded dict. Raises UnreadableInputError (not such a file), PatchError (exit 2: a recorded plan cannot
    be re-applied to what ``factory`` builds) or ModelMismatchError (the weights do not fit).
    """
    from deadneuron.checkpoint import load_checkpoint

    where = str(source) if not isinstance(source, Mapping) else "patched state"
    obj = source if isinstance(source, Mapping) else load_checkpoint(source)
    if not is_patched_state(obj):
        raise UnreadableInputError(f"{where}: not a file written by `deadneuron patch --model ...` (no {PATCHED_FORMAT} tag)")
    assert isinstance(obj, Mapping)
    return rebuild_patched(obj, factory, model_args=model_args, where=where)


def rebuild_patched(
    obj: Mapping[str, Any],
    factory: Callable[..., nn.Module],
    *,
    model_args: Mapping[str, Any] | None = None,
    where: str = "patched state",
) -> nn.Module:
    """:func:`load_patched` for a loaded patched state; ``where`` names it in messages."""
    from deadneuron.checkpoint import extract_state_dict, load_state_dict_strict

    plans = _plans(obj, where)
    args = dict(model_args) if model_args is not None else recorded_args(obj)
    model = factory(**args)
    if not isinstance(model, nn.Module):
        raise ModelMismatchError(f"{where}: the factory returned {type(model).__name__}, not an nn.Module")
    for plan in plans:
        model = _reapply(model, plan, obj, where)
    load_state_dict_strict(model, extract_state_dict(obj, source=where), source=where)
    return model


def rebuild_architecture(model: nn.Module, plans: Sequence[Mapping[str, Any]], *, where: str = "patched state") -> nn.Module:
    """``model`` (fresh from its factory) with the recorded ``plans`` re-applied, weights untouched: the
    architecture of a patched state, to train from scratch."""
    obj = {"version": PATCHED_VERSION, "earlier_plans": list(plans[:-1]), "plan": plans[-1] if plans else None}
    if not plans:
        return model
    for plan in _plans(obj, where):
        model = _reapply(model, plan, obj, where)
    return model


def _plans(obj: Mapping[str, Any], where: str) -> list[Plan]:
    version = obj.get("version")
    if version not in READABLE_VERSIONS:
        raise _cannot(obj, where, f"its format version {version!r} is not one this deadneuron reads "
                      f"({', '.join(map(str, READABLE_VERSIONS))}); upgrade deadneuron")  # fmt: skip
    plans: list[Plan] = []
    for raw in recorded_plan_dicts(obj):
        try:
            plan = Plan.from_dict(raw) if isinstance(raw, Mapping) and "ops" in raw else None
        except (DeadneuronError, TypeError, ValueError, AttributeError) as exc:
            raise _cannot(obj, where, f"its recorded plan is malformed: {_first_line(exc)}") from None
        if plan is None:
            raise _cannot(obj, where, "it records no readable plan")
        plans.append(Plan(tuple(op for op in plan.ops if not isinstance(op, ReinitDead))))
    return plans


def _reapply(model: nn.Module, plan: Plan, obj: Mapping[str, Any], where: str) -> nn.Module:
    from deadneuron.patch.apply import apply_plan

    try:
        result = apply_plan(model, plan, strict=False)
    except Exception as exc:  # any failure means the recorded architecture cannot be rebuilt
        raise _cannot(obj, where, f"{'; '.join(plan.describe())}: {_first_line(exc)}") from None
    if result.record.not_patched:
        items = "; ".join(item.removeprefix("--select ") for item in result.record.not_patched[:3])
        more = f" and {len(result.record.not_patched) - 3} more" if len(result.record.not_patched) > 3 else ""
        raise _cannot(obj, where, f"{items}{more}")
    return result.model


def _cannot(obj: Mapping[str, Any], where: str, reason: str) -> DeadneuronError:
    spec = obj.get("model")
    args = recorded_args(obj)
    recorded = f" (recorded: --model {spec}" + "".join(f" --model-arg {k}={v}" for k, v in args.items()) + ")" if spec else ""
    return PatchError(
        f"{where}: deadneuron.load_patched cannot re-apply the patch plan recorded in it to the model the factory "
        f"builds ({reason}); refused, as without its plan the weights would be read as the unpatched model: pass the "
        f"factory and arguments it was patched with{recorded}, or patch the original checkpoint again"
    )


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, DeadneuronError) else text


__all__ = [
    "PATCHED_FORMAT",
    "PATCHED_VERSION",
    "READABLE_VERSIONS",
    "is_patched_state",
    "load_patched",
    "patched_state",
    "rebuild_architecture",
    "rebuild_patched",
    "recorded_args",
    "recorded_plan_dicts",
]
