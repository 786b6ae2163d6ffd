"""The two golden reports in tests/golden/ are real audits, not hand-written values: the bundled demo
checkpoints (A: the sick one, B: the healthy one) audited on a fixed set of 100 held-out grids, with the
rule engine. The renderers' golden files (.md, .terminal.txt) are drawn from them.

Regenerate both after an intended change of the measurement or of the rules, then review the diff:

    python -m tests.golden_reports          # rewrites tests/golden/report_{a,b}.json
    DEADNEURON_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py   # the renderings of them

`tests/test_golden_reports.py` checks that the stored reports equal fresh audits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import deadneuron

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SOURCES = {"a": "checkpoints/slot_attention.pth", "b": "checkpoints/slot_attention_healthy.pth"}
GRIDS = 100
# meta that says where and how the audit ran, not what it measured
VOLATILE_META = ("kernels", "device")


def build(name: str) -> deadneuron.Report:
    """A fresh audit of golden report ``name`` ("a" or "b")."""
    from deadneuron.adapters import get_adapter
    from deadneuron.checkpoint import load_checkpoint

    source = SOURCES[name]
    ckpt = load_checkpoint(ROOT / source)
    adapter = get_adapter(str(ckpt["adapter"]))
    config = {**ckpt["config"], "BATCH_SIZE": 25}
    batches = list(adapter.batches("heldout", config, max_grids=GRIDS))
    model = adapter.load(ckpt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model's own sums in one order, whatever the machine's cores: the figures to 1e-9
    try:
        report = deadneuron.audit(
            model, batches, adapter=adapter, progress=False, checkpoint=ckpt, meta={"source": source}
        )
    finally:
        torch.set_num_threads(threads)
    return report.with_meta(**{k: "-" for k in VOLATILE_META})


def stable(report: dict[str, Any]) -> dict[str, Any]:
    """A report dict without the meta that depends on the machine."""
    return {**report, "meta": {k: v for k, v in report["meta"].items() if k not in VOLATILE_META}}


def main() -> None:
    for name in SOURCES:
        path = GOLDEN / f"report_{name}.json"
        path.write_text(build(name).to_json(indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
