"""Tuple batches and their padding (DESIGN section 3, "Masks: padding is not data").

A tuple or list batch feeds its item 0 alone to the model (`deadneuron._inputs.default_forward`, the
``(input, target)`` convention), and ``mask="auto"`` reads keys of dict batches only: the batches of
``DataLoader(TensorDataset(input_ids, attention_mask))`` would have their padding counted as data without a
word. `mask_like` finds an item that looks like item 0's attention mask, for a warning that says how to use
it; `keyed` lets a str mask spec name a tuple's item by its index (``"1"``) and a named tuple's by its field.

What looks like a mask: a bool or integer tensor of exactly item 0's (N, L) shape (item 0 being (N, L)
token ids or (N, L, E) embeddings), holding 0 and 1 only, both present, each row ones then zeros (right
padding) or zeros then ones (left padding). Targets do not: class labels (N,), token labels of more than two
classes or with -100 at padding, 0/1 token labels that start and stop within a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence


def is_named_tuple(batch: Any) -> bool:
    """Whether ``batch`` is a named tuple (a ``collections.namedtuple`` / ``typing.NamedTuple``), not a
    PackedSequence (one too, read as the padded data it packs)."""
    return isinstance(batch, tuple) and hasattr(batch, "_fields") and not isinstance(batch, PackedSequence)


def keyed(batch: Any, key: str) -> Any:
    """``batch`` as a str mask spec naming ``key`` reads it: a named tuple as the dict of its fields, a tuple or
    list, where ``key`` is an index (``"1"``), as the dict of its items by index, anything else as it is."""
    if is_named_tuple(batch):
        return batch._asdict()
    if isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence) and key.isdecimal():
        return {str(i): v for i, v in enumerate(batch)}
    return batch


BY_INDEX = " (a tuple batch's item is named by its index: mask='1' / --mask 1)"
"""What the mask errors for a key of a tuple batch add."""


def mask_like(batch: Sequence[Any]) -> int | None:
    """The index of the first item after item 0 of a tuple batch that looks like item 0's attention mask (see
    the module docstring), else None. Synchronises once where an item has the shape, outside the hooks."""
    first = batch[0] if len(batch) else None
    if not isinstance(first, torch.Tensor) or not (first.dim() == 2 or (first.dim() == 3 and first.is_floating_point())):
        return None
    for index in range(1, len(batch)):
        value = batch[index]
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(first.shape[:2]) \
                and not value.is_floating_point() and not value.is_complex() and _padding_runs(value):  # fmt: skip
            return index
    return None


def _padding_runs(mask: torch.Tensor) -> bool:
    """Whether ``mask`` (N, L) holds 0 and 1 only, both, each row ones then zeros or zeros then ones."""
    if mask.shape[1] < 2:
        return False
    ones = mask != 0
    step = ones[:, 1:].to(torch.int8) - ones[:, :-1].to(torch.int8)
    runs = (step <= 0).all(1) | (step >= 0).all(1)
    return bool(((mask == 0) | (mask == 1)).all() & runs.all() & ones.any() & (~ones).any())


def tuple_mask_warning(batch: Sequence[Any], index: int, *, seen: str = "") -> str:
    """The one line for a tuple batch's item ``index`` that looks like item 0's attention mask and is not used;
    ``seen``: on which batches (the audit's count)."""
    name = batch._fields[index] if is_named_tuple(batch) else str(index)  # type: ignore[attr-defined]
    return (f"item {index}{f' ({name!r})' if name != str(index) else ''} of the tuple batches{seen} looks like an "
            "attention mask of item 0 (0/1 of its (N, L) shape, each row ones then zeros or zeros then ones) but is "
            "not used: a tuple batch feeds item 0 alone to the model and no mask is read from it, so padding counts "
            f"as data; pass mask={name!r} / --mask {name} (or yield dicts of 'input_ids' and 'attention_mask'), or "
            "mask=None / --no-mask if it is a target")


__all__ = ["is_named_tuple", "keyed", "mask_like", "tuple_mask_warning"]
