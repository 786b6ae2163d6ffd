"""Turn CLI arguments into what an audit needs: a model, its data, and what the checkpoint knows."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deadneuron._parse import parse_scalar
from deadneuron.adapters import Adapter, get_adapter, is_deadneuron_checkpoint
from deadneuron.errors import AuditRuntimeError, UnreadableInputError, UnsafeCheckpointError, UsageError
from deadneuron.patch.plan import Plan
from deadneuron.patch.saved import is_patched_state, rebuild_patched, recorded_args, recorded_plan_dicts

if TYPE_CHECKING:
    from deadneuron.cli._launch import Shard


@dataclass
class Subject:
    """A model ready to audit, with its data and the checkpoint's training metadata."""

    model: nn.Module
    data: Iterable[Any] | None
    adapter: Adapter | None = None
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    random_inputs: bool = False
    warnings: list[str] = field(default_factory=list)
    patched_plans: list[dict[str, Any]] = field(default_factory=list)  # re-applied plans of a patched state
    notes: list[str] = field(default_factory=list)  # for the user, on stderr
    model_args: dict[str, Any] = field(default_factory=dict)  # what the factory was called with
    sharded: bool = False  # ``data`` is this rank's share already (its source took rank and world_size)


def parse_key_values(items: Sequence[str], *, option: str) -> dict[str, Any]:
    """``["depth=4", "act=gelu"]`` -> ``{"depth": 4, "act": "gelu"}`` (ints, floats, bools parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_scalar(raw.strip())
    return out


def parse_channel_axes(items: Sequence[str]) -> dict[str, int]:
    """``["block.relu=1", "head.*=-1"]`` -> ``{"block.relu": 1, "head.*": -1}`` (--channel-axis GLOB=AXIS)."""
    out: dict[str, int] = {}
    for item in items:
        glob, sep, raw = item.rpartition("=")
        try:
            axis = int(raw.strip())
        except ValueError:
            axis = None
        if not sep or not glob.strip() or axis is None:
            raise UsageError(f"--channel-axis takes GLOB=AXIS with an integer dim (e.g. 'block.relu=1'), got {item!r}")
        out[glob.strip()] = axis
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> (8, 3, 32, 32); a clear error for anything else."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape must be positive integers separated by commas (e.g. 8,3,32,32), got {text!r}")
    return shape


def import_object(spec: str, *, option: str) -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` -> the object."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"{option} takes MODULE:NAME (e.g. mypkg.models:build or models.py:build), got {spec!r}")
    try:
        module = _import_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        raise UsageError(f"{option} {spec!r}: cannot import {exc.name!r}; check the module path and PYTHONPATH") from exc
    except Exception as exc:
        raise UsageError(f"{option} {spec!r}: importing {target!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UsageError(f"{option} {spec!r}: module {target!r} has no attribute {attr!r}") from exc


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"no such Python file: {path}")
    name = f"_deadneuron_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], *, option: str, spec: str) -> Any:
    if not callable(factory):
        raise UsageError(f"{option} {spec!r} is not callable")
    try:
        return factory(**kwargs)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [""])[0]
        raise AuditRuntimeError(f"{option} {spec!r} raised {type(exc).__name__}: {line}") from exc


def random_batches(shape: tuple[int, ...], count: int, *, seed: int = 0) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(shape, generator=gen)


def build_subject(
    checkpoint: Path,
    *,
    model_spec: str | None,
    model_args: Mapping[str, Any],
    input_shape: str | None,
    data_spec: str | None,
    batches: int | None,
    allow_globals: Sequence[str] = (),
    trust_code: bool = False,
    shard: Shard | None = None,
) -> Subject:
    """Load the checkpoint safely and pair the model with its data (under torchrun: a ``--data`` factory
    or adapter that takes ``rank`` and ``world_size`` is asked for ``shard``'s share)."""
    from deadneuron import checkpoint as ckpt

    if input_shape is not None and data_spec is not None:
        raise UsageError("pass either --input-shape or --data, not both")
    shape = parse_shape(input_shape) if input_shape is not None else None
    obj = ckpt.load_checkpoint(checkpoint, allow_globals=allow_globals, trust_code=trust_code)
    subject = _model_from(obj, checkpoint, model_spec, model_args)
    subject.warnings.extend(_nonfinite_warnings(subject.model))
    if data_spec is not None:
        factory = import_object(data_spec, option="--data")
        kwargs = shard.kwargs_for(factory) if shard is not None and callable(factory) else {}
        subject.data = call_factory(factory, kwargs, option="--data", spec=data_spec)
        subject.sharded = bool(kwargs)
    elif shape is not None:
        subject.data = random_batches(shape, batches or 8)
        subject.random_inputs = True
    elif subject.adapter is not None:
        kwargs = shard.kwargs_for(subject.adapter.batches) if shard is not None else {}
        subject.data = subject.adapter.batches("heldout", subject.checkpoint.get("config", {}), **kwargs)
        subject.sharded = bool(kwargs)
    else:
        raise UsageError("no data to audit on: pass --data MODULE:FACTORY (your batches) or --input-shape N,C,H,W")
    return subject


def _model_from(obj: Any, path: Path, model_spec: str | None, model_args: Mapping[str, Any]) -> Subject:
    from deadneuron import checkpoint as ckpt

    if isinstance(obj, torch.jit.ScriptModule):
        raise UnreadableInputError(
            f"{path}: a TorchScript module cannot take forward hooks, so it cannot be audited; "
            "audit the eager model it was scripted from (its state_dict with --model MODULE:FACTORY)"
        )
    if isinstance(obj, nn.Module) and model_spec is None:
        return Subject(model=obj, data=None, source=str(path))
    if is_patched_state(obj):
        return _patched_subject(obj, path, model_spec, model_args)
    if model_spec is None:
        if is_deadneuron_checkpoint(obj):
            adapter = get_adapter(str(obj.get("adapter")))
            return Subject(model=adapter.load(obj), data=None, adapter=adapter, checkpoint=obj, source=str(path))
        raise UsageError(
            f"{path} holds weights but no model: pass --model MODULE:FACTORY (a function that builds the model)"
        )
    factory = import_object(model_spec, option="--model")
    model = call_factory(factory, model_args, option="--model", spec=model_spec)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {model_spec!r} returned {type(model).__name__}, not an nn.Module")
    state = ckpt.extract_state_dict(obj, source=str(path))
    ckpt.load_state_dict_strict(model, state, source=str(path))
    meta = obj if isinstance(obj, Mapping) and is_deadneuron_checkpoint(obj) else {}
    return Subject(model=model, data=None, checkpoint=meta, source=str(path), model_args=dict(model_args))


def _patched_subject(obj: Any, path: Path, model_spec: str | None, model_args: Mapping[str, Any]) -> Subject:
    """A file from `deadneuron patch --model`: the factory's model with every recorded plan re-applied,
    then the weights; a plan that cannot be re-applied is an error, never the unpatched model."""
    if model_spec is None:
        spec = obj.get("model")
        recorded = f" (it was patched with --model {spec})" if spec else ""
        raise UsageError(
            f"{path} is a patched checkpoint of a model of your own{recorded}: pass --model MODULE:FACTORY; "
            "its recorded plan is re-applied to the factory's model before the weights are loaded"
        )
    factory = import_object(model_spec, option="--model")

    def build(**kwargs: Any) -> nn.Module:
        model = call_factory(factory, kwargs, option="--model", spec=model_spec)
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {model_spec!r} returned {type(model).__name__}, not an nn.Module")
        return model

    args = {**recorded_args(obj), **model_args}
    model = rebuild_patched(obj, build, model_args=args, where=str(path))
    plans = recorded_plan_dicts(obj)
    done = "; ".join(line for p in plans for line in Plan.from_dict(p).describe()) or "no architecture change"
    note = f"{path} is a patched checkpoint: its recorded plan was re-applied before the weights were loaded ({done})"
    return Subject(model=model, data=None, source=str(path), patched_plans=plans, notes=[note], model_args=args)


def _nonfinite_warnings(model: nn.Module) -> list[str]:
    from deadneuron import checkpoint as ckpt

    bad = ckpt.nonfinite_parameters(model.state_dict())
    if not bad:
        return []
    names = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [f"non-finite weights in {names}{more}: activations downstream will be NaN/Inf"]


__all__ = [
    "Subject", "UnsafeCheckpointError", "build_subject", "import_object", "parse_channel_axes", "parse_key_values",
]
