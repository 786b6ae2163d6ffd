"""Checkpoint weights matched to a model: finding the state_dict, strict loading, non-finite values.

Private helpers of :mod:`deadneuron.checkpoint`; they take loaded objects, never files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deadneuron.errors import ModelMismatchError, UnreadableInputError

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile
_SHOWN = 3  # names listed in a message before "and N more"


def extract_state_dict(obj: object, *, source: str) -> dict[str, torch.Tensor]:
    """The model weights in a loaded checkpoint: a bare state_dict, ``{"state_dict": ...}``,
    ``{"model_state_dict": ...}``, ``{"model": ...}``, a deadneuron checkpoint or a (trusted) nn.Module."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:  # "state_dict" is also where a deadneuron checkpoint keeps it
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if isinstance(inner, Mapping):
                return _tensors_only(inner, source=source, key=key)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        keys = _few([str(k) for k in obj]) if obj else "none"
        what = f"a dict with keys {keys}"
    else:
        what = f"a {type(obj).__name__}"
    raise UnreadableInputError(
        f"{source}: no state_dict found in it ({what}); expected a state_dict, {{'state_dict': ...}}, "
        "{'model_state_dict': ...} or a deadneuron checkpoint"
    )


def _tensors_only(state_dict: Mapping[Any, Any], *, source: str, key: str) -> dict[str, torch.Tensor]:
    others = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if others or not state_dict:
        found = f"non-tensor entries {_few(others)}" if others else "no tensors"
        raise UnreadableInputError(f"{source}: {key!r} holds {found}; expected a mapping of names to tensors")
    return {str(k): v for k, v in state_dict.items()}


def strip_common_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without a ``module.`` / ``_orig_mod.`` prefix, stripped only when every key has it."""
    keys = list(state_dict)
    while keys:
        prefix = next((p for p in _STRIPPED_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        keys = [k[len(prefix) :] for k in keys]
    return dict(zip(keys, state_dict.values(), strict=True))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any], *, source: str) -> None:
    """Load ``state_dict`` into ``model``; every key and shape must match (ModelMismatchError otherwise)."""
    expected = model.state_dict()
    weights = dict(state_dict) if set(state_dict) == set(expected) else strip_common_prefix(state_dict)
    problems = _mismatches(expected, weights)
    if problems:
        prefix = _wrapper_prefix(expected, weights)
        advice = (
            f"the checkpoint holds this model's weights under the prefix {prefix!r} (saved from a wrapper, such "
            f"as a LightningModule's self.{prefix[:-1]}): give --model a factory of the wrapper, or save the "
            f"inner model's weights with torch.save(wrapper.{prefix[:-1]}.state_dict(), PATH)"
            if prefix else "check that --model / the config build the model this checkpoint was trained as"
        )
        raise ModelMismatchError(f"{source}: checkpoint does not match the model: {problems}; {advice}")
    try:
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ModelMismatchError(
            f"{source}: checkpoint does not match the model ({_one_line(err)})"
        ) from None


def _wrapper_prefix(expected: Mapping[str, Any], weights: Mapping[str, Any]) -> str | None:
    """``"model."`` where every weight of the model is in ``weights`` under that one prefix, same shape."""
    if not expected:
        return None
    first = next(iter(expected))
    for key in weights:
        prefix = key[: -len(first)] if key.endswith(f".{first}") else ""
        if prefix and all(
            isinstance(w := weights.get(prefix + k), torch.Tensor) and isinstance(v, torch.Tensor) and w.shape == v.shape
            for k, v in expected.items()
        ):
            return prefix
    return None


def _mismatches(expected: Mapping[str, Any], weights: Mapping[str, Any]) -> str:
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights
        and isinstance(v, torch.Tensor)
        and isinstance(weights[k], torch.Tensor)
        and weights[k].shape != v.shape
    ]
    parts = [
        f"{len(items)} {one if len(items) == 1 else many} ({_few(items)})"
        for one, many, items in (
            ("missing key", "missing keys", missing),
            ("unexpected key", "unexpected keys", unexpected),
            ("shape mismatch", "shape mismatches", shapes),
        )
        if items
    ]
    return ", ".join(parts)


def nonfinite_parameters(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """``name -> count`` of NaN/inf values in each floating-point tensor that has any."""
    counts: dict[str, int] = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[name] = bad
    return counts


def _few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return f"{shown} and {len(items) - _SHOWN} more" if len(items) > _SHOWN else shown


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else f"{text[:197]}..."
