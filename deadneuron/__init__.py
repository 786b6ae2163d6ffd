"""deadneuron: activation-health auditor for PyTorch.

    import deadneuron
    report = deadneuron.audit(model, batches)
    report.summary.sparsity, report.sites["encoder.bn_layers.2>relu"].dead_channels
    findings = deadneuron.evaluate(report)                # the rule engine
    deadneuron.assert_healthy(report, max_dead_fraction=0.0)
    model = deadneuron.load_patched("model_patched.pth", build)   # a `deadneuron patch --model` output
    deadneuron.register_activation(MyAct, fn)             # a kind of your own (see deadneuron.registry)
    with deadneuron.Monitor(model, every=100) as mon:     # health during training, in your own loop
        ...; mon.step()

Subpackages: ``deadneuron.rules`` (findings), ``deadneuron.patch`` (plans, surgery, retraining),
``deadneuron.testing`` (assertions; a pytest plugin registers the ``activation_audit`` fixture),
``deadneuron.integrations`` (monitor writers; Lightning and Hugging Face callbacks).
"""

from deadneuron.audit import audit
from deadneuron.errors import DeadneuronError, ExitCode
from deadneuron.monitor import Monitor
from deadneuron.patch.saved import load_patched
from deadneuron.probe import Recorder
from deadneuron.registry import ActivationRegistry, register_activation
from deadneuron.render.files import save_report
from deadneuron.render.frames import channels_frame, sites_frame
from deadneuron.report import Report, SiteHealth, Summary
from deadneuron.rules import evaluate
from deadneuron.snapshot import SiteSnapshot, Snapshot
from deadneuron.testing import assert_healthy, assert_sparsity_below

__all__ = [
    "ActivationRegistry",
    "DeadneuronError",
    "ExitCode",
    "Monitor",
    "Recorder",
    "Report",
    "SiteHealth",
    "SiteSnapshot",
    "Snapshot",
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
