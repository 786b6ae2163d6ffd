"""What an audit is fed: the device it runs on and the batches of its data, each checked with one clear
error (a device this torch build cannot use, data that is no iterable, data that raises)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

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
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0]
            raise AuditRuntimeError(f"the data raised {type(exc).__name__} while producing batch {index}: {line}") from exc
        yield batch
        index += 1


__all__ = ["batches_of", "resolve_device"]
