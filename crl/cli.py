"""The ``crl`` command.

Options resolve as: built-in defaults < YAML file (``--config``) < options given on the
command line. RL commands dispatch lazily to ``envs``/``agents`` so that ``crl`` itself
imports neither.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crl.config import flatten_config, load_yaml, method_options, split_list
from crl.supervised.benchmarks import BENCHMARKS, DEFAULT_SCENARIO, SCENARIOS

#: piped or redirected output is not cut to 80 columns (tables keep whole words, lines stay
#: whole for grep); a terminal keeps its own width
console = Console() if sys.stdout.isatty() else Console(width=200)



def _supervised_options() -> list[click.Option]:
    """Generic options (default None = "not given", so YAML can fill them) + method options."""
    opts = [
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False),
                     help="YAML file of options; command-line options override it."),
        click.Option(["--benchmark"], type=click.Choice(BENCHMARKS), help="[split-mnist]"),
        click.Option(["--scenario"], type=click.Choice(SCENARIOS),
                     help="Default: the benchmark's own (" + ", ".join(
                         f"{b}: {s}" for b, s in DEFAULT_SCENARIO.items()) + ")."),
        click.Option(["--tasks"], type=click.IntRange(min=1), help="Number of tasks."),
        click.Option(["--method"], type=str, help="finetune, l2, ewc, mas, packnet, agem, "
                     "replay, si, lwf, der, bc, or joint (multi-task upper bound); plasticity "
                     "interventions "
                     "l2init, snp, redo, cbp, alone or combined: ewc+redo. [finetune]"),
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
    opts.extend(_method_flag_options("supervised"))
    return opts


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def _show_default(mo: Any, value: Any) -> str:
    if mo.type is list and value is None:
        return "none: equal shares per task"
    return _show(value)


def method_default_text(mo: Any, command: str) -> str:
    """The default a run of ``command`` (``supervised`` or ``train``) really uses for a
    method option, from the same tables the runs read: supervised defaults, or RL defaults
    per agent (``agents.method_defaults``), else the constructor's."""
    if command == "supervised":
        from crl.supervised.experiment import SUPERVISED_METHOD_DEFAULTS

        return _show_default(
            mo, SUPERVISED_METHOD_DEFAULTS.get(mo.method, {}).get(mo.param, mo.default))
    from agents.method_defaults import RL_METHOD_DEFAULTS, rl_method_options

    per_agent = {a: rl_method_options(a, mo.method).get(mo.param, mo.default)
                 for a in RL_METHOD_DEFAULTS}
    single = {a: rl_method_options(a, mo.method, agent_options={"multi_head": False})
              .get(mo.param, mo.default) for a in RL_METHOD_DEFAULTS}
    if any(repr(single[a]) != repr(per_agent[a]) for a in per_agent):  # per head setting
        return ", ".join(f"{a.upper()} {_show(v)}" + (f" (single head {_show(single[a])})"
                                                      if repr(single[a]) != repr(v) else "")
                         for a, v in per_agent.items())
    if mo.param == "max_samples" and all(v is None for v in per_agent.values()):
        return "all the task's --importance-samples"
    if mo.method == "agem" and mo.param == "batch_size":
        return ("the agent's batch size: " + ", ".join(
            f"{a.upper()} {_show(v)}" for a, v in per_agent.items()) + " unless --batch-size")
    if len({repr(v) for v in per_agent.values()}) == 1:
        return _show_default(mo, next(iter(per_agent.values())))
    return ", ".join(f"{a.upper()} {_show(v)}" for a, v in per_agent.items())


class NumberList(click.ParamType):
    """A list of numbers: ``0.5,0.25,0.25`` on the command line, a list in YAML."""

    name = "NUMBERS"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        items = value if isinstance(value, list | tuple) else split_list(str(value))
        try:
            return [float(v) for v in items]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 0.5,0.25)",
                      param, ctx)


def _method_flag_options(command: str) -> list[click.Option]:
    """One flag per method option, its help showing the default ``command`` resolves."""
    opts = []
    for mo in method_options():
        names = [f"--{mo.flag}/--no-{mo.flag}"] if mo.type is bool else [f"--{mo.flag}"]
        kind = (NumberList() if mo.type is list
                else click.Choice(mo.choices) if mo.choices else mo.type)
        opts.append(click.Option([*names, mo.dest], type=kind, default=None,
                                 help=f"{mo.method}: {mo.param} "
                                 f"[{method_default_text(mo, command)}]"))
    return opts


def _resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Merge YAML and command line into one flat dict of option dests."""
    given = {k: v for k, v in params.items() if v is not None and k != "config_file"}
    known = set(params) - {"config_file"}
    from_file: dict[str, Any] = {}
    if params.get("config_file"):
        try:
            from_file = flatten_config(load_yaml(params["config_file"]), known)
        except ValueError as exc:
            raise ValueError(f"--config {params['config_file']}: {exc}") from None
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
    seeds = split_list(flat.get("seeds"), int, "--seeds") or [int(flat.get("seed", 0))]
    common: dict[str, Any] = {
        k: flat[k]
        for k in ("benchmark", "scenario", "tasks", "activation", "train_per_task",
                  "data_dir", "download", "run_dir", "wandb", "wandb_project", "group")
        if k in flat
    }
    if "hidden" in flat:
        common["hidden"] = tuple(split_list(flat["hidden"], int, "--hidden"))
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


class _Commands(click.Group):
    """Every command's file-system errors (a path under a regular file, a read-only file
    system, a full disk) become one message naming the path and the fix, in this one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OSError, RuntimeError) as exc:
            message = filesystem_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from exc


@click.group(cls=_Commands)
@click.version_option(package_name="crl")
def main() -> None:
    """crl: continual learning for RL agents and supervised benchmarks."""
    from crl.allocator import keep_freed_memory

    keep_freed_memory()  # the command owns the process: reuse freed large blocks
    _plain_warnings()


def _plain_warnings() -> None:
    """Warnings print as one "warning: ..." line each, once per message: a user of the
    command needs the message, not the source line that raised it."""
    import warnings

    seen: set[str] = set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        click.echo(f"warning: {text}", err=True)

    warnings.showwarning = show


def _supervised(**params: Any) -> None:
    from crl.supervised.experiment import build_benchmark, check_method_options, run_experiment
    from crl.supervised.mnist import MNISTError, load_mnist

    resume, run_path = params.pop("resume", None), params.pop("run_path", None)
    if resume is not None:
        _supervised_resume(resume, run_path, params)
        return
    try:
        configs = _build_configs(_resolve(params))
        if run_path is not None:
            _check_run_path(run_path, configs)
        data = load_mnist(configs[0].data_dir, download=configs[0].download)
        benchmarks: dict[int, Any] = {}
        for cfg in configs:  # every benchmark and method is checked before any run starts
            if cfg.seed not in benchmarks:  # it depends on the seed, not the method
                benchmarks[cfg.seed] = build_benchmark(cfg, data)
            check_method_options(cfg, len(benchmarks[cfg.seed].tasks))
    except (ValueError, FileNotFoundError, MNISTError) as exc:
        raise click.UsageError(str(exc)) from exc
    rows = []
    for cfg in configs:
        with _run_failures():
            res = run_experiment(cfg, benchmark=benchmarks[cfg.seed],
                                 run_dir=None if run_path is None else Path(run_path))
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


def _run_dir_options(path_note: str, every: str) -> list[click.Option]:
    """Run-directory options shared by `crl train` and `crl supervised`."""
    return [
        click.Option(["--resume"], type=click.Path(file_okay=False),
                     help="Continue the interrupted run in this run directory from its last "
                     "checkpoint, bit for bit (its config.yaml gives the options; options given "
                     "now must agree with it)."),
        click.Option(["--run-path"], type=click.Path(file_okay=False),
                     help=f"Exact directory of a new run{path_note}; it must not hold a run yet."),
        click.Option(["--checkpoint-every"], type=click.IntRange(min=0),
                     help=f"Checkpoint every {every} besides every task boundary "
                     "(0: boundaries only)."),
    ]


def _plasticity_options(when: str) -> list[click.Option]:
    """The plasticity metrics' options (crl/plasticity.py), shared by RL and supervised."""
    return [
        click.Option(["--plasticity/--no-plasticity", "plasticity"], default=None,
                     help=f"Measure dormant units, feature rank, |w| and gradient norms at "
                     f"every {when} (plasticity/ keys). [on]"),
        click.Option(["--plasticity-tau"], type=float,
                     help="A unit is dormant when its activity is at most tau x its layer's "
                     "mean (Sokar et al. 2023). [0.025]"),
        click.Option(["--plasticity-probe"], type=click.IntRange(min=2),
                     help="Samples of each task in its fixed probe batch. [256]"),
    ]


def _supervised_run_options() -> list[click.Option]:
    """Run-directory options of `crl supervised`: resume, exact path, checkpoints, threads."""
    return [
        *_run_dir_options(" (one method and one seed)", "N updates [500]"),
        click.Option(["--torch-threads"], type=click.IntRange(min=1),
                     help="torch intra-op threads; pin it for bit-exact resumes. "
                     "[torch's default]"),
        *_plasticity_options("task end"),
    ]


def _check_run_path(run_path: str, configs: list[Any]) -> None:
    from crl.runs import holds_run

    if len(configs) > 1:
        raise click.UsageError(
            f"--run-path names one run directory but {len(configs)} runs were asked for "
            "(--methods/--seeds); drop --run-path or run one method and seed"
        )
    existing = holds_run(run_path)
    if existing:
        raise click.UsageError(
            f"--run-path {run_path} already holds a run ({', '.join(existing)}); continue it "
            f"with --resume {run_path} or choose another directory"
        )


@contextlib.contextmanager
def _run_failures(run_dir: str | None = None) -> Iterator[None]:
    """Diverged runs and checkpoint problems of `crl train` and `crl supervised`: a clear
    message naming the fix and the checkpoint, and exit code 1."""
    from crl.checkpoint import CheckpointError
    from crl.runs import RunFailed
    from crl.tracking import RunLockedError

    try:
        yield
    except RunFailed as exc:
        raise click.ClickException(str(exc)) from exc
    except CheckpointError as exc:
        raise click.ClickException(
            f"cannot resume {run_dir}: {exc}" if run_dir else str(exc)) from exc
    except RunLockedError as exc:
        raise click.ClickException(str(exc)) from exc
    # file-system errors propagate to the command group, which words them (_Commands)


def filesystem_message(exc: BaseException) -> str | None:
    """A file-system error as one line naming the path, the problem and the fix (None for
    errors that are not about a path we write)."""
    import errno

    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    text = " ".join(str(e) for e in chain).lower()
    if os_error is None and ("enforce fail" in text or "no space" in text):
        return ("cannot write a file: the disk is full (no space left on device); free space "
                "or choose another folder (a run's last good checkpoint is kept)")
    if os_error is None:
        return None
    path = os_error.filename or "a file"
    fixes = {
        errno.ENOTDIR: "a part of that path is a regular file, not a folder; choose another "
                       "folder (--run-dir, --run-path, --out)",
        errno.EACCES: "no permission to write there; choose a folder you can write to",
        errno.EPERM: "no permission to write there; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose a writable folder",
        errno.ENOSPC: "the disk is full; free space or choose another folder (a run's last "
                      "good checkpoint is kept)",
        errno.EDQUOT: "the disk quota is used up; free space or choose another folder",
        errno.EEXIST: "it exists already; choose another path",
        errno.EISDIR: "it is a folder where a file is expected; remove it or choose another "
                      "path",
    }
    fix = fixes.get(os_error.errno)
    if fix is None:
        return None
    return f"cannot write {path}: {os_error.strerror}; {fix}"


def _echo_finished(run_dir: str, results: dict[str, Any], key: str, label: str,
                   spec: str) -> None:
    """What `--resume` of a run that already wrote results.json says (it runs nothing)."""
    value = results.get(key)
    shown = f", {label} {value:{spec}}" if isinstance(value, float) else ""
    click.echo(f"{run_dir} already finished (results.json{shown}); nothing to resume.")


def _resume_config(saved: dict[str, Any], given: dict[str, Any]) -> Any:
    """The run's config (its config.yaml) with the options given now applied on top."""
    import copy

    from crl.supervised.experiment import SupervisedConfig
    from crl.supervised.trainer import TrainerConfig

    data = copy.deepcopy(saved)
    trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    by_dest = {mo.dest: mo for mo in method_options()}
    for key, value in given.items():
        if key in ("methods", "seeds"):
            items = split_list(value, int if key == "seeds" else str, f"--{key}")
            if len(items) != 1:
                raise click.UsageError(f"--resume continues one run; --{key} lists "
                                       f"{len(items)}: {value}")
            key, value = key[:-1], items[0]
        if key == "method":
            data["method"] = str(value).strip().lower()
        elif key in trainer_fields:
            data.setdefault("trainer", {})[key] = value
        elif key in by_dest:
            mo = by_dest[key]
            data.setdefault("method_options", {}).setdefault(mo.method, {})[mo.param] = value
        elif key == "hidden":
            data["hidden"] = split_list(value, int, "--hidden")
        else:
            data[key] = value
    return SupervisedConfig.from_dict(data)


def _supervised_resume(run_dir: str, run_path: str | None, params: dict[str, Any]) -> None:
    """`crl supervised --resume RUN_DIR`: validate everything, then continue the run."""
    from crl.checkpoint import CheckpointError
    from crl.runs import RunFinished
    from crl.supervised.experiment import load_run_config, resume_experiment
    from crl.supervised.mnist import MNISTError

    if run_path is not None:
        raise click.UsageError("--resume continues the run where it is; drop --run-path")
    try:
        config = _resume_config(load_run_config(run_dir), _resolve(params))
        with _run_failures(run_dir):
            res = resume_experiment(run_dir, config)
    except RunFinished as done:
        _echo_finished(run_dir, done.results, "avg_acc", "average accuracy", ".4f")
        return
    except CheckpointError as exc:
        raise click.ClickException(f"cannot resume {run_dir}: {exc}") from exc
    except (ValueError, FileNotFoundError, MNISTError) as exc:
        raise click.UsageError(f"cannot resume {run_dir}: {exc}") from exc
    s = res.summary
    console.print(f"[bold]{config.method}[/] seed {config.seed} (resumed): average accuracy "
                  f"{s['avg_acc']:.4f}, forgetting {s['forgetting']:.4f} → {res.run_dir}")


main.add_command(
    click.Command(
        "supervised",
        callback=_supervised,
        params=[*_supervised_options(), *_supervised_run_options()],
        help="Train on split/permuted/rotated MNIST with a continual-learning method.",
    )
)


@main.group("list")
def list_group() -> None:
    """List what crl knows about."""


COMBINE_NOTE = ("plasticity interventions (l2init, snp, redo, cbp) combine with any method "
                "and with each other: --method ewc+redo (each member takes its own options)")


def _flag_text(mo: Any) -> str:
    """The flag, with the words it accepts where it takes one of a fixed set."""
    return mo.flag + (f" [{'|'.join(mo.choices)}]" if mo.choices else "")


@list_group.command("methods")
def list_methods() -> None:
    """Methods and their options (CLI flag and default)."""
    from agents.method_defaults import RL_METHOD_DEFAULTS
    from crl.strategies import METHODS

    t = Table(title="methods: options and the defaults runs use (crl supervised / crl train)")
    t.add_column("method")
    t.add_column("option")
    t.add_column("supervised")
    t.add_column("train (" + ", ".join(a.upper() for a in RL_METHOD_DEFAULTS) + ")")
    by_method: dict[str, list[Any]] = {}
    for mo in method_options():
        by_method.setdefault(mo.method, []).append(mo)
    if not sys.stdout.isatty():  # piped or redirected: one whole line per option
        for m in METHODS:
            if not by_method.get(m):
                click.echo(f"{m}: no options")
            for mo in by_method.get(m, []):
                click.echo(f"{m}: --{_flag_text(mo)}  supervised: "
                           f"{method_default_text(mo, 'supervised')}  train: "
                           f"{method_default_text(mo, 'train')}")
        click.echo(COMBINE_NOTE)
        return
    for m in METHODS:
        if not by_method.get(m):
            t.add_row(m, "-", "", "")
        for k, mo in enumerate(by_method.get(m, [])):
            t.add_row(m if k == 0 else "", escape(f"--{_flag_text(mo)}"),
                      escape(method_default_text(mo, "supervised")),
                      escape(method_default_text(mo, "train")))
    console.print(t)
    console.print(COMBINE_NOTE)


@list_group.command("sequences")
def list_sequences() -> None:
    """Built-in task sequences with their tasks and default budget."""
    from envs.registry import describe_sequences, sequence_rows  # lazy: crl never imports envs

    if not sys.stdout.isatty():  # piped or redirected: whole names, one block per sequence
        click.echo(describe_sequences(), nl=False)
        return
    t = Table(title="task sequences  (gymnasium.make(ID) after `import envs`)")
    for col in ("name", "gymnasium id", "tasks", "steps / task", "cycles", "total steps",
                "extra"):
        t.add_column(col, overflow="fold")
    t.columns[0].no_wrap = True
    for r in sequence_rows():
        tasks = r["tasks"] if isinstance(r["tasks"], str) else ", ".join(r["tasks"])
        extra = r["extra"] or "-"
        if r["extra"] and not r["installed"]:
            extra += " (not installed)"
        steps = r["steps_per_task"]
        steps = f"{steps:,}" if isinstance(steps, int) else ", ".join(f"{x:,}" for x in steps)
        t.add_row(r["name"], r["gym_id"], tasks, steps, str(r["cycles"]),
                  f"{r['total_steps']:,}", extra)
    console.print(t)


# --------------------------------------------------------------------------------------------
# RL: crl train / crl reference (dispatch lazily to agents/ and envs/)
# --------------------------------------------------------------------------------------------
#: CLI dest -> agent constructor keyword (continual options and the common SB3 ones).
AGENT_OPTION_DESTS = {
    "learning_rate": "learning_rate", "batch_size": "batch_size", "buffer_size": "buffer_size",
    "gamma": "gamma", "n_steps": "n_steps", "n_epochs": "n_epochs", "ent_coef": "ent_coef",
    "multi_head": "multi_head", "reset_buffer": "reset_buffer",
    "reset_optimizer": "reset_optimizer", "exploration_steps": "exploration_steps",
    "per_task_entropy": "per_task_entropy", "regularize_critic": "regularize_critic",
    "importance_samples": "importance_samples",
}
RUN_CONFIG_DESTS = (
    "sequence", "agent", "method", "seed", "steps_per_task", "cycles", "eval_every",
    "eval_episodes",
    "eval_max_steps",
    "forgetting_k", "device", "torch_threads", "run_dir", "wandb", "wandb_project", "group",
    "reference_dir", "reference_seed", "require_references", "random_episodes", "progress",
    "save_model", "checkpoint_every", "checkpoint_buffer", "run_path", "plasticity",
    "plasticity_tau", "plasticity_probe",
)


def _rl_options() -> list[click.Option]:
    """Options of `crl train` and `crl reference` (None = not given, so YAML can fill them)."""
    opt = click.Option
    opts = [
        opt(["--config", "config_file"], type=click.Path(dir_okay=False),
            help="YAML file of options; command-line options override it."),
        opt(["--sequence"], type=str, help="Built-in sequence name (crl list sequences) or a "
            "YAML sequence file. [CartPoleSwap]"),
        opt(["--agent"], type=str, help="sac or ppo. [ppo]"),
        opt(["--method"], type=str, help="finetune, l2, ewc, mas, packnet, agem, replay, si, "
            "lwf, der, bc (--bc-clonex: ClonEx-SAC); "
            "plasticity interventions l2init, snp, redo, cbp, alone or combined with a "
            "method: ewc+redo. [finetune]"),
        opt(["--steps-per-task"], type=click.IntRange(min=1),
            help="Env steps per task. [the sequence's own]"),
        opt(["--cycles"], type=click.IntRange(min=1),
            help="Times the task list is repeated (Atari6: 3, CW20: 2). [the sequence's own]"),
        opt(["--eval-every"], type=click.IntRange(min=1), help="Evaluate every K env steps. "
            "[5000]"),
        opt(["--eval-episodes"], type=click.IntRange(min=1),
            help="Episodes per task per evaluation. [5]"),
        opt(["--eval-max-steps"], type=click.IntRange(min=1),
            help="Cut evaluation episodes after N steps (Atari: idle deterministic policies "
            "run to the 108k-frame limit). [the envs' own limits]"),
        opt(["--seed"], type=int, help="[0]"),
        opt(["--net-arch"], type=str, help="Hidden widths of every MLP, e.g. 256,256. "
            "[SB3's default]"),
        opt(["--learning-rate", "--lr", "learning_rate"], type=float),
        opt(["--batch-size"], type=click.IntRange(min=1)),
        opt(["--buffer-size"], type=click.IntRange(min=1), help="SAC replay buffer size."),
        opt(["--gamma"], type=float),
        opt(["--n-steps"], type=click.IntRange(min=1),
            help="PPO rollout length; must divide the task budget. [2048]"),
        opt(["--n-epochs"], type=click.IntRange(min=1), help="PPO epochs per rollout."),
        opt(["--ent-coef"], type=str, help="Entropy coefficient (SAC: 'auto' or a number)."),
        opt(["--multi-head/--single-head", "multi_head"], default=None,
            help="One output head per task (CW default). [multi-head]"),
        opt(["--reset-buffer/--keep-buffer", "reset_buffer"], default=None,
            help="SAC: new replay buffer at each task (CW default; replay's perfect memory "
            "needs it). [reset]"),
        opt(["--reset-optimizer/--keep-optimizer", "reset_optimizer"], default=None,
            help="New optimiser state at each task (CW default). [reset]"),
        opt(["--exploration-steps"], type=click.IntRange(min=0),
            help="SAC: uniform random actions for the first N steps of each task "
                 "(SB3's learning_starts, rearmed per task). [10000]"),
        opt(["--per-task-entropy/--shared-entropy", "per_task_entropy"], default=None,
            help="SAC: a separate entropy coefficient per task."),
        opt(["--regularize-critic/--no-regularize-critic", "regularize_critic"], default=None,
            help="Let the method protect the critic too (off in CW)."),
        opt(["--importance-samples"], type=click.IntRange(min=1),
            help="Samples of the finished task used for importance/memories."),
        opt(["--sb3-kwargs"], type=str, help="Further SB3 keyword arguments as JSON (or a "
            "mapping in YAML), e.g. '{\"tau\": 0.01}'."),
        opt(["--device"], type=str, help="torch device. [cpu]"),
        opt(["--torch-threads"], type=click.IntRange(min=0),
            help="torch intra-op threads (0: torch's default). [1]"),
        opt(["--forgetting-k"], type=click.IntRange(min=1),
            help="End values average the last k evaluations (CW: 5). [5]"),
        opt(["--reference-dir"], type=click.Path(file_okay=False),
            help="Cache of reference runs and random-policy returns. [~/.cache/crl]"),
        opt(["--reference-seed"], type=int, help="Seed of reference runs (CW's 001). [1]"),
        opt(["--require-references/--no-require-references", "require_references"],
            default=None, help="Fail when reference runs are missing (else FT is n/a)."),
        opt(["--random-episodes"], type=click.IntRange(min=1),
            help="Episodes to measure the random policy's return (score lower bound). [10]"),
        opt(["--run-dir"], type=click.Path(file_okay=False), help="[runs]"),
        opt(["--wandb"], type=click.Choice(["offline", "online", "disabled"]), help="[offline]"),
        opt(["--wandb-project"], type=str),
        opt(["--group"], type=str, help="W&B group / run-dir folder."),
        opt(["--progress/--no-progress"], default=None),
        opt(["--save-model/--no-save-model", "save_model"], default=None,
            help="Write checkpoints/agent.zip and the strategy state. [save]"),
        *_plasticity_options("evaluation"),
    ]
    opts.extend(_method_flag_options("train"))
    return opts


def _number_or_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _run_config(flat: dict[str, Any]) -> Any:
    """The RunConfig of resolved options; bad values raise ValueError naming the option."""
    import json

    from agents.config import RunConfig

    kwargs = {k: flat[k] for k in RUN_CONFIG_DESTS if k in flat}
    if "torch_threads" in kwargs and kwargs["torch_threads"] == 0:
        kwargs["torch_threads"] = None
    if "net_arch" in flat:
        kwargs["net_arch"] = tuple(split_list(flat["net_arch"], int, "--net-arch"))
    agent_options = {AGENT_OPTION_DESTS[k]: flat[k] for k in AGENT_OPTION_DESTS if k in flat}
    if "ent_coef" in agent_options:
        agent_options["ent_coef"] = _number_or_text(agent_options["ent_coef"])
    extra = flat.get("sb3_kwargs")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--sb3-kwargs must be a JSON object, got {extra!r}: {exc}") from exc
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"sb3-kwargs must be a mapping of SB3 keyword arguments, got {extra!r}")
    agent_options |= extra or {}
    method_opts: dict[str, dict[str, Any]] = {}
    for mo in method_options():
        if mo.dest in flat:
            method_opts.setdefault(mo.method, {})[mo.param] = flat[mo.dest]
    return RunConfig(agent_options=agent_options, method_options=method_opts, **kwargs)


def _rl_errors() -> tuple[type[BaseException], ...]:
    from agents.reference import MissingReferenceError
    from envs.errors import EnvConfigError, MissingExtraError

    return (ValueError, FileNotFoundError, EnvConfigError, MissingExtraError,
            MissingReferenceError)


@contextlib.contextmanager
def _rl_usage_errors() -> Iterator[None]:
    """Bad RL input (and agents that cannot be imported) become click usage errors."""
    try:
        errors = _rl_errors()
    except ImportError as exc:
        raise click.UsageError(f"the RL agents cannot be imported: {exc}") from exc
    try:
        yield
    except errors as exc:
        raise click.UsageError(str(exc)) from exc


def _fmt_value(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def print_run_table(summary: dict[str, Any], title: str) -> None:
    """Per task: end-of-task and final score, forgetting, AUC, forward transfer; then means."""
    k = summary.get("forgetting_k", 5)
    t = Table(title=title, caption=f"* mean of the last {k} evaluations after the task's start "
              "(CW); forgetting = end of task* - final*; gain = end of task* - score when its "
              "training began")
    for col in ("task", "end of task*", "final*", "forgetting", "gain", "AUC",
                "forward transfer"):
        t.add_column(col, justify="left" if col == "task" else "right",
                     no_wrap=col == "task")
    gains = summary.get("new_task_gain") or []
    for i, r in enumerate(summary["table"]):
        gain = gains[i - 1] if 1 <= i <= len(gains) else None
        t.add_row(r["task"], _fmt_value(r.get("end_of_task")), _fmt_value(r.get("final")),
                  _fmt_value(r.get("forgetting")), _fmt_value(gain),
                  *(_fmt_value(r.get(k)) for k in ("auc", "forward_transfer")))
    t.add_section()
    finals = [r["final"] for r in summary["table"] if r.get("final") is not None]
    t.add_row("[bold]average[/]", "", _fmt_value(float(np.mean(finals)) if finals else None),
              _fmt_value(summary.get("mean_forgetting")),
              _fmt_value(summary.get("mean_new_task_gain")), "",
              _fmt_value(summary.get("mean_forward_transfer")))
    console.print(t)
    basis = summary.get("score_basis") or []
    if basis:
        names = [r["task"] for r in summary["table"]][:len(basis)]
        text = (f"scores: {basis[0]}" if len(set(basis)) == 1 else "scores: " + "; ".join(
            f"{n}: {b}" for n, b in zip(names, basis, strict=False)))
        console.print(escape(text), soft_wrap=True)
    for key in ("metrics_reason", "forward_transfer_reason"):
        if summary.get(key):
            console.print(f"[yellow]{key.replace('_', ' ')}:[/] {escape(summary[key])}",
                          soft_wrap=True)


def _train_run_options() -> list[click.Option]:
    """Run-directory options of `crl train`: resume, exact path, checkpoints."""
    return [
        *_run_dir_options("", "N env steps (at the next update boundary) [100000]"),
        click.Option(["--checkpoint-buffer/--no-checkpoint-buffer", "checkpoint_buffer"],
                     default=None, help="SAC: put the replay buffer in the checkpoints (large: "
                     "~840 MB for CW10's 1M transitions; without it a resume is not "
                     "bit-exact). The strategy's own memories (replay's perfect memory "
                     "of finished tasks, A-GEM, bc) are always kept: a resume cannot "
                     "recollect them. [on]"),
    ]


def _train_changes(flat: dict[str, Any]) -> dict[str, Any]:
    """The options given to `crl train --resume`, as RunConfig fields (nested for agent and
    method options): each must agree with the run's config, or name a field that may change."""
    config = _run_config(flat)  # validates the values the way a new run would
    full = config.to_dict()
    changes = {k: full[k] for k in RUN_CONFIG_DESTS if k in flat}
    if "net_arch" in flat:
        changes["net_arch"] = full["net_arch"]
    if full["agent_options"]:  # only the given ones (and --sb3-kwargs)
        changes["agent_options"] = full["agent_options"]
    if full["method_options"]:
        changes["method_options"] = full["method_options"]
    return changes


def _train_resume(run_dir: str, params: dict[str, Any]) -> None:
    """`crl train --resume RUN_DIR`: validate everything, then continue the run."""
    if params.get("run_path") is not None:
        raise click.UsageError("--resume continues the run where it is; drop --run-path")
    with _rl_usage_errors(), _run_failures(run_dir):
        from agents.runner import resume
        from crl.runs import RunFinished

        try:
            result = resume(run_dir, _train_changes(_resolve(params)))
        except RunFinished as done:
            _echo_finished(run_dir, done.results, "final_performance", "performance P(T)",
                           ".3f")
            return
    _print_train_result(result)


def _train(resume: str | None = None, **params: Any) -> None:
    if resume is not None:
        _train_resume(resume, params)
        return
    with _rl_usage_errors(), _run_failures():
        from agents.runner import train

        config = _run_config(_resolve(params))
        result = train(config)
    _print_train_result(result)


def _print_train_result(result: Any) -> None:
    config = result.config
    s = result.summary
    print_run_table(s, f"{s['sequence']}: {config.agent} + {config.method}, seed {config.seed}")
    k = s.get("forgetting_k", 5)
    finals = [r["final"] for r in s.get("table", []) if r.get("final") is not None]
    table_final = _fmt_value(float(np.mean(finals)) if finals else None)
    click.echo(f"performance P(T) {_fmt_value(s.get('final_performance'))} at the last "
               f"evaluation ({table_final} averaged over the last {k}, the table's final*), "
               f"forgetting {_fmt_value(s.get('mean_forgetting'))}, new-task gain "
               f"{_fmt_value(s.get('mean_new_task_gain'))}, forward transfer "
               f"{_fmt_value(s.get('mean_forward_transfer'))}; {s['env_steps']:,} env steps, "
               f"{s['timings']['total_seconds']:.0f} s ({100 * s['eval_share']:.0f}% evaluating)")
    click.echo(f"run directory: {result.run_dir}")
    if result.plot_path is not None:
        click.echo(f"plot: {result.plot_path}")


def _reference(force: bool = False, **params: Any) -> None:
    with _rl_usage_errors():
        from agents.config import resolve_sequence
        from agents.factory import check_agent_fits, check_agent_options
        from agents.reference import run_references

        config = _run_config(_resolve(params))
        sequence = resolve_sequence(config)
        check_agent_fits(config, sequence)
        check_agent_options(config)
        refs = run_references(config, sequence, force=force)
    t = Table(title=f"reference runs: {sequence.name}, {config.agent}, seed "
                    f"{config.reference_seed}")
    for col in ("task", "steps", "evaluations", "final return", "cache file"):
        t.add_column(col, overflow="fold")
    for ref in refs.values():
        t.add_row(ref.task_name, f"{ref.budget:,}", str(len(ref.steps)),
                  f"{ref.final_return:.2f}", str(ref.path))
    console.print(t)


main.add_command(
    click.Command(
        "train",
        callback=_train,
        params=[*_rl_options(), *_train_run_options()],
        help="Train an SB3 agent (sac/ppo) on a task sequence with a continual-learning "
        "method; print performance, forgetting and forward transfer.",
    )
)
main.add_command(
    click.Command(
        "reference",
        callback=_reference,
        params=[*_rl_options(),
                click.Option(["--force"], is_flag=True, help="Re-run cached references.")],
        help="Train and cache the single-task reference runs of every task of a sequence "
        "(forward transfer's baseline) with the same agent options as `crl train`.",
    )
)


# --------------------------------------------------------------------------------------------
# crl sweep (crl/sweep.py): a grid of train/supervised runs on Ray
# --------------------------------------------------------------------------------------------
def command_options(command: str) -> Any:
    """What `crl sweep` checks a grid with: the options of `crl <command>`, read off the click
    command itself (never a copy), and the command's own check of a run's config."""
    from crl.sweep import CommandOptions

    cmd = main.commands[command]
    params = {p.name: p for p in cmd.params if p.name}
    return CommandOptions(params, lambda flat: check_sweep_run(command, flat))


def check_sweep_run(command: str, flat: dict[str, Any]) -> None:
    """Build one sweep run's config the way the command itself would, strategy included, so
    a bad grid point fails before the sweep starts anything (raises with the command's
    own message)."""
    if command == "supervised":
        from crl.supervised.experiment import check_method_options as check_supervised

        (cfg,) = _build_configs(flat)
        if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
            raise ValueError(f"data-dir {cfg.data_dir} is not a folder (it must hold the four "
                             "MNIST IDX files)")
        check_supervised(cfg, cfg.tasks or 2)
        return
    from agents.config import resolve_sequence
    from agents.factory import check_run_config

    config = _run_config(flat)
    check_run_config(config, resolve_sequence(config))  # `crl train`'s own checks


@main.command("sweep")
@click.argument("config_file", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--address", help="Ray cluster to run on (e.g. ray://host:10001 or "
              "host:6379). [a new local Ray instance]")
@click.option("--num-cpus", type=click.IntRange(min=1),
              help="CPUs of the local Ray instance. [all of this machine's]")
@click.option("--max-concurrent", type=click.IntRange(min=1),
              help="Run at most K runs at once. [as many as the CPUs fit]")
@click.option("--dry-run", is_flag=True, help="List the runs and their commands; start nothing.")
@click.option("--ray-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for Ray to start or connect.")
def sweep_command(config_file: str, address: str | None, num_cpus: int | None,
                  max_concurrent: int | None, dry_run: bool, ray_timeout: float) -> None:
    """Run a grid of `crl train` or `crl supervised` runs on Ray: each run is its own
    process in out/NAME/RUN-ID, all in the W&B group NAME. Failed runs are retried (from
    their checkpoint), then reported; runs with a results.json are skipped when the sweep
    runs again; ends with `crl report` on the finished runs. Exit code 1 when a run failed.

    \b
    name: cartpole-methods     # W&B group, folder (default: the file's stem)
    command: train             # train | supervised
    base: {agent: ppo, sequence: CartPoleSwap}   # options of every run (as --config)
    grid: {method: [finetune, ewc], seed: [0, 1, 2]}   # their product
    overrides: [{}, {ewc_lam: 100}]   # optional: one run set per option set
    retries: 1                 # attempts after the first failure
    resources: {num_cpus: 1}   # per run (num_cpus, num_gpus, memory)
    timeout: 3600              # optional: seconds per attempt
    out: runs/sweeps
    """
    from crl.sweep import SweepConfigError, SweepError, load_sweep, print_dry_run, run_sweep

    try:
        config = load_sweep(config_file, options_for=command_options)
    except SweepConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    missing = (f"`crl {config.command}` has no --run-path option in this version; the sweep "
               "needs it to give every run its folder")
    if dry_run:
        print_dry_run(config, console)
        if "run_path" not in click_params(config.command):
            console.print(f"[yellow]warning:[/] {missing}")
        return
    if "run_path" not in click_params(config.command):
        raise click.UsageError(missing)
    try:
        result = run_sweep(config, address=address, num_cpus=num_cpus,
                           max_concurrent=max_concurrent, ray_timeout_s=ray_timeout,
                           console=console)
    except SweepError as exc:
        raise click.ClickException(str(exc)) from exc
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} of {len(result.outcomes)} runs "
                                   f"failed; see {result.sweep_json}")


def click_params(command: str) -> set[str]:
    """Option dests of `crl <command>` (what a sweep can rely on)."""
    return {p.name for p in main.commands[command].params if p.name}


# --------------------------------------------------------------------------------------------
# crl report (crl/report.py): method comparison across runs
# --------------------------------------------------------------------------------------------
@main.command("report")
@click.argument("run_dirs", nargs=-1, metavar="[RUN_DIRS]...")
@click.option("--wandb-group", help="Report the runs of this W&B group: offline, those under "
              "RUN_DIRS (default: runs/) whose wandb_run.json names the group; with "
              "--wandb-online, the group's runs in the W&B API.")
@click.option("--wandb-online", is_flag=True,
              help="Read --wandb-group through the W&B API (needs network and a login).")
@click.option("--wandb-project", help="W&B project of --wandb-online. [$WANDB_PROJECT or crl]")
@click.option("--wandb-entity", help="W&B entity of --wandb-online. [$WANDB_ENTITY or your "
              "default entity]")
@click.option("--wandb-timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds each W&B API call may take before the report gives up.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for report.csv, report.md and the plots. [report/ next to the "
              "runs, or ./report]")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots.")
def report_command(run_dirs: tuple[str, ...], wandb_group: str | None, wandb_online: bool,
                   wandb_project: str | None, wandb_entity: str | None, wandb_timeout: float,
                   out_dir: str | None, plots: bool) -> None:
    """Compare methods across runs: performance, forgetting and forward transfer (RL) or
    accuracy, forgetting and FWT (supervised), mean and 90% bootstrap CI over seeds; writes
    report.csv, report.md and PNG plots. RUN_DIRS are run directories or folders above them."""
    from crl.report import ReportError, default_out_dir, report, report_wandb

    try:
        if wandb_online:
            if wandb_group is None:
                raise ReportError("--wandb-online reads a W&B group: add --wandb-group G")
            if run_dirs:
                raise ReportError("--wandb-online reads the runs from W&B; drop the run "
                                  "directories, or drop --wandb-online to read them locally")
            result = report_wandb(wandb_group, Path(out_dir or "report"),
                                  project=wandb_project,
                                  entity=wandb_entity, console=console,
                                  timeout_s=wandb_timeout, plots=plots)
        else:
            if wandb_project or wandb_entity:
                raise ReportError("--wandb-project/--wandb-entity choose where the W&B API "
                                  "looks; add --wandb-online (local runs are found by folder)")
            paths = list(run_dirs) or (["runs"] if wandb_group else [])
            out = Path(out_dir) if out_dir else default_out_dir(paths)
            result = report([Path(p) for p in paths], out, console=console,
                            wandb_group=wandb_group, plots=plots)
    except ReportError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"report: {result.md_path}  table: {result.csv_path}  plots: "
               f"{len(result.plot_paths)}  skipped runs: {len(result.skipped)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
