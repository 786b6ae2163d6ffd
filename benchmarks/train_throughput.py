"""Training throughput of the bundled ARC slot model, in grids per second, at one and two threads.

    python benchmarks/train_throughput.py [--steps 40] [--threads 1 2] [--config BATCH_NORM=false ...]

Times ``train_step`` (forward, loss, backward, Adam) over the same size-grouped batches of the
config's training grids that ``train`` uses, after a short warm-up; also times eval-mode inference over
the same batches. Prints a table; asserts nothing (timings on a shared machine vary, compare ratios).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from arc_model import data
from arc_model.config import TrainConfig
from arc_model.model import build_model
from arc_model.train import train_step


def batches(cfg: TrainConfig, count: int) -> list[data.GridBatch]:
    grids = data.training_grids(cfg.NUM_GRIDS, cfg.SEED)
    epochs = (list(data.epoch_batches(grids, cfg.BATCH_SIZE, seed=cfg.SEED, epoch=e)) for e in itertools.count())
    return list(itertools.islice(itertools.chain.from_iterable(epochs), count))


def train_rate(cfg: TrainConfig, work: list[data.GridBatch], warmup: int) -> float:
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LEARNING_RATE)
    for batch in work[:warmup]:
        train_step(model, optimizer, batch)
    start = time.perf_counter()
    for batch in work[warmup:]:
        train_step(model, optimizer, batch)
    return sum(len(b) for b in work[warmup:]) / (time.perf_counter() - start)


def inference_rate(cfg: TrainConfig, work: list[data.GridBatch]) -> float:
    model = build_model(cfg).eval()
    with torch.no_grad():
        model(work[0].x)
        start = time.perf_counter()
        for batch in work:
            model(batch.x)
    return sum(len(b) for b in work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many measurements")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = TrainConfig().with_overrides(args.config)
    work = batches(cfg, args.warmup + args.steps)
    print(f"config: BATCH_NORM={cfg.BATCH_NORM} BATCH_SIZE={cfg.BATCH_SIZE} NUM_GRIDS={cfg.NUM_GRIDS}; "
          f"{args.steps} timed steps, median of {args.repeats}")
    print(f"{'threads':>7}  {'train grids/s':>13}  {'inference grids/s':>17}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        train_gps = statistics.median(train_rate(cfg, work, args.warmup) for _ in range(args.repeats))
        infer_gps = statistics.median(inference_rate(cfg, work) for _ in range(args.repeats))
        print(f"{threads:>7}  {train_gps:>13.1f}  {infer_gps:>17.1f}")


if __name__ == "__main__":
    main()
