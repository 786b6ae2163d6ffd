"""The observer seam: code that sees each site's tensors beside the Recorder's own statistics.

A `SiteObserver` passed to `Recorder(observer=...)` is called inside the hooks, with ``__torch_function__``
handling off: ``before(site, z)`` with the pre-activation as the activation receives it (before an
in-place call overwrites it), ``after(site, a)`` with the output. The training monitor uses it to
register gradient hooks on ``z`` and to sum ``|a|`` per channel. An observer follows the hook rules: it
returns None, keeps no tensor of the forward pass, and never synchronises with the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from deadneuron.probe.site import Site


class SiteObserver(Protocol):
    def before(self, site: Site, z: torch.Tensor) -> None: ...

    def after(self, site: Site, a: torch.Tensor) -> None: ...
