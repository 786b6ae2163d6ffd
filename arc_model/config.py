"""Training configuration of the bundled ARC slot model.

The field names are the user's own (``LEARNING_RATE``, ``NUM_EPOCHS``, ...), so that a patch or a finding
can say "LEARNING_RATE 1e-4 -> 5e-5" in the words of the code it talks about. Defaults are the user's
config (BatchNorm, ReLU, lr 1e-4, dropout 0.1, 7 slots, 200 grids, an enormous epoch count); cap a run
with ``MAX_STEPS``.

Activations are set per part of the model: ``ACTIVATION`` is the encoder conv stack's shared module
(``encoder.relu``, the four ``encoder.bn_layers.i>relu`` sites; the key predates the others and keeps its
name, so old checkpoints load unchanged), ``ENCODER_MLP_ACTIVATION`` the encoder MLP's (``encoder.mlp.1``),
``SLOT_MLP_ACTIVATION`` the slot-attention MLP's (``slot_attention.mlp.1``) and ``DECODER_ACTIVATION`` the
decoder's (``decoder.layers.1/3/5``). ``NEGATIVE_SLOPE`` is the slope of every LeakyReLU among them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

from deadneuron.replacements import SWAP_NAMES, SwapName

Activation = SwapName  # the activations deadneuron's patches swap in (deadneuron.replacements)
ACTIVATIONS: tuple[str, ...] = SWAP_NAMES
SlotInit = Literal["shared", "learned"]
LrDecay = Literal["none", "cosine"]
ColourHead = Literal["broadcast", "slot"]
Position = Literal["linear", "fourier"]
MaskSource = Literal["decoder", "attention"]
# One key per part of the model (see the module docstring); ACTIVATION is the encoder conv stack's.
ACTIVATION_KEYS: tuple[str, ...] = ("ACTIVATION", "ENCODER_MLP_ACTIVATION", "SLOT_MLP_ACTIVATION", "DECODER_ACTIVATION")

_CHOICE_KEYS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "SLOT_INIT": get_args(SlotInit), "LR_DECAY": get_args(LrDecay), "POSITION": get_args(Position),
    "MASKS": get_args(MaskSource), "COLOUR_HEAD": get_args(ColourHead),
})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; a checkpoint stores ``to_dict()`` of it."""

    LEARNING_RATE: float = 1e-4
    NUM_EPOCHS: int = 100_000
    ACTIVATION: Activation = "relu"  # the encoder conv stack's
    ENCODER_MLP_ACTIVATION: Activation = "relu"
    SLOT_MLP_ACTIVATION: Activation = "relu"
    DECODER_ACTIVATION: Activation = "relu"
    NEGATIVE_SLOPE: float = 0.01
    DROPOUT: float = 0.1
    DROPOUT_BETWEEN_CONVS: bool = False
    BATCH_NORM: bool = True
    NUM_SLOTS: int = 7
    SLOT_DIM: int = 64
    SLOT_ITERS: int = 3
    CHANNELS: int = 64
    NUM_CONV: int = 4
    BATCH_SIZE: int = 32
    NUM_GRIDS: int | None = 200
    SEED: int = 0
    MAX_STEPS: int | None = None
    TIMELINE_EVERY: int = 10
    TIMELINE_GRIDS: int = 256
    # Recipe knobs; the defaults are the user's recipe (constant rate, no clipping, shared slot init).
    WARMUP_STEPS: int = 0  # linear learning-rate warm-up from LEARNING_RATE / WARMUP_STEPS
    LR_DECAY: LrDecay = "none"  # "cosine": to 0 at the run's last step (NUM_EPOCHS or MAX_STEPS)
    GRAD_CLIP: float = 0.0  # max global gradient norm; 0 = off
    SLOT_INIT: SlotInit = "shared"  # "learned": one learned query per slot, last iteration straight-through
    POSITION: Position = "linear"  # "fourier": sin/cos of the cell index too (periods 2..64 cells)
    DECODER_NORM: bool = False  # LayerNorm each slot before the broadcast (else its norm drowns the position)
    MASKS: MaskSource = "decoder"  # "attention": the last iteration's attention is the mixing mask
    COLOUR_HEAD: ColourHead = "broadcast"  # "slot": each slot paints one colour (its alpha stays per pixel)

    def __post_init__(self) -> None:
        for name in ACTIVATION_KEYS:
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(ACTIVATIONS)}")
        for name, choices in _CHOICE_KEYS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.WARMUP_STEPS < 0 or self.GRAD_CLIP < 0:
            raise ValueError("WARMUP_STEPS and GRAD_CLIP must be >= 0")
        positive = ("NUM_EPOCHS", "NUM_SLOTS", "SLOT_DIM", "SLOT_ITERS", "CHANNELS", "NUM_CONV",
                    "BATCH_SIZE", "TIMELINE_EVERY", "TIMELINE_GRIDS")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("NUM_GRIDS", "MAX_STEPS"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if not 0.0 <= self.DROPOUT < 1.0:
            raise ValueError(f"DROPOUT must be in [0, 1), got {self.DROPOUT}")
        if self.LEARNING_RATE <= 0:
            raise ValueError(f"LEARNING_RATE must be > 0, got {self.LEARNING_RATE}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (it goes into a ``weights_only`` checkpoint and into JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config stored in a checkpoint; unknown keys are an error, missing ones take defaults."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.field_names())}"
            )
        return cls(**{key: _coerce(key, value) for key, value in data.items()})

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, items: Iterable[str]) -> TrainConfig:
        """Apply ``["KEY=VALUE", ...]`` (the CLI's ``--config``), each value parsed to the field's type."""
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"config override {item!r} is not KEY=VALUE (for example LEARNING_RATE=3e-3)")
            if key not in self.field_names():
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(self.field_names())}")
            changes[key] = parse_value(key, text.strip())
        return self.replace(**changes)


def _field_type(key: str) -> Any:
    return get_type_hints(TrainConfig)[key]


def _coerce(key: str, value: Any) -> Any:
    """``value`` as field ``key``'s type: text is parsed (``"3e-3"``), an int is taken where a float is
    declared and an integral float where an int is; anything else of the wrong type is a ValueError."""
    tp = _field_type(key)
    base = _base_type(tp)
    if value is None and _optional(tp):
        return None
    if isinstance(value, str) and base is not str:
        return parse_value(key, value)
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if (base is int and isinstance(value, bool)) or not isinstance(value, base):
        raise ValueError(f"{key}={value!r}: expected {base.__name__}")
    return value


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int, ``Literal[...]`` -> str, ``float`` -> float."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if args and all(isinstance(a, str) for a in args):
        return str
    return tp


def _optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in get_args(tp)


def parse_value(key: str, text: str) -> Any:
    """Parse ``text`` to the type of field ``key``; a ValueError names the field and the expected type."""
    tp = _field_type(key)
    if _optional(tp) and text.lower() in {"none", "null", ""}:
        return None
    base = _base_type(tp)
    try:
        if base is bool:
            return _parse_bool(text)
        if base is int:
            return int(float(text)) if _is_integral(text) else int(text)
        return base(text)
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: expected {getattr(base, '__name__', base)} ({err})") from None


def _is_integral(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value.is_integer()


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean; use one of {', '.join(sorted(_TRUE | _FALSE))}")


# Named recipes: overrides of the user's defaults. "reference" is the recipe of the bundled demo checkpoints
# (docs/reference_model.md has the measurements behind each key).
RECIPES: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    "user": types.MappingProxyType({}),
    "reference": types.MappingProxyType({
        "NUM_GRIDS": None, "NUM_EPOCHS": 19, "TIMELINE_EVERY": 4, "LEARNING_RATE": 1e-3,
        "WARMUP_STEPS": 100, "LR_DECAY": "cosine", "GRAD_CLIP": 1.0, "MASKS": "attention",
    }),
})


def recipe(name: str) -> TrainConfig:
    """The config of a named recipe (``RECIPES``); an unknown name is a ValueError listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return TrainConfig(**RECIPES[name])
