"""Turn CLI arguments into what an audit needs: a model, its data, and what the checkpoint knows."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deadneuron._parse import parse_scalar
from deadneuron.adapters import Adapter, get_adapter, is_deadneuron_checkpoint
from deadneuron.errors import (
    AuditRuntimeError,
    DeadneuronError,
    UnreadableInputError,
    UnsafeCheckpointError,
    UsageError,
)
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


def parse_channel_axes(items: Sequence[str]) -> dict[str, int | None]:
    """``["block.relu=1", "head.*=-1", "gate=none"]`` -> ``{"block.relu": 1, "head.*": -1, "gate": None}``
    (--channel-axis GLOB=AXIS; ``none``: the input has no channel dim, one channel)."""
    out: dict[str, int | None] = {}
    for item in items:
        glob, sep, raw = item.rpartition("=")
        word = raw.strip()
        if not sep or not glob.strip() or not (word.lower() == "none" or re.fullmatch(r"[+-]?[0-9]+", word)):
            raise UsageError(f"--channel-axis takes GLOB=AXIS with an integer dim, or none where the input has no "
                             f"channel dim (e.g. 'block.relu=1', 'gate=none'), got {item!r}")
        out[glob.strip()] = None if word.lower() == "none" else int(word)
    return out


def parse_mask_dims(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["encoder.*=1,0"]`` -> ``{"encoder.*": (1, 0)}`` (--mask-dims GLOB=DIMS: the site's dims under the
    padding mask's dims, in the mask's order, N first)."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        glob, sep, raw = item.rpartition("=")
        try:
            dims = tuple(int(d.strip()) for d in raw.split(","))
        except ValueError:
            dims = ()
        if not sep or not glob.strip() or not dims:
            raise UsageError(f"--mask-dims takes GLOB=DIMS, the site's dims under the mask's (N, positions...) in "
                             f"that order (e.g. 'encoder.*=1,0' for (L, N, C) activations), got {item!r}")  # fmt: skip
        out[glob.strip()] = dims
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> (8, 3, 32, 32); a clear error for anything else."""
    parts = [p.strip() for p in text.strip().replace("x", ",").split(",")]  # an empty part is an error, not skipped
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape must be positive integers separated by commas (e.g. 8,3,32,32), got {text!r}")
    return shape


def import_object(spec: str, *, option: str) -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` -> the object.

    While the module loads, a file's own folder (a dotted module: the working folder) is importable, as
    pytest's rootdir is, so the file may import its neighbours; sys.path is restored afterwards."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"{option} takes MODULE:NAME (e.g. mypkg.models:build or models.py:build), got {spec!r}")
    is_file = target.endswith(".py")
    if is_file and not Path(target).is_file():
        what = "is a folder, not a Python file" if Path(target).is_dir() else "no such Python file"
        raise UsageError(f"{option} {spec!r}: {target}: {what}; check the path (relative to the working folder)")
    folder = Path(target).resolve().parent if is_file else Path.cwd()
    try:
        with importable(folder):
            module = _import_file(Path(target)) if is_file else importlib.import_module(target)
    except UsageError:
        raise
    except ImportError as exc:
        raise UsageError(_import_failure(option, spec, target, exc, is_file=is_file)) from exc
    except SyntaxError as exc:  # its text names the file and line already, maybe another file than target's
        raise UsageError(f"{option} {spec!r}: importing {target!r} raised {type(exc).__name__}: "
                         f"{exc.msg}{_syntax_where(exc, Path(target) if is_file else None)}") from exc  # fmt: skip
    except Exception as exc:
        where = _line_in(exc, Path(target)) if is_file else ""
        raise UsageError(f"{option} {spec!r}: importing {target!r} raised {type(exc).__name__}: "
                         f"{_first_line(exc)}{where}") from exc  # fmt: skip
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UsageError(f"{option} {spec!r}: module {target!r} has no attribute {attr!r}") from exc


@contextmanager
def importable(folder: Path) -> Iterator[None]:
    """``folder`` first on sys.path for the duration of the block; sys.path as it was afterwards."""
    saved = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_failure(option: str, spec: str, target: str, exc: ImportError, *, is_file: bool) -> str:
    """Which import failed, and where: the module itself, or an import inside it (file and line)."""
    name = getattr(exc, "name", None)
    if not is_file and name is not None and (target == name or target.startswith(f"{name}.")):
        return (f"{option} {spec!r}: cannot import {name!r}; check the module path, and run from the folder that "
                "holds it or put it on PYTHONPATH")  # fmt: skip
    where = _line_in(exc, Path(target)) if is_file else f" (in {target})"
    what = f"import of {name!r}" if name else "an import"
    return (f"{option} {spec!r}: {what} failed{where}: {_first_line(exc)}; install it, or put it beside "
            f"{Path(target).name if is_file else 'the module'}")


def _line_in(exc: BaseException, path: Path) -> str:
    """`` (models.py, line 3)``: the last frame of the traceback inside ``path``, if any."""
    found = ""
    frame = exc.__traceback__
    resolved = str(path.resolve())
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == resolved:
            found = f" ({path}, line {frame.tb_lineno})"
        frame = frame.tb_next
    if not found and isinstance(exc, SyntaxError) and exc.lineno is not None:
        found = f" ({path}, line {exc.lineno})"
    return found


def _syntax_where(exc: SyntaxError, target: Path | None) -> str:
    """`` (models.py, line 3)``: the file the syntax error is in (as the user named it, if it is the
    target) and its line."""
    if exc.filename is None:
        return ""
    shown = str(target) if target is not None and Path(exc.filename).resolve() == target.resolve() else exc.filename
    return f" ({shown}, line {exc.lineno})" if exc.lineno is not None else f" ({shown})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"no such Python file: {path}")
    name = f"_deadneuron_user_{path.stem}"
    stamp = (str(path.resolve()), path.stat().st_mtime_ns)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__deadneuron_stamp__", None) == stamp:
        return loaded  # --model and --data in one file: it runs once
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    module.__deadneuron_stamp__ = stamp  # type: ignore[attr-defined]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check_callable(spec: str, *, option: str) -> Callable[..., Any]:
    """The function ``spec`` names (imported, not called); a UsageError if it is not callable."""
    found = import_object(spec, option=option)
    if not callable(found):
        raise UsageError(f"{option} {spec!r} is a {type(found).__name__}, not a function")
    return found


def call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], *, option: str, spec: str) -> Any:
    """``factory(**kwargs)``, with the factory's folder importable while it runs; what it raises becomes
    one line naming the factory (exit 6)."""
    if not callable(factory):
        raise UsageError(f"{option} {spec!r} is a {type(factory).__name__}, not a function")
    target = spec.rpartition(":")[0]
    folder = Path(target).resolve().parent if target.endswith(".py") else Path.cwd()
    try:
        with importable(folder):
            return factory(**kwargs)
    except DeadneuronError:
        raise
    except Exception as exc:
        where = _line_in(exc, Path(target)) if target.endswith(".py") else ""
        raise AuditRuntimeError(f"{option} {spec!r} raised {type(exc).__name__}: {_first_line(exc)}{where}") from exc


def check_batches(data: Any, *, spec: str) -> Iterable[Any]:
    """What a --data function returned, if it can be batches; a UsageError saying what it is otherwise."""
    if data is None:
        raise UsageError(f"--data {spec!r} returned None: return your batches (a DataLoader, a list of tensors, "
                         "or yield them from a generator)")  # fmt: skip
    if isinstance(data, nn.Module):
        raise UsageError(f"--data {spec!r} returned a model ({type(data).__name__}), not batches: --data names the "
                         "function that returns your batches, --model the one that builds the model")  # fmt: skip
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise UsageError(f"--data {spec!r} returned a {type(data).__name__}, not an iterable of batches: return a "
                         "DataLoader, a list of tensors, or yield them from a generator")  # fmt: skip
    return data


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
        subject.data = check_batches(call_factory(factory, kwargs, option="--data", spec=data_spec), spec=data_spec)
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
    "Subject", "UnsafeCheckpointError", "build_subject", "call_factory", "check_batches", "check_callable",
    "import_object", "importable", "parse_channel_axes", "parse_key_values",
]
