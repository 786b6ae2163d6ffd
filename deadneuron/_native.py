"""The CPU statistics kernel in C (`_stats.c`): built once with the system compiler, loaded with ctypes.

Why: on a 2-core CPU the audit's cost is the statistics pass. Eager torch needs about eight passes per
activation; `torch.compile` fuses them but its call costs 0.2-0.5 ms of guards and wrappers, more than
the pass itself on a ResNet's later layers. This kernel does the one pass with a ctypes call of a few
microseconds and merges straight into the accumulators.

`load()` returns a `NativeStats` or None with the reason in `load_error()`: no compiler, a failed build, or
a self-check against the torch reference that disagreed (it is only the fast path). Builds are cached per
source, compiler and CPU under ``$DEADNEURON_CACHE_DIR`` (default ``$XDG_CACHE_HOME/deadneuron`` or ``~/.cache/deadneuron``), each
with the SHA-256 of its bytes recorded when it was built, and written atomically, so concurrent first
runs are safe. A cache entry is loaded only if nobody but this user could have written it or the
folders above it, and its bytes match the recorded digest (`deadneuron._cache`); otherwise it is built
again, and where the cache folder itself is unsafe, built in a fresh private temporary folder (said in
`NativeStats.note`). ``DEADNEURON_NATIVE=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from deadneuron import _cache
from deadneuron._native_check import fresh_accumulator as fresh_accumulator  # re-exported
from deadneuron._native_check import self_check
from deadneuron._native_flow import FlowPlan

_FLAGS = ("-fPIC", "-shared", "-std=c99")
# tried in order: tuned for this CPU, portable, and plain (for a compiler that knows no OpenMP simd)
_ATTEMPTS = (
    ("native", ("-O3", "-fno-trapping-math", "-fopenmp", "-march=native")),
    ("portable", ("-O3", "-fno-trapping-math", "-fopenmp")),
    ("one thread", ("-O3", "-fno-trapping-math", "-fopenmp-simd")),
    ("plain", ("-O2",)),
)
# a, f; outer, C, inner and their strides; eps, lo, hi; count_flat, acc, counts; channels [c0, c1), threads
_ARGTYPES = [*[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 6, *[ctypes.c_double] * 3, ctypes.c_int, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # fmt: skip

# A batch at least this large is split by channels over torch's intra-op threads (OpenMP: the kernel
# links the libgomp torch already loaded, so it shares torch's thread pool); below it one thread.
PARALLEL_MIN_ELEMENTS = 1 << 16
_DTYPES = {torch.float32: 0, torch.float64: 1}


class _Plan(ctypes.Structure):
    """`deadneuron_plan` of `_stats.c`: one call's view shape and strides, thresholds and accumulators."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("outer", "C", "inner", "so", "sc", "si")),
        *((name, ctypes.c_double) for name in ("eps", "lo", "hi")),
        ("acc", ctypes.c_void_p), ("counts", ctypes.c_void_p),
        *((name, ctypes.c_int32) for name in ("dtype", "mode", "count_flat", "threads")),
        ("rows", ctypes.c_void_p),
        ("relu", ctypes.c_int32), ("unused", ctypes.c_int32),
    ]


class Planned:
    """A kernel call prepared for one layout (shape, strides, dtype) of one accumulator's batches: the
    arguments are packed once, so that a call passes the data pointers and the plan (about 1 us,
    against several for seventeen converted arguments). ``acc``/``counts``: the accumulator tensors it
    writes into (the caller checks they are still the ones it holds; the gradient-flow call's sums of |x|
    and its non-zero counts, None where not counted)."""

    __slots__ = ("_address", "_fn", "_parallel", "_plan", "_threaded", "acc", "counts", "shape", "writes")

    def __init__(self, fn: Callable[..., int], plan: _Plan | FlowPlan, *, parallel: bool, threaded: bool,
                 acc: torch.Tensor, counts: torch.Tensor | None, shape: tuple[int, ...]) -> None:  # fmt: skip
        self._fn, self._plan, self._address, self._parallel = fn, plan, ctypes.addressof(plan), parallel
        self._threaded, self.acc, self.counts, self.shape = threaded, acc, counts, shape
        self.writes = True  # a relu plan: whether the kernel writes relu's values for this layout

    def __call__(self, a_ptr: int, f_ptr: int | None) -> int:
        """Run on the batch at ``a_ptr`` (and the flat-region tensor at ``f_ptr``, same strides; a relu
        plan's: where relu's values are written, `NativeStats.plan`); the kernel's status: 0 done, 1 strides
        no kernel reads, 3 relu's values not written for this layout (nothing done either way)."""
        if f_ptr is not None and not self.writes:
            return 3
        if self._parallel:  # threads follow torch's setting; the result does not depend on them
            threads = torch.get_num_threads()
            if threads != self._plan.threads:
                self._plan.threads = threads
        status = int(self._fn(a_ptr, f_ptr, self._address))
        if status == 3:  # decided by the layout and thresholds alone: asked once
            self.writes = False
        return status

    def rows(self, a_ptr: int, f_ptr: int | None, offsets: torch.Tensor) -> int:
        """`__call__` on the outer rows that start at the int64 element ``offsets`` (contiguous, CPU) of the
        batch laid out as planned: the rows a padding mask keeps, read in place."""
        plan = self._plan
        plan.outer, plan.rows = offsets.shape[0], offsets.data_ptr()
        size = plan.outer * plan.C * plan.inner
        plan.threads = torch.get_num_threads() if self._threaded and size >= PARALLEL_MIN_ELEMENTS else 1
        return int(self._fn(a_ptr, f_ptr, self._address))


class NativeStats:
    """The loaded kernel: `update` merges one (outer, C, inner) batch into a (7, C) float64 accumulator.

    ``path``: where it was built or cached; ``note``: how it came to be loaded where that is worth
    saying (built in a private temporary folder because the cache was unsafe, or not cached)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, *, note: str | None = None) -> None:
        self.path = path
        self.note = note
        # threads only where the kernel shares torch's OpenMP runtime: a second runtime in the process
        # would bring a second thread pool competing with torch's for the same cores
        self.threaded = _openmp_runtimes() <= 1
        self._fns = {}
        for dtype, name in ((torch.float32, "deadneuron_stats_f32"), (torch.float64, "deadneuron_stats_f64")):
            fn = getattr(lib, name)
            fn.argtypes = _ARGTYPES
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        self._planned = lib.deadneuron_planned
        self._planned.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._planned.restype = ctypes.c_int
        self._flow = lib.deadneuron_flow_planned
        self._flow.argtypes, self._flow.restype = self._planned.argtypes, ctypes.c_int

    def supports(self, a3: torch.Tensor, f3: torch.Tensor | None) -> bool:
        return (
            a3.device.type == "cpu"
            and a3.dtype in self._fns
            and (f3 is None or (f3.dtype == a3.dtype and f3.shape == a3.shape and f3.device.type == "cpu"))
        )

    def plan(
        self, a3: torch.Tensor, eps: float, lo: float, hi: float, count_flat: bool, acc: torch.Tensor,
        counts: torch.Tensor, *, flat_only: bool = False, relu: bool = False,
    ) -> Planned:  # fmt: skip
        """The call for batches laid out as ``a3`` (a supported (outer, C, inner) view; a flat-region
        tensor passed with it has its strides), merging into ``acc``/``counts`` (see `update`). With
        ``flat_only`` it adds the flat counts of ``a3`` alone (into row 1 of ``acc`` and ``counts[1]``).
        With ``relu`` ``a3`` is a pre-activation z: the statistics are those of ``torch.relu(z)``, the flat
        region tested on z, in one read of z; the call's second pointer is then None, or a tensor of z's
        strides that the same pass writes ``torch.relu(z)`` into (relu's default thresholds only; status 3
        elsewhere, nothing done: `_stats.c` WRITES)."""
        plan = _Plan(*a3.shape, *a3.stride(), eps, lo, hi, (acc[1] if flat_only else acc).data_ptr(),
                     counts.data_ptr(), _DTYPES[a3.dtype], int(flat_only), int(count_flat), 1, None,
                     int(relu and not flat_only))  # fmt: skip
        return self._prepared(self._planned, plan, a3, acc, counts)

    def flow_plan(self, x3: torch.Tensor, abs_sum: torch.Tensor, nonzero: torch.Tensor | None) -> Planned:
        """The gradient-flow call for batches laid out as ``x3`` (a supported (outer, C, inner) view, any
        strides): per channel it adds the float64 sum of |x| into ``abs_sum`` and the count of x != 0 into
        ``nonzero`` (None: not counted), both (C,) contiguous float64 on the CPU; a channel with a NaN in
        the batch gets NaN in both (`deadneuron._native_flow`)."""
        plan = FlowPlan(*x3.shape, *x3.stride(), abs_sum.data_ptr(), None if nonzero is None else nonzero.data_ptr(),
                        _DTYPES[x3.dtype], 1, None)  # fmt: skip
        return self._prepared(self._flow, plan, x3, abs_sum, nonzero)

    def _prepared(self, fn: Callable[..., int], plan: _Plan | FlowPlan, x3: torch.Tensor, acc: torch.Tensor,
                  counts: torch.Tensor | None) -> Planned:  # fmt: skip
        parallel = self.threaded and x3.numel() >= PARALLEL_MIN_ELEMENTS
        if parallel:
            plan.threads = torch.get_num_threads()
        return Planned(fn, plan, parallel=parallel, threaded=self.threaded, acc=acc, counts=counts, shape=tuple(x3.shape))

    def update(self, a3: torch.Tensor, f3: torch.Tensor | None, eps: float, lo: float, hi: float, count_flat: bool,
               acc: torch.Tensor, counts: torch.Tensor) -> None:  # fmt: skip
        """``acc``: (7, C) contiguous float64 (zero, flat, finite, mean, m2, min, max: see `_stats.c`);
        ``counts``: (2,) float64 (elements, elements whose flat region was tested)."""
        if f3 is not None and f3.stride() != a3.stride():
            a3, f3 = a3.contiguous(), f3.contiguous()
        for attempt in range(2):
            run = self.plan(a3, eps, lo, hi, count_flat, acc, counts)
            status = run(a3.data_ptr(), f3.data_ptr() if f3 is not None else None)
            if status != 1 or attempt:
                break
            # strides no kernel reads (nothing was written): again on contiguous copies
            a3 = a3.contiguous()
            f3 = f3.contiguous() if f3 is not None else None
        if status:
            raise RuntimeError(f"deadneuron C kernel refused a {tuple(a3.shape)} batch (status {status})")

    def flat(self, z3: torch.Tensor, lo: float, hi: float, acc: torch.Tensor, counts: torch.Tensor) -> None:
        """Add the flat counts of ``z3`` (finite, in (-inf, lo] or [hi, inf)) into row 1 of the (7, C)
        ``acc`` and the elements tested into ``counts[1]``: any strides, read in place."""
        self.plan(z3, 0.0, lo, hi, True, acc, counts, flat_only=True)(z3.data_ptr(), None)


def _openmp_runtimes() -> int:
    """How many OpenMP runtime libraries this process has loaded (Linux; 0 where it cannot tell)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "/lib" in line}
    except OSError:
        return 0
    return len({p for p in paths if Path(p).name.startswith(("libgomp", "libiomp", "libomp"))})


_loaded: NativeStats | None = None
_error: str | None = None
_tried = False


def load() -> NativeStats | None:
    """The kernel, built on the first call of the process (5-6 s of compiling on a 2-core CPU, once: cached on disk after)."""
    global _loaded, _error, _tried
    if not _tried:
        _tried = True
        try:
            _loaded = _load()
        except _Unavailable as exc:
            _error = str(exc)
    return _loaded


def load_error() -> str | None:
    """Why `load` returned None (None when it did not, or was not called)."""
    return _error


class _Unavailable(Exception):
    pass


def _load() -> NativeStats:
    if os.environ.get("DEADNEURON_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("turned off by DEADNEURON_NATIVE=0")
    if sys.platform == "win32":
        raise _Unavailable("not built on Windows")
    source = resources.files("deadneuron").joinpath("_stats.c").read_bytes()
    cc = _compiler()
    cache, unsafe = _cache.private_folder(_cache_dir())
    errors = []
    for attempt, extra in _ATTEMPTS:
        flags = (*_FLAGS, *extra)
        name = f"stats-{_key(source, cc, flags)}"
        try:
            native = _from_cache(cache, name) if cache is not None else None
            if native is None:
                native = _build(cc, flags, source, cache, name, unsafe)
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            errors.append(f"{attempt}: {_last_line(exc)}")
            if isinstance(exc, subprocess.TimeoutExpired):
                break  # a compiler that hangs will hang again
            continue
        failed = self_check(native)
        if failed is not None:
            raise _Unavailable(f"{failed} ({native.path}); using torch")
        return native
    raise _Unavailable("could not build the C statistics kernel (" + "; ".join(errors) + ")")


def _from_cache(cache: Path, name: str) -> NativeStats | None:
    """The cached build, if its bytes match the digest recorded when it was built (else None: it is
    built again). Exactly the bytes that were hashed are loaded, from a fresh private copy."""
    entry = cache / f"{name}.so"
    data = _cache.read_verified(entry, cache / f"{name}.sha256")
    if data is None:
        return None
    try:
        folder = None
        fd, copy = tempfile.mkstemp(prefix=f".{name}.load-", suffix=".so", dir=cache)
    except OSError:  # a read-only cache: copy into a private temporary folder
        folder = tempfile.mkdtemp(prefix="deadneuron-")
        fd, copy = tempfile.mkstemp(suffix=".so", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return NativeStats(ctypes.CDLL(copy), entry)
    except (OSError, AttributeError):  # recorded, yet not a loadable kernel: build it again
        return None
    finally:  # the loaded library outlives its file
        Path(copy).unlink(missing_ok=True)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _build(cc: str, flags: tuple[str, ...], source: bytes, cache: Path | None, name: str, unsafe: str | None) -> NativeStats:
    """Compile in a fresh private folder (inside the cache when there is one that nobody else can
    write), load that file, and record it in the cache with its digest."""
    note = None
    workdir = None
    if cache is not None:
        try:
            workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        except OSError as exc:
            unsafe = f"cannot write to {cache}: {exc.strerror or exc}"
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="deadneuron-"))
        note = f"built in a private temporary folder: {unsafe}"
    try:
        built = _compile(cc, flags, source, workdir)
        data = built.read_bytes()
        native = NativeStats(ctypes.CDLL(str(built)), built, note=note)
        if note is None and cache is not None:
            entry = cache / f"{name}.so"
            try:
                _cache.store(data, entry, cache / f"{name}.sha256")
                native.path = entry
            except OSError as exc:
                native.note = f"not cached: {exc.strerror or exc}"
        return native
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise _Unavailable("no C compiler found (set CC, or install gcc or clang)")


def _cache_dir() -> Path:
    root = os.environ.get("DEADNEURON_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deadneuron"


def _key(source: bytes, cc: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256(source)
    h.update(repr((cc, flags, platform.machine(), _cpu_flags(), shutil.which(cc))).encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cache shared by different CPUs must not mix them up."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, flags: tuple[str, ...], source: bytes, workdir: Path) -> Path:
    """Compile ``source`` in ``workdir`` under fixed names (so that builds are byte-identical)."""
    (workdir / "_stats.c").write_bytes(source)
    done = subprocess.run(
        [cc, *flags, "_stats.c", "-o", "stats.so", "-lm"],
        cwd=workdir, capture_output=True, text=True, timeout=60, check=False,
    )
    if done.returncode != 0:
        raise OSError(f"{cc} failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    return workdir / "stats.so"
