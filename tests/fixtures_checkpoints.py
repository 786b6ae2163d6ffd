"""Builders of good, damaged and hostile checkpoint files, for the checkpoint and CLI tests.

Each ``make_*`` takes a folder and returns the path it wrote. Nothing here loads a checkpoint.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn


@dataclass
class TrainConfig:
    """A dataclass some training scripts store in their checkpoints."""

    lr: float = 1e-3
    epochs: int = 3


class RunsCommand:
    """Unpickling this runs ``touch marker``: the classic hostile-checkpoint payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def save(folder: Path, name: str, obj: object, **kwargs: object) -> Path:
    path = folder / name
    torch.save(obj, path, **kwargs)  # type: ignore[arg-type]
    return path


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def zip_with_pickle(folder: Path, name: str, data_pkl: bytes) -> Path:
    """A torch-style zip archive whose data.pkl is ``data_pkl`` (no tensors)."""
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return path


def deeply_nested_pickle(depth: int = 50_000) -> bytes:
    # depth EMPTY_LISTs then depth-1 APPENDs: [[[...]]]; no recursion needed to build or scan it.
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def flip_tensor_byte(path: Path) -> Path:
    """Flip one byte inside the first tensor record of a torch zip checkpoint."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def save_as_if_from_cuda(folder: Path, name: str, obj: object) -> Path:
    """torch.save ``obj`` with every storage tagged ``cuda:0``, as a GPU training run would."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"  # type: ignore[assignment]
    try:
        return save(folder, name, obj)
    finally:
        torch.serialization.location_tag = original


def torchscript_file(folder: Path) -> Path:
    path = folder / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit.script
        torch.jit.script(tiny_model()).save(str(path))
    return path


def exported_program_file(folder: Path) -> Path:
    path = folder / "exported.pt2"
    program = torch.export.export(tiny_model(), (torch.randn(2, 3),))
    torch.export.save(program, path)
    return path


def safetensors_file(folder: Path, name: str = "weights.safetensors") -> Path:
    path = folder / name
    save_file(tiny_state_dict(), str(path))
    return path


def numpy_scalar_checkpoint(folder: Path) -> Path:
    return save(folder, "numpy.pth", {"state_dict": tiny_state_dict(), "best_acc": np.float64(0.93)})


def numpy_array_checkpoint(folder: Path) -> Path:
    return save(folder, "numpy_array.pth", {"state_dict": tiny_state_dict(), "curve": np.arange(4.0)})


def namespace_checkpoint(folder: Path) -> Path:
    return save(folder, "args.pth", {"state_dict": tiny_state_dict(), "args": argparse.Namespace(lr=0.1)})


def dataclass_checkpoint(folder: Path) -> Path:
    return save(folder, "cfg.pth", {"state_dict": tiny_state_dict(), "config": TrainConfig()})


def plain_pickle(obj: object, protocol: int = 4) -> bytes:
    buffer = io.BytesIO()
    pickle.dump(obj, buffer, protocol=protocol)
    return buffer.getvalue()
