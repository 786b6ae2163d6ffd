"""deadneuron: activation-health auditor for PyTorch.

    import deadneuron
    report = deadneuron.audit(model, batches)
    report.summary.sparsity, report.sites["encoder.bn_layers.2>relu"].dead_channels
    findings = deadneuron.evaluate(report)                # the rule engine
    deadneuron.assert_healthy(report, max_dead_fraction=0.0)
    model = deadneuron.load_patched("model_patched.pth", build)   # a `deadneuron patch --model` output
    deadneuron.register_activation(MyAct, fn)             # a kind of your own (see deadneuron.registry)

Subpackages: ``deadneuron.rules`` (findings), ``deadneuron.patch`` (plans, surgery, retraining),
``deadneuron.testing`` (assertions; a pytest plugin registers the ``activation_audit`` fixture).
"""

from deadneuron.audit import audit
from deadneuron.errors import DeadneuronError, ExitCode
from deadneuron.patch.saved import load_patched
from deadneuron.probe import Recorder
from deadneuron.registry import ActivationRegistry, register_activation
from deadneuron.render.files import save_report
from deadneuron.render.frames import channels_frame, sites_frame
from deadneuron.report import Report, SiteHealth, Summary
from deadneuron.rules import evaluate
from deadneuron.testing import assert_healthy, assert_sparsity_below

__all__ = [
    "ActivationRegistry",
    "DeadneuronError",
    "ExitCode",
    "Recorder",
    "Report",
    "SiteHealth",
    "Summary",
    "assert_healthy",
    "assert_sparsity_below",
    "audit",
    "channels_frame",
    "evaluate",
    "load_patched",
    "register_activation",
    "save_report",
    "sites_frame",
]
__version__ = "0.1.0"
