"""RuleContext: what the checkpoint knows beyond the audit (learning rate, optimizer, history, timeline,
BatchNorm scales). ``context_from`` reads it tolerantly: every key may be missing, and a missing fact
only keeps the rules that need it from firing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

    from deadneuron.report import SiteHealth

# The same fact under the names different training scripts give it (the ARC model's first).
_LR = ("LEARNING_RATE", "learning_rate", "lr")
_EPOCHS = ("NUM_EPOCHS", "num_epochs", "epochs", "EPOCHS")
_DATA_SIZE = ("NUM_GRIDS", "num_samples", "NUM_SAMPLES", "data_size", "train_size")
_BATCH = ("BATCH_SIZE", "batch_size")
_OPTIMIZER = ("OPTIMIZER", "optimizer")
_ACTIVATION = ("ACTIVATION", "activation")
_DROPOUT_BETWEEN = ("DROPOUT_BETWEEN_CONVS", "dropout_between_convs")
_BATCH_NORM = ("BATCH_NORM", "batch_norm")
LayerKind = Literal["conv", "linear", "norm", "identity"]


@dataclass(frozen=True)
class BatchNormScale:
    """Per-channel |gamma| and beta of one BatchNorm layer."""

    abs_gamma: tuple[float, ...]
    beta: tuple[float, ...]


@dataclass(frozen=True)
class RuleContext:
    """Training metadata for the rules; every field is optional (None / empty when unknown)."""

    learning_rate: float | None = None
    optimizer: str | None = None  # lower case: "adam", "adamw", "sgd", ...
    epochs: int | None = None  # configured epoch budget
    epochs_trained: int | None = None
    steps: int | None = None
    data_size: int | None = None
    batch_size: int | None = None
    activation: str | None = None
    dropout_between_convs: bool | None = None
    batch_norm: bool | None = None
    history: tuple[Mapping[str, Any], ...] = ()
    timeline: tuple[Mapping[str, Any], ...] = ()
    bn_scales: Mapping[str, BatchNormScale] = field(default_factory=dict)  # BatchNorm module name -> scale
    config: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # the checkpoint's adapter: its config, not --select, places a swap
    layers: Mapping[str, LayerKind] = field(default_factory=dict)  # module name -> conv, linear, norm, identity

    def __post_init__(self) -> None:
        object.__setattr__(self, "bn_scales", MappingProxyType(dict(self.bn_scales)))
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    @property
    def adam_family(self) -> bool:
        return self.optimizer is not None and "adam" in self.optimizer

    def bn_scale_for(self, site: SiteHealth) -> BatchNormScale | None:
        """The BatchNorm layer a site consumes directly (``encoder.bn_layers.2>relu`` consumes
        ``encoder.bn_layers.2``), when its channel count matches the site's."""
        scale = self.bn_scales.get(site.producer) if site.producer is not None else None
        if scale is None or len(scale.abs_gamma) != site.channels:
            return None
        return scale


def context_from(checkpoint: Mapping[str, Any] | None, model: nn.Module | None = None) -> RuleContext:
    """Everything the rules may use from a (safely loaded) checkpoint dict and the model built from it."""
    ckpt: Mapping[str, Any] = checkpoint if isinstance(checkpoint, Mapping) else {}
    cfg = ckpt.get("config")
    config: Mapping[str, Any] = cfg if isinstance(cfg, Mapping) else {}
    groups = _param_groups(ckpt.get("optimizer_state"))
    lr = _number(_lookup(config, _LR), _lookup(ckpt, _LR), groups[0].get("lr") if groups else None)
    return RuleContext(
        learning_rate=lr,
        optimizer=_optimizer_name(ckpt, config, groups),
        epochs=_integer(_lookup(config, _EPOCHS)),
        epochs_trained=_integer(ckpt.get("epoch")),
        steps=_integer(ckpt.get("step")),
        data_size=_integer(_lookup(config, _DATA_SIZE)),
        batch_size=_integer(_lookup(config, _BATCH)),
        activation=_text(_lookup(config, _ACTIVATION)),
        dropout_between_convs=_flag(_lookup(config, _DROPOUT_BETWEEN)),
        batch_norm=_flag(_lookup(config, _BATCH_NORM)),
        history=_records(ckpt.get("history")),
        timeline=_records(ckpt.get("health_timeline")),
        bn_scales=bn_scales(model) if model is not None else _bn_scales_from_state(ckpt.get("state_dict")),
        config=config,
        adapter=_text(ckpt.get("adapter")),
        layers=layer_kinds(model) if model is not None else _layer_kinds_from_state(ckpt.get("state_dict")),
    )


def layer_kinds(model: nn.Module) -> dict[str, LayerKind]:
    """conv, linear, norm (a normalisation layer, or a layer given one by ``deadneuron patch
    --add-batchnorm``) or identity, for the modules of those kinds."""
    from torch import nn

    from deadneuron.patch.hooks import has_added_batchnorm
    from deadneuron.wrappers import user_named_modules

    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    out: dict[str, LayerKind] = {}
    for name, module in user_named_modules(model):  # the user's names, without wrappers
        if isinstance(module, norms) or has_added_batchnorm(module):
            out[name] = "norm"
        elif isinstance(module, nn.modules.conv._ConvNd):
            out[name] = "conv"
        elif isinstance(module, nn.Linear):
            out[name] = "linear"
        elif isinstance(module, nn.Identity):
            out[name] = "identity"
    return out


def _layer_kinds_from_state(state: Any) -> dict[str, LayerKind]:
    """Without a model: weights of rank 3-5 are conv layers, rank 2 linear, running statistics norms."""
    if not isinstance(state, Mapping):
        return {}
    out: dict[str, LayerKind] = {}
    for key, value in state.items():
        prefix, _, leaf = str(key).rpartition(".")
        rank = value.dim() if leaf == "weight" and hasattr(value, "dim") else 0
        if 2 <= rank <= 5:
            out[prefix] = "linear" if rank == 2 else "conv"
    for key in state:
        prefix, _, leaf = str(key).rpartition(".")
        if leaf == "running_var":
            out[prefix] = "norm"
            owner, _, child = prefix.rpartition(".")
            if child == "batchnorm" and owner in out:
                out[owner] = "norm"
    return out


def bn_scales(model: nn.Module) -> dict[str, BatchNormScale]:
    """|gamma| and beta of every affine BatchNorm layer, by qualified module name."""
    from torch import nn

    from deadneuron.wrappers import user_named_modules

    out: dict[str, BatchNormScale] = {}
    for name, module in user_named_modules(model):  # the user's names, without wrappers
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            beta = module.bias.detach() if module.bias is not None else module.weight.detach() * 0
            out[name] = _scale(module.weight.detach(), beta)
    return out


def _bn_scales_from_state(state: Any) -> dict[str, BatchNormScale]:
    """Without a model: layers whose state has weight, bias, running_mean and running_var (BatchNorm)."""
    if not isinstance(state, Mapping):
        return {}
    out: dict[str, BatchNormScale] = {}
    for key in state:
        if not isinstance(key, str) or not key.endswith(".running_var"):
            continue
        prefix = key[: -len(".running_var")]
        weight, bias = state.get(prefix + ".weight"), state.get(prefix + ".bias")
        if weight is None or bias is None:
            continue
        if hasattr(weight, "detach") and hasattr(bias, "detach") and weight.dim() == 1:
            out[prefix] = _scale(weight.detach(), bias.detach())
    return out


def _scale(weight: Any, bias: Any) -> BatchNormScale:
    return BatchNormScale(
        abs_gamma=tuple(float(g) for g in weight.float().abs().cpu().tolist()),
        beta=tuple(float(b) for b in bias.float().cpu().tolist()),
    )


def _lookup(mapping: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if name in mapping and mapping[name] is not None:
            return mapping[name]
    return None


def _number(*candidates: Any) -> float | None:
    for value in candidates:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _text(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) else None


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0  # a dropout probability stored in place of the switch
    return None


def _records(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return ()
    return tuple(MappingProxyType(dict(r)) for r in value if isinstance(r, Mapping))


def _param_groups(state: Any) -> list[Mapping[str, Any]]:
    if not isinstance(state, Mapping):
        return []
    groups = state.get("param_groups")
    return [g for g in groups if isinstance(g, Mapping)] if isinstance(groups, Sequence) else []


def _optimizer_name(ckpt: Mapping[str, Any], config: Mapping[str, Any],
                    groups: Sequence[Mapping[str, Any]]) -> str | None:
    named = _text(_lookup(ckpt, _OPTIMIZER)) or _text(_lookup(config, _OPTIMIZER))
    if named is not None:
        return named
    if not groups:
        return None
    group = groups[0]
    # Recognised by the hyper-parameters torch's optimizers keep in their param groups.
    if "betas" in group:
        return "adamw" if group.get("decoupled_weight_decay") else "adam"
    if "momentum" in group and "dampening" in group:
        return "sgd"
    if "alpha" in group and "centered" in group:
        return "rmsprop"
    return None
