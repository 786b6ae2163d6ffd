"""Tensors a model stores in its own forward, put back as they were found after an audit's passes.

A model that caches in its forward (a rotary embedding's cos/sin buffer grown to the sequence length, a
tensor attribute made on the first call) would keep what the audit's passes made: under
``torch.inference_mode`` inference tensors, which no later training step can use. `kept_tensors` notes
every module's buffers and tensor-valued attributes and, on the way out, also when a pass raises, puts back
each one that was replaced and removes each one that was added. A buffer the forward updates in place (a
call counter, a running mean) is copied first and its values are put back where its version counter says
it was written (`COPY_LIMIT` bytes of buffers at most are copied: a larger buffer written in place keeps
what the passes wrote). Parameters are not touched here: an audit never changes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _tensor_attributes(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}


COPY_LIMIT = 64 << 20  # bytes of buffers copied on entry, to put back values written in place


@contextmanager
def kept_tensors(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` runs as it likes; after: its buffers and tensor attributes are those it had before,
    holding the values they held (buffers written in place: within `COPY_LIMIT`)."""
    found = [(m, dict(m._buffers), dict(vars(m))) for m in model.modules()
             if not isinstance(m, torch.jit.ScriptModule)]  # whose forward stores nothing in Python  # fmt: skip
    values = _values(model)
    try:
        yield
    finally:
        for m, buffers, attributes in found:
            _restore(m, buffers, attributes)
        with torch.no_grad():
            for buffer, version, copy in values:
                if buffer._version != version:
                    buffer.copy_(copy)


def _values(model: nn.Module) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(buffer, its version counter, a copy of it) for every buffer (once each) within `COPY_LIMIT` bytes."""
    out, left, seen = [], COPY_LIMIT, set()
    for b in model.buffers():
        size = b.numel() * b.element_size()
        if id(b) in seen or b.is_inference() or size > left:
            continue
        seen.add(id(b))
        left -= size
        out.append((b, b._version, b.detach().clone()))
    return out


def _restore(m: nn.Module, buffers: dict[str, Any], attributes: dict[str, Any]) -> None:
    for name in list(m._buffers):
        if name not in buffers:
            del m._buffers[name]
            m._non_persistent_buffers_set.discard(name)
        elif m._buffers[name] is not buffers[name]:
            m._buffers[name] = buffers[name]
    for name in buffers.keys() - m._buffers.keys():  # a buffer the forward deleted
        m._buffers[name] = buffers[name]
    for name, value in _tensor_attributes(m).items():
        if name not in attributes:
            delattr(m, name)
        elif attributes[name] is not value:
            object.__setattr__(m, name, attributes[name])
    for name, value in attributes.items():  # a tensor attribute made None or something else: put back too
        if isinstance(value, torch.Tensor) and vars(m).get(name) is not value:
            object.__setattr__(m, name, value)
