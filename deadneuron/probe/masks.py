"""Padding masks: which positions of a batch hold data (DESIGN section 3, "Masks: padding is not data").

A mask is a bool (or 0/1) tensor of shape (N, positions...) over one batch, True where the batch holds
data. It applies at a site whose tensor, once the channel dim (the site's axis) is removed, has dims
that begin with exactly the mask's shape, or with its positions then N (sequence first: (L, N, C) under
an (N, L) mask); where both fit, `deadneuron.probe.placement` says how the placement is decided:
token activations (N, L, C) under an (N, L) attention mask, conv maps (N, C, H, W) under an (N, H, W)
validity mask.
Elsewhere (attention scores (N, heads, L, L), pooled (N, C) features) the site is not masked. At a
masked site the statistics see only the valid positions, so they equal those of the same data unpadded.

Where the mask comes from, per batch (`choose_mask`):

* ``"auto"`` (the default): an adapter's ``position_mask(batch)`` where the adapter has one; else the
  ``attention_mask`` of a dict batch when its shape is the leading shape of the token tensor
  (``input_ids``, else ``inputs_embeds``, else the batch's first other tensor) and it holds 0/1 only;
  else no mask (an ``attention_mask`` that does not fit, or a key that looks like a mask or lengths, is named
  in a warning). A batch that is or holds a ``PackedSequence`` is masked by its lengths
  (`deadneuron.probe.lengths.packed_mask`); a named tuple is read as the dict of its fields; a tuple batch's
  item that looks like an attention mask of item 0 is named in a warning (`deadneuron.probe.tuples`);
* a ``str``: that key of dict batches (or that attribute of batch objects, that field of named tuples, that
  index of tuple batches: ``"1"``); ``"~KEY"`` inverts a mask True at padding; ``"len:KEY"`` builds the mask
  from per-sample lengths (`deadneuron.probe.lengths`);
* a callable ``batch -> tensor``;
* ``None``: no mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from deadneuron.errors import UsageError
from deadneuron.probe.lengths import (
    ATTENTION_MASK,
    LENGTHS_PREFIX,
    TOKEN_KEYS,
    is_lengths_spec,
    lengths_mask,
    packed_mask,
    packed_of,
    unused_lengths_warning,
)
from deadneuron.probe.placement import Placement, placements
from deadneuron.probe.seq2seq import decoder_warning
from deadneuron.probe.spread import spread_rows
from deadneuron.probe.tuples import BY_INDEX, is_named_tuple, keyed, mask_like, tuple_mask_warning
from deadneuron.stats import channel_view

MaskSpec = str | Callable[[Any], Any] | None
AUTO = "auto"
PACKED = "PackedSequence"


@dataclass(frozen=True)
class BatchMask:
    """One batch's mask, prepared once per batch (in `Recorder.start_batch`, outside the hooks).

    ``index`` holds the flat indices of the valid positions, or is None where every position is valid
    (the sites then read the tensor as it is, with no copy); ``valid`` is their number.
    """

    shape: tuple[int, ...]
    index: torch.Tensor | None
    valid: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> BatchMask:
        flat = mask.detach().reshape(-1).bool()
        # One host synchronisation per batch, here and never in a hook: `nonzero` must learn how many
        # positions are valid to size its output. The hooks then gather rows with `index_select`,
        # whose output shape the host already knows, so they run without synchronising (boolean
        # indexing inside each hook would synchronise once per site on CUDA).
        index = flat.nonzero().squeeze(1)
        valid = int(index.shape[0])
        return cls(tuple(mask.shape), None if valid == flat.shape[0] else index, valid)

    @property
    def positions(self) -> int:
        return math.prod(self.shape)

    def folded(self, fold: int) -> BatchMask:
        """This mask for a batch dim of N * ``fold`` rows, sample n's at rows n*fold ... n*fold + fold - 1
        (`deadneuron.probe.placement.Placement.fold`): each valid position at each of its sample's rows, row j
        of every sample before row j + 1 (near memory order); no host synchronisation."""
        shape = (self.shape[0] * fold, *self.shape[1:])
        if self.index is None:
            return BatchMask(shape, None, self.valid * fold)
        per = math.prod(self.shape[1:])  # positions per sample
        n, q = self.index // per, self.index % per
        rows = (n * fold)[None, :] + torch.arange(fold, device=n.device)[:, None]
        return BatchMask(shape, (rows * per + q[None, :]).reshape(-1), self.valid * fold)


def moved_mask(mask: BatchMask, steps: Sequence[tuple[int, int]]) -> BatchMask:
    """``mask`` with its positions moved as the data's were (`deadneuron.probe.order`): per step, its dim ``j``
    flipped (``shift`` -1) or rolled by ``shift``. Index arithmetic on the mask's device, no host sync: the
    number of valid positions is the mask's."""
    if mask.index is None or not steps:
        return mask
    shape = mask.shape
    strides = [math.prod(shape[j + 1 :]) for j in range(len(shape))]
    coords = [mask.index // strides[j] % shape[j] for j in range(len(shape))]
    for j, shift in steps:
        coords[j] = shape[j] - 1 - coords[j] if shift < 0 else (coords[j] + shift) % shape[j]
    index = sum(c * stride for c, stride in zip(coords, strides, strict=True))
    return BatchMask(shape, torch.sort(index).values, mask.valid)  # type: ignore[arg-type]


def mask_applies(shape: tuple[int, ...] | torch.Size, axis: int, mask_shape: tuple[int, ...]) -> bool:
    """Whether a mask of ``mask_shape`` fits a tensor of ``shape`` with channel dim ``axis`` in some placement
    (see `deadneuron.probe.placement.placements`)."""
    return bool(placements(shape, axis, mask_shape))


def _aligned(x: torch.Tensor, axis: int, place: Placement) -> tuple[torch.Tensor, int, int]:
    """``x`` with the mask's dims first, in the mask's order (as it is where they lead), its channel dim
    then, and the number of mask dims."""
    axis %= x.dim()
    k = len(place.dims)
    if place.leading:
        return x, axis, k
    moved = x.movedim(place.dims, tuple(range(k)))
    return moved, k + sum(1 for d in range(axis) if d not in place.dims), k


def masked_channel_view(x: torch.Tensor, axis: int, mask: BatchMask | None,
                        place: Placement | None) -> tuple[torch.Tensor, int | None]:  # fmt: skip
    """``x`` as the (outer, C, inner) view the statistics take, over the valid positions only where
    ``mask`` applies (``place``: where it lies on ``x``, None: it does not fit), and the number of elements
    per channel the mask excluded (None: not masked).

    The valid positions are gathered (no host synchronisation, see `BatchMask.of`) into the layout the
    unmasked view has: channels last (tokens (N, L, C)) -> (valid positions, C, inner); the channel
    before the positions (conv maps (N, C, H, W)) -> (1, C, valid positions x inner), so that each
    channel's values stay one run, as the statistics kernels sum them unmasked.
    """
    if mask is None or place is None:
        return channel_view(x, axis), None
    if place.fold > 1:  # rows folded per sample (stated): the mask repeated so
        mask = mask.folded(place.fold)
    if mask.index is None:
        return channel_view(x, axis), 0
    x, axis, k = _aligned(x, axis, place)
    channels = x.shape[axis]
    inner = x.numel() // max(channels * mask.positions, 1)
    excluded = (mask.positions - mask.valid) * inner
    index = mask.index if mask.index.device == x.device else mask.index.to(x.device)
    if axis >= k:  # the channel comes after every position dim
        rows = x.movedim(axis, k).reshape(mask.positions, channels, inner)
        return rows.index_select(0, index), excluded
    runs = x.movedim(axis, 0).reshape(channels, mask.positions, inner).index_select(1, index)
    return runs.reshape(1, channels, mask.valid * inner), excluded


def masked_rows(x: torch.Tensor, axis: int, mask: BatchMask,
                place: Placement | None) -> tuple[torch.Tensor, torch.Tensor, int] | None:  # fmt: skip
    """Where ``mask`` applies to ``x`` (at ``place``) with some positions left out and the channel comes
    after every position dim (tokens (N, L, C)): ``x`` as (positions, C, inner) with the indices of its
    valid rows and the elements per channel excluded, which `masked_channel_view` would gather (the
    statistics read those rows in place); else None."""
    mask = mask.folded(place.fold) if place is not None and place.fold > 1 else mask
    if place is None or mask.index is None:
        return None
    spread = spread_rows(x, axis, mask, place)  # the mask on dims other than the leading ones: rows in place
    if spread is not None:
        return spread
    x, axis, k = _aligned(x, axis, place)
    if axis < k:
        return None
    channels = x.shape[axis]
    inner = x.numel() // max(channels * mask.positions, 1)
    index = mask.index if mask.index.device == x.device else mask.index.to(x.device)
    rows = x.movedim(axis, k).reshape(mask.positions, channels, inner)
    return rows, index, (mask.positions - mask.valid) * inner


# -- where a batch's mask comes from ------------------------------------------------------------------
@dataclass(frozen=True)
class MaskChoice:
    """The mask of one batch (bool, on the batch's device) or None, what it is called in the report's
    meta (``"attention_mask"``, the key, ``"callable"``, ``"adapter:NAME"``, ``"PackedSequence"``), and a
    warning, if any; ``unused``: the index of a tuple batch's item that looks like an attention mask, not used
    (``warning`` says so)."""

    mask: torch.Tensor | None
    source: str | None
    warning: str | None = None
    unused: int | None = None


def describe_spec(spec: MaskSpec) -> str:
    """How a mask setting is named in messages and in the report's meta."""
    if spec is None:
        return "none"
    return spec if isinstance(spec, str) else "callable"


def choose_mask(spec: MaskSpec, batch: Any, *, batch_size: int, device: torch.device, adapter: Any = None,
                seq2seq: bool = False) -> MaskChoice:
    """The mask of ``batch`` under ``spec`` (see the module docstring); a UsageError, with the shapes,
    for a mask that was asked for and does not fit the batch. ``seq2seq``: the model is an encoder-decoder
    (`deadneuron.probe.seq2seq`)."""
    if spec is None:
        return MaskChoice(None, None)
    if callable(spec):
        return MaskChoice(_checked(spec(batch), "the mask callable's result", batch, batch_size, device), "callable")
    if not isinstance(spec, str):
        raise UsageError(f"mask must be 'auto', a batch key, 'len:KEY', a callable or None, not {type(spec).__name__}")
    if spec == AUTO:
        return _auto(batch, batch_size=batch_size, device=device, adapter=adapter, seq2seq=seq2seq)
    batch = keyed(batch, spec.removeprefix(LENGTHS_PREFIX).removeprefix("~"))
    if is_lengths_spec(spec):
        return MaskChoice(lengths_mask(spec, batch), spec)
    if spec.startswith("~") and len(spec) > 1:  # a mask True at padding (PyTorch's key_padding_mask), inverted
        return MaskChoice(~_keyed(spec[1:], batch, batch_size, device), spec)
    return MaskChoice(_keyed(spec, batch, batch_size, device), spec, _polarity_warning(spec))


def _unused_mask_warning(batch: Mapping[Any, Any]) -> str | None:
    """A warning naming a bool tensor of a dict batch whose key says mask or padding, which ``"auto"`` (reading
    ``attention_mask`` alone) leaves unused, so padding would count as data without a word."""
    for key, value in batch.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() >= 2 \
                and any(word in key.lower() for word in ("mask", "pad")):  # fmt: skip
            use = f"~{key}" if "pad" in key.lower() else key
            return (f"the batches' {key!r} looks like a padding mask but is not used (only 'attention_mask' is, by "
                    f"default), so padding counts as data: pass mask={use!r} / --mask {use!r} (a mask is True where "
                    "the batch holds data; '~' inverts one True at padding), or mask=None / --no-mask")
    return None


def _polarity_warning(key: str) -> str | None:
    """A warning where a mask key's name says padding: read as True where the batch holds data, a mask True at
    padding (PyTorch's ``src_key_padding_mask``) would leave the data out and measure the padding alone."""
    if "pad" not in key.lower():
        return None
    return (f"mask {key!r} is read as True (1) where the batch holds data, but its name says padding: if it is "
            f"True at padding (as PyTorch's key_padding_mask is), the figures cover the padding alone; pass "
            f"mask='~{key}' / --mask '~{key}' to invert it")


def _auto(batch: Any, *, batch_size: int, device: torch.device, adapter: Any, seq2seq: bool = False) -> MaskChoice:
    position_mask = getattr(adapter, "position_mask", None)
    if callable(position_mask):
        found = position_mask(batch)
        source = f"adapter:{getattr(adapter, 'name', type(adapter).__name__)}"
        what = f"the {source} position mask"
        return MaskChoice(None, None) if found is None else MaskChoice(
            _checked(found, what, batch, batch_size, device), source
        )
    packed = packed_of(batch)
    if packed is not None:
        return MaskChoice(packed_mask(packed).to(device), PACKED)
    if is_named_tuple(batch) and ATTENTION_MASK in batch._fields:
        return _auto(batch._asdict(), batch_size=batch_size, device=device, adapter=None)
    if isinstance(batch, (tuple, list)):
        index = mask_like(batch)
        return MaskChoice(None, None) if index is None else MaskChoice(None, None, tuple_mask_warning(batch, index), index)
    if not isinstance(batch, Mapping):
        return MaskChoice(None, None)
    if ATTENTION_MASK not in batch:
        return MaskChoice(None, None, _unused_mask_warning(batch) or unused_lengths_warning(batch))
    mask, tokens = batch[ATTENTION_MASK], _token_tensor(batch)
    problem = _auto_problem(mask, tokens)
    if problem is not None:
        return MaskChoice(None, None, f"attention_mask {problem}: padding positions are counted as data "
                                      "(pass mask=KEY / --mask KEY, or a callable)")
    return MaskChoice(mask.to(device=device, dtype=torch.bool), ATTENTION_MASK, decoder_warning(batch, seq2seq=seq2seq))


def _auto_problem(mask: Any, tokens: tuple[str, torch.Tensor] | None) -> str | None:
    """Why a dict batch's ``attention_mask`` is not used by default, or None where it is."""
    if not isinstance(mask, torch.Tensor):
        return f"is a {type(mask).__name__}, not a tensor"
    if tokens is None:
        return "has no token tensor beside it to match"
    name, t = tokens
    if mask.dim() == 0 or tuple(t.shape[: mask.dim()]) != tuple(mask.shape):
        return f"of shape {tuple(mask.shape)} does not match {name} of shape {tuple(t.shape)}"
    if not _zero_one(mask):
        return f"of dtype {mask.dtype} holds values other than 0 and 1"
    return None


def _token_tensor(batch: Mapping[Any, Any]) -> tuple[str, torch.Tensor] | None:
    for key in TOKEN_KEYS:
        if isinstance(batch.get(key), torch.Tensor):
            return key, batch[key]
    for key, value in batch.items():
        if key != ATTENTION_MASK and isinstance(value, torch.Tensor):
            return str(key), value
    return None


def _keyed(key: str, batch: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if key not in batch:
            keys = ", ".join(repr(k) for k in batch) or "none"
            raise UsageError(f"mask key {key!r} is not in the batch (its keys: {keys}); pass one of them, or no mask")
        mask = batch[key]
        for name in _tokens_of(key):
            tokens = batch.get(name)
            if isinstance(tokens, torch.Tensor) and isinstance(mask, torch.Tensor) and (
                mask.dim() == 0 or tuple(tokens.shape[: mask.dim()]) != tuple(mask.shape)
            ):
                raise UsageError(
                    f"mask {key!r} of shape {tuple(mask.shape)} does not match {name} of shape {tuple(tokens.shape)}: "
                    "a mask is (N, positions...) over the token positions"
                )
        return _checked(mask, f"mask {key!r}", batch, batch_size, device)
    value = getattr(batch, key, None)
    if isinstance(value, torch.Tensor):
        return _checked(value, f"mask {key!r}", batch, batch_size, device)
    fields = [k for k, v in vars(batch).items() if isinstance(v, torch.Tensor)] if hasattr(batch, "__dict__") else []
    has = f" (its tensors: {', '.join(fields)})" if fields else BY_INDEX if isinstance(batch, (tuple, list)) else ""
    raise UsageError(f"mask key {key!r} needs dict batches, got a {type(batch).__name__}{has}")


def _tokens_of(key: str) -> tuple[str, ...]:
    """The token keys a mask key is checked against: ``decoder_attention_mask`` against ``decoder_input_ids``
    (an encoder-decoder batch's other sequence), any other key against ``input_ids`` / ``inputs_embeds``."""
    prefix = key[: -len(ATTENTION_MASK)] if key.endswith(ATTENTION_MASK) else ""
    return tuple(prefix + name for name in TOKEN_KEYS)


def _checked(mask: Any, what: str, batch: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """``mask`` as a bool tensor on ``device``; a UsageError naming the shapes where it cannot be one."""
    if not isinstance(mask, torch.Tensor):
        raise UsageError(f"{what} is a {type(mask).__name__}: a mask is a bool or 0/1 tensor of shape (N, positions...)")
    if mask.dim() == 0 or (batch_size and mask.shape[0] != batch_size and not _sequence_first(mask, batch)):
        raise UsageError(
            f"{what} has shape {tuple(mask.shape)}, which does not fit a batch of {batch_size} samples "
            f"(input {batch_shapes(batch)}): a mask is (N, positions...)"
        )
    if mask.dtype != torch.bool and not _zero_one(mask):
        raise UsageError(f"{what} (dtype {mask.dtype}) holds values other than 0 and 1: pass a bool mask, True where "
                         "the batch holds data")
    return mask.to(device=device, dtype=torch.bool)


def _sequence_first(mask: torch.Tensor, batch: Any) -> bool:
    """Whether the batch's first tensor is sequence first under an (N, L, ...) ``mask``: (L, N, ...), its first
    two dims the mask's swapped (its leading dim is then not the batch's N)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (tuple, list)) \
        else [batch]  # fmt: skip
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    return first is not None and mask.dim() >= 2 and first.dim() >= 2 and \
        (first.shape[0], first.shape[1]) == (mask.shape[1], mask.shape[0])


def _zero_one(mask: torch.Tensor) -> bool:
    """Whether every value is 0 or 1 (synchronises once per batch, outside the hooks)."""
    if mask.dtype == torch.bool:
        return True
    if mask.is_complex():
        return False
    return bool(((mask == 0) | (mask == 1)).all())


def batch_shapes(batch: Any) -> str:
    """The shapes of a batch's tensors, for messages."""
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, PackedSequence):
        sequences = int(batch.batch_sizes[0]) if batch.batch_sizes.numel() else 0
        return f"PackedSequence of {sequences} sequences, data {tuple(batch.data.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {batch_shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(batch_shapes(v) for v in batch) + ")"
    fields = {k: tuple(v.shape) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)} if hasattr(
        batch, "__dict__"
    ) else {}
    return str(fields) if fields else type(batch).__name__


def unmatched_error(source: str, shape: tuple[int, ...], site_shapes: Mapping[str, tuple[int, ...]]) -> UsageError:
    """The error for a mask that was asked for and applied at no site: the user's figures would silently
    count the padding."""
    examples = "; ".join(f"{name} {shape_}" for name, shape_ in list(site_shapes.items())[:4])
    return UsageError(
        f"mask {source!r} of shape {shape} applied at no activation site (their shapes: {examples}): a site is "
        "masked where its dims other than the channel begin with the mask's shape (or with its positions, then N); "
        "pass a mask that fits, or none"
    )
