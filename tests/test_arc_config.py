"""TrainConfig: the user's names, a plain-dict round trip, KEY=VALUE overrides."""

from __future__ import annotations

import json

import pytest

from arc_model.config import TrainConfig


def test_defaults_are_the_users_config() -> None:
    cfg = TrainConfig()
    assert (cfg.LEARNING_RATE, cfg.ACTIVATION, cfg.DROPOUT, cfg.BATCH_NORM) == (1e-4, "relu", 0.1, True)
    assert (cfg.NUM_SLOTS, cfg.SLOT_DIM, cfg.CHANNELS, cfg.NUM_CONV, cfg.NUM_GRIDS) == (7, 64, 64, 4, 200)


def test_round_trip_through_a_plain_dict_and_json() -> None:
    cfg = TrainConfig(ACTIVATION="leaky", LEARNING_RATE=3e-3, BATCH_NORM=False, MAX_STEPS=600)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(data) == cfg


def test_from_dict_rejects_unknown_keys_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) LR.*valid keys: LEARNING_RATE"):
        TrainConfig.from_dict({"LR": 1e-3})


def test_from_dict_accepts_an_int_where_a_float_is_declared() -> None:
    assert TrainConfig.from_dict({"DROPOUT": 0}).DROPOUT == 0.0


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("LEARNING_RATE=3e-3", "LEARNING_RATE", 3e-3),
        ("BATCH_NORM=false", "BATCH_NORM", False),
        ("DROPOUT_BETWEEN_CONVS=yes", "DROPOUT_BETWEEN_CONVS", True),
        ("NUM_EPOCHS=1000", "NUM_EPOCHS", 1000),
        ("NUM_EPOCHS=1e3", "NUM_EPOCHS", 1000),
        ("NUM_GRIDS=none", "NUM_GRIDS", None),
        ("MAX_STEPS=600", "MAX_STEPS", 600),
        ("ACTIVATION=gelu", "ACTIVATION", "gelu"),
        (" SEED = 3 ", "SEED", 3),
    ],
    ids=lambda v: str(v),
)
def test_overrides_parse_to_the_fields_type(item: str, key: str, expected: object) -> None:
    value = getattr(TrainConfig().with_overrides([item]), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("LEARNING_RATE", "not KEY=VALUE"),
        ("LR=1", "unknown config key 'LR'"),
        ("NUM_EPOCHS=ten", "NUM_EPOCHS='ten': expected int"),
        ("BATCH_NORM=maybe", "BATCH_NORM='maybe': expected bool"),
        ("ACTIVATION=tanh", "ACTIVATION='tanh' is not one of relu, leaky"),
        ("NUM_SLOTS=0", "NUM_SLOTS must be >= 1"),
        ("DROPOUT=1.5", "DROPOUT must be in"),
    ],
    ids=lambda v: str(v),
)
def test_bad_overrides_say_what_is_wrong(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig().with_overrides([item])


@pytest.mark.parametrize(
    ("data", "expected"),
    [({"LEARNING_RATE": "3e-3"}, 3e-3), ({"NUM_EPOCHS": 1000.0}, 1000), ({"BATCH_NORM": "false"}, False),
     ({"NUM_GRIDS": None}, None), ({"LEARNING_RATE": 1}, 1.0)],
    ids=["text", "integral-float", "text-bool", "none", "int-for-float"],
)
def test_from_dict_coerces_plain_values(data: dict[str, object], expected: object) -> None:
    ((key, _),) = data.items()
    value = getattr(TrainConfig.from_dict(data), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("data", [{"NUM_EPOCHS": 2.5}, {"BATCH_NORM": 1}, {"SEED": True}, {"ACTIVATION": 3}],
                         ids=str)
def test_from_dict_rejects_values_of_the_wrong_type(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="expected"):
        TrainConfig.from_dict(data)
