"""Moving many small tensors to the host at once: one device-to-host copy per device, not one per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Every tensor as a flat float64 numpy array, in order. The tensors of each device are flattened and
    concatenated there (as float64: integer counts stay exact up to 2**53), then copied in one transfer,
    so the host synchronises once per device."""
    by_device: dict[torch.device, list[int]] = {}
    for index, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(index)
    out: list[np.ndarray] = [np.empty(0)] * len(tensors)
    with torch._C.DisableTorchFunction(), torch.no_grad():
        for indices in by_device.values():
            parts = [tensors[i].detach().reshape(-1).to(torch.float64) for i in indices]
            flat = torch.cat(parts).cpu().numpy()  # a copy, also on the CPU: never a view of live state
            offset = 0
            for i, part in zip(indices, parts, strict=True):
                out[i] = flat[offset : offset + part.numel()]
                offset += part.numel()
    return out


__all__ = ["to_host"]
