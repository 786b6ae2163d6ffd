"""What an audit is fed: the device it runs on and the batches of its data, each checked with one clear
error (a device this torch build cannot use, data that is no iterable, data that raises), and how a
batch reaches the model (`default_forward`, `to_device`, `batch_size`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from deadneuron.errors import AuditRuntimeError, UsageError


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; a UsageError for a name torch does not know or a device it cannot use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA is not available in this torch build/machine: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("MPS is not available in this torch build/machine: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "meta") and not _backend_available(dev.type):
        raise UsageError(f"--device {device!r}: the {dev.type} backend is not available here: use --device cpu")
    return dev


def _backend_available(kind: str) -> bool:
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    return bool(available()) if callable(available) else False


def batches_of(data: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    """The batches of ``data``; an error raised while producing one is an AuditRuntimeError naming it."""
    try:
        iterator = iter(data)
    except TypeError:
        raise UsageError(f"the data is a {type(data).__name__}, not an iterable of batches: pass a DataLoader, "
                         "a list of tensors or a generator") from None  # fmt: skip
    index = 0
    while max_batches is None or index < max_batches:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (UsageError, AuditRuntimeError, KeyboardInterrupt):  # already named: data wrapped twice
            raise
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0]
            raise AuditRuntimeError(f"the data raised {type(exc).__name__} while producing batch {index}: {line}") from exc
        yield batch
        index += 1


def batch_count(data: Iterable[Any]) -> int | None:
    """How many batches ``data`` holds where it says (``len``), else None: a generator, or a DataLoader over an
    ``IterableDataset`` without ``__len__`` (whose ``len`` raises TypeError)."""
    if not isinstance(data, Sized):
        return None
    try:
        return len(data)
    except (TypeError, NotImplementedError):
        return None


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; CPU for a model without either."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def refuse_meta(model: nn.Module) -> None:
    """A UsageError for a model whose parameters or buffers are on the meta device (built under
    ``torch.device("meta")`` or an empty-weights context): they hold shapes, no values to measure."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_meta:
            raise UsageError(f"{'parameter' if isinstance(t, nn.Parameter) else 'buffer'} {name!r} of the model "
                             f"({type(model).__name__}) is on the meta device: it holds no values to measure; load "
                             "the weights first (model.to_empty(device='cpu') then model.load_state_dict(state), or "
                             "model.load_state_dict(state, assign=True))")  # fmt: skip


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch on ``device``: tensors moved, mappings, tuples, lists and named tuples walked, objects with a
    ``.to`` method asked to move (a PackedSequence so, its ``batch_sizes`` staying on the CPU), anything else
    as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, PackedSequence):
        return cast(Any, obj).to(device)  # (its typed overloads name dtypes only)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        moved = (to_device(v, device) for v in obj)
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if hasattr(obj, "to") and callable(obj.to):
        return obj.to(device)
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor (or a PackedSequence) is the input; a tuple/list's first element is; a dict (any mapping,
    a Hugging Face ``BatchEncoding`` too) is passed as keyword arguments."""
    if isinstance(batch, (torch.Tensor, PackedSequence)):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise UsageError(_unfed(batch))


def _unfed(batch: Any) -> str:
    """The one line for a batch `default_forward` cannot feed: what it is, and what to yield instead."""
    kind = type(batch).__name__
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = ", ".join(f.name for f in dataclasses.fields(batch))
        return (f"cannot feed a batch of type {kind} (a dataclass: {fields}) to the model: yield dicts of keyword "
                "arguments (e.g. vars(batch)), (input, ...) tuples or tensors")
    return f"cannot feed a batch of type {kind} to the model: yield tensors, (input, ...) tuples, or dicts of keyword arguments"


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: its first batched tensor's leading dim (a dict's values and a
    tuple's items in order, those of the batch itself before those inside nested dicts and lists, past
    strings, numbers and 0-dim tensors), or a PackedSequence's number of sequences where that comes first;
    1 for a 0-dim tensor batch; 0 where none is found. `unbatched` says, after the forward pass, where that
    tensor held one sample."""
    if isinstance(batch, torch.Tensor) and not batch.dim():
        return 1
    counted = _counted(batch)
    if isinstance(counted, PackedSequence):  # batch_sizes lives on the CPU: no device sync
        return int(counted.batch_sizes[0]) if counted.batch_sizes.numel() else 0
    return int(counted.shape[0]) if counted is not None else 0


def counted_tensor(batch: Any) -> torch.Tensor | None:
    """The tensor whose leading dim `batch_size` counts (None where a PackedSequence is counted)."""
    counted = _counted(batch)
    return counted if isinstance(counted, torch.Tensor) else None


def _counted(batch: Any) -> torch.Tensor | PackedSequence | None:
    """What `batch_size` counts: the first tensor of ``batch`` with a non-empty leading dim, or PackedSequence,
    looked for among the batch's own values first, then inside its nested dicts, tuples and lists."""
    if isinstance(batch, PackedSequence):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() and batch.shape[0] else None
    if isinstance(batch, Mapping):
        items: list[Any] = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        x = getattr(batch, "x", None)
        return _counted(x) if isinstance(x, torch.Tensor) else None
    direct = (v for v in items if isinstance(v, (torch.Tensor, PackedSequence)))
    nested = (v for v in items if not isinstance(v, (torch.Tensor, PackedSequence)))
    return next((t for t in map(_counted, (*direct, *nested)) if t is not None), None)


def unbatched(batch: Any, first_input: tuple[int, int | None] | None) -> bool:
    """Whether ``batch`` was one sample fed without a batch dim: the tensor `batch_size` counts has the rank
    of the input of the first activation site the forward pass reached (``first_input``: that rank and the
    dim the site read its channels on, `deadneuron.probe.Recorder.first_input`), and that site read them on
    dim 0, with nothing in front: a (6,) fed to ``nn.Linear(6, 4)``, a (C, L) to ``nn.Conv1d``. Anything
    else (the rank changed on the way, the channels are not in front) keeps the leading dim as the count."""
    counted = counted_tensor(batch)
    return counted is not None and first_input == (counted.dim(), 0)

__all__ = ["batch_count", "batch_size", "batches_of", "counted_tensor", "default_forward", "model_device", "resolve_device",
           "to_device", "unbatched"]
