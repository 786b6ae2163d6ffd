"""`deadneuron audit` under torchrun (2 gloo ranks on CPU) prints the one report a single process prints,
and batches are shared out by rank the way the single process would have read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from deadneuron.cli import app
from deadneuron.cli._launch import Shard
from tests import dist_helpers as h

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints" / "slot_attention.pth"
ARGS = ["audit", str(CKPT), "--batches", "4", "--format", "json", "--max-dead", "0"]


def test_torchrun_audit_prints_the_single_process_report_once() -> None:
    single = CliRunner().invoke(app, ARGS)
    assert single.exit_code == 1, single.stderr  # the checkpoint has dead channels: the gate fails
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deadneuron", *ARGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode != 0 and "health gate failed" in run.stderr, run.stderr[-2000:]
    assert run.stderr.count("health gate failed") == 1  # one rank speaks
    merged, want = json.loads(run.stdout), json.loads(single.stdout)  # one JSON document: printed once
    # counts exactly, moments to 1e-12 relative, with the default (C) kernel on each rank
    assert merged["meta"]["kernels"] == want["meta"]["kernels"]
    h.same_figures(h.figures(merged), h.figures(want), rel=1e-12)
    for key in ("batches", "samples", "mask", "warnings", "source"):
        assert merged["meta"][key] == want["meta"][key], key
    assert merged["meta"]["distributed"] == {"world_size": 2, "rank_batches": [2, 2]}


def test_batches_are_strided_by_rank_within_the_first_n() -> None:
    stream = list(range(11))
    assert [list(Shard(r, 3).take(iter(stream), 7, sharded=False)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(Shard(1, 2).take(iter(stream), None, sharded=False)) == [1, 3, 5, 7, 9]
    assert list(Shard(3, 4).take(iter(stream), 2, sharded=False)) == []  # --batches 2 leaves rank 3 none
    # a source that took rank and world_size yields its own share: --batches caps it at its part of the first N
    assert list(Shard(1, 3).take(iter([1, 4, 7, 10]), 7, sharded=True)) == [1, 4]
    assert list(Shard(0, 1).take(iter(stream), 3, sharded=False)) == [0, 1, 2]


def test_sources_that_take_rank_and_world_size_are_asked_for_their_share() -> None:
    def own(rank: int, world_size: int) -> list[int]:
        return list(range(rank, 10, world_size))

    def anything(**kwargs: int) -> list[int]:
        return []

    def plain() -> list[int]:
        return []

    shard = Shard(1, 2)
    assert shard.kwargs_for(own) == shard.kwargs_for(anything) == {"rank": 1, "world_size": 2}
    assert shard.kwargs_for(plain) == {} and Shard().kwargs_for(own) == {}
