"""What the monitor says about a snapshot beyond its figures: sites that saw nothing in a window (once per
site), and snapshots taken before the loop ever called ``mon.step()``."""

from __future__ import annotations

from deadneuron.measure import empty_sites_warning
from deadneuron.snapshot import Snapshot


class EmptySites:
    """The audit's warning for the sites that ran in a window but saw no element, once per site (an expert no
    token was routed to in a window is routine); None where no new site did."""

    def __init__(self) -> None:
        self.noted: set[str] = set()

    def __call__(self, snap: Snapshot) -> str | None:
        empty = [name for name, s in snap.sites.items() if not s.n and name not in self.noted]
        self.noted.update(empty)
        first, last = snap.first_step, snap.step - 1
        window = f"steps {first}-{last}" if last > first else f"step {first}"
        return empty_sites_warning(empty, where=f"in the window of {window}", advice="train on data that reaches "
                                   "them (said once per site, not per window)") if empty else None  # fmt: skip


def never_stepped(snap: Snapshot) -> str:
    return (f"a snapshot was taken before any call of mon.step(): every snapshot stays at step {snap.step} until "
            "the loop calls it after each optimizer step")  # fmt: skip
