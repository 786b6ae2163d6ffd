"""What the hooks do with an activation call's tensors: add them into the site's statistics.

Called inside the hooks with __torch_function__ handling off, so that these ops do not pass through
the functional probe. Nothing here keeps a tensor or synchronises with the host.
"""

from __future__ import annotations

import functools
import math

import torch

from deadneuron.probe.batched import is_batched, measured_unbatched
from deadneuron.probe.masks import BatchMask, masked_channel_view, masked_rows, moved_mask
from deadneuron.probe.order import PositionOrder
from deadneuron.probe.placement import Placement
from deadneuron.probe.site import Site

_WRITTEN = (torch.float32, torch.float64)  # the dtypes the C kernel reads (and writes relu's values in)
# Calls of fewer elements are not answered with written values: answering an nn.ReLU's call through the
# functional probe costs 3-5 us of Python (measured), more than such a relu saves; at 2**16 in cache about even.
_WRITE_MIN = 1 << 16


def measure_input(site: Site, z: torch.Tensor, *, inplace: bool, mask: BatchMask | None, eps: float,
                  relu: bool = False, write: bool = False, order: PositionOrder | None = None) -> torch.Tensor | None:  # fmt: skip
    """Before the call: the flat count on the pre-activation ``z``, where it must be taken before the
    call overwrites ``z`` (in place) or needs a per-channel region (PReLU); else `measure_output` takes it.

    ``relu``: the call computes exactly ``torch.relu(z)`` (an ``nn.ReLU``, ``F.relu``...). Then the whole
    measurement is taken here from ``z`` alone where the C kernel reads it (`ChannelStats.update_relu_along`:
    relu's values, the flat region tested on ``z``), one read instead of reading ``z`` and the output, and
    `measure_output` skips the call (``site.taken``). Not with a histogram, nor with a padding mask that
    leaves positions of this call out (one that does not fit the site, or has every position valid, is
    noted as `measure_output` notes it). ``write``: the caller can answer the call with relu's values
    (`writable`); returned where the same pass computed them (`fused_relu`), else None.

    ``order``: the positions reordered in this forward pass; where ``z``'s were, the mask is moved as they
    were, or not applied where that cannot be told, on this call and in `measure_output` (`unordered`).
    Inside ``torch.func.vmap`` (or ``torch.func.grad``) the plain tensor under its wrapper is measured (`batched`)."""
    if is_batched(z):
        return measured_unbatched(site, z, mask, call=True, measure=lambda plain, m: measure_input(
            site, plain(z), inplace=inplace, mask=m, eps=eps, relu=relu))  # fmt: skip
    mask = unordered(site, z, mask, order)
    eps = eps_in(eps, z.dtype)
    region = site.region
    place = None if mask is None or not relu else place_of(site, z, mask)[0]
    out = None
    if relu and _whole(mask, place) and site.histogram is None and region.center is None \
            and not isinstance(region.lo, torch.Tensor):  # fmt: skip
        flat = (region.lo, region.hi)
        out = fused_relu(site, z, eps, flat) if write else None
        site.taken = out is not None or site.stats.update_relu_along(z, site.axis, eps, flat)
    else:
        site.taken = False
    if site.taken:
        if mask is not None:
            site.masked, site.unfitted = (True, site.unfitted) if place is not None else (site.masked, site.unfitted + 1)
        site.shape = tuple(z.shape)
        return out
    lo = region.lo
    if relu and place is not None and not _whole(mask, place) and z.is_cpu and site.histogram is None \
            and region.center is None and not isinstance(lo, torch.Tensor) \
            and _masked_relu(site, z, mask, place, eps, (lo, region.hi)):  # fmt: skip
        return None
    if site.flat_from_z_first(inplace):
        region = site.region
        place = place_of(site, z, mask)[0]
        if not isinstance(region.lo, torch.Tensor) and _whole(mask, place):
            site.stats.update_flat_along(region.tested(z), site.axis, region.lo, region.hi)
            return None
        z3 = masked_channel_view(region.tested(z).detach(), site.axis, mask, place)[0]
        site.stats.update_flat(z3, region.lo, region.hi)
    return None


def writable(z: torch.Tensor) -> bool:
    """Whether a relu call on ``z`` (not in place) can be answered with values the statistics pass wrote:
    a plain CPU tensor of the kernel's dtypes, of at least ``_WRITE_MIN`` elements, that autograd does not follow (an audit under
    `torch.inference_mode`, a monitor's eval batches; never a training step's graph)."""
    return (type(z) is torch.Tensor and z.numel() >= _WRITE_MIN and z.is_cpu and z.dtype in _WRITTEN
            and not (z.requires_grad and torch.is_grad_enabled()))  # fmt: skip


def fused_relu(site: Site, z: torch.Tensor, eps: float, flat: tuple[float | torch.Tensor, float]) -> torch.Tensor | None:
    """``torch.relu(z)``, written by the C kernel in the pass that adds relu(z)'s statistics to ``site`` (one
    pass where the model's relu and the statistics made two): relu's default thresholds only (eps 0, flat
    where z <= 0), else None with nothing added. The values are torch.relu's bit for bit (-0.0 and NaN kept;
    checked when the kernel is loaded), in a new tensor laid out as torch.relu lays out its result."""
    if eps != 0 or flat != (0.0, math.inf):
        return None
    out = torch.empty_like(z)
    if out.stride() != z.stride() or not site.stats.update_relu_along(z, site.axis, eps, flat, out):
        return None
    return out


def _masked_relu(site: Site, z: torch.Tensor, mask: BatchMask | None, place: Placement, eps: float,
                 flat: tuple[float, float]) -> bool:  # fmt: skip
    """`measure_input`'s one read of z where the mask leaves positions out: the valid rows of tokens read in
    place, or conv maps' valid positions gathered (z alone, where reading the output gathered both)."""
    assert mask is not None
    options = place_of(site, z, mask)[1]
    rows = masked_rows(z, site.axis, mask, place)
    if rows is not None:
        z3, index, excluded = rows
        done = site.stats.update_relu_rows(z3, index, eps, flat)
    else:
        z3, gathered = masked_channel_view(z.detach(), site.axis, mask, place)
        done = site.stats.update_relu_along(z3, 1, eps, flat)
        excluded = gathered or 0
    if done:
        if options:
            site.placement.guessed(place, options)  # a guess that decides what is left out
        site.masked, site.taken, site.shape = True, True, tuple(z.shape)
        site.excluded += excluded
    return done


def measure_output(site: Site, a: torch.Tensor, z: torch.Tensor | None, *, eps: float, mask: BatchMask | None) -> None:
    """After the call: the output statistics of ``a``, and the flat count in the same pass unless
    `measure_input` took it (``z`` is None after an in-place call). The flat count is always read on
    ``z``, never on the output: the output cannot tell an infinite input from a finite one
    (``relu(-inf)`` is 0, ``sigmoid(inf)`` is 1), and a non-finite pre-activation is never flat."""
    if site.taken:  # `measure_input` measured the call from z
        site.taken = False
        return
    if is_batched(a):  # inside torch.func.vmap or torch.func.grad (`batched`)
        measured_unbatched(site, a, mask, call=False, measure=lambda plain, m: measure_output(
            site, plain(a), None if z is None else plain(z), eps=eps, mask=m))  # fmt: skip
        return
    mask = site.call_mask if site.reordering else mask
    eps = eps_in(eps, a.dtype)
    region = site.region
    place, options = place_of(site, a, mask)
    if site.histogram is None and _whole(mask, place):  # every position read: no gathered copy
        if mask is not None:  # it applies with every position valid, or does not fit this site
            site.masked, site.unfitted = (True, site.unfitted) if place is not None else (site.masked, site.unfitted + 1)
        if z is not None and not isinstance(region.lo, torch.Tensor):
            site.stats.update_output_along(a, site.axis, eps, flat=(region.lo, region.hi), z=region.tested(z))
        else:  # `measure_input` took the flat count before the call
            site.stats.update_output_along(a, site.axis, eps)
        site.shape = tuple(a.shape)
        return
    if options and place is not None and mask is not None and mask.index is not None:
        site.placement.guessed(place, options)  # a guess that decides what is left out
    if mask is not None and site.histogram is None and _rows(site, a, z, eps=eps, mask=mask, place=place):
        return
    a3, excluded = masked_channel_view(a.detach(), site.axis, mask, place)
    if excluded is not None:
        site.masked = True
        site.excluded += excluded
    elif mask is not None:
        site.unfitted += 1
    if z is not None and not isinstance(region.lo, torch.Tensor):
        z3 = masked_channel_view(region.tested(z).detach(), site.axis, mask, place)[0]
        site.stats.update_output(a3, eps, flat=(region.lo, region.hi), z3=z3)
    else:  # `measure_input` took the flat count before the call
        site.stats.update_output(a3, eps)
    if site.histogram is not None:
        site.histogram.update(a3 if excluded else a.detach())
    site.shape = tuple(a.shape)


def _rows(site: Site, a: torch.Tensor, z: torch.Tensor | None, *, eps: float, mask: BatchMask,
          place: Placement | None) -> bool:  # fmt: skip
    """`measure_output` of tokens (N, L, C) under an (N, L) mask that leaves some out: the valid rows are
    read in place rather than gathered (`masked_rows`). False where that does not apply."""
    region, lo = site.region, site.region.lo
    rows = masked_rows(a, site.axis, mask, place)
    if rows is None:
        return False
    a3, index, excluded = rows
    if z is not None and not isinstance(lo, torch.Tensor):  # else `measure_input` took the flat count
        zrows = masked_rows(region.tested(z), site.axis, mask, place)
        if zrows is None:
            return False
        site.stats.update_output_rows(a3, index, eps, flat=(lo, region.hi), z3=zrows[0])
    else:
        site.stats.update_output_rows(a3, index, eps)
    site.masked = True
    site.excluded += excluded
    site.shape = tuple(a.shape)
    return True


def unordered(site: Site, z: torch.Tensor, mask: BatchMask | None, order: PositionOrder | None) -> BatchMask | None:
    """The mask a call is measured under (kept in ``site.call_mask`` for `measure_output`): where ``z``'s
    positions were reordered inside the forward pass (a flip, a roll), the mask moved as they were; where how
    cannot be told, none (the padding counts: ``site.reordered`` counts those calls, which the report names)."""
    site.reordering = False
    if mask is None or mask.index is None or order is None or not order.marks:
        return mask
    steps = order.on_mask(z, mask.shape)
    if steps == () or place_of(site, z, mask)[0] is None:
        return mask
    site.reordering, site.call_mask = True, None if steps is None else moved_mask(mask, steps)
    if steps is None:
        site.reordered += 1
    return site.call_mask


def place_of(site: Site, x: torch.Tensor, mask: BatchMask | None) -> tuple[Placement | None, tuple[Placement, ...]]:
    """Where the batch's ``mask`` lies on ``x`` at ``site``, None where it does not fit, and the placements
    it was guessed among (`SitePlacement.choose`)."""
    return (None, ()) if mask is None else site.placement.choose(x.shape, site.axis, mask.shape)


def _whole(mask: BatchMask | None, place: Placement | None) -> bool:
    """Whether the statistics read every position: no mask, one that does not fit the site (``place``
    None), or one that fits with every position valid."""
    return mask is None or mask.index is None or place is None


@functools.lru_cache(maxsize=64)
def eps_in(eps: float, dtype: torch.dtype) -> float:
    """``eps`` for the zero test ``abs(a) <= eps`` on activations of ``dtype``, which every kernel runs in
    float32 (float16, bfloat16 and float32 activations) or float64: the largest value of that type not above
    ``eps``, so that the test counts exactly the elements within ``eps`` (float32(1e-30) is above 1e-30)."""
    if dtype == torch.float64 or eps == 0 or not math.isfinite(eps):
        return eps
    e = torch.tensor(eps, dtype=torch.float32)
    if float(e) > eps:
        e = torch.nextafter(e, torch.zeros((), dtype=torch.float32))
    return float(e)
