"""The ``crl`` command.

Options resolve as: built-in defaults < YAML file (``--config``) < options given on the
command line. RL commands dispatch lazily to ``envs``/``agents`` so that ``crl`` itself
imports neither.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from crl.config import flatten_config, load_yaml, method_options, split_list

console = Console()

BENCHMARKS = ["permuted-mnist", "split-mnist", "rotated-mnist"]
SCENARIOS = ["task-il", "domain-il", "class-il"]


def _supervised_options() -> list[click.Option]:
    """Generic options (default None = "not given", so YAML can fill them) + method options."""
    opts = [
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False),
                     help="YAML file of options; command-line options override it."),
        click.Option(["--benchmark"], type=click.Choice(BENCHMARKS), help="[split-mnist]"),
        click.Option(["--scenario"], type=click.Choice(SCENARIOS),
                     help="Default: the benchmark's own (split: class-il, others: domain-il)."),
        click.Option(["--tasks"], type=click.IntRange(min=1), help="Number of tasks."),
        click.Option(["--method"], type=str, help="finetune, l2, ewc, mas, packnet, agem, "
                     "replay, or joint (multi-task upper bound). [finetune]"),
        click.Option(["--methods"], type=str, help="Comma list: run a comparison."),
        click.Option(["--seed"], type=int, help="[0]"),
        click.Option(["--seeds"], type=str, help="Comma list of seeds, e.g. 0,1,2."),
        click.Option(["--hidden"], type=str, help="MLP widths, e.g. 400,400. [400,400]"),
        click.Option(["--activation"], type=click.Choice(["relu", "tanh", "elu"])),
        click.Option(["--epochs"], type=click.IntRange(min=1), help="Epochs per task. [1]"),
        click.Option(["--batch-size"], type=click.IntRange(min=1), help="[128]"),
        click.Option(["--lr"], type=float, help="[0.001]"),
        click.Option(["--optimizer"], type=click.Choice(["adam", "sgd"])),
        click.Option(["--momentum"], type=float),
        click.Option(["--reset-optimizer/--keep-optimizer"], default=None,
                     help="New optimiser state at each task (CW default). [reset]"),
        click.Option(["--importance-batch-size"], type=click.IntRange(min=1)),
        click.Option(["--eval-batch-size"], type=click.IntRange(min=1)),
        click.Option(["--log-every"], type=click.IntRange(min=1)),
        click.Option(["--progress/--no-progress"], default=None),
        click.Option(["--train-per-task"], type=click.IntRange(min=1),
                     help="Subsample each task's training set (seeded)."),
        click.Option(["--data-dir"], type=click.Path(file_okay=False),
                     help="Folder with the four MNIST IDX .gz files (else $CRL_DATA_DIR, "
                     "else the cache, downloading there)."),
        click.Option(["--download/--no-download"], default=None),
        click.Option(["--run-dir"], type=click.Path(file_okay=False), help="[runs]"),
        click.Option(["--wandb"], type=click.Choice(["offline", "online", "disabled"]),
                     help="[offline]"),
        click.Option(["--wandb-project"], type=str),
        click.Option(["--group"], type=str, help="W&B group / run-dir folder."),
    ]
    for mo in method_options():
        names = [f"--{mo.flag}/--no-{mo.flag}"] if mo.type is bool else [f"--{mo.flag}"]
        opts.append(
            click.Option(names, mo.dest, type=mo.type, default=None,
                         help=f"{mo.method}: {mo.param} [{mo.default}]")
        )
    return opts


def _resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Merge YAML and command line into one flat dict of option dests."""
    given = {k: v for k, v in params.items() if v is not None and k != "config_file"}
    known = set(params) - {"config_file"}
    from_file = flatten_config(load_yaml(params["config_file"]), known) if params.get(
        "config_file") else {}
    return from_file | given


def _build_configs(flat: dict[str, Any]) -> list[Any]:
    """One SupervisedConfig per (method, seed) of the request."""
    from crl.supervised.experiment import SupervisedConfig
    from crl.supervised.trainer import TrainerConfig

    trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    trainer = {k: v for k, v in flat.items() if k in trainer_fields}
    method_opts: dict[str, dict[str, Any]] = {}
    for mo in method_options():
        if mo.dest in flat:
            method_opts.setdefault(mo.method, {})[mo.param] = flat[mo.dest]
    methods = split_list(flat.get("methods")) or [flat.get("method", "finetune")]
    seeds = split_list(flat.get("seeds"), int) or [int(flat.get("seed", 0))]
    common: dict[str, Any] = {
        k: flat[k]
        for k in ("benchmark", "scenario", "tasks", "activation", "train_per_task",
                  "data_dir", "download", "run_dir", "wandb", "wandb_project", "group")
        if k in flat
    }
    if "hidden" in flat:
        common["hidden"] = tuple(split_list(flat["hidden"], int))
    return [
        SupervisedConfig(method=m.strip().lower(), seed=s, trainer=TrainerConfig(**trainer),
                         method_options=method_opts, **common)
        for m in methods
        for s in seeds
    ]


def _comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and 90% bootstrap CI over seeds of accuracy and forgetting."""
    from crl.metrics import bootstrap_ci

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        acc = bootstrap_ci([r["avg_acc"] for r in runs])
        forg_values = [r["forgetting"] for r in runs if not np.isnan(r["forgetting"])]
        forg = bootstrap_ci(forg_values) if forg_values else (np.nan, np.nan, np.nan)
        out.append({
            "method": method, "seeds": len(runs),
            "avg_acc": acc[0], "avg_acc_lo": acc[1], "avg_acc_hi": acc[2],
            "forgetting": forg[0], "forgetting_lo": forg[1], "forgetting_hi": forg[2],
            "seconds_per_task": float(np.mean([r["seconds_per_task"] for r in runs])),
        })
    return out


def _fmt(mean: float, lo: float, hi: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def print_comparison(table: list[dict[str, Any]], title: str) -> None:
    t = Table(title=title)
    for col in ("method", "seeds", "avg accuracy (90% CI)", "forgetting (90% CI)", "s / task"):
        t.add_column(col)
    for r in table:
        t.add_row(r["method"], str(r["seeds"]),
                  _fmt(r["avg_acc"], r["avg_acc_lo"], r["avg_acc_hi"]),
                  _fmt(r["forgetting"], r["forgetting_lo"], r["forgetting_hi"]),
                  f"{r['seconds_per_task']:.2f}")
    console.print(t)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@click.group()
@click.version_option(package_name="crl")
def main() -> None:
    """crl: continual learning for RL agents and supervised benchmarks."""


def _supervised(**params: Any) -> None:
    from crl.supervised.experiment import build_benchmark, run_experiment
    from crl.supervised.mnist import MNISTError, load_mnist

    try:
        configs = _build_configs(_resolve(params))
        data = load_mnist(configs[0].data_dir, download=configs[0].download)
    except (ValueError, FileNotFoundError, MNISTError) as exc:
        raise click.UsageError(str(exc)) from exc
    rows = []
    benchmarks: dict[int, Any] = {}
    for cfg in configs:
        if cfg.seed not in benchmarks:  # the benchmark depends on the seed, not the method
            benchmarks[cfg.seed] = build_benchmark(cfg, data)
        res = run_experiment(cfg, benchmark=benchmarks[cfg.seed])
        rows.append(res.summary)
        console.print(
            f"[bold]{cfg.method}[/] seed {cfg.seed}: average accuracy "
            f"{res.summary['avg_acc']:.4f}, forgetting {res.summary['forgetting']:.4f} "
            f"→ {res.run_dir}"
        )
    bench = benchmarks[configs[0].seed]
    title = f"{bench.name} ({bench.scenario}, {len(bench.tasks)} tasks)"
    table = _comparison_table(rows)
    print_comparison(table, title)
    if len(configs) > 1:
        out = Path(configs[0].run_dir) / (configs[0].group or f"{bench.name}-{bench.scenario}")
        console.print(f"comparison table: {write_csv(table, out / 'comparison.csv')}")


main.add_command(
    click.Command(
        "supervised",
        callback=_supervised,
        params=_supervised_options(),
        help="Train on split/permuted/rotated MNIST with a continual-learning method.",
    )
)


@main.group("list")
def list_group() -> None:
    """List what crl knows about."""


@list_group.command("methods")
def list_methods() -> None:
    """Methods and their options (CLI flag and default)."""
    t = Table(title="methods")
    t.add_column("method")
    t.add_column("options")
    by_method: dict[str, list[str]] = {}
    for mo in method_options():
        by_method.setdefault(mo.method, []).append(f"--{mo.flag} [{mo.default}]")
    from crl.strategies import METHODS

    for m in METHODS:
        t.add_row(m, "  ".join(by_method.get(m, [])) or "-")
    console.print(t)


@list_group.command("sequences")
def list_sequences() -> None:
    """Built-in task sequences with their tasks and default budget."""
    from envs.registry import sequence_rows  # lazy: crl itself never imports envs

    t = Table(title="task sequences  (gymnasium.make(ID) after `import envs`)")
    for col in ("name", "gymnasium id", "tasks", "steps / task", "cycles", "total steps",
                "extra"):
        t.add_column(col)
    for r in sequence_rows():
        tasks = r["tasks"] if isinstance(r["tasks"], str) else ", ".join(r["tasks"])
        extra = r["extra"] or "-"
        if r["extra"] and not r["installed"]:
            extra += " (not installed)"
        steps = r["steps_per_task"]
        steps = f"{steps:,}" if isinstance(steps, int) else str(steps)
        t.add_row(r["name"], r["gym_id"], tasks, steps, str(r["cycles"]),
                  f"{r['total_steps']:,}", extra)
    console.print(t)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
