"""The probe: hooks that find activation call sites in a running model and measure them.

`Recorder` (recorder.py) owns every hook; `layout` decides each site's channel axis; `functional` finds
functional activation calls; `site` holds per-site state and naming; `leaves` and `modestack` are the
plumbing that keeps the functional probe cheap.
"""

from deadneuron.probe.axisrules import AxisSource
from deadneuron.probe.layout import AxisTracker
from deadneuron.probe.recorder import Recorder
from deadneuron.probe.site import SiteResult

__all__ = ["AxisSource", "AxisTracker", "Recorder", "SiteResult"]
