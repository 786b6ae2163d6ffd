"""The arms x seeds runs of a verification, one after another or spread over worker processes.

A run (one arm, one seed) depends on its config, seed and starting weights only: the adapter seeds
everything from the config, and the run starts from ``init`` or from scratch. So it gives the same
checkpoint and report in any process, provided it runs with the same number of torch threads: every
run gets ``options.threads`` whether it runs here (``workers`` 1) or in a worker (None: here, as this
process has; in a worker, 1). The command line gives every run ``--threads`` (default 1), so
``--workers 1`` and ``--workers N`` give the same table.

Workers are spawned (`torch.multiprocessing`'s "spawn" context: no fork of a process that holds
OpenMP threads), one run at a time each, taking the runs in order; results come back in the order of
the sequential loop, and each is announced as it starts. What crosses a process boundary is serialised with `torch.save` (checkpoints as
they are, reports as `Report.to_dict`), not shared memory.

Under torchrun (``options.world_size`` > 1, the default process group initialised) run i goes to rank
``i % world_size``; each rank trains and audits its share (one after another, or on its own
``options.workers`` processes), then every rank gathers every run (`all_gather_object`), so each holds
the list the sequential loop gives. A rank whose runs failed makes every rank raise, naming it.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deadneuron.errors import AuditRuntimeError, UsageError

if TYPE_CHECKING:
    from deadneuron.adapters import Adapter
    from deadneuron.patch.estimate import Estimator
    from deadneuron.patch.retrain import Budget, Options, Run


@dataclass(frozen=True)
class Job:
    """One training run: an arm's config for one seed, from ``init`` (None: from scratch)."""

    arm: str
    seed: int
    config: Mapping[str, Any]
    init: Mapping[str, Any] | None = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_jobs(
    adapter: Adapter, jobs: Sequence[Job], budget: Budget, options: Options, *, estimate: Estimator | None = None
) -> list[Run]:
    """Every job trained and audited, in order: here one after another (``options.workers`` 1, or a
    single job; ``estimate`` then times the first steps and says how long the rest will take), else on
    ``options.workers`` spawned processes."""
    if options.world_size > 1:
        return _over_ranks(adapter, jobs, budget, options)
    workers = min(options.workers, len(jobs))
    if workers <= 1:
        return [_here(adapter, job, budget, options, i, len(jobs), estimate) for i, job in enumerate(jobs)]
    return _spread(adapter, jobs, budget, options, workers, estimate)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _here(
    adapter: Adapter, job: Job, budget: Budget, options: Options, index: int, total: int, estimate: Estimator | None
) -> Run:
    from deadneuron.patch.retrain import Run, audit_run, seeded, train_run

    options.say(f"[{index + 1}/{total}] training the {job.arm} config, seed {job.seed}")
    if estimate is not None:
        estimate.run_started(index)
    with _threads(options.threads):
        with torch.random.fork_rng(devices=[]):
            ckpt = train_run(adapter, seeded(job.config, job.seed), budget, options, init=job.init, estimate=estimate)
        report = audit_run(adapter, ckpt, budget, progress=options.audit_progress)
    if estimate is not None:
        estimate.run_finished(index)
    return Run(job.arm, job.seed, ckpt, report)


def _spread(adapter: Adapter, jobs: Sequence[Job], budget: Budget, options: Options, workers: int,
            estimate: Estimator | None = None) -> list[Run]:  # fmt: skip
    from deadneuron.patch.retrain import Run
    from deadneuron.report import Report

    threads = options.threads or 1
    options.say(f"training {len(jobs)} runs on {workers} worker processes, {threads} thread(s) each")
    context = torch.multiprocessing.get_context("spawn")
    payload = _dumps((adapter, budget), what=f"the adapter {type(adapter).__name__}")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,)) as pool:
        pending: dict[Any, int] = {}
        done: dict[int, tuple[Any, Any]] = {}
        order = iter(range(len(jobs)))

        def start_next() -> None:  # at most `workers` runs in flight: a run starts when it is submitted
            i = next(order, None)
            if i is not None:
                options.say(f"[{i + 1}/{len(jobs)}] training the {jobs[i].arm} config, seed {jobs[i].seed}")
                pending[pool.submit(_remote, payload, _dumps(jobs[i], what="a run"))] = i

        began = time.monotonic()
        for _ in range(workers):
            start_next()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i = pending.pop(future)
                done[i] = _loads(_result(future, jobs[i]))
                if estimate is not None:
                    estimate.spread_run_finished(time.monotonic() - began, workers=workers)
                start_next()
    return [Run(job.arm, job.seed, done[i][0], Report.from_dict(done[i][1])) for i, job in enumerate(jobs)]


def _over_ranks(adapter: Adapter, jobs: Sequence[Job], budget: Budget, options: Options) -> list[Run]:
    """This rank's share of ``jobs`` (every world_size-th from its rank on), then every rank's gathered."""
    import dataclasses

    import torch.distributed as dist

    from deadneuron.patch.retrain import Run
    from deadneuron.report import Report

    rank, world = options.rank, options.world_size
    mine = list(range(rank, len(jobs), world))
    options.say(f"training {len(jobs)} runs on {world} ranks, run i on rank i % {world}, "
                f"{options.threads or 1} thread(s) each")  # fmt: skip
    try:
        if options.workers > 1 and len(mine) > 1:
            local = _spread(adapter, [jobs[i] for i in mine], budget, options, min(options.workers, len(mine)))
        else:
            alone = dataclasses.replace(options, world_size=1)
            local = [_here(adapter, jobs[i], budget, alone, i, len(jobs), None) for i in mine]
        share: tuple[Any, ...] = ("ok", [(i, _dumps((r.checkpoint, r.report.to_dict()), what="a run"))
                                         for i, r in zip(mine, local, strict=True)])  # fmt: skip
        failure: BaseException | None = None
    except Exception as exc:  # every rank must reach the gather, or the others wait for it
        share, failure = ("failed", rank, type(exc).__name__, (str(exc).strip().splitlines() or [""])[0]), exc
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, share)
    if failure is not None:
        raise failure
    failed = [g for g in gathered if g[0] == "failed"]
    if failed:
        _, who, name, message = failed[0]
        raise AuditRuntimeError(f"rank {who} failed while training its runs: {name}: {message}")
    done = {i: _loads(data) for _, pairs in gathered for i, data in pairs}
    return [Run(job.arm, job.seed, done[i][0], Report.from_dict(done[i][1])) for i, job in enumerate(jobs)]


def _result(future: Any, job: Job) -> bytes:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise AuditRuntimeError(f"the worker process training the {job.arm} config, seed {job.seed}, died "
                                "(out of memory?); run with fewer --workers") from exc  # fmt: skip


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _remote(payload: bytes, job_bytes: bytes) -> bytes:
    """In a worker: one job, its checkpoint and report serialised."""
    from deadneuron.patch.retrain import Options, audit_run, seeded, train_run

    adapter, budget = _loads(payload)
    job: Job = _loads(job_bytes)
    with torch.random.fork_rng(devices=[]):
        ckpt = train_run(adapter, seeded(job.config, job.seed), budget, Options(), init=job.init)
    report = audit_run(adapter, ckpt, budget, progress=None)
    return _dumps((ckpt, report.to_dict()), what="a run's checkpoint")


def _dumps(obj: Any, *, what: str) -> bytes:
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except Exception as exc:  # an adapter that cannot be pickled
        line = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot send {what} to a worker process ({type(exc).__name__}: {line}); "
                         "run with --workers 1") from exc  # fmt: skip
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)  # written by this program, in this run


__all__ = ["Job", "available_cores", "run_jobs"]
