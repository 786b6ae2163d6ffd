"""The sides of the overhead suite: a plain forward, deadneuron's audit, and the peers, on the same batches.

Every side runs a case's batches through the model under ``torch.inference_mode`` and reports two times:

* ``span``: from the moment the first batch is asked for to the moment the loop asks past the last one
  (`Stamped`); this is the per-batch cost (forward, hooks, statistics) without the set-up before the
  first batch and the report building after the last;
* ``whole``: the whole call, set-up and report building included.

The peers, each on the modules at which deadneuron measured a site (the same activations, the same
batches):

* captum's ``LayerActivation`` over those layers, one ``attribute`` call per batch: it hooks them for the
  call and clones each output (capture only, no statistic is computed from the clones);
* a per-layer hook written here after fastai's ``ActivationStats`` (fastai/callback/hook.py): each hook
  detaches its output (``to_detach(..., cpu=True)``), then reads ``mean().item()``, ``std().item()`` and
  ``(o <= 0.05).long().sum().item() / o.numel()``; after each batch the stored figures are appended to a
  list, as fastai's ``after_batch`` does;
* torchlens' ``trace`` saving the outputs of those modules, one trace per batch.
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from suite_models import Case
from torch import nn

import deadneuron


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time (all its threads), which leaves out the time other
processes held the core: for one thread on a loaded machine (with two threads it also counts their spinning)."""


class Stamped:
    """The batches, with the clock read when the first is asked for and when the consumer asks past the last."""

    def __init__(self, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> None:
        self.batches = batches
        self.device = device
        self.clock = clock
        self.start = self.end = float("nan")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        _sync(self.device)
        self.start = self.clock()
        yield from self.batches
        _sync(self.device)
        self.end = self.clock()

    @property
    def span(self) -> float:
        return self.end - self.start


class Timing(dict[str, float]):
    """``span``, ``whole`` (seconds) and ``faults`` (minor page faults during the whole call)."""


class Side(Protocol):
    name: str

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = ...) -> Timing: ...


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(body: Callable[[Stamped], object], batches: Sequence[Any], device: torch.device,
          clock: Clock = time.perf_counter) -> Timing:  # fmt: skip
    stamped = Stamped(batches, device, clock)
    _sync(device)
    faults, t0 = _faults(), clock()
    body(stamped)
    _sync(device)
    whole = clock() - t0
    return Timing(span=stamped.span, whole=whole, faults=float(_faults() - faults))


def site_modules(report: deadneuron.Report) -> list[str]:
    """The qualified names of the modules at which the audit measured a site, in first-call order."""
    return list(dict.fromkeys(s.module for s in report.sites.values()))


class Plain:
    name = "plain"

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> Timing:
        def body(stamped: Stamped) -> None:
            with torch.inference_mode():
                for b in stamped:
                    case.forward(case.model, b)

        return timed(body, batches, device, clock)


class Deadneuron:
    """``deadneuron.audit`` over the batches, every site measured; no rules (they read the report after)."""

    name = "deadneuron"

    def __init__(self) -> None:
        self.report: deadneuron.Report | None = None

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> Timing:
        def body(stamped: Stamped) -> None:
            self.report = deadneuron.audit(case.model, stamped, progress=False, rules=False, **case.audit_kwargs)

        return timed(body, batches, device, clock)


class Captum:
    name = "captum"

    def __init__(self, modules: Sequence[str]) -> None:
        from captum.attr import LayerActivation  # noqa: F401  (unavailable: the side is left out)

        self.modules = modules

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> Timing:
        from captum.attr import LayerActivation

        named = dict(case.model.named_modules())
        current: list[Any] = [None]
        layer_act = LayerActivation(lambda *_: case.forward(case.model, current[0]), [named[m] for m in self.modules])

        def body(stamped: Stamped) -> None:
            with torch.inference_mode():
                for b in stamped:
                    current[0] = b
                    layer_act.attribute(case.first_tensor(b))

        return timed(body, batches, device, clock)


def _detach(o: Any) -> Any:
    """fastai's ``to_detach(o, cpu=True, gather=False)``."""
    if isinstance(o, torch.Tensor):
        return o.detach().cpu()
    if isinstance(o, (tuple, list)):
        return type(o)(_detach(x) for x in o)
    return o


def _activation_stats(o: torch.Tensor) -> dict[str, float]:
    """fastai's ``ActivationStats.hook``: mean, std and near-zero share, each read to the host."""
    o = o.float()
    return {"mean": o.mean().item(), "std": o.std().item(), "near_zero": (o <= 0.05).long().sum().item() / o.numel()}


class FastaiStyle:
    """fastai's ``Hooks`` + ``ActivationStats`` on the site modules: registered once, removed after the run."""

    name = "fastai-style"

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = modules
        self.stats: list[list[Any]] = []

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> Timing:
        named = dict(case.model.named_modules())
        stored: list[Any] = [None] * len(self.modules)

        def hook(index: int) -> Callable[[nn.Module, Any, Any], None]:
            def hook_fn(module: nn.Module, inputs: Any, output: Any) -> None:
                _detach(inputs)
                out = _detach(output)
                stored[index] = _activation_stats(out) if isinstance(out, torch.Tensor) else None

            return hook_fn

        def body(stamped: Stamped) -> None:
            handles = [named[m].register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
            try:
                with torch.inference_mode():
                    for b in stamped:
                        case.forward(case.model, b)
                        self.stats.append(list(stored))
            finally:
                for h in handles:
                    h.remove()

        return timed(body, batches, device, clock)


class Torchlens:
    """``torchlens.trace`` per batch, saving the outputs of the site modules (torch functions stay wrapped
    after the first trace: run it in a process of its own)."""

    name = "torchlens"

    def __init__(self, modules: Sequence[str]) -> None:
        import torchlens  # noqa: F401  (unavailable: the side is left out)

        self.modules = list(modules)

    def run(self, case: Case, batches: Sequence[Any], device: torch.device, clock: Clock = time.perf_counter) -> Timing:
        import torchlens
        from torchlens.options import CaptureOptions

        options = CaptureOptions(layers_to_save=self.modules)

        def body(stamped: Stamped) -> None:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its notes on what it could not trace (e.g. BERT's mask)
                for b in stamped:
                    if isinstance(b, dict):
                        torchlens.trace(case.model, [], input_kwargs=b, capture=options)
                    else:
                        torchlens.trace(case.model, case.first_tensor(b), capture=options)

        return timed(body, batches, device, clock)


PEERS: dict[str, Callable[[Sequence[str]], Side]] = {"captum": Captum, "fastai-style": FastaiStyle,
                                                      "torchlens": Torchlens}  # fmt: skip

