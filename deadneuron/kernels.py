"""Which statistics kernel runs: the C kernel on CPU, else `torch.compile`, else eager torch.

All of them compute `deadneuron.moments.fused_moments` (the C kernel merges into the accumulator
itself; the others return a batch's statistics for `deadneuron.stats.ChannelStats` to merge).
Building and loading the C kernel lives in `deadneuron._native`; this module only chooses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from deadneuron import _native
from deadneuron.moments import Moments, channel_flat, fused_flat, fused_moments

_INF = float("inf")
_T = TypeVar("_T")


class Kernels:
    """The statistics kernels of one audit: the C kernel on CPU, else `torch.compile`, else eager.

    On CPU the C kernel (`deadneuron._native`, built once with the system compiler) does the whole
    update in one pass and one ctypes call; where it cannot be built or loaded, a `torch.compile`d
    `fused_moments` fuses the pass (its call costs about 0.5 ms of guards on CPU, so tensors under
    ``min_compiled_numel`` elements stay eager); any failure to compile falls back to eager for the
    rest of the run. ``name`` says which ran; ``fallback_reason`` why the C kernel did not, or how it
    was loaded where that is worth saying (built in a private temporary folder: the cache was unsafe).
    On CUDA the eager kernels are used: measured on an H100, the compiled call's fixed cost exceeded
    the whole eager cost for every benchmark model (benchmarks/overhead.py).

    ``compile=False`` forces the eager torch kernels (the reference); ``native=False`` skips the C
    kernel (then `torch.compile`, else eager).
    """

    def __init__(self, compile: bool = True, *, native: bool = True, min_compiled_numel: int = 1 << 15) -> None:
        self.compiled = compile
        self.min_compiled_numel = min_compiled_numel
        self.fallback_reason: str | None = None
        self.native: _native.NativeStats | None = None
        self._moments: Callable[..., Moments] = fused_moments
        self._flat: Callable[..., torch.Tensor] = fused_flat
        self._used: set[str] = set()
        if compile:
            self.native = _native.load() if native else None
            if self.native is None:
                self.fallback_reason = _native.load_error() if native else None
                self._moments, self._flat = _compiled_kernels()
            else:
                self.compiled = False  # what the C kernel does not take (CUDA tensors) runs eager
                self.fallback_reason = self.native.note

    @property
    def name(self) -> str:
        """Which kernels ran ("native", "compiled", "eager", or several joined by "+")."""
        order = ("native", "compiled", "eager")
        used = [k for k in order if k in self._used]
        if used:
            return "+".join(used)
        return "native" if self.native is not None else "compiled" if self.compiled else "eager"

    def _call(self, fast: Callable[..., _T], eager: Callable[..., _T], x: torch.Tensor, *args: Any) -> _T:
        if self.compiled and x.device.type == "cpu" and x.numel() >= self.min_compiled_numel:
            try:
                # the Recorder's TorchFunctionMode must not be traced into the compiled graph
                with torch._C.DisableTorchFunction():
                    out = fast(x, *args)
                self._used.add("compiled")
                return out
            except Exception as exc:  # no C++ compiler, unsupported device, dynamo limits...
                self.compiled = False
                first = (str(exc).strip().splitlines() or [""])[0]
                self.fallback_reason = f"{type(exc).__name__}: {first}"
        self._used.add("eager")
        return eager(x, *args)

    def accumulate(
        self,
        a3: torch.Tensor,
        f3: torch.Tensor | None,
        eps: float,
        lo: float,
        hi: float,
        count_flat: bool,
        acc: torch.Tensor,
        counts: torch.Tensor,
    ) -> bool:
        """Merge the batch into ``acc``/``counts`` with the C kernel where it applies; False if it does not."""
        native = self.native
        if native is None:
            return False
        a3, f3 = as_float(a3), None if f3 is None else as_float(f3)
        if not native.supports(a3, f3):
            return False
        native.update(a3, f3, eps, lo, hi, count_flat, acc, counts)
        self._used.add("native")
        return True

    def moments(self, a3: torch.Tensor, eps: float, lo: float, hi: float, f3: torch.Tensor | None = None) -> Moments:
        """The batch's per-channel statistics (`fused_moments`), for the caller to merge."""
        a3 = as_float(a3)
        return self._call(self._moments, fused_moments, a3, a3 if f3 is None else as_float(f3), eps, lo, hi)

    def flat(self, z3: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """Per-channel count of finite elements of ``z3`` in (-inf, lo] or [hi, inf), float64."""
        z3 = as_float(z3)
        native = self.native
        if native is not None and native.supports(z3, None):
            # one allocation: row 1 takes the counts, row 0 the kernel's element count (not needed here)
            out = torch.zeros(2, max(z3.shape[1], 2), dtype=torch.float64)
            native.flat(z3, lo, hi, out, out[0])
            self._used.add("native")
            return out[1, : z3.shape[1]]
        return self._call(self._flat, fused_flat, z3, lo, hi)

    def plan(
        self, a3: torch.Tensor, eps: float, lo: float, hi: float, count_flat: bool, acc: torch.Tensor,
        counts: torch.Tensor, *, flat_only: bool = False, relu: bool = False,
    ) -> _native.Planned | None:  # fmt: skip
        """The C kernel's call prepared for batches laid out as ``a3`` (`deadneuron._native.NativeStats.plan`;
        ``relu``: the statistics of relu of ``a3``), or None where the C kernel does not take them (not
        loaded, not a CPU float32/float64 tensor)."""
        native = self.native
        if native is None or not native.supports(a3, None):
            return None
        self._used.add("native")
        return native.plan(a3, eps, lo, hi, count_flat, acc, counts, flat_only=flat_only, relu=relu)

    def count_flat(self, z3: torch.Tensor, lo: torch.Tensor | float, hi: float) -> torch.Tensor:
        """`flat`, where ``lo`` may also be a per-channel (C,) tensor (PReLU: one slope per channel)."""
        if isinstance(lo, torch.Tensor):
            return channel_flat(as_float(z3), lo, hi)
        if lo == -_INF and hi == _INF:
            return torch.zeros(z3.shape[1], dtype=torch.float64, device=z3.device)
        return self.flat(z3, lo, hi)


@functools.cache
def _compiled_kernels() -> tuple[Callable[..., Moments], Callable[..., torch.Tensor]]:
    """`torch.compile` wrappers, made once per process (making one costs milliseconds)."""
    return torch.compile(fused_moments, dynamic=True), torch.compile(fused_flat, dynamic=True)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 as float32 (exact: every such value is a float32); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
