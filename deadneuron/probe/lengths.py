"""Padding given as per-sample lengths (DESIGN section 3, "Masks: padding is not data").

Sequence models that pack their batches (``pack_padded_sequence``), speech models and variable-length token
batches often carry their padding as a ``lengths`` tensor of shape (N,) rather than a bool mask. The mask
spec ``"len:KEY"`` turns that key of a dict batch into the (N, L) mask True where position < lengths[n];
`deadneuron.probe.placement` then decides where it lies on each site, sequence-first sites included.

L is read from the batch's data tensor (``input_ids``, else ``inputs_embeds``, else the first floating
tensor, else the first other tensor of two or more dims): its dim 1 where its dim 0 is N (batch first,
(N, L, ...)), its dim 0 where its dim 1 is N (sequence first, (L, N, ...)). Where both are N, or neither
is, the spec is a usage error rather than a guess.

A batch that is (or holds, beside other values) a ``PackedSequence`` states its lengths itself: under
``"auto"`` its (N, T) mask (`packed_mask`, T its longest sequence, the samples in the order
``pad_packed_sequence`` gives back) leaves out the padding of the sites reading ``pad_packed_sequence``'s
output (batch first or not). Sites reading the packed data itself, (sum of lengths, C), hold no padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from deadneuron.errors import UsageError

LENGTHS_PREFIX = "len:"
TOKEN_KEYS = ("input_ids", "inputs_embeds")
ATTENTION_MASK = "attention_mask"
LENGTH_WORD = "len"


def is_lengths_spec(spec: str) -> bool:
    """Whether a str mask spec names a lengths key (``"len:KEY"``)."""
    return spec.startswith(LENGTHS_PREFIX)


def lengths_mask(spec: str, batch: Any) -> torch.Tensor:
    """The (N, L) bool mask of ``batch`` under ``spec`` (``"len:KEY"``), True where position < lengths[n],
    on the data tensor's device (the model's); a one-line UsageError, with the shapes, where it cannot be
    built. Synchronises once (the range check of the lengths), before the forward pass, never in a hook."""
    key = spec[len(LENGTHS_PREFIX):]
    if not key:
        raise UsageError(f"mask {spec!r} names no lengths key: pass mask='len:KEY' / --mask 'len:KEY', "
                         "KEY being the (N,) integer tensor of valid positions per sample")
    if not isinstance(batch, Mapping):
        index = " (a tuple batch's item is named by its index: mask='len:1')" if isinstance(batch, (tuple, list)) else ""
        raise UsageError(f"mask {spec!r} needs dict batches (in a Monitor: a forward called with keywords) holding "
                         f"{key!r} beside the data, got a {type(batch).__name__}{index}")
    if key not in batch:
        keys = ", ".join(repr(k) for k in batch) or "none"
        raise UsageError(f"lengths key {key!r} (mask {spec!r}) is not in the batch (its keys: {keys}); pass one of them")
    lengths = batch[key]
    if not _integer_vector(lengths):
        what = (f"of shape {tuple(lengths.shape)} and dtype {lengths.dtype}" if isinstance(lengths, torch.Tensor)
                else f"a {type(lengths).__name__}")  # fmt: skip
        raise UsageError(f"lengths {key!r} is {what}, not a 1-D integer tensor: pass the (N,) integer tensor of "
                         "valid positions per sample")
    found = data_tensor(batch, skip=key)
    if found is None:
        raise UsageError(f"mask {spec!r} finds no data tensor beside {key!r} in the batch to read the positions L "
                         f"from (its keys: {', '.join(repr(k) for k in batch)})")
    name, data = found
    positions = sequence_length(lengths, data)
    if isinstance(positions, str):
        raise UsageError(f"lengths {key!r} of shape {tuple(lengths.shape)} {positions} {name} of shape "
                         f"{tuple(data.shape)}")
    bad = (lengths < 0) | (lengths > positions)
    if bool(bad.any()):
        low, high = int(lengths.min()), int(lengths.max())
        raise UsageError(f"lengths {key!r} hold values in [{low}, {high}], outside [0, {positions}] (L of {name} "
                         f"of shape {tuple(data.shape)}): each is the number of valid positions of its sample")
    mask: torch.Tensor = torch.arange(positions, device=lengths.device)[None, :] < lengths[:, None]
    return mask.to(data.device)


def sequence_length(lengths: torch.Tensor, data: torch.Tensor) -> int | str:
    """L of ``data`` under (N,) ``lengths``: dim 1 where dim 0 is N (batch first), dim 0 where dim 1 is N
    (sequence first); else why not, as the middle of a message."""
    n = lengths.shape[0]
    shape = tuple(data.shape)
    if len(shape) < 2:
        return "cannot place its N samples on"
    if shape[0] == n and shape[1] == n:
        return (f"cannot tell batch first (N, L, ...) from sequence first (L, N, ...) where N == L == {n}: pad the "
                "batch to another length, or pass the (N, L) mask as a callable; data:")
    if shape[0] == n:
        return shape[1]
    if shape[1] == n:
        return shape[0]
    return ("fits neither dim 0 (batch first, (N, L, ...)) nor dim 1 (sequence first, (L, N, ...)) of the data "
            "tensor: pass one length per sample of")


def data_tensor(batch: Mapping[Any, Any], *, skip: Any) -> tuple[str, torch.Tensor] | None:
    """The tensor of a dict batch whose positions a lengths tensor counts: ``input_ids``, else
    ``inputs_embeds``, else the first floating tensor, else the first other tensor of two or more dims."""
    for key in TOKEN_KEYS:
        if isinstance(batch.get(key), torch.Tensor):
            return key, batch[key]
    others = [(str(k), v) for k, v in batch.items()
              if k not in (skip, ATTENTION_MASK) and isinstance(v, torch.Tensor)]  # fmt: skip
    floating = [(k, v) for k, v in others if v.is_floating_point()]
    return next(iter(floating or [(k, v) for k, v in others if v.dim() >= 2]), None)


def unused_lengths_warning(batch: Mapping[Any, Any]) -> str | None:
    """A warning naming a 1-D integer tensor of a dict batch, one entry per sample, whose key says length, which
    ``"auto"`` leaves unused, so the padding it describes would count as data without a word."""
    for key, value in batch.items():
        if not (isinstance(key, str) and LENGTH_WORD in key.lower() and _integer_vector(value)):
            continue
        found = data_tensor(batch, skip=key)
        if found is not None and isinstance(sequence_length(value, found[1]), int):
            use = f"{LENGTHS_PREFIX}{key}"
            return (f"the batches' {key!r} looks like per-sample lengths but is not used (only 'attention_mask' is, "
                    f"by default), so padding counts as data: pass mask={use!r} / --mask {use!r}, or mask=None / "
                    "--no-mask")
    return None


def packed_of(batch: Any) -> PackedSequence | None:
    """The PackedSequence ``batch`` is, else the first one among its own items (a tuple's, a list's) or values
    (a dict's), else None."""
    if isinstance(batch, PackedSequence):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return next((v for v in items if isinstance(v, PackedSequence)), None)


def packed_mask(packed: PackedSequence) -> torch.Tensor:
    """The (N, T) bool mask of ``packed``, True where position < the sample's length, the samples in their
    order before packing (as ``pad_packed_sequence`` returns them), on the packed data's device. The lengths
    are counted on the CPU, where ``batch_sizes`` lives, then copied over: no device sync."""
    sizes = packed.batch_sizes
    n = int(sizes[0]) if sizes.numel() else 0
    device = packed.data.device
    lengths = (sizes[None, :] > torch.arange(n)[:, None]).sum(1).to(device)  # in the packed (sorted) order
    if packed.unsorted_indices is not None:
        lengths = lengths[packed.unsorted_indices.to(device)]
    mask: torch.Tensor = torch.arange(sizes.numel(), device=device)[None, :] < lengths[:, None]
    return mask


def _integer_vector(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype != torch.bool
            and not value.is_floating_point() and not value.is_complex())  # fmt: skip


__all__ = ["LENGTHS_PREFIX", "data_tensor", "is_lengths_spec", "lengths_mask", "packed_mask", "packed_of",
           "sequence_length", "unused_lengths_warning"]  # fmt: skip
