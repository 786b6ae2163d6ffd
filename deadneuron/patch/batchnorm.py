"""Adding BatchNorm after the conv or linear layer that feeds a site (module surgery on a generic model).

The BatchNorm becomes a child of the layer (``conv2.batchnorm``) applied by a forward hook, so no other
module moves: the site names, the layer's own ``state_dict`` keys and every reference to the layer stay
as they were; only ``<layer>.batchnorm.*`` keys are added (``load_patched`` re-creates them from the plan).

**Initialisation: the function is unchanged at the moment of surgery.** weight 1, bias 0, running mean 0
and running variance ``1 - eps``, so that in eval mode ``(x - 0) / sqrt((1 - eps) + eps) * 1 + 0 = x``
exactly (to float rounding) on any input. In training mode BatchNorm normalises each batch by its own
statistics, which is the point of the fix: a channel whose pre-activations were all negative is
re-centred and fires again. Running statistics calibrated on the data with a matching affine
(weight sqrt(var + eps), bias mean) would also be an identity, in training mode too, but they reproduce
the dead channels exactly, and those would stay dead: that is why it is not done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from deadneuron.errors import PatchError
from deadneuron.ops import AddBatchNorm
from deadneuron.patch.hooks import CHILD, BatchNormHook, has_added_batchnorm
from deadneuron.patch.record import Change, RecordBuilder

LAYER_PREFIX = "layer:"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def add_batchnorm(model: nn.Module, op: AddBatchNorm, report: Any, acc: RecordBuilder) -> None:
    """Give every layer feeding a selected site a BatchNorm (``model`` is changed in place)."""
    modules = dict(model.named_modules())
    layers, unused = _targets(op, report, modules, acc)
    acc.not_patched += [f"--select {p!r} matched no site or layer" for p in unused]
    for layer, sites in layers.items():
        _insert(layer, modules[layer], sites, acc)


def _targets(op: AddBatchNorm, report: Any, modules: Mapping[str, nn.Module],
             acc: RecordBuilder) -> tuple[dict[str, list[str]], list[str]]:  # fmt: skip
    """layer name -> the selected sites it feeds, and the patterns that matched nothing."""
    direct = [p for p in op.sites if p.startswith(LAYER_PREFIX)]
    globs = [p for p in op.sites if not p.startswith(LAYER_PREFIX)]
    used: set[str] = set()
    layers: dict[str, list[str]] = {}
    for pattern in direct:
        for name in modules:
            if name and fnmatchcase(name, pattern.removeprefix(LAYER_PREFIX)):
                layers.setdefault(name, [])
                used.add(pattern)
    if globs or not op.sites:
        if report is None:
            raise _needs_report()
        for site in report.sites.values():
            hits = [p for p in globs if _site_matches(site, p)]
            used.update(hits)
            if op.sites and not hits:
                continue
            if not op.sites and not isinstance(modules.get(site.producer or ""), (nn.modules.conv._ConvNd, *_NORMS)):
                continue  # by default only conv-fed sites (and a note where they are normalised already)
            _add_site(site, modules, layers, acc)
    return layers, [p for p in op.sites if p not in used]


def _needs_report() -> Exception:
    return PatchError("adding BatchNorm at sites needs to know which layer feeds each: pass an audit report or an "
                      "example batch (on the command line: --data or --input-shape)")  # fmt: skip


def _site_matches(site: Any, pattern: str) -> bool:
    names = (site.name, site.module, f"module:{site.module}", site.kind, f"kind:{site.kind}")
    return any(fnmatchcase(n, pattern) for n in names if n)


def _add_site(site: Any, modules: Mapping[str, nn.Module], layers: dict[str, list[str]], acc: RecordBuilder) -> None:
    producer = site.producer
    layer = modules.get(producer) if producer else None
    if isinstance(layer, _NORMS):
        acc.notes.append(f"{site.name}: already normalised by {producer} ({type(layer).__name__})")
    elif isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        layers.setdefault(producer, []).append(site.name)
    else:
        what = f"{producer} ({type(layer).__name__})" if layer is not None else "no layer deadneuron can see"
        acc.not_patched.append(f"{site.name}: fed by {what}, not a conv or linear layer; no BatchNorm added")


def planned_layers(model: nn.Module, op: AddBatchNorm, report: Any) -> tuple[dict[str, list[str]], list[str]]:
    """What :func:`add_batchnorm` would do to ``model``, which is not changed: layer name -> the selected
    sites it feeds, and why a selected site or layer would get no BatchNorm (not fed by a conv or linear
    layer, normalised already, a layer that has its BatchNorm, a glob matching nothing)."""
    modules = dict(model.named_modules())
    acc = RecordBuilder()
    layers, unused = _targets(op, report, modules, acc)
    problems = [*acc.not_patched, *(f"--select {p!r} matched no site or layer" for p in unused), *acc.notes]
    for name, layer in modules.items():
        if name in layers:
            blocked = _blocked(name, layer)
            problems += [blocked[1]] if blocked is not None else []
    return layers, problems


def _blocked(name: str, layer: nn.Module) -> tuple[bool, str] | None:
    """Why ``layer`` gets no BatchNorm (True: a note, it has one already; False: it cannot take one)."""
    if has_added_batchnorm(layer):
        return True, f"{name} already has an added BatchNorm"
    if CHILD in layer._modules or not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        return False, (f"{name}: cannot add a BatchNorm to a {type(layer).__name__}"
                       + (f" that already has a child {CHILD!r}" if CHILD in layer._modules else ""))
    return None


def _insert(name: str, layer: nn.Module, sites: Sequence[str], acc: RecordBuilder) -> None:
    blocked = _blocked(name, layer)
    if blocked is not None:
        (acc.notes if blocked[0] else acc.not_patched).append(blocked[1])
        return
    norm = _norm_for(layer)
    layer.add_module(CHILD, norm)
    layer.register_forward_hook(BatchNormHook(channels_last=isinstance(layer, nn.Linear)))
    acc.normed.append(f"{LAYER_PREFIX}{name}")
    feeds = f"feeds {', '.join(sites[:3])}{' and more' if len(sites) > 3 else ''}; " if sites else ""
    acc.changes.append(Change(name, "no normalisation", f"{type(norm).__name__}({norm.num_features}) after it",
                              f"{feeds}identity in eval mode at surgery, normalises batches in training"))  # fmt: skip


def _norm_for(layer: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    """A BatchNorm for the layer's output channels, identity in eval mode (see the module docstring)."""
    if isinstance(layer, nn.Linear):
        cls: type[nn.modules.batchnorm._BatchNorm] = nn.BatchNorm1d
        channels = layer.out_features
    else:
        assert isinstance(layer, nn.modules.conv._ConvNd)
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(layer.kernel_size)]
        channels = layer.out_channels
    weight = layer.weight
    norm = cls(channels, device=weight.device, dtype=weight.dtype)
    assert norm.running_var is not None  # track_running_stats is on by default
    with torch.no_grad():
        norm.running_var.fill_(1.0 - norm.eps)
    norm.train(layer.training)
    return norm


__all__ = ["CHILD", "BatchNormHook", "add_batchnorm", "has_added_batchnorm", "planned_layers"]
