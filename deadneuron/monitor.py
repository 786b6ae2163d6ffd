"""Monitor: activation health during training, in the user's own loop (DESIGN section 9).

    with deadneuron.Monitor(model, every=100, optimizer=opt) as mon:
        for batch in loader:
            loss = ...; opt.zero_grad(); loss.backward(); opt.step()
            mon.step()                     # a snapshot every 100 steps (a step: one optimizer step)
    mon.timeline                           # pandas DataFrame, one row per (snapshot step, site)
    mon.findings()                         # the rules over the last window and the timeline

The statistics are the audit's (a `deadneuron.probe.Recorder`) over the training batches themselves in
train mode: no extra forward pass. Each snapshot covers the steps since the previous one (one copy to the
host, merged over the ranks of a process group: `deadneuron.window`), then the window starts afresh on the
same hooks. With ``sample_every=k`` only every k-th step's forward passes are measured; between them no
hook is attached at all. Eval-mode passes (a validation loop, through the model or a part of it:
`deadneuron._monitor_parts`) are not measured. A `deadneuron.gradflow.FlowObserver` reads dL/dz per channel
in the backward pass (tensor hooks that return None) and sums |a| for the tau-dormant score.

Nothing is left on the model: hooks are removed when the ``with`` block ends, also on an exception, and
the model's modes, parameters and gradients are never touched. The host synchronises only at snapshots
(and, with a padding ``mask``, once per measured forward pass to count its valid positions).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deadneuron import _monitor_args as checks
from deadneuron._monitor_notes import EmptySites, never_stepped
from deadneuron._monitor_parts import PartGates
from deadneuron.errors import UsageError
from deadneuron.gradflow import FlowObserver
from deadneuron.probe import Recorder
from deadneuron.probe.masks import BatchMask, MaskSpec
from deadneuron.registry import ActivationRegistry
from deadneuron.report import Report, SiteHealth
from deadneuron.snapshot import ChannelDetail, Snapshot, site_snapshot, unmeasured_flow
from deadneuron.window import WindowFigures, forward_mask, read_window, reset_window

if TYPE_CHECKING:
    import pandas as pd

    from deadneuron.rules import Finding, RulesConfig, RuleSet


_NOTHING = ("a window of training steps measured no activation site: no forward pass in train mode "
            "ran, the model has no recognised activation, or none matches the select; nothing was recorded for it")


class SnapshotWriter(Protocol):
    """Where snapshots go as they are taken (`deadneuron.integrations.writers`): CSV, JSONL, TensorBoard."""

    def write(self, snapshot: Snapshot, channels: Mapping[str, ChannelDetail]) -> None: ...

    def close(self) -> None: ...


class Monitor:
    """Hooks ``model`` while the ``with`` block runs; a snapshot every ``every`` calls of `step` (None:
    only when `snapshot` is called, and when the block ends).

    ``sample_every``: measure only every k-th step's forward passes (k <= every). ``select`` and
    ``channel_axis``: as for `deadneuron.audit`. ``optimizer``: its learning rate and kind go into the
    snapshots and the rules. ``tau``: the tau-dormant threshold (Sokar et al. 2023). ``writers`` get every
    snapshot (`deadneuron.integrations.writers`). ``gradients=False`` skips the gradient-flow hooks.
    ``mask``: the padding of each training batch, left out of every figure (see `forward_mask`: ``"auto"``
    finds an ``attention_mask`` keyword beside ``input_ids``; a keyword's name; ``"len:KEY"``: the (N,)
    per-sample lengths of that keyword; a callable of the forward's arguments): one host synchronisation per
    measured forward pass; ``mask_dims``: where it lies at sequence-first sites, as for `deadneuron.audit`.
    ``start_step``: the steps done before (a resumed run), where the step count starts. ``distributed``:
    under an initialised process group of more than one rank, every snapshot merges the ranks' figures
    (each rank gets the same snapshot, as `deadneuron.audit` merges); every rank must then take its
    snapshots at the same steps. False: each rank's own batches only. A loop that calls parts of the model
    rather than the model itself marks its batches (`begin_batch`, `end_forward`) and its passes that are
    no training (`pause`, `resume`), as the model's own forward hooks do otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None = 100,
        sample_every: int = 1,
        select: Sequence[str] | None = None,
        channel_axis: Mapping[str, int | None] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        tau: float = 0.1,
        writers: Sequence[SnapshotWriter] = (),
        gradients: bool = True,
        eps: float = 0.0,
        delta: float = 0.05,
        activations: ActivationRegistry | None = None,
        compile: bool = True,
        mask: MaskSpec = None,
        mask_dims: Mapping[str, Sequence[int]] | None = None,
        start_step: int = 0,
        distributed: bool = True,
    ) -> None:
        self.every, self.sample_every, self.tau = checks.window_args(every, sample_every, tau)
        self.model = checks.module_arg(model)
        self.optimizer = checks.optimizer_arg(optimizer)
        self.writers = tuple(writers)
        self.gradients = gradients
        self.distributed = distributed
        self.mask = mask
        self._recorder_options: dict[str, Any] = {
            "eps": eps, "delta": delta, "select": select, "channel_axis": channel_axis, "mask_dims": mask_dims,
            "activations": activations, "compile": compile,
        }  # fmt: skip
        self.snapshots: list[Snapshot] = []
        self.last_channels: dict[str, ChannelDetail] = {}  # the last window's per-channel arrays
        self._last_window: WindowFigures | None = None  # its figures on the host (`last_health` reads them)
        self._last_health: dict[str, SiteHealth] | None = None
        self.warnings: list[str] = []
        self._step = self._window_start = self._start_step = checks.positive_int(start_step, "start_step", lo=0)
        self._rec: Recorder | None = None
        self._observer: FlowObserver | None = None
        self._attached = False
        self._paused = False  # detached for an eval-mode forward pass
        self._held = False  # `pause` called: nothing is measured until `resume`
        self._running = False
        self._gates: list[RemovableHandle] = []
        self._parts: PartGates | None = None  # on the model's parts: one called on its own in eval mode is no training
        self._mask_shape: tuple[int, ...] | None = None  # of a padding mask the loop's batches had
        self._empty_sites = EmptySites()  # says once per site which saw nothing in a window

    # -- the with block ---------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(snapshot=exc_type is None)

    def start(self) -> Monitor:
        """Attach (what entering the ``with`` block does), for callbacks that cannot hold a with block."""
        if self._running:
            raise UsageError("Monitor: this monitor is already running; use one with block at a time")
        self._running, self._held = True, False
        try:
            self._gates = [self.model.register_forward_pre_hook(self._gate_enter, prepend=True, with_kwargs=True),
                           self.model.register_forward_hook(self._gate_exit)]  # fmt: skip
            self._new_window()
        except BaseException:
            self._teardown()
            raise
        return self

    def close(self, *, snapshot: bool = True) -> None:
        """Remove every hook and close the writers (what leaving the ``with`` block does); with
        ``snapshot``, first a last snapshot of the steps since the previous one. Safe to call twice."""
        if not self._running:
            return
        try:
            self._detach()
            if snapshot:
                self._take_snapshot()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        try:
            self._detach()
        finally:
            for handle in self._gates:
                handle.remove()
            self._gates.clear()
            self._rec, self._observer, self._parts = None, None, None
            self._running = False
            for writer in self.writers:
                writer.close()

    # -- steps and windows --------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Training steps counted so far (calls of `step`)."""
        return self._step

    def step(self) -> Snapshot | None:
        """Count one training step (call it after the optimizer step). Returns the snapshot when one is
        taken (every ``every`` steps), else None."""
        if not self._running:
            raise UsageError("Monitor.step() called outside the monitor's with block")
        self._step += 1
        if self.every is not None and self._step - self._window_start >= self.every:
            return self.snapshot()
        self._sync()
        return None

    def snapshot(self) -> Snapshot | None:
        """Take a snapshot now of the steps since the previous one (at the end of an epoch, say), and
        start a new window. None when the window measured nothing (no training forward pass ran).
        Under a process group (see ``distributed``) every rank must call it at the same step."""
        if not self._running:
            raise UsageError("Monitor.snapshot() called outside the monitor's with block")
        snap = self._take_snapshot()
        self._new_window()
        return snap

    def _sampled(self, step: int) -> bool:
        return step % self.sample_every == 0

    def _sampled_steps(self) -> int:
        """Sampled steps of the window (a window closed before any `step` call counts its one step)."""
        k, start = self.sample_every, self._window_start
        return len(range(-(-start // k) * k, max(self._step, start + 1), k))

    def _new_window(self) -> None:
        """The next window: the same Recorder and hooks, every statistic afresh."""
        self._window_start = self._step
        if self._rec is None or self._observer is None:
            self._observer = FlowObserver(gradients=self.gradients)
            self._rec = Recorder(self.model, observer=self._observer, restore_modes=False, **self._recorder_options)
            self._parts = PartGates(self._rec.model, pause=lambda: self._detach(gates=False), resume=self._after_part)
        else:
            reset_window(self._rec, self._observer)
        self._sync()

    # -- attaching the Recorder around sampled steps; eval-mode forward passes are not measured -----
    def _sync(self) -> None:
        self._paused = False
        if self._parts is not None:  # (what a forward pass that raised left set)
            self._parts.in_model, self._parts.paused = False, None
        if self._sampled(self._step):
            self._attach()
        else:
            self._detach()

    def _attach(self) -> None:
        if not self._attached and not self._held and self._rec is not None:
            self._rec.__enter__()
            self._attached = True
            if self._parts is not None:
                self._parts.on()

    def _detach(self, *, gates: bool = True) -> None:
        if self._attached and self._rec is not None:
            self._attached = False
            self._rec.__exit__(None, None, None)
        if gates and self._parts is not None:
            self._parts.off()

    def _after_part(self) -> None:
        """A part called on its own in eval mode returned: measure again, forgetting what that call began."""
        self._attach()
        if self._attached and self._rec is not None:
            self._rec.start_batch(None)
            self._rec.idle()

    def _gate_enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._parts is not None:
            self._parts.in_model = True
            if self._parts.paused is not None:  # that part's call raised: its return never came
                self._parts.paused = None
                self._after_part()
        if not self._attached or self._rec is None or self._observer is None:
            return
        if not module.training:
            self._detach()
            self._paused = True
        elif self.mask is not None and not self._rec.wrapped:  # (a wrapped call's arguments are a step's)
            choice = forward_mask(self.mask, args, kwargs, model=module)
            if choice.warning:
                self._note(choice.warning)
            self._observer.mask = BatchMask.of(choice.mask) if choice.mask is not None else None
            self._rec.start_batch(self._observer.mask)
            self._mask_shape = self._mask_shape or (tuple(choice.mask.shape) if choice.mask is not None else None)

    def _gate_exit(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self._parts is not None:
            self._parts.in_model = False
        if self._paused:
            self._paused = False
            self._attach()
        elif self._attached and self._rec is not None:
            self._rec.idle()  # the loss and the optimizer step run without the functional probe

    # -- loops that call parts of the model, not the model itself ------------------------------------------
    def pause(self) -> None:
        """Measure nothing until `resume`: an evaluation the model's own forward hook cannot see (a
        LightningModule whose validation_step calls ``self.net``), or train-mode passes that are no training."""
        self._held = True
        self._detach()

    def resume(self) -> None:
        """Measure again after `pause` (the sampled steps, as before)."""
        self._held = False
        self._sync()

    def begin_batch(self, *, wrapped: bool = False) -> None:
        """A training batch begins, where the loop calls parts of the model rather than the model itself (a
        training_step calling ``self.net``): site names count the calls of one batch (no padding mask).
        ``wrapped``: the model's next call runs the whole training step (Lightning's DDP reaches ``training_step``
        through the model's forward): that call is no forward pass, the module calls inside it are."""
        if self._attached and self._rec is not None and self._observer is not None:
            self._observer.mask = None
            self._rec.start_batch(None, wrapped=wrapped)

    def end_forward(self) -> None:
        """The batch's forward passes are done: the backward and optimizer step run without the functional probe."""
        if self._attached and self._rec is not None:
            self._rec.idle()

    # -- snapshots ------------------------------------------------------------------------------------
    def _take_snapshot(self) -> Snapshot | None:
        """The window's snapshot (one copy to the host, merged over ``distributed`` ranks), None if no site was measured."""
        if self._rec is None or self._observer is None:
            return None
        figures = read_window(self._rec, self._observer, distributed=self.distributed)
        if not figures.sites:
            if self._step > self._window_start:  # (also when the block ends: nothing recorded is said)
                for line in [_NOTHING, *figures.warnings]:
                    self._note(line)
            return None
        sites, details = {}, {}
        for site, state, flow in zip(figures.sites, figures.states, figures.flows, strict=True):
            name = site.info.name
            sites[name], details[name] = site_snapshot(site.info, state[0], flow, tau=self.tau)
        snap = Snapshot(self._step, self._window_start, self._sampled_steps(), self.learning_rate, sites)
        self.snapshots.append(snap)
        self._last_window, self._last_health = figures, None
        self.last_channels = details
        for w in [*figures.warnings, *([unmeasured_flow(snap)] if self.gradients else []), self._empty_sites(snap),
                  *([never_stepped(snap)] if self._step == self._start_step else [])]:  # fmt: skip
            if w is not None:
                self._note(w)
        if self._mask_shape is not None and not any(s.masked or s.reordered for s in figures.sites):
            self._note(f"the padding mask (shape {self._mask_shape}) applied at no activation site, so the figures "
                       "count the padding: a site is masked where its dims other than the channel begin with the "
                       "mask's shape (or with its positions, then N)")  # fmt: skip
        for writer in self.writers:
            writer.write(snap, details)
        return snap

    def _note(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            warnings.warn(f"deadneuron.Monitor: {message}", RuntimeWarning, stacklevel=3)

    # -- what the user reads --------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float | None:
        """The optimizer's current learning rate (its first parameter group), if one was given."""
        return checks.optimizer_lr(self.optimizer)

    @property
    def optimizer_name(self) -> str | None:
        """``adam``, ``sgd``...: the class of ``optimizer`` (inside a trainer's wrapper, if any)."""
        return checks.optimizer_kind(self.optimizer)

    @property
    def last_health(self) -> dict[str, SiteHealth]:
        """The last window's full per-site health (what an audit reports per site), built when first read."""
        if self._last_health is None:
            results = self._last_window.results() if self._last_window is not None else []
            self._last_health = {r.name: SiteHealth.from_result(r) for r in results}
        return self._last_health

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The snapshots as health-timeline entries (plain dicts, JSON-ready)."""
        return [s.to_dict() for s in self.snapshots]

    @property
    def timeline(self) -> pd.DataFrame:
        """One row per (snapshot step, site): see `deadneuron.render.timeline.timeline_frame`."""
        from deadneuron.render.timeline import timeline_frame

        return timeline_frame(self.entries)

    def report(self) -> Report:
        """The last window as a Report (what an audit of those training batches would have said)."""
        if not self.snapshots:
            raise UsageError(f"Monitor: no snapshot: the {self._step} steps counted measured no activation site (no "
                             "forward pass in train mode ran, no recognised activation, or none matching the select); see mon.warnings"
                             if self._step else "Monitor: no snapshot yet (call step() after each optimizer step; a "
                             f"snapshot comes every {self.every} steps and when the with block ends)")  # fmt: skip
        last = self.snapshots[-1]
        meta = {"model": type(self.model).__name__, "monitor": True, "warnings": list(self.warnings),
                "samples": f"the training batches of {checks.steps_text(last.first_step, last.step)}"}  # fmt: skip
        return Report.build(self.last_health.values(), meta=meta)

    def findings(self, *, rules: RuleSet | None = None, config: RulesConfig | None = None) -> list[Finding]:
        """The built-in rules and the timeline rules over the last window and the whole timeline, with the
        learning rate and optimizer read from ``optimizer``. Most severe first. Their fixes are checked against
        the model; no ``deadneuron patch`` command is written (none names a model trained in a loop)."""
        from deadneuron.rules import PatchTarget, evaluate
        from deadneuron.rules.timeline_rules import monitor_context, monitor_rules

        context = monitor_context(self.entries, learning_rate=self.learning_rate, optimizer=self.optimizer_name,
                                  steps=self._step, model=self.model)  # fmt: skip
        return evaluate(self.report(), context, rules=rules if rules is not None else monitor_rules(), config=config,
                        target=PatchTarget())  # fmt: skip


__all__ = ["Monitor", "SnapshotWriter"]
