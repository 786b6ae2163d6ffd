"""pandas DataFrames of a Report: one row per site, or one row per (site, channel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deadneuron.report import Report

if TYPE_CHECKING:
    import pandas as pd

_SITE_COLUMNS = (
    "name", "kind", "channels", "channel_axis", "axis_source", "masked", "excluded", "sparsity",
    "flat_fraction", "nonfinite", "mean", "std", "min", "max",
)  # fmt: skip


def sites_frame(report: Report) -> pd.DataFrame:
    """One row per site: the columns of `_SITE_COLUMNS` plus dead and dormant channel counts."""
    import pandas as pd

    rows = [
        {**{c: getattr(s, c) for c in _SITE_COLUMNS}, "dead": len(s.dead_channels), "dormant": len(s.dormant_channels)}
        for s in report.sites.values()
    ]
    return pd.DataFrame(rows)


def channels_frame(report: Report) -> pd.DataFrame:
    """One row per (site, channel): zero and flat fractions, dead/dormant flags, counts and moments."""
    import pandas as pd

    rows = []
    for s in report.sites.values():
        dead, dormant = set(s.dead_channels), set(s.dormant_channels)
        for c in range(s.channels):
            rows.append(
                {
                    "site": s.name, "channel": c, "sparsity": s.channel_zero[c],
                    "flat_fraction": s.channel_flat[c], "dead": c in dead, "dormant": c in dormant,
                    "nonfinite": s.channel_nonfinite[c], "mean": s.channel_mean[c],
                    "std": s.channel_std[c], "min": s.channel_min[c], "max": s.channel_max[c],
                }
            )  # fmt: skip
    return pd.DataFrame(rows)
