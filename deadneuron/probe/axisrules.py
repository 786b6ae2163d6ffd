"""How torch ops fix, keep or move a tensor's channel dim (used by `AxisTracker.produce` and `carry`).

A rule takes an op's arguments, its result and a lookup of the axes already known, and returns the
channel axis of the result with how it was decided, or None where it cannot say. Producers (``F.conv2d``,
``F.linear``, ``F.layer_norm``, pooling...) fix the axis whatever their input; every other rule carries a
known input axis through the op and gives up where the channel dim does not survive as one dim of the same
size (advanced indexing, a reshape that merges it, a reduction...). `axis_rules` maps each torch function,
method and operator to its rule once, so that the functional probe pays one dict lookup per op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F


class AxisSource(StrEnum):
    """How a site's channel axis was decided."""

    PRODUCER = "producer"  # the tensor came straight from a layer whose layout is known
    TRACED = "traced"  # carried from such a layer through ops that keep or move the channel dim
    # (N, C), (C,) or a scalar with no known producer: the last dim is the only one that can hold
    # channels (the first is the batch), so nothing is guessed and nothing is warned about.
    RANK = "rank"
    GUESSED = "guessed"  # nothing known: dim 1 for 4-D and more, else the last dim
    USER = "user"  # set by the user (channel_axis={glob: axis})
    # no channel dim: it was reduced (``.sum(-1)``), squeezed (a one-feature linear's ``.squeeze(-1)``) or
    # indexed away (``x[..., 0]``): the tensor is one channel, read as a unit dim after its last
    NONE = "none"


Known = Callable[[torch.Tensor], "tuple[int, AxisSource] | None"]
Found = tuple[int, AxisSource] | None
SINGLE: Found = (0, AxisSource.NONE)  # what a rule returns where the op leaves no channel dim
AxisRule = Callable[[tuple[Any, ...], Mapping[str, Any], Any, Known], Found]

_TRACED = AxisSource.TRACED


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, *names: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return default


def source_of(args: tuple[Any, ...], kwargs: Mapping[str, Any], known: Known) -> tuple[torch.Tensor, int] | None:
    """The op's first tensor argument and its known axis."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(x, torch.Tensor):
        return None
    found = known(x)
    return None if found is None else (x, found[0])


def _dims(value: Any, ndim: int) -> list[int] | None:
    """An int or a sequence of ints as non-negative dims of an ``ndim``-D tensor."""
    items = (value,) if isinstance(value, int) else value if isinstance(value, (tuple, list, torch.Size)) else None
    if items is None:
        return None
    n = max(ndim, 1)
    dims = []
    for d in items:
        if not isinstance(d, int) or not -ndim <= d < n:
            return None
        dims.append(d % n)
    return dims


# -- producers ------------------------------------------------------------------------------------------


class Producer:
    """A rule that fixes the axis whatever the input: conv, pooling, batch/instance/group norm and
    interpolation put channels before their ``spatial`` dims (unbatched inputs have none in front;
    ``None``: dim 1, or 0 for a 1-D result); linear, embedding and layer norm (``last``) on the last dim.
    An axis counted from the end is returned negative (the form that holds at any rank: `layout`)."""

    def __init__(self, spatial: int | None = None, *, last: bool = False) -> None:
        self.spatial = spatial
        self.last = last

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(t, torch.Tensor):
            return None
        if self.last:
            return (-1 if t.dim() else 0), AxisSource.PRODUCER
        if t.dim() <= 1:
            return 0, AxisSource.PRODUCER
        if self.spatial is None:
            return 1, AxisSource.PRODUCER
        return (-self.spatial - 1, AxisSource.PRODUCER) if t.dim() > self.spatial else None


def layer_norm(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """``F.layer_norm`` / ``F.rms_norm``: over the last dim, a producer on it; over several trailing dims
    (``[C, H, W]`` of a conv map) the input's layout is kept, the last dim being no channel dim."""
    shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 1:
        return same(args, kwargs, out, known)
    return Producer(last=True)(args, kwargs, out, known)


# -- ops that keep the layout ---------------------------------------------------------------------------


def same(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """Copies, casts, dropout, padding, softmax over any dim: same rank, the channel dim keeps its size."""
    src = source_of(args, kwargs, known)
    if src is None or not isinstance(out, torch.Tensor):
        return None
    x, a = src
    return (a, _TRACED) if out.dim() == x.dim() and out.shape[a] == x.shape[a] else None


def elementwise(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """Elementwise ops with broadcasting (``a + b``, ``torch.where``, ``x.expand``...): dims line up from
    the right, so a known axis keeps its distance from the last dim. Known inputs must agree."""
    axis = None
    for t in (*args, *kwargs.values()) if kwargs else args:
        found = known(t) if isinstance(t, torch.Tensor) else None
        if found is None:
            continue
        if not isinstance(out, torch.Tensor):
            return None
        cand = out.dim() - (t.dim() - found[0])
        if cand < 0 or out.size(cand) != t.size(found[0]) or (axis is not None and cand != axis):
            return None
        axis = cand
    return None if axis is None else (axis, _TRACED)


# -- ops that move the channel dim ----------------------------------------------------------------------


def permute(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    src = source_of(args, kwargs, known)
    if src is None:
        return None
    x, a = src
    order = args[1] if len(args) == 2 else args[1:] if len(args) > 2 else kwargs.get("dims")
    dims = _dims(order, x.dim()) if order is not None else None
    if dims is None or a not in dims:
        return None
    return dims.index(a), _TRACED


def transpose(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    src = source_of(args, kwargs, known)
    if src is None:
        return None
    x, a = src
    pair = args[1:] if len(args) == 3 else (_arg(args, kwargs, 1, "dim0", "axis0"), _arg(args, kwargs, 2, "dim1", "axis1"))
    d = _dims(pair, x.dim())
    if d is None:
        return None
    return (d[1] if a == d[0] else d[0] if a == d[1] else a), _TRACED


def movedim(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    src = source_of(args, kwargs, known)
    if src is None:
        return None
    x, a = src
    n = x.dim()
    source = _dims(_arg(args, kwargs, 1, "source"), n)
    dest = _dims(_arg(args, kwargs, 2, "destination"), n)
    if source is None or dest is None or len(source) != len(dest):
        return None
    if a in source:
        return dest[source.index(a)], _TRACED
    rest = [d for d in range(n) if d not in source]
    free = [d for d in range(n) if d not in dest]
    return free[rest.index(a)], _TRACED


def reverse_dims(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """``x.T`` (every dim reversed)."""
    src = source_of(args, kwargs, known)
    return None if src is None else (src[0].dim() - 1 - src[1], _TRACED)


def swap_last_two(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """``x.mT`` / ``x.mH``."""
    src = source_of(args, kwargs, known)
    if src is None or src[0].dim() < 2:
        return None
    n, a = src[0].dim(), src[1]
    return (n - 2 if a == n - 1 else n - 1 if a == n - 2 else a), _TRACED


@functools.lru_cache(maxsize=4096)  # a pure function of shapes, which repeat from batch to batch
def reshaped_axis(before: tuple[int, ...], after: tuple[int, ...], axis: int) -> int | None:
    """Where dim ``axis`` of a tensor shaped ``before`` lands after a reshape to ``after``: the dim of the
    same size whose leading dims hold as many elements (then every element keeps its channel), else None."""
    if math.prod(before) != math.prod(after) or not math.prod(before):
        return None
    lead, size = math.prod(before[:axis]), before[axis]
    seen = 1
    for j, d in enumerate(after):
        if seen == lead and d == size:
            return j
        seen *= d
        if seen > lead:
            return None
    return None


def reshape(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """reshape/view/flatten/unflatten/squeeze/unsqueeze: wherever the channel dim survives whole."""
    src = source_of(args, kwargs, known)
    if src is None or not isinstance(out, torch.Tensor):
        return None
    x, a = src
    j = reshaped_axis(tuple(x.shape), tuple(out.shape), a)
    if j is None and x.shape[a] == 1 and (out.shape == x.shape[:a] + x.shape[a + 1 :] or 1 not in out.shape):
        return SINGLE  # a one-channel dim squeezed away (``.squeeze(-1)``, ``.view(-1)``)
    return None if j is None else (j, _TRACED)


def cat(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """cat along any dim keeps the channel axis (along it, the channels of the inputs are concatenated)."""
    items = _arg(args, kwargs, 0, "tensors")
    if not isinstance(out, torch.Tensor) or not isinstance(items, (tuple, list)):
        return None
    axis = None
    for t in items:
        found = known(t) if isinstance(t, torch.Tensor) else None
        if found is None:
            continue
        if t.dim() != out.dim() or (axis is not None and found[0] != axis):
            return None
        axis = found[0]
    return None if axis is None else (axis, _TRACED)


def stack(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    items = _arg(args, kwargs, 0, "tensors")
    if not isinstance(out, torch.Tensor) or not isinstance(items, (tuple, list)) or not items:
        return None
    d = _dims(_arg(args, kwargs, 1, "dim", default=0), out.dim())
    axes = {found[0] for t in items if isinstance(t, torch.Tensor) and (found := known(t)) is not None}
    if d is None or len(axes) != 1:
        return None
    a = axes.pop()
    return (a if a < d[0] else a + 1), _TRACED


def unbind(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    src = source_of(args, kwargs, known)
    if src is None:
        return None
    d = _dims(_arg(args, kwargs, 1, "dim", default=0), src[0].dim())
    if d is None:
        return None
    if d[0] == src[1]:
        return SINGLE  # one piece per channel
    return (src[1] if src[1] < d[0] else src[1] - 1), _TRACED


def split(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """split/chunk/tensor_split: every piece keeps the layout (along the channel dim, fewer channels)."""
    src = source_of(args, kwargs, known)
    return None if src is None else (src[1], _TRACED)


def getitem(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """Basic indexing (ints, slices, None, Ellipsis) maps dims one to one, as does one 1-D tensor of indices
    along a dim other than the channel dim (``h[:, :, idx]``); anything else gives up."""
    src = source_of(args, kwargs, known)
    if src is None or len(args) < 2 or not isinstance(out, torch.Tensor):
        return None
    x, a = src
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    picks = [i for i in index if isinstance(i, torch.Tensor)]
    if len(picks) > 1 or any(p.dim() != 1 for p in picks) or not all(
            i is None or i is Ellipsis or type(i) in (int, slice) or isinstance(i, torch.Tensor) for i in index):  # fmt: skip
        return None
    consumed = sum(1 for i in index if type(i) in (int, slice) or isinstance(i, torch.Tensor))
    pos_in = pos_out = 0
    for i in index:
        if i is None:
            pos_out += 1
            continue
        span = x.dim() - consumed if i is Ellipsis else 1
        if pos_in <= a < pos_in + span:
            if isinstance(i, torch.Tensor):  # channels picked in another order: not carried
                return None
            return SINGLE if type(i) is int else (pos_out + a - pos_in, _TRACED)  # one channel taken
        pos_in += span
        pos_out += 0 if type(i) is int else span
    j = pos_out + a - pos_in
    return (j, _TRACED) if a >= pos_in and j < out.dim() else None


# -- the table --------------------------------------------------------------------------------------------

_ELEMENTWISE = """
    add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod pow float_power
    maximum minimum fmax fmin where atan2 arctan2 hypot logaddexp copysign lerp addcmul addcdiv
    eq ne lt le gt ge greater less greater_equal less_equal not_equal logical_and logical_or logical_xor
    logical_not bitwise_and bitwise_or bitwise_xor
    abs absolute neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sign sgn
    sin cos tan sinh cosh asin acos atan arcsin arccos arctan erf erfc erfinv floor ceil round trunc frac
    clamp clip clamp_min clamp_max nan_to_num masked_fill expand expand_as broadcast_to
    relu relu6 leaky_relu gelu silu mish elu selu celu sigmoid tanh hardtanh hardswish hardsigmoid
    softplus softsign tanhshrink softshrink hardshrink logsigmoid threshold rrelu prelu
    __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
    __rtruediv__ __itruediv__ __div__ __rdiv__ __floordiv__ __rfloordiv__ __mod__ __rmod__ __pow__
    __rpow__ __ipow__ __neg__ __abs__ __and__ __or__ __xor__ __invert__ __eq__ __ne__ __lt__ __le__
    __gt__ __ge__
"""
_SAME = """
    contiguous clone detach to float double half bfloat16 type type_as cpu cuda requires_grad_ repeat tile
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout pad constant_pad_nd
    softmax log_softmax softmin normalize cumsum cumprod flip fliplr flipud roll
    gather index_select take_along_dim scatter scatter_ index_copy index_copy_
"""
KEEPING_RULES = (elementwise, same)  # a tensor with no channel dim keeps none through them (`AxisTracker.carry`)
_MOVES: Mapping[str, AxisRule] = MappingProxyType({
    "permute": permute, "transpose": transpose, "swapaxes": transpose, "swapdims": transpose,
    "movedim": movedim, "moveaxis": movedim, "reshape": reshape, "view": reshape, "view_as": reshape,
    "reshape_as": reshape, "flatten": reshape, "unflatten": reshape, "squeeze": reshape, "unsqueeze": reshape,
    "cat": cat, "concat": cat, "concatenate": cat, "stack": stack, "unbind": unbind, "split": split,
    "chunk": split, "tensor_split": split, "__getitem__": getitem,
})  # fmt: skip
_FIRST_DIM_PRODUCERS: Mapping[str, int | None] = MappingProxyType({
    **{f"{op}{k}d": k for k in (1, 2, 3) for op in ("conv", "conv_transpose", "max_pool", "avg_pool", "lp_pool",
                                                     "adaptive_max_pool", "adaptive_avg_pool")},
    **{f"fractional_max_pool{k}d": k for k in (2, 3)},
    "batch_norm": None, "instance_norm": None, "group_norm": None, "local_response_norm": None,
    "interpolate": None, "upsample": None, "upsample_nearest": None, "upsample_bilinear": None,
    "pixel_shuffle": 2, "pixel_unshuffle": 2,
})  # fmt: skip
_LAST_DIM_PRODUCERS = ("linear", "bilinear", "embedding", "embedding_bag")
_NAMESPACES = (F, torch, torch.Tensor)


def _names(text: str, rule: AxisRule) -> dict[str, AxisRule]:
    out: dict[str, AxisRule] = {}
    for name in text.split():
        out[name] = rule
        if not name.startswith("_"):
            out[name + "_"] = rule  # the in-place variant
    return out


def axis_rules() -> Mapping[Any, AxisRule]:
    """Each torch function, Tensor method and operator the functional probe sees, to its rule (built once:
    a read-only table of torch's own functions)."""
    return _table()


@functools.cache
def _table() -> Mapping[Any, AxisRule]:
    by_name: dict[str, AxisRule] = {**_names(_ELEMENTWISE, elementwise), **_names(_SAME, same), **_MOVES}
    by_name.update({name: Producer(k) for name, k in _FIRST_DIM_PRODUCERS.items()})
    by_name.update({name: Producer(last=True) for name in _LAST_DIM_PRODUCERS})
    by_name.update({"layer_norm": layer_norm, "rms_norm": layer_norm})
    table: dict[Any, AxisRule] = {}
    # Producers looked up in torch.nn.functional first: torch.relu_ and F.relu_ are distinct objects, but
    # torch.Tensor.flatten and torch.flatten must both map, so every namespace is visited.
    for ns in _NAMESPACES:
        for name, rule in by_name.items():
            func = getattr(ns, name, None)
            if callable(func):
                table.setdefault(func, rule)
    tensor: Any = torch.Tensor  # on the class, .T and the like are descriptors: the probe sees their __get__
    table[tensor.T.__get__] = reverse_dims
    table[tensor.mT.__get__] = swap_last_two
    table[tensor.mH.__get__] = swap_last_two
    table[tensor.H.__get__] = reverse_dims
    for t in (torch.t, tensor.t, tensor.t_):  # a matrix transposed (a 1-D tensor kept)
        table[t] = reverse_dims
    table[torch.adjoint] = table[tensor.adjoint] = swap_last_two
    return MappingProxyType(table)
