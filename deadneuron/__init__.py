"""deadneuron: activation-health auditor for PyTorch.

    import deadneuron
    report = deadneuron.audit(model, batches)
    report.summary.sparsity, report.sites["encoder.bn_layers.2>relu"].dead_channels
"""

from deadneuron.audit import audit
from deadneuron.errors import DeadneuronError, ExitCode
from deadneuron.probe import Recorder
from deadneuron.report import Report, SiteHealth, Summary

__all__ = ["DeadneuronError", "ExitCode", "Recorder", "Report", "SiteHealth", "Summary", "audit"]
__version__ = "0.1.0"
