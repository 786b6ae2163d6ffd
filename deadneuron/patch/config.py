"""An adapter model's plan as config changes. Pure: a dict in, a new dict out.

Keys (or their lower-case names): the activation keys, NEGATIVE_SLOPE, LEARNING_RATE, NUM_EPOCHS,
DROPOUT_BETWEEN_CONVS, DROPOUT and BATCH_NORM. Where a config sets the activation per part of the model
(the ARC model: ACTIVATION for the encoder conv stack, ENCODER_MLP_ACTIVATION, SLOT_MLP_ACTIVATION,
DECODER_ACTIVATION), a :class:`ConfigMap` says which sites each key governs (measured by
:mod:`deadneuron.patch.parts`), and a swap's ``--select`` globs choose the keys: a key changes when a
glob matches one of its sites, the modules running them, or their kind. Without a map, a swap sets the
one ACTIVATION key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from deadneuron.ops import AddBatchNorm, InsertDropout, ReinitDead, SetHyperParameter, SwapActivation
from deadneuron.patch.plan import Plan
from deadneuron.patch.record import ApplyRecord, Change, RecordBuilder, show
from deadneuron.replacements import kind_of

Init = Literal["scratch", "checkpoint"]
Setting = Literal["activation", "batch_norm"]

CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "activation": ("ACTIVATION", "activation"),
    "negative_slope": ("NEGATIVE_SLOPE", "negative_slope"),
    "learning_rate": ("LEARNING_RATE", "learning_rate", "lr"),
    "epochs": ("NUM_EPOCHS", "num_epochs", "EPOCHS", "epochs"),
    "dropout_between_convs": ("DROPOUT_BETWEEN_CONVS", "dropout_between_convs"),
    "dropout": ("DROPOUT", "dropout"),
    "batch_norm": ("BATCH_NORM", "batch_norm"),
}


@dataclass(frozen=True)
class ConfigPart:
    """One config key and what it decides: the modules it builds and the sites they run or feed."""

    key: str
    setting: Setting
    modules: tuple[str, ...]
    sites: tuple[str, ...]


@dataclass(frozen=True)
class SiteRef:
    """What a selector can match of a site: its activation module and kind."""

    module: str
    kind: str


@dataclass(frozen=True)
class ConfigMap:
    """The parts of an adapter model its config decides, and every site of the model."""

    parts: tuple[ConfigPart, ...] = ()
    sites: Mapping[str, SiteRef] = field(default_factory=dict)

    def of(self, setting: Setting) -> list[ConfigPart]:
        return [p for p in self.parts if p.setting == setting]


def config_key(config: Mapping[str, Any], what: str) -> str | None:
    return next((k for k in CONFIG_KEYS[what] if k in config), None)


def apply_to_config(config: Mapping[str, Any], plan: Plan, *, init: Init = "scratch",
                    parts: ConfigMap | None = None) -> tuple[dict[str, Any], ApplyRecord]:  # fmt: skip
    """The adapter config ``plan`` asks for, and the record of what changed (``config`` is not modified).

    With ``parts`` the record's ``targets`` are the sites the plan selected."""
    new = dict(config)
    acc = RecordBuilder()
    targets: list[str] = []

    def put(what: str, value: Any, op_text: str, note: str = "", *, key: str | None = None) -> None:
        key = key or config_key(new, what)
        if key is None:
            acc.not_patched.append(f"{op_text}: the config has no {'/'.join(CONFIG_KEYS[what][:2])} key")
            return
        if new[key] != value:
            acc.changes.append(Change(key, new[key], value, note))
            new[key] = value
        else:
            acc.notes.append(f"{key} already is {show(value)}")

    for op in plan.ops:
        if isinstance(op, SwapActivation):
            _swap(op, new, parts, acc, targets, put)
        elif isinstance(op, AddBatchNorm):
            _batch_norm(op, parts, acc, targets, put)
        elif isinstance(op, SetHyperParameter) and op.name == "learning_rate":
            key = config_key(new, "learning_rate")
            value = op.value if op.value is not None else _scaled(new.get(key) if key else None, op.scale)
            put("learning_rate", value, op.describe(), f"x {op.scale:g}" if op.scale is not None else "")
        elif isinstance(op, SetHyperParameter):
            put("epochs", int(op.value or 0), op.describe())
        elif isinstance(op, InsertDropout):
            if op.after:
                acc.not_patched.append(f"{op.describe()}: the config can only place dropout between conv layers")
                continue
            put("dropout_between_convs", True, op.describe())
            put("dropout", op.p, op.describe())
        elif isinstance(op, ReinitDead) and init == "scratch":
            acc.notes.append("re-initialising dead channels does nothing with --init scratch: every weight is fresh")
    record = acc.record()
    return new, ApplyRecord(record.changes, record.not_patched, record.notes, tuple(dict.fromkeys(targets)))


def _swap(op: SwapActivation, config: Mapping[str, Any], parts: ConfigMap | None, acc: RecordBuilder,
          targets: list[str], put: Any) -> None:  # fmt: skip
    chosen = parts.of("activation") if parts is not None else []
    if parts is None or not chosen:
        put("activation", op.to, op.describe())
    else:
        if op.sites:
            chosen = _selected(op.sites, chosen, parts, "activation", acc)
        else:
            chosen = [p for p in chosen if kind_of(str(config.get(p.key))) == op.source]
            if not chosen:
                acc.notes.append(f"no part of the model runs {op.source}: nothing to swap")
        for part in chosen:
            put("activation", op.to, op.describe(), key=part.key)
            targets.extend(part.sites)
    if op.to == "leaky" and op.negative_slope is not None:
        put("negative_slope", op.negative_slope, op.describe())


def _batch_norm(op: AddBatchNorm, parts: ConfigMap | None, acc: RecordBuilder, targets: list[str], put: Any) -> None:
    chosen = parts.of("batch_norm") if parts is not None else []
    if parts is None or not chosen:
        put("batch_norm", True, op.describe())
        return
    if op.sites:
        chosen = _selected(op.sites, chosen, parts, "batch_norm", acc)
    for part in chosen:
        put("batch_norm", True, op.describe(), key=part.key)
        targets.extend(part.sites)


def _candidates(part: ConfigPart, sites: Mapping[str, SiteRef]) -> list[str]:
    names = [*part.sites, *part.modules, *(f"module:{m}" for m in part.modules), *(f"layer:{m}" for m in part.modules)]
    for site in part.sites:
        ref = sites.get(site)
        if ref is not None:
            names += [ref.module, f"module:{ref.module}", ref.kind, f"kind:{ref.kind}"]
    return names


def _selected(patterns: Sequence[str], parts: Sequence[ConfigPart], config_map: ConfigMap, setting: Setting,
              acc: RecordBuilder) -> list[ConfigPart]:  # fmt: skip
    """The parts a glob of ``patterns`` matches; a glob matching none is recorded as not patched."""
    chosen: list[ConfigPart] = []
    for pattern in patterns:
        hits = [p for p in parts if any(fnmatchcase(n, pattern) for n in _candidates(p, config_map.sites))]
        chosen += [p for p in hits if p not in chosen]
        if not hits:
            acc.not_patched.append(_unmatched(pattern, parts, config_map, setting))
    return chosen


def _unmatched(pattern: str, parts: Sequence[ConfigPart], config_map: ConfigMap, setting: Setting) -> str:
    keys = ", ".join(p.key for p in parts)
    site = next((name for name, ref in config_map.sites.items()
                 if any(fnmatchcase(n, pattern) for n in (name, ref.module, ref.kind))), None)  # fmt: skip
    if site is None:
        return f"--select {pattern!r} matched no site of this model"
    what = "activation" if setting == "activation" else "normalisation"
    return f"--select {pattern!r}: {site}'s {what} is not set by the config (only {keys} can be patched)"


def _scaled(value: Any, scale: float | None) -> float:
    if not isinstance(value, (int, float)) or scale is None:
        return float("nan")
    return float(f"{float(value) * scale:.6g}")


__all__ = ["CONFIG_KEYS", "ConfigMap", "ConfigPart", "Init", "SiteRef", "apply_to_config", "config_key"]
