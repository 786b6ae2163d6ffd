"""Thin layers over `deadneuron.Monitor` (DESIGN section 9): snapshot writers (JSONL, CSV, TensorBoard)
and trainer callbacks, each an optional extra:

* ``deadneuron.integrations.writers``: `JsonlWriter`, `CsvWriter`, `TensorBoardWriter`, `read_log`;
* ``deadneuron.integrations.lightning``: `DeadneuronCallback` for PyTorch Lightning (``deadneuron[lightning]``);
* ``deadneuron.integrations.hf``: `DeadneuronCallback` for the Hugging Face ``Trainer`` (``deadneuron[hf]``).

The callbacks' modules import their framework; nothing here does.
"""

from deadneuron.integrations.writers import (
    CsvWriter,
    JsonlWriter,
    TensorBoardWriter,
    read_log,
    snapshot_metrics,
)

__all__ = ["CsvWriter", "JsonlWriter", "TensorBoardWriter", "read_log", "snapshot_metrics"]
