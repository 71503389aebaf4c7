"""One supervised run from a resolved config: data, benchmark, model, strategy, tracking.

The CLI, the benchmark script and the tests all go through :func:`run_experiment`, so a
run started any of these ways writes the same run directory and W&B run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl import metrics
from crl.plots import plot_average_and_forgetting
from crl.strategies import make_strategy, strategy_class
from crl.supervised.benchmarks import Benchmark, make_benchmark
from crl.supervised.mnist import MNIST, load_mnist
from crl.supervised.models import MLPClassifier
from crl.supervised.trainer import (
    SupervisedResult,
    TrainerConfig,
    run_joint,
    run_sequence,
)
from crl.tracking import RunTracker

JOINT = "joint"

#: Supervised defaults for options the user leaves unset. Strengths were picked once on
#: permuted-MNIST (seed 0, mnist-10k, 1 epoch, 400-400 MLP) from small grids (L2, MAS: 1,
#: 0.1, 0.01; EWC: 1000, 100, 30, 10; online EWC: 300, 30); importance uses 256 samples
#: per task (the exact true Fisher over 10 classes costs ~10 per-sample gradients each).
SUPERVISED_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2": {"lam": 0.01},
    "ewc": {"lam": 10.0, "max_samples": 256},
    "mas": {"lam": 0.01, "max_samples": 256},
    "packnet": {"retrain_steps": 100},
    "agem": {"memory_per_task": 256, "batch_size": 256},
    "replay": {"memory_size": 1000, "batch_size": 128},
}


def method_options_for(config: SupervisedConfig, n_tasks: int) -> dict[str, Any]:
    """The method's constructor options: defaults < user options; task count and seed."""
    options = SUPERVISED_METHOD_DEFAULTS.get(config.method, {}) | config.method_options.get(
        config.method, {}
    )
    return {"num_tasks": n_tasks, "seed": config.seed} | options


@dataclass
class SupervisedConfig:
    """Everything a supervised run depends on; saved verbatim as the run's config."""

    benchmark: str = "split-mnist"
    scenario: str | None = None
    tasks: int | None = None
    method: str = "finetune"
    seed: int = 0
    hidden: tuple[int, ...] = (400, 400)
    activation: str = "relu"
    train_per_task: int | None = None
    data_dir: str | None = None
    download: bool = True
    run_dir: str = "runs"
    wandb: str = "offline"
    wandb_project: str = "crl"
    group: str | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    #: per-method constructor options, e.g. {"ewc": {"lam": 100.0, "mode": "online"}}
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method != JOINT:
            strategy_class(self.method)  # unknown names fail before any work is done
        if self.wandb not in ("offline", "online", "disabled"):
            raise ValueError(
                f"wandb mode must be offline, online or disabled, got {self.wandb!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExperimentResult:
    config: SupervisedConfig
    result: SupervisedResult
    summary: dict[str, Any]
    run_dir: Path


def summarize(result: SupervisedResult) -> dict[str, Any]:
    """Final metrics of a run: average accuracy, forgetting, BWT/FWT (Lopez-Paz & Ranzato)."""
    R = result.matrix
    summary: dict[str, Any] = {
        "method": result.method,
        "avg_acc": float(np.mean(R[-1])),
        "final_acc_per_task": [float(a) for a in R[-1]],
        # joint trains all tasks at once: its one timing is shared by the tasks it covers
        "seconds_per_task": float(np.sum(result.seconds_per_task)) / R.shape[1],
        "seconds_total": float(np.sum(result.seconds_per_task)),
        "updates": result.updates,
    }
    if R.shape[0] == R.shape[1] and R.shape[0] > 1:
        summary["forgetting"] = float(metrics.average_forgetting(R))
        summary["bwt"] = float(metrics.bwt(R))
        summary["fwt"] = float(metrics.fwt(R, result.initial))
        summary["accuracy_matrix"] = R.tolist()
    else:  # joint training has no sequence, so no forgetting
        summary["forgetting"] = float("nan")
    return summary


def build_benchmark(config: SupervisedConfig, data: MNIST | None = None) -> Benchmark:
    if data is None:
        data = load_mnist(config.data_dir, download=config.download)
    return make_benchmark(
        config.benchmark,
        data,
        num_tasks=config.tasks,
        scenario=config.scenario,
        seed=config.seed,
        train_per_task=config.train_per_task,
    )


def run_experiment(
    config: SupervisedConfig,
    *,
    data: MNIST | None = None,
    benchmark: Benchmark | None = None,
    run_dir: Path | None = None,
) -> ExperimentResult:
    """Run one method on one benchmark with one seed, tracked locally and in W&B."""
    if benchmark is None:
        benchmark = build_benchmark(config, data)
    torch.manual_seed(config.seed)
    model = MLPClassifier(
        in_features=benchmark.tasks[0].train_x[0].numel(),
        hidden=config.hidden,
        n_heads=benchmark.n_heads,
        head_outputs=benchmark.head_outputs,
        activation=config.activation,
    )
    group = config.group or f"{benchmark.name}-{benchmark.scenario}"
    name = f"{config.method}-seed{config.seed}"
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.run_dir) / group / f"{name}-{stamp}-{os.getpid()}"
    resolved = config.to_dict() | {
        "resolved_scenario": benchmark.scenario,
        "resolved_tasks": len(benchmark.tasks),
        "resolved_method_options": (
            {} if config.method == JOINT else method_options_for(config, len(benchmark.tasks))
        ),
    }
    task_names = [t.name for t in benchmark.tasks]
    with RunTracker(
        run_dir,
        resolved,
        wandb_mode=config.wandb,
        project=config.wandb_project,
        group=group,
        name=name,
        job_type="supervised",
    ) as tracker:

        def on_task_end(i: int, accs: np.ndarray, updates: int) -> None:
            row: dict[str, Any] = {
                f"eval/acc/{n}": float(a) for n, a in zip(task_names, accs, strict=True)
            }
            row |= {"task": i, "eval/avg_acc_seen": float(np.mean(accs[: i + 1]))}
            row["eval/avg_acc"] = float(np.mean(accs))
            tracker.log(row, step=updates)

        def on_update(updates: int, row: dict[str, float]) -> None:
            tracker.log(row, step=updates)

        if config.method == JOINT:
            result = run_joint(
                benchmark, model, config.trainer, seed=config.seed, on_update=on_update
            )
        else:
            strategy = make_strategy(
                config.method, **method_options_for(config, len(benchmark.tasks))
            )
            result = run_sequence(
                benchmark,
                model,
                strategy,
                config.trainer,
                seed=config.seed,
                on_task_end=on_task_end,
                on_update=on_update,
            )
        summary = summarize(result)
        if result.matrix.shape[0] > 1:
            tracker.log_matrix("accuracy_matrix", result.matrix, task_names, task_names)
            curves = plot_average_and_forgetting(
                result.matrix, tracker.run_dir / "plots" / "average_and_forgetting.png"
            )
            tracker.log_image("average_and_forgetting", curves)
        tracker.finish(summary)
    return ExperimentResult(config, result, summary, Path(run_dir))
