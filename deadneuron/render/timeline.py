"""A health timeline as a pandas DataFrame: one row per (step, site).

Reads health-timeline entries (``{"step", "sites": {site: {...}}}``): the training monitor's
(`deadneuron.snapshot.Snapshot.to_dict`, also read back from its JSONL/CSV logs) or a checkpoint's.
A figure an entry lacks is NaN in its column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

ENTRY_COLUMNS = ("step", "first_step", "sampled_steps", "learning_rate")
SITE_COLUMNS = (
    "kind", "channels", "n", "dead", "dormant", "flat_fraction", "sparsity", "nonfinite", "abs_mean", "abs_max",
    "tau", "tau_dormant", "grad_elements", "grad_nonzero", "grad_abs_mean", "not_learning",
)  # fmt: skip
_COUNTED = {"dead": "dead_channels", "dormant": "dormant_channels", "tau_dormant": "tau_dormant_channels",
            "not_learning": "not_learning_channels"}  # fmt: skip


def _value(site: Mapping[str, Any], column: str) -> Any:
    value = site.get(column)
    if value is None and column in _COUNTED and isinstance(site.get(_COUNTED[column]), Sequence):
        value = len(site[_COUNTED[column]])
    if value is None:
        return "" if column == "kind" else math.nan
    return value


def timeline_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `timeline_frame` as plain dicts."""
    rows = []
    for index, entry in enumerate(entries):
        head = {c: entry.get(c) for c in ENTRY_COLUMNS}
        head["step"] = entry.get("step", index)
        sites = entry.get("sites")
        for name, site in (sites.items() if isinstance(sites, Mapping) else ()):
            if isinstance(site, Mapping):
                rows.append({**head, "site": name, **{c: _value(site, c) for c in SITE_COLUMNS}})
    return rows


def timeline_frame(entries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (step, site): the columns ``ENTRY_COLUMNS``, ``site``, then ``SITE_COLUMNS``."""
    import pandas as pd

    return pd.DataFrame(timeline_rows(entries), columns=[*ENTRY_COLUMNS, "site", *SITE_COLUMNS])


__all__ = ["ENTRY_COLUMNS", "SITE_COLUMNS", "timeline_frame", "timeline_rows"]
