"""Which sites each config key of an adapter model decides, measured by building the model.

A key is flipped (an activation key to another activation, a BatchNorm switch to its opposite), both
models are built, and the modules that differ are the key's part: the sites those activation modules run,
or the sites those layers feed. Nothing is declared by the adapter, so a config that grows a key is
covered without code here. The site names come from an audit of the input checkpoint where there is one,
else from a one-batch audit of a freshly built model (names depend on the architecture, not the weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deadneuron.activations import spec_for_module
from deadneuron.adapters import Adapter, heldout_batches
from deadneuron.measure import measure
from deadneuron.patch.config import CONFIG_KEYS, ConfigMap, ConfigPart, SiteRef
from deadneuron.replacements import SWAP_NAMES

PROBE_GRIDS = 4  # grids of the one-batch audit that names the sites


@dataclass(frozen=True)
class SiteInfo:
    module: str
    producer: str | None
    kind: str


def full_config(adapter: Adapter, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The stored config with the adapter's defaults for keys it predates (what its model was built
    with), so that keys added since (DECODER_ACTIVATION, ...) can be patched in an old checkpoint."""
    defaults = getattr(adapter, "default_config", None)
    base = defaults() if callable(defaults) else {}
    return {**base, **stored}


def activation_keys(config: Mapping[str, Any]) -> list[str]:
    """``ACTIVATION`` and every ``*_ACTIVATION`` key (any case) holding an activation name."""
    return [k for k, v in config.items()
            if (k.upper() == "ACTIVATION" or k.upper().endswith("_ACTIVATION")) and isinstance(v, str)
            and v.lower() in SWAP_NAMES]  # fmt: skip


def batch_norm_keys(config: Mapping[str, Any]) -> list[str]:
    return [k for k in CONFIG_KEYS["batch_norm"] if isinstance(config.get(k), bool)]


def site_infos(adapter: Adapter, config: Mapping[str, Any], report: Any = None) -> dict[str, SiteInfo]:
    """Every site of the model ``config`` builds: from ``report`` (an audit of it) or a one-batch audit."""
    if report is None:
        report = _probe_audit(adapter, config)
    return {name: SiteInfo(s.module, s.producer, s.kind) for name, s in report.sites.items()}


def _probe_audit(adapter: Adapter, config: Mapping[str, Any]) -> Any:
    batches = heldout_batches(adapter, config, max_grids=PROBE_GRIDS)
    first = next(iter(batches), None)
    if first is None:
        return _NoSites()
    model = _build(adapter, config).eval()
    return measure(model, [first], adapter=adapter, compile=False, distributed=False).report


class _NoSites:
    sites: Mapping[str, Any] = {}


def _build(adapter: Adapter, config: Mapping[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # building draws weights: leave the caller's RNG alone
        return adapter.build(config)


def config_map(adapter: Adapter, config: Mapping[str, Any], sites: Mapping[str, SiteInfo]) -> ConfigMap:
    """The activation and BatchNorm keys of ``config`` with the modules and sites each decides."""
    base = _build(adapter, config)
    parts: list[ConfigPart] = []
    for key in activation_keys(config):
        other = "relu" if str(config[key]).lower() == "gelu" else "gelu"
        modules = _changed_activations(base, _build(adapter, {**config, key: other}))
        parts.append(ConfigPart(key, "activation", tuple(modules), tuple(s for s, i in sites.items() if i.module in modules)))
    for key in batch_norm_keys(config):
        modules = _changed_layers(base, _build(adapter, {**config, key: not config[key]}))
        parts.append(ConfigPart(key, "batch_norm", tuple(modules), tuple(s for s, i in sites.items() if i.producer in modules)))
    refs = {name: SiteRef(i.module, i.kind) for name, i in sites.items()}
    return ConfigMap(tuple(p for p in parts if p.modules), refs)


def changed_sites(adapter: Adapter, before: Mapping[str, Any], after: Mapping[str, Any],
                  sites: Mapping[str, SiteInfo]) -> list[str]:  # fmt: skip
    """The sites whose activation or feeding layer differs between the models the two configs build."""
    old, new = _build(adapter, before), _build(adapter, after)
    activations = set(_changed_activations(old, new))
    layers = set(_changed_layers(old, new))
    return [s for s, i in sites.items() if i.module in activations or (i.producer in layers)]


def model_changes(adapter: Adapter, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``name: old -> new`` for every activation module and layer the config change swaps."""
    old, new = _build(adapter, before), _build(adapter, after)
    new_modules = dict(new.named_modules())
    lines = []
    for name, module in old.named_modules():
        other = new_modules.get(name)
        if other is None:
            continue
        a, b = spec_for_module(module), spec_for_module(other)
        if a is not None and b is not None and a != b:
            lines.append(f"{name}: {a.label} -> {b.label}")
        elif a is None and b is None and type(module) is not type(other):
            lines.append(f"{name}: {type(module).__name__} -> {type(other).__name__}")
    return lines


def _changed_activations(old: nn.Module, new: nn.Module) -> list[str]:
    theirs = {n: spec_for_module(m) for n, m in new.named_modules()}
    return [n for n, m in old.named_modules() if (s := spec_for_module(m)) is not None and theirs.get(n) not in (None, s)]


def _changed_layers(old: nn.Module, new: nn.Module) -> list[str]:
    theirs = dict(new.named_modules())
    return [n for n, m in old.named_modules()
            if n and n in theirs and spec_for_module(m) is None and type(theirs[n]) is not type(m)]  # fmt: skip


def outside(changed: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Sites a config change reaches that the plan did not select."""
    wanted = set(targets)
    return [s for s in changed if s not in wanted]


__all__ = ["SiteInfo", "activation_keys", "batch_norm_keys", "changed_sites", "config_map", "full_config",
           "model_changes", "outside", "site_infos"]  # fmt: skip
