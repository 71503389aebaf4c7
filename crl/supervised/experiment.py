"""One supervised run from a resolved config: data, benchmark, model, strategy, tracking.

The CLI, the benchmark script and the tests all go through :func:`run_experiment`, so a
run started any of these ways writes the same run directory and W&B run.

Checkpoints and resume: a run writes ``checkpoints/last.pt`` (atomically) at every task
boundary and every ``trainer.checkpoint_every`` updates. :func:`resume_experiment` continues
an interrupted run directory from it and finishes it exactly as an uninterrupted run would
(same metrics rows, same results; wall times aside), reusing the W&B run id. Everything is
validated before anything in the run directory is written. A run that fails (nan/inf loss or
any other exception) leaves ``failed.json`` beside its last good checkpoint and no
``results.json``.

What an exact (bit-identical) resume needs, and what is checked:

- the same configuration (checked: every key but :data:`RESUME_MAY_CHANGE`) and the same data
  (checked: :func:`data_fingerprint`);
- the same number of torch threads: CPU kernels split their reductions by thread count, and
  torch's default count is the machine's core count. Pin it with ``trainer.torch_threads``
  (``--torch-threads``), which is part of the config; a resume under another count warns;
- the same torch build and CPU kind (a kernel may take another vector path on another CPU).
  The supervised trainer runs on the CPU, where every op it uses is deterministic for a fixed
  thread count, so ``torch.use_deterministic_algorithms`` is not needed (nor set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl import metrics
from crl.checkpoint import (
    CheckpointError,
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from crl.config import check_seed
from crl.metric_keys import SL_AVG_ACC, SL_AVG_ACC_SEEN, sl_acc_key
from crl.plots import plot_average_and_forgetting, plot_plasticity
from crl.runs import (
    RunFailed,
    check_metrics_rows,
    clear_for_resume,
    holds_run,
    raise_if_finished,
    read_run_config,
    record_run_failure,
)
from crl.strategies import check_method, make_strategy, method_members
from crl.strategies.base import check_used_options
from crl.supervised.benchmarks import Benchmark, make_benchmark
from crl.supervised.mnist import MNIST, load_mnist
from crl.supervised.models import MLPClassifier
from crl.supervised.trainer import (
    NonFiniteError,
    SupervisedResult,
    TrainerConfig,
    run_joint,
    run_sequence,
)
from crl.tracking import RunTracker, to_builtin

#: Config keys a resume may change: they do not change what the run computes.
RESUME_MAY_CHANGE = ("trainer.progress", "trainer.checkpoint_every", "data_dir", "download",
                     "run_dir", "wandb")

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
    # SI: lam from 0.1, 1, 10, 100 on permuted-MNIST (10 tasks, seed 0): 10 best (0.798)
    "si": {"lam": 10.0},
    # DER++ (beta > 0): alpha 0.3, beta 0.5 with replay's memory and memory batch (1000,
    # 128) gave 0.900 on permuted-MNIST (10 tasks, seed 0) beside replay's 0.881; alpha 0.5
    # beta 1.0: 0.895, alpha 1 beta 1: 0.880, DER (beta 0) batch 64: 0.867
    "der": {"memory_size": 1000, "batch_size": 128, "alpha": 0.3, "beta": 0.5},
    # plasticity interventions: from one exploration on the long permuted-MNIST benchmark
    # (50 tasks, 100-100 ReLU MLP, Adam lr 0.01, 63 updates per task, seed 0;
    # scripts/sweeps/plasticity-pmnist.yaml): L2 Init 1e-3 and ReDo every 63 updates at
    # tau 0.1 kept the end-of-task accuracy level; CBP at 1e-3 replacement rate slowed its fall
    "l2init": {"lam": 0.001},
    "redo": {"every": 50, "tau": 0.1},
    "cbp": {"rate": 0.001},
}


def method_options_for(config: SupervisedConfig, n_tasks: int) -> dict[str, Any]:
    """The method's constructor options: defaults < user options; task count and seed (a
    combination: each member's options under its name)."""
    def own(method: str) -> dict[str, Any]:
        return SUPERVISED_METHOD_DEFAULTS.get(method, {}) | config.method_options.get(method, {})

    members = method_members(config.method)
    options = own(members[0]) if len(members) == 1 else {m: own(m) for m in members}
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
        check_seed(self.seed)
        if self.method != JOINT:
            self.method = check_method(self.method)  # unknown names fail before any work
        if self.wandb not in ("offline", "online", "disabled"):
            raise ValueError(
                f"wandb mode must be offline, online or disabled, got {self.wandb!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SupervisedConfig:
        """Rebuild a config from :meth:`to_dict` output or a run's config.yaml (its
        ``resolved_*`` keys are derived, so they are skipped); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        own = {k: v for k, v in data.items() if not str(k).startswith("resolved_")}
        unknown = sorted(set(own) - names)
        if unknown:
            raise ValueError(f"unknown supervised config keys: {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(names))}")
        kwargs = dict(own)
        if "hidden" in kwargs:
            kwargs["hidden"] = tuple(int(h) for h in kwargs["hidden"])
        if "trainer" in kwargs:
            trainer = dict(kwargs["trainer"] or {})
            known = {f.name for f in dataclasses.fields(TrainerConfig)}
            bad = sorted(set(trainer) - known)
            if bad:
                raise ValueError(f"unknown trainer config keys: {', '.join(bad)}; valid: "
                                 f"{', '.join(sorted(known))}")
            kwargs["trainer"] = TrainerConfig(**trainer)
        if "method_options" in kwargs:
            kwargs["method_options"] = {str(m): dict(o) for m, o in
                                        (kwargs["method_options"] or {}).items()}
        return cls(**kwargs)


@dataclass
class ExperimentResult:
    config: SupervisedConfig
    result: SupervisedResult
    summary: dict[str, Any]
    run_dir: Path


def supervised_summary(result: SupervisedResult) -> dict[str, Any]:
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
    if result.plasticity is not None:
        summary["plasticity"] = result.plasticity
        summary["plasticity_seconds"] = result.plasticity_seconds
    if R.shape[0] == R.shape[1] and R.shape[0] > 1:
        summary["forgetting"] = float(metrics.average_forgetting(R))
        summary["bwt"] = float(metrics.bwt(R))
        summary["fwt"] = float(metrics.fwt(R, result.initial))
        summary["accuracy_matrix"] = R.tolist()
        ends = np.diag(R)  # each task's accuracy right after its own training
        summary["end_of_task_score"] = ends.tolist()
        summary["plasticity_slope"] = metrics.plasticity_slope(ends)
    else:  # joint training has no sequence, so no forgetting
        summary["forgetting"] = float("nan")
    return summary


def check_method_options(config: SupervisedConfig, n_tasks: int) -> None:
    """Build the method once from its resolved options, before any run directory exists: a
    bad option is an error naming it (ValueError), not a failed run left behind."""
    if config.method == JOINT:
        return
    try:
        built = make_strategy(config.method, **method_options_for(config, n_tasks))
        if built.explores_with_heads:
            raise ValueError("ClonEx's exploration (--bc-clonex) explores a new task with an "
                             "earlier task's policy head; a classifier has no exploration "
                             "phase: use bc without --bc-clonex (ClonEx is for crl train "
                             "--agent sac)")
        check_used_options(built, config.method_options)
    except (ValueError, TypeError) as exc:
        given = sorted(config.method_options.get(config.method) or {})
        flags = ", ".join(f"--{config.method}-{k.replace('_', '-')}" for k in given)
        raise ValueError(f"{config.method}: {exc}" + (f" (options given: {flags})" if flags
                                                       else "")) from exc


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


def resolved_config(config: SupervisedConfig, benchmark: Benchmark) -> dict[str, Any]:
    """What the run saves as config.yaml and in its checkpoints: the config plus what the
    benchmark and the method defaults made of it (JSON-able)."""
    return to_builtin(config.to_dict() | {
        "resolved_scenario": benchmark.scenario,
        "resolved_tasks": len(benchmark.tasks),
        "resolved_method_options": (
            {} if config.method == JOINT else method_options_for(config, len(benchmark.tasks))
        ),
    })


def data_fingerprint(benchmark: Benchmark) -> str:
    """A hash of the benchmark's labels and a strided sample of its images: a resume on
    other data (a moved or regenerated data folder) is refused, at a cost of milliseconds."""
    h = hashlib.blake2b(digest_size=16)
    for task in benchmark.tasks:
        for t in (task.train_y, task.test_y, task.train_x[::97], task.test_x[::97]):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_model(config: SupervisedConfig, benchmark: Benchmark) -> MLPClassifier:
    torch.manual_seed(config.seed)
    return MLPClassifier(
        in_features=benchmark.tasks[0].train_x[0].numel(),
        hidden=config.hidden,
        n_heads=benchmark.n_heads,
        head_outputs=benchmark.head_outputs,
        activation=config.activation,
    )


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the run (CPU results depend on the count)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_experiment(
    config: SupervisedConfig,
    *,
    data: MNIST | None = None,
    benchmark: Benchmark | None = None,
    run_dir: Path | None = None,
    checkpoints: bool = True,
) -> ExperimentResult:
    """Run one method on one benchmark with one seed, tracked locally and in W&B.

    ``run_dir``: the exact run directory (default: a new one under ``config.run_dir``); it
    must not hold a run already (resume one with :func:`resume_experiment`).
    ``checkpoints=False`` writes none (a run that cannot be resumed; for measurements).
    """
    if benchmark is None:
        benchmark = build_benchmark(config, data)
    group = config.group or f"{benchmark.name}-{benchmark.scenario}"
    name = f"{config.method}-seed{config.seed}"
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.run_dir) / group / f"{name}-{stamp}-{os.getpid()}"
    existing = holds_run(run_dir)
    if existing:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(existing)}); continue it with "
            f"`crl supervised --resume {run_dir}` or choose another directory"
        )
    return _execute(config, benchmark, Path(run_dir), resolved_config(config, benchmark),
                    checkpoints=checkpoints)


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A `crl supervised` run directory's config.yaml; anything else is a clear error."""
    return read_run_config(run_dir, "supervised")


def resume_experiment(
    run_dir: str | Path,
    config: SupervisedConfig | None = None,
    *,
    data: MNIST | None = None,
    benchmark: Benchmark | None = None,
) -> ExperimentResult:
    """Continue an interrupted run from ``run_dir/checkpoints/last.pt`` and finish it.

    ``config``: the run's config as the caller rebuilt it (config.yaml plus any options
    given now); default: config.yaml as is. It must equal the checkpoint's config except for
    :data:`RESUME_MAY_CHANGE`, else a :class:`CheckpointError` lists every differing key.
    Raises :class:`RunFinished` if the run already has results. Nothing in ``run_dir`` is
    written before the checkpoint, the config, the data and the metrics file all check out.
    """
    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    raise_if_finished(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir))
    for key in ("config", "rows", "data", "trainer"):
        if key not in state:
            raise CheckpointError(f"{checkpoint_path(run_dir)} lacks {key!r}: it is not a "
                                  "checkpoint of a supervised run")
    if config is None:
        config = SupervisedConfig.from_dict(saved)
    if benchmark is None:
        benchmark = build_benchmark(config, data)
    resolved = resolved_config(config, benchmark)
    check_compatible(state["config"], resolved, what="configuration",
                     ignore=RESUME_MAY_CHANGE)
    fingerprint = data_fingerprint(benchmark)
    if state["data"] != fingerprint:
        raise CheckpointError(
            f"the data differ from the data the run was trained on (fingerprint "
            f"{state['data']} in the checkpoint, {fingerprint} now); point --data-dir (or "
            "$CRL_DATA_DIR) at the run's own MNIST files"
        )
    check_metrics_rows(run_dir, int(state["rows"]))
    # validated; the run directory changes only under the run's lock (_execute)
    return _execute(config, benchmark, run_dir, resolved, resume=state)


def _execute(
    config: SupervisedConfig,
    benchmark: Benchmark,
    run_dir: Path,
    resolved: dict[str, Any],
    *,
    resume: Mapping[str, Any] | None = None,
    checkpoints: bool = True,
) -> ExperimentResult:
    """Train (or continue) the run in ``run_dir``, checkpointing, and write its results."""
    group = config.group or f"{benchmark.name}-{benchmark.scenario}"
    name = f"{config.method}-seed{config.seed}"
    task_names = [t.name for t in benchmark.tasks]
    fingerprint = data_fingerprint(benchmark)
    ckpt_file = checkpoint_path(run_dir)
    last: dict[str, Any] = {"position": None if resume is None else resume["trainer"][
        "position"], "updates": None if resume is None else resume["trainer"]["updates"]}
    with _torch_threads(config.trainer.torch_threads), RunTracker(
        run_dir,
        resolved,
        wandb_mode=config.wandb,
        project=config.wandb_project,
        group=group,
        name=name,
        job_type="supervised",
        resume_rows=None if resume is None else int(resume["rows"]),
        new_run=resume is None,
    ) as tracker:
        if resume is not None:  # under the lock (see agents.runner._execute)
            clear_for_resume(run_dir)
        model = _build_model(config, benchmark)

        def on_task_end(i: int, accs: np.ndarray, updates: int,
                        plasticity: dict[str, float]) -> None:
            row: dict[str, Any] = {
                sl_acc_key(n): float(a) for n, a in zip(task_names, accs, strict=True)
            }
            row |= {"task": i, SL_AVG_ACC_SEEN: float(np.mean(accs[: i + 1]))}
            row[SL_AVG_ACC] = float(np.mean(accs))
            tracker.log(row | plasticity, step=updates)

        def on_update(updates: int, row: dict[str, float]) -> None:
            tracker.log(row, step=updates)

        def on_checkpoint(trainer_state: dict[str, Any]) -> None:
            save_checkpoint(ckpt_file, {"trainer": trainer_state, "rows": tracker.rows,
                                        "config": resolved, "data": fingerprint})
            last.update(position=trainer_state["position"], updates=trainer_state["updates"])

        trainer_resume = None if resume is None else resume["trainer"]
        save = on_checkpoint if checkpoints else None
        strategy = None  # joint training has none
        try:
            if config.method == JOINT:
                result = run_joint(
                    benchmark, model, config.trainer, seed=config.seed, on_update=on_update,
                    on_checkpoint=save, resume=trainer_resume,
                )
            else:
                strategy = make_strategy(
                    config.method, **method_options_for(config, len(benchmark.tasks))
                )
                result = run_sequence(
                    benchmark, model, strategy, config.trainer, seed=config.seed,
                    on_task_end=on_task_end, on_update=on_update,
                    on_checkpoint=save, resume=trainer_resume,
                )
        except BaseException as exc:
            failure = _record_failure(run_dir, exc, ckpt_file, last, config.method)
            if failure is None:
                raise
            raise failure from exc
        summary = supervised_summary(result)
        if strategy is not None and (method_summary := strategy.run_summary()):
            summary["method_summary"] = method_summary
        if result.matrix.shape[0] > 1:
            tracker.log_matrix("accuracy_matrix", result.matrix, task_names, task_names)
            curves = plot_average_and_forgetting(
                result.matrix, tracker.run_dir / "plots" / "average_and_forgetting.png"
            )
            tracker.log_image("average_and_forgetting", curves)
        if result.plasticity is not None:
            bounds = [int(s) for s in result.plasticity["steps"]]
            curves = plot_plasticity(result.plasticity, bounds,
                                     tracker.run_dir / "plots" / "plasticity.png",
                                     title=f"{benchmark.name} {benchmark.scenario}: "
                                     f"{config.method} (seed {config.seed})")
            if curves is not None:
                tracker.log_image("plasticity", curves)
        tracker.finish(summary)
    return ExperimentResult(config, result, summary, Path(run_dir))


def _record_failure(run_dir: Path, exc: BaseException, ckpt_file: Path,
                    last: dict[str, Any], method: str) -> RunFailed | None:
    diverged = isinstance(exc, NonFiniteError)
    task = getattr(exc, "task", None) if diverged else None
    update = getattr(exc, "update", None) if diverged else None
    has_ckpt = ckpt_file.is_file() and last["position"] is not None
    return record_run_failure(
        run_dir, exc, diverged=diverged, checkpoint=ckpt_file if has_ckpt else None,
        checkpoint_at=(f"after update {last['updates']}, {_describe(last['position'])}"
                       if has_ckpt else ""),
        details={"task": task, "update": update,
                 "last_checkpoint": str(ckpt_file) if has_ckpt else None,
                 "checkpoint_position": last["position"] if has_ckpt else None,
                 "checkpoint_updates": last["updates"] if has_ckpt else None},
        command="crl supervised", fix=f"start a new run with a lower {_strength_flags(method)}",
        task=task, step=update, position=last["position"] if has_ckpt else None)


def _describe(position: Mapping[str, Any]) -> str:
    if position["started"]:
        return (f"task {position['task']}, epoch {position['epoch']}, batch "
                f"{position['batch']}")
    return f"before task {position['task']}"


def _strength_flags(method: str) -> str:
    """The options that tame a divergence: the learning rate and the method's strength."""
    if method in ("l2", "ewc", "mas", "replay"):
        return f"--lr or --{method}-lam"
    return "--lr"
