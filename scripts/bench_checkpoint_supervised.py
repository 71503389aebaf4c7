"""Checkpoint overhead of `crl supervised` runs, as a share of wall time, and checkpoint sizes.

Runs the same supervised run (default: permuted-MNIST, 10 tasks, EWC, the project's defaults:
400-400 MLP, 1 epoch, batch 128) through :func:`crl.supervised.experiment.run_experiment`
in three arms, interleaved over ``--repeats`` rounds so that drifts in machine load hit every
arm alike:

- ``none``: no checkpoints (``checkpoints=False``);
- ``boundaries``: ``checkpoint_every=0``, one checkpoint per task boundary;
- ``every-N``: the default interval (``--every``, default 500 updates) plus boundaries.

Two measures of the overhead: (1) the time spent inside checkpointing (building the payload
and ``save_checkpoint``, timed around each call) as a share of the run's wall time, which is
immune to load noise; (2) the difference of median wall times against ``none``. It also
prints the size of every checkpoint written (EWC's separate mode keeps a Fisher and an
anchor per finished task, so the file grows with the task count).

Data: the four MNIST IDX files in ``$CRL_DATA_DIR`` (e.g. ../shared/data/mnist-10k).

    CRL_DATA_DIR=../shared/data/mnist-10k python scripts/bench_checkpoint_supervised.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _instrument() -> dict[str, list[float]]:
    """Time every payload build and every checkpoint write of the runs that follow."""
    import crl.supervised.experiment as experiment
    from crl.supervised.trainer import _Run

    log: dict[str, list[float]] = {"payload_s": [], "save_s": [], "bytes": []}
    real_payload, real_save = _Run.payload, experiment.save_checkpoint

    def payload(self, optimizer, position):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return real_payload(self, optimizer, position)
        finally:
            log["payload_s"].append(time.perf_counter() - start)

    def save(path, state):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        size = real_save(path, state)
        log["save_s"].append(time.perf_counter() - start)
        log["bytes"].append(size)
        return size

    _Run.payload = payload  # type: ignore[method-assign]
    experiment.save_checkpoint = save
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--benchmark", default="permuted-mnist")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--method", default="ewc")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--every", type=int, default=None,
                   help="checkpoint interval in updates [TrainerConfig's default]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--data-dir", default=None, help="[$CRL_DATA_DIR]")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    from crl.supervised.experiment import SupervisedConfig, build_benchmark, run_experiment
    from crl.supervised.trainer import TrainerConfig

    every = TrainerConfig().checkpoint_every if args.every is None else args.every
    torch.set_num_threads(args.threads)

    def config(interval: int) -> SupervisedConfig:
        return SupervisedConfig(
            benchmark=args.benchmark, tasks=args.tasks, method=args.method, seed=0,
            data_dir=args.data_dir, download=False, wandb="disabled",
            trainer=TrainerConfig(epochs=args.epochs, progress=False, checkpoint_every=interval),
        )

    benchmark = build_benchmark(config(every))
    log = _instrument()
    arms = {"none": (0, False), "boundaries": (0, True), f"every-{every}": (every, True)}
    walls: dict[str, list[float]] = {a: [] for a in arms}
    inside: dict[str, list[float]] = {a: [] for a in arms}
    sizes: list[int] = []
    updates = 0
    for rep in range(args.repeats):
        for arm, (interval, checkpoints) in arms.items():
            for values in log.values():
                values.clear()
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                res = run_experiment(config(interval), benchmark=benchmark,
                                     run_dir=Path(tmp) / "run", checkpoints=checkpoints)
                wall = time.perf_counter() - start
            walls[arm].append(wall)
            inside[arm].append(sum(log["payload_s"]) + sum(log["save_s"]))
            updates = res.result.updates
            if arm.startswith("every") and rep == 0:
                sizes = list(log["bytes"])
            print(f"round {rep + 1} {arm:>12}: {wall:7.2f} s wall, "
                  f"{len(log['save_s'])} checkpoints, {inside[arm][-1]:.3f} s inside them",
                  flush=True)

    base = statistics.median(walls["none"])
    out: dict[str, Any] = {
        "benchmark": args.benchmark, "tasks": args.tasks, "method": args.method,
        "epochs": args.epochs, "updates": updates, "threads": args.threads,
        "repeats": args.repeats, "interval": every, "arms": {},
        "checkpoint_mb": [round(b / 2**20, 2) for b in sizes],
    }
    print(f"\n{args.method} on {args.benchmark}, {args.tasks} tasks, {updates} updates, "
          f"{args.threads} torch thread(s), median of {args.repeats}:")
    print(f"{'arm':>14} | wall s | inside checkpoints s | share of wall | wall vs none")
    for arm in arms:
        wall = statistics.median(walls[arm])
        ins = statistics.median(inside[arm])
        share = ins / wall
        delta = (wall - base) / base
        out["arms"][arm] = {"wall_s": walls[arm], "inside_s": inside[arm],
                            "median_wall_s": wall, "median_inside_s": ins,
                            "share_of_wall": share, "wall_vs_none": delta}
        print(f"{arm:>14} | {wall:6.2f} | {ins:20.3f} | {100 * share:12.2f}% | "
              f"{100 * delta:+11.2f}%")
    if sizes:
        print(f"checkpoint sizes (MB), in write order: {out['checkpoint_mb']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
