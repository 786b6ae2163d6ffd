"""An adapter model's plan as config changes: ACTIVATION, NEGATIVE_SLOPE, LEARNING_RATE, NUM_EPOCHS,
DROPOUT_BETWEEN_CONVS and DROPOUT (or their lower-case names). Pure: a dict in, a new dict out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from deadneuron.patch.plan import InsertDropout, Plan, ReinitDead, SetHyperParameter, SwapActivation
from deadneuron.patch.record import ApplyRecord, Change, RecordBuilder, show

Init = Literal["scratch", "checkpoint"]

CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "activation": ("ACTIVATION", "activation"),
    "negative_slope": ("NEGATIVE_SLOPE", "negative_slope"),
    "learning_rate": ("LEARNING_RATE", "learning_rate", "lr"),
    "epochs": ("NUM_EPOCHS", "num_epochs", "EPOCHS", "epochs"),
    "dropout_between_convs": ("DROPOUT_BETWEEN_CONVS", "dropout_between_convs"),
    "dropout": ("DROPOUT", "dropout"),
}


def config_key(config: Mapping[str, Any], what: str) -> str | None:
    return next((k for k in CONFIG_KEYS[what] if k in config), None)


def apply_to_config(config: Mapping[str, Any], plan: Plan, *, init: Init = "scratch") -> tuple[dict[str, Any], ApplyRecord]:
    """The adapter config ``plan`` asks for, and the record of what changed (``config`` is not modified)."""
    new = dict(config)
    acc = RecordBuilder()

    def put(what: str, value: Any, op_text: str, note: str = "") -> None:
        key = config_key(new, what)
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
            put("activation", op.to, op.describe())
            if op.to == "leaky" and op.negative_slope is not None:
                put("negative_slope", op.negative_slope, op.describe())
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
    return new, acc.record()


def _scaled(value: Any, scale: float | None) -> float:
    if not isinstance(value, (int, float)) or scale is None:
        return float("nan")
    return float(f"{float(value) * scale:.6g}")


__all__ = ["CONFIG_KEYS", "Init", "apply_to_config", "config_key"]
