"""The audit: measure a model on data (`deadneuron.measure`) and judge what was measured (`deadneuron.rules`):
one Report with its findings, each fix checked against the model it would patch.

The model is left exactly as it was found (see `deadneuron.measure`), also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deadneuron._inputs import default_forward, model_device, to_device
from deadneuron._kept import kept_tensors
from deadneuron.adapters import Feed
from deadneuron.errors import UsageError
from deadneuron.measure import ProgressBar, measure
from deadneuron.probe.masks import AUTO, MaskSpec
from deadneuron.registry import ActivationRegistry
from deadneuron.report import Report
from deadneuron.rules import PatchTarget, RulesConfig, RuleSet, attach_findings
from deadneuron.wrappers import full_parameters, sharded


def audit(
    model: nn.Module,
    data: Iterable[Any],
    *,
    eps: float = 0.0,
    delta: float = 0.05,
    select: Sequence[str] | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: ProgressBar | None = None,
    adapter: Feed | None = None,
    functional: bool = True,
    compile: bool = True,
    histograms: bool = False,
    meta: Mapping[str, Any] | None = None,
    activations: ActivationRegistry | None = None,
    mask: MaskSpec = AUTO,
    channel_axis: Mapping[str, int | None] | None = None,
    mask_dims: Mapping[str, Sequence[int]] | None = None,
    rules: bool | RuleSet = True,
    rules_config: RulesConfig | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    patch_target: PatchTarget | None = None,
    distributed: bool = True,
) -> Report:
    """Audit ``model`` on ``data`` and return a Report (see DESIGN section 3 for every figure).

    ``data`` yields batches: a tensor, a tuple/list whose first element is the input, or a dict of
    keyword arguments (with ``adapter``, whatever the adapter's ``forward`` takes). ``select`` limits
    the sites (globs over names, or kinds such as ``gelu``). ``compile``: the fast statistics kernels (the
    compiled C pass on CPU, else `torch.compile`, falling back to eager torch where neither runs);
    False runs the eager torch reference. ``report.meta["kernels"]`` says which ran and why.
    ``progress``: a `deadneuron.measure.ProgressBar` told of every batch (the command line draws a terminal
    bar, `deadneuron.render.progress.audit_bar`); None (the default) draws nothing.
    ``histograms`` also counts every activation value into fixed signed-log bins per site (for plots;
    it costs a few passes per batch). ``activations``: the registry of the user's own kinds
    (default: the one `deadneuron.register_activation` writes).

    Unknown activations (modules or functions that look like one but are no recognised kind) are
    named in ``report.meta["warnings"]``. An audit that measured no site, or whose ``select`` matched
    none, raises UsageError: no gate or assertion can pass on nothing.

    ``mask`` says which positions of a batch are padding, to leave out of every statistic (DESIGN
    section 3, "Masks: padding is not data"). ``"auto"`` (the default): the adapter's position mask
    where it has one (the ARC adapter: the valid grid cells); else, for dict batches, the
    ``"attention_mask"`` when its shape (N, L) is the leading shape of ``"input_ids"`` (else of
    ``"inputs_embeds"``, else of the batch's first other tensor) and it holds only 0/1; else none.
    A ``str``: that key of dict batches; ``"~key"`` inverts a mask that is True at padding (PyTorch's
    ``src_key_padding_mask``); ``"len:key"`` builds the (N, L) mask from that key's (N,) per-sample
    lengths, L read from the batch's data tensor (`deadneuron.probe.lengths`). A callable:
    ``batch -> tensor``, bool or 0/1 of shape (N, positions...), True where the batch holds data. ``None``: no mask, padding counts as data.
    A mask applies at every site whose dims other than the channel begin with the mask's shape
    (tokens (N, L, C) under (N, L); conv maps (N, C, H, W) under (N, H, W)), or with its positions then
    N (sequence first: (L, N, C) under (N, L)); statistics there cover the valid positions only and
    equal those of the same data unpadded. Each site says whether it was masked and how many elements
    per channel were excluded; ``report.meta["mask"]`` names the mask. A mask that does not fit the
    batch, or that was asked for and fits no site, is a UsageError. Where both placements fit a site
    (a sequence-first layer with as many samples as positions: N == L) and no other batch told which,
    batch first is used and a warning names the site; ``mask_dims`` states it per site glob: the
    site's dims under the mask's dims, in the mask's order (``{"encoder.*": (1, 0)}`` for (L, N, C)).
    ``report.meta["mask_dims"]`` lists the sites where a placement was chosen other than batch first
    by the shapes (sequence first, stated, guessed, or misplaced on some batches).

    ``channel_axis`` sets the channel dim of the sites matching each glob
    (``{"block.relu": 1}``; negative dims count from the end) where it cannot be derived from a layer;
    None says the input has no channel dim (``{"gate": None}``: one channel over all its elements).

    ``rules``: evaluate the rule engine and put its findings (``deadneuron.rules.Finding``, most severe
    first) in ``report.findings`` -- True for the built-in and installed rules, a ``RuleSet`` for those,
    False for none. ``rules_config``: thresholds and disabled rules (default: pyproject.toml's
    ``[tool.deadneuron.rules]`` above the working folder, as the CLI reads it). ``checkpoint``: what the
    training run knows (a deadneuron checkpoint dict: config, history, health timeline, optimizer
    state), for the rules that read it. ``patch_target``: the subject ``deadneuron patch`` would patch
    (the CLI passes the audited checkpoint and its flags, so each finding's commands run as printed);
    by default fixes are checked against module surgery on ``model`` and no command is written.

    ``distributed``: where a torch.distributed process group with more than one rank is initialised,
    every rank audits its own shard of the data and the ranks merge their statistics exactly
    (`deadneuron.distributed`): every rank returns the same Report, equal to one process's audit of
    all the shards (``report.meta["distributed"]`` gives the batches per rank). Every rank must call
    it. ``False`` audits this rank's shard alone. A model inside DistributedDataParallel or
    torch.compile is audited as the module inside (``report.meta["notes"]`` says so).
    """
    measured = measure(model, data, eps=eps, delta=delta, select=select, max_batches=max_batches, device=device,
                       progress=_progress(progress), adapter=adapter, functional=functional, compile=compile,
                       histograms=histograms, meta=meta, activations=activations, mask=mask,
                       channel_axis=channel_axis, mask_dims=mask_dims, distributed=distributed)  # fmt: skip
    if rules is False:
        return measured.report
    ruleset = None if rules is True else rules
    forward = adapter.forward if adapter is not None else default_forward
    target = patch_target if patch_target is not None else _surgery_target(measured.model, measured.example, forward)
    with full_parameters(measured.model), kept_tensors(measured.model):  # the rules read weights (FSDP: gathered
        # whole); a fix is checked on one forward pass, whose caches are not left on the model
        return attach_findings(measured.report, checkpoint, model=measured.model, rules=ruleset,
                               config=_rules_config(ruleset, rules_config), target=target)  # fmt: skip


def _progress(progress: ProgressBar | None) -> ProgressBar | None:
    """``progress`` checked: a bar to draw is the caller's (the command line supplies one)."""
    if progress is None or progress is False:
        return None
    if not callable(progress):
        raise UsageError(f"progress takes a ProgressBar (see deadneuron.measure) or None, not {progress!r}: "
                         "the command line draws its bar with deadneuron.render.progress.audit_bar")  # fmt: skip
    return progress


def _surgery_target(model: nn.Module, example: Any, forward: Any) -> PatchTarget:
    """Fixes for ``model`` in Python: module surgery, checked on the audit's first batch; no command line."""
    from deadneuron.reach import ModelPreview

    def run(m: nn.Module, batch: Any) -> Any:
        return forward(m, to_device(batch, model_device(m)))

    # an FSDP model's forward is a collective: one the rules ran on some ranks only would hang the others
    no_pass = "the model is FSDP-sharded: the layers around the dead channels are not traced" if sharded(model) else ""
    return PatchTarget(preview=ModelPreview(model, example, forward=run, no_pass=no_pass))


def _rules_config(rules: RuleSet | None, config: RulesConfig | None) -> RulesConfig:
    if config is not None:
        return config
    from deadneuron.rules import load_rules
    from deadneuron.settings import load_config

    return load_config(rules=rules if rules is not None else load_rules())
