"""`crl sweep`: a grid of `crl train` / `crl supervised` runs as independent Ray tasks.

A sweep YAML (schema: ``crl sweep --help``; examples: scripts/sweeps/*.yaml) names a
command, options shared by every run (``base``), the axes of a grid (``grid``: their
product) and an optional extra axis of option sets (``overrides``). Each grid point becomes
one run with a deterministic id (``ppo-ewc-CartPoleSwap-ewc_lam=100-seed1``) and folder
``out/<name>/<run-id>``. A run is a Ray task that starts the ordinary command as a
subprocess, so a sweep run is exactly what a user would get by typing the command, crashes
stay inside their process, and Ray only schedules (no home-made scheduler;
docs/ARCHITECTURE.md, "Layers").

The whole config is checked before anything starts, through the command's own options (their
click types) and the command's own config checks, and every problem is reported at once. A
failed attempt is retried (from the run's checkpoint with ``--resume`` when it has one);
a run that keeps failing is recorded with the tail of its stderr and never stops the others.
Runs that already wrote ``results.json`` are skipped, so re-running a sweep finishes it.

Files of a sweep ``out/<name>/``: ``sweep.yaml`` (the config as given), ``sweep.json`` (every
run: status, attempts, wall time, error), ``<run-id>/`` (run directories; ``run.yaml`` is the
run's options), ``logs/<run-id>/attempt-N.out|.err`` (output of each attempt; a run folder
that a fresh attempt replaces is kept as ``logs/<run-id>/before-attempt-N/``), ``report/``
(``crl report`` of the finished runs). On a multi-node cluster ``out`` must be on storage
that every node sees.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crl.config import flatten_keys

COMMANDS = ("train", "supervised")
#: Top-level keys of a sweep file.
SWEEP_KEYS = ("name", "command", "base", "grid", "overrides", "retries", "resources", "out",
              "timeout")
#: Per-run Ray resources a sweep may request, with the Ray resource name each maps to.
RESOURCE_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
#: Options the sweep sets itself on every run (or that would start several runs in one).
RESERVED_OPTIONS = {
    "config_file": "the sweep writes each run's options to its own run.yaml",
    "run_dir": "runs go to out/<name>/<run-id>; set `out` in the sweep file",
    "run_path": "the sweep gives every run its own folder",
    "resume": "the sweep resumes failed runs from their checkpoint by itself",
    "group": "the W&B group of every run is the sweep name; set `name`",
    "progress": "progress bars are off in sweep runs",
    "methods": "one run per process: make `method` a grid axis",
    "seeds": "one run per process: make `seed` a grid axis",
    "force": "not an option of a run",
}
#: Options that name a run (in this order) before the other axes, per command.
HEADLINE = {"train": ("agent", "method", "sequence"), "supervised": ("method", "benchmark")}
#: Names inside the sweep folder that are not runs.
SWEEP_FILES = ("logs", "report", "sweep.json", "sweep.yaml")
RUN_YAML = "run.yaml"
RESULTS = "results.json"
#: Where the resume checkpoint of a run lives (see crl.checkpoint.checkpoint_path).
CHECKPOINT = Path("checkpoints") / "last.pt"
STDERR_TAIL_LINES = 25
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepConfigError(ValueError):
    """A sweep file that cannot run; the message lists every problem found."""


class SweepError(RuntimeError):
    """The sweep could not run (Ray did not start, no resources); names the fix."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One grid point: its id, its folder and the options written to its run.yaml.

    ``options`` are option dests (``ewc_lam``) with values converted by the command's own
    click types, so the run gets what the same value on the command line would give.
    """

    run_id: str
    run_dir: Path
    options: dict[str, Any]
    axes: dict[str, Any]


@dataclass(frozen=True)
class SweepConfig:
    name: str
    command: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    overrides: list[dict[str, Any]]
    retries: int
    resources: dict[str, float]
    out: Path
    timeout: float | None
    runs: tuple[RunSpec, ...]
    source: Path | None = None
    #: whether the command has --resume (an interrupted run can continue from its checkpoint)
    can_resume: bool = False

    @property
    def sweep_dir(self) -> Path:
        return self.out / self.name

    def with_out(self, out: str | Path) -> SweepConfig:
        """The same sweep writing under another ``out`` (benchmarks run one grid twice)."""
        out = Path(out).resolve()
        runs = tuple(dataclasses.replace(r, run_dir=out / self.name / r.run_id)
                     for r in self.runs)
        return dataclasses.replace(self, out=out, runs=runs)


@dataclass(frozen=True)
class CommandOptions:
    """What the sweep needs to know of `crl <command>`: its options and its config check."""

    params: dict[str, Any]  # dest -> click.Parameter
    check: Callable[[dict[str, Any]], None]  # raises with a message on a bad run config

    @property
    def dests(self) -> set[str]:
        return set(self.params) - {"config_file"}


#: ``command -> CommandOptions``: given by the command-line layer (``crl.cli.command_options``,
#: read off the click commands themselves), so that this module never imports it back
OptionsFor = Callable[[str], CommandOptions]


def _dest(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Problems(list):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}" if where else message)


def load_sweep(path: str | Path, *, options_for: OptionsFor | None = None,
               options: CommandOptions | None = None) -> SweepConfig:
    """Read and check a sweep file; every problem is listed in one :class:`SweepConfigError`.

    The file is checked through its command's own options: ``options_for`` gives them
    (``crl.cli.command_options``), or ``options`` directly (tests pass their own).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"sweep file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SweepConfigError(f"sweep file {path} must hold a mapping (name, command, base, "
                               f"grid, ...), not {type(data).__name__}")
    return parse_sweep(data, source=path, options_for=options_for, options=options)


def parse_sweep(data: Mapping[str, Any], *, source: Path | None = None,
                options_for: OptionsFor | None = None,
                options: CommandOptions | None = None) -> SweepConfig:
    """Check a sweep mapping (see :func:`load_sweep`)."""
    from crl.strategies import METHODS

    where_file = str(source) if source else "sweep"
    problems = _Problems()
    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(str(key), f"unknown key{hint}; valid keys: {', '.join(SWEEP_KEYS)}")

    name = data.get("name", source.stem if source else None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.add("name", f"must be a folder-safe name (letters, digits, '.', '_', '-'), "
                     f"got {name!r}")
    command = data.get("command", "train")
    if command not in COMMANDS:
        problems.add("command", f"must be one of {', '.join(COMMANDS)}, got {command!r}")

    base = data.get("base") or {}
    if not isinstance(base, dict):
        problems.add("base", f"must be a mapping of option: value, got {base!r}")
        base = {}
    grid = data.get("grid")
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        problems.add("grid", f"must be a mapping of option: [values], got {grid!r}")
        grid = {}
    for key, values in grid.items():
        if not isinstance(values, list):
            problems.add(f"grid.{key}", f"must be a list of values, got {values!r} (write "
                         f"[{values!r}] for one value, or move it to base)")
        elif not values:
            problems.add(f"grid.{key}", "is empty: a grid axis needs at least one value")
        elif len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
            problems.add(f"grid.{key}", f"repeats a value: {values!r}")
    grid = {k: v for k, v in grid.items() if isinstance(v, list) and v}

    overrides = data.get("overrides", [{}])
    if isinstance(overrides, list):
        overrides = list(overrides)  # entries are normalised below; the caller's list is kept
    if not isinstance(overrides, list) or not overrides:
        problems.add("overrides", f"must be a non-empty list of option mappings ({{}} for "
                     f"none), got {overrides!r}")
        overrides = [{}]
    for i, ov in enumerate(overrides):
        if ov is None:
            overrides[i] = {}
        elif not isinstance(ov, dict):
            problems.add(f"overrides[{i}]", f"must be a mapping of option: value, got {ov!r}")
    overrides = [ov if isinstance(ov, dict) else {} for ov in overrides]

    retries = data.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        problems.add("retries", f"must be an integer >= 0, got {retries!r}")
        retries = 0
    resources = _check_resources(data.get("resources", {}), problems)
    out = data.get("out", "runs/sweeps")
    if not isinstance(out, str) or not out.strip():
        problems.add("out", f"must be a folder path, got {out!r}")
        out = "runs/sweeps"
    timeout = data.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        problems.add("timeout", f"must be a number of seconds > 0 per attempt, got {timeout!r}")
        timeout = None

    if command not in COMMANDS:
        raise SweepConfigError(_message(where_file, problems))
    if options is None:
        if options_for is None:
            raise TypeError("parse_sweep needs the command's options: pass "
                            "options_for=crl.cli.command_options")
        options = options_for(command)
    methods = list(METHODS)
    flat_base = _check_options("base", base, command, options, methods, problems)
    flat_grid: dict[str, list[Any]] = {}
    for key, values in grid.items():
        dest = _dest(key)
        if dest in methods:
            problems.add(f"grid.{key}", f"an axis is one option: write e.g. {dest}_lam: "
                         "[1, 10] (option names: crl list methods)")
            continue
        flat_values = []
        for i, v in enumerate(values):
            checked = _check_options(f"grid.{key}[{i}]", {key: v}, command, options, methods,
                                     problems)
            flat_values.append(checked.get(dest, v))
        if dest in flat_base:
            problems.add(f"grid.{key}", "is also set in base; keep it in one place")
        flat_grid[dest] = flat_values
    flat_overrides = []
    for i, ov in enumerate(overrides):
        checked = _check_options(f"overrides[{i}]", ov, command, options, methods, problems)
        for dest in sorted(set(checked) & set(flat_grid)):
            problems.add(f"overrides[{i}].{dest}", "is also a grid axis; an override may "
                         "change base options, not grid axes")
        flat_overrides.append(checked)
    if problems:
        raise SweepConfigError(_message(where_file, problems))

    out_path = Path(out).expanduser().resolve()
    runs = _expand(str(name), command, flat_base, flat_grid, flat_overrides, out_path)
    _check_runs(runs, options, problems)
    if problems:
        raise SweepConfigError(_message(where_file, problems))
    return SweepConfig(name=str(name), command=command, base=flat_base, grid=flat_grid,
                       overrides=flat_overrides, retries=retries, resources=resources,
                       out=out_path, timeout=float(timeout) if timeout else None,
                       runs=tuple(runs), source=source,
                       can_resume="resume" in options.params)


def _message(where: str, problems: Sequence[str]) -> str:
    n = len(problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{where}: {n} problem{'s' if n > 1 else ''}:\n{lines}"


def _check_resources(resources: Any, problems: _Problems) -> dict[str, float]:
    if resources is None:
        resources = {}
    if not isinstance(resources, dict):
        problems.add("resources", f"must be a mapping like {{num_cpus: 1}}, got {resources!r}")
        return {"num_cpus": 1}
    out: dict[str, float] = {}
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            problems.add(f"resources.{key}", f"unknown resource; valid: "
                         f"{', '.join(RESOURCE_KEYS)}")
        elif not _is_number(value) or value < 0 or (key != "num_gpus" and value == 0):
            problems.add(f"resources.{key}", f"must be a number > 0"
                         f"{' (or 0)' if key == 'num_gpus' else ''}, got {value!r}")
        else:
            out[key] = value
    out.setdefault("num_cpus", 1)
    return out


def _check_options(where: str, mapping: Mapping[str, Any], command: str,
                   options: CommandOptions, methods: Sequence[str],
                   problems: _Problems) -> dict[str, Any]:
    """Dests of ``mapping`` with values converted by the command's click types; problems
    (unknown or reserved options, bad values, unknown methods) are added, not raised."""
    import click

    known = options.dests
    out: dict[str, Any] = {}
    for dest, value in flatten_keys(mapping, methods).items():
        at = f"{where}.{dest}" if "[" not in where else where
        if dest in RESERVED_OPTIONS:
            problems.add(at, f"cannot be set in a sweep: {RESERVED_OPTIONS[dest]}")
            continue
        if dest not in known:
            close = difflib.get_close_matches(dest, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(at, f"unknown option of `crl {command}`{hint}; see `crl {command} "
                         "--help` (YAML keys are the option names without dashes)")
            continue
        param = options.params[dest]
        if value is None:
            problems.add(at, "has no value")
            continue
        if dest == "method":
            valid = [*methods, "joint"] if command == "supervised" else list(methods)
            if str(value).strip().lower() not in valid:
                problems.add(at, f"unknown method {value!r}; choose from {', '.join(valid)}")
                continue
        if isinstance(param.type, click.types.StringParamType):
            out[dest] = value  # the command parses lists, mappings and text itself
            continue
        try:
            out[dest] = param.type.convert(value, param, None)
        except click.BadParameter as exc:
            problems.add(at, exc.format_message())
            continue
        if isinstance(param.type, click.Path):  # runs (and later resumes) start elsewhere
            out[dest] = str(Path(out[dest]).expanduser().resolve())
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)  # 100.0 from a float option prints as 100
    text = str(value)
    if isinstance(value, str) and ("/" in text or text.endswith((".yaml", ".yml"))):
        text = Path(text).stem  # a sequence file names the run by its stem
    return re.sub(r"[^A-Za-z0-9._,+=-]", "_", text)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return json.dumps(value) if isinstance(value, (bool, dict)) or value is None else str(value)


def run_id(command: str, options: Mapping[str, Any], axes: Sequence[str]) -> str:
    """``<headline values>-<other axis>=<value>...-seed<N>``, e.g.
    ``ppo-ewc-CartPoleSwap-ewc_lam=100-seed1``: readable and stable across invocations."""
    parts = [_format_value(options[k]) for k in HEADLINE[command] if k in options]
    parts += [f"{k}={_format_value(options[k])}" for k in axes
              if k in options and k not in HEADLINE[command] and k != "seed"]
    if "seed" in options:
        parts.append(f"seed{_format_value(options['seed'])}")
    return "-".join(parts) or "run"


def _expand(name: str, command: str, base: dict[str, Any], grid: dict[str, list[Any]],
            overrides: list[dict[str, Any]], out: Path) -> list[RunSpec]:
    """The product of the grid axes times the override sets, in file order."""
    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        for ov in overrides:
            opts = base | point | ov
            axes = point | ov
            rid = run_id(command, opts, [*keys, *sorted(ov)])
            runs.append(RunSpec(rid, out / name / rid, opts, axes))
    return runs


def _check_runs(runs: Sequence[RunSpec], options: CommandOptions, problems: _Problems) -> None:
    """Run ids must be unique and folder-safe; each run must pass the command's own checks
    (identical messages of several runs are reported once, with the runs named)."""
    by_id: dict[str, list[RunSpec]] = {}
    for r in runs:
        by_id.setdefault(r.run_id, []).append(r)
    for rid, same in by_id.items():
        if len(same) > 1:
            problems.add(f"run {rid}", f"{len(same)} grid points get this id ("
                         + "; ".join(json.dumps(s.axes, default=str) for s in same)
                         + "): make their axis values differ in how they print")
        if rid in SWEEP_FILES:
            problems.add(f"run {rid}", "this id is a reserved name in the sweep folder")
    errors: dict[str, list[str]] = {}
    for r in runs:
        try:
            options.check(dict(r.options))
        except Exception as exc:  # noqa: BLE001 - every config error of a run is a problem
            msg = str(exc) or type(exc).__name__
            errors.setdefault(msg, []).append(r.run_id)
    for msg, ids in errors.items():
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        problems.add(f"run{'s' if len(ids) > 1 else ''} {shown}", msg)


# --------------------------------------------------------------------------------------------
# One attempt of one run (executed inside a Ray task)
# --------------------------------------------------------------------------------------------
def command_line(config: SweepConfig, spec: RunSpec, *, resume: bool = False) -> list[str]:
    """The `crl` arguments of a run (after ``crl``); the W&B group is the sweep name."""
    args = [config.command, "--config", str(spec.run_dir / RUN_YAML)]
    args += ["--resume", str(spec.run_dir)] if resume else ["--run-path", str(spec.run_dir)]
    return [*args, "--group", config.name, "--no-progress"]


@dataclass(frozen=True)
class AttemptTask:
    """Everything a worker needs for one attempt (plain data: it travels through Ray)."""

    run_id: str
    run_dir: str
    logs_dir: str
    options: dict[str, Any]
    args_fresh: list[str]
    args_resume: list[str] | None  # None: the command has no --resume
    cwd: str
    attempt: int
    timeout: float | None
    threads: int | None


@dataclass
class Attempt:
    number: int
    returncode: int | None
    seconds: float
    resumed: bool
    command: list[str]
    stdout: str | None = None
    stderr: str | None = None
    error: str | None = None  # stderr tail, or why the attempt could not run
    #: CPU time (user + sys) of the command and the children it waited for
    cpu_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file()


def _next_log_index(logs: Path) -> int:
    found = [int(m.group(1)) for p in logs.glob("attempt-*.err")
             if (m := re.match(r"attempt-(\d+)\.err$", p.name))]
    return max(found, default=0) + 1


def run_attempt(task: AttemptTask) -> Attempt:
    """Run the command once in its run folder; never raises for a failing run.

    A folder left by an earlier attempt without a checkpoint is moved to the logs (a fresh
    start appends to nothing stale); with a checkpoint and --resume, the attempt resumes.
    """
    from crl.tracking import atomic_write_text

    run_dir, logs = Path(task.run_dir), Path(task.logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    index = _next_log_index(logs)
    resume = task.args_resume is not None and has_checkpoint(run_dir)
    if not resume and run_dir.is_dir() and any(p.name != RUN_YAML for p in run_dir.iterdir()):
        shutil.move(str(run_dir), str(logs / f"before-attempt-{index}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_YAML, yaml.safe_dump(task.options, sort_keys=False))
    args = task.args_resume if resume else task.args_fresh
    argv = [sys.executable, "-m", "crl.cli", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120", WANDB_SILENT="true")
    if task.threads:
        env |= {"OMP_NUM_THREADS": str(task.threads), "MKL_NUM_THREADS": str(task.threads)}
    out_path, err_path = logs / f"attempt-{index}.out", logs / f"attempt-{index}.err"
    cwd = task.cwd if Path(task.cwd).is_dir() else str(run_dir)
    # a Ray worker runs one task at a time, so the children's rusage delta is this command's
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env)
        try:
            rc: int | None = proc.wait(timeout=task.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        except BaseException:  # cancelled (Ctrl-C on the driver): do not leave orphans
            _stop(proc)
            raise
        if timed_out:
            _stop(proc)
    seconds = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    shown = ["crl", *args]
    error = None
    if timed_out:
        error = f"timed out after {task.timeout:g} s (sweep `timeout`)\n{_tail(err_path)}"
    elif rc != 0:
        error = _tail(err_path) or f"exited with code {rc} and wrote nothing to stderr"
    elif not (run_dir / RESULTS).is_file():
        error = (f"exited with code 0 but wrote no {RESULTS} in {run_dir}\n"
                 f"{_tail(err_path)}").rstrip()
    return Attempt(task.attempt, rc, seconds, resume, shown, str(out_path), str(err_path),
                   error, cpu)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
FINISHED, FAILED, SKIPPED, CANCELLED = "finished", "failed", "skipped", "cancelled"


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str = "queued"
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.attempts)

    @property
    def error(self) -> str | None:
        return self.attempts[-1].error if self.status == FAILED and self.attempts else None

    def to_dict(self, config: SweepConfig) -> dict[str, Any]:
        return {
            "id": self.spec.run_id, "status": self.status, "attempts": len(self.attempts),
            "resumed_attempts": [a.number for a in self.attempts if a.resumed],
            "wall_seconds": round(self.seconds, 3), "run_dir": str(self.spec.run_dir),
            "axes": self.spec.axes, "options": self.spec.options,
            "command": shlex.join(["crl", *command_line(config, self.spec)]),
            "error": self.error,
            "attempt_details": [
                {"number": a.number, "returncode": a.returncode, "resumed": a.resumed,
                 "seconds": round(a.seconds, 3), "command": shlex.join(a.command),
                 "cpu_seconds": None if a.cpu_seconds is None else round(a.cpu_seconds, 3),
                 "stdout": a.stdout, "stderr": a.stderr} for a in self.attempts],
        }


@dataclass
class SweepResult:
    config: SweepConfig
    outcomes: list[RunOutcome]
    wall_seconds: float
    sweep_json: Path
    report_dir: Path | None = None
    report_error: str | None = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]


def start_ray(address: str | None = None, num_cpus: int | None = None,
              timeout_s: float = 120.0) -> None:
    """A new local Ray instance (``address="local"``: never a cluster someone else started
    with ``ray start`` on this machine), or the cluster at ``address``; a start that hangs
    past ``timeout_s`` is an error.

    Ray 2.x cannot be bound to the loopback interface on Linux: it replaces 127.0.0.1 by the
    node's address (``ray._private.services.resolve_ip_for_localhost``) and its gRPC servers
    listen on 0.0.0.0; its token authentication (on by default in Ray 2.60) guards them."""
    try:
        import ray
    except ImportError as exc:
        raise SweepError("crl sweep needs Ray: pip install 'crl[ray]'") from exc
    import logging

    if address and num_cpus is not None:
        raise SweepError("--num-cpus sizes a local Ray instance; an existing cluster "
                         "(--address) has its own CPUs")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    else:
        kwargs |= {"address": "local", "num_cpus": num_cpus}
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    message = (f"{where} did not start within {timeout_s:g} s; check `ray status` or raise "
               "--ray-timeout")
    # ray.init must run on the main thread (started from another thread, its driver loses the
    # GCS), so the bound is an alarm there; elsewhere Ray's own startup timeouts apply.
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def _expired(signum: int, frame: Any) -> None:
        raise SweepError(message)

    previous = signal.signal(signal.SIGALRM, _expired) if use_alarm else None
    if use_alarm:
        signal.alarm(max(1, math.ceil(timeout_s)))
    try:
        ray.init(**kwargs)
    except SweepError:
        ray.shutdown()
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises many types for a failed start
        raise SweepError(f"could not start {where}: {exc}") from exc
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def _ray_capacity(resources: Mapping[str, float]) -> int:
    """How many runs fit in the cluster at once (so 'running' means started, not queued)."""
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get(RESOURCE_KEYS[k], 0) // v) for k, v in resources.items() if v > 0]
    return min(fits) if fits else 1


def plan(config: SweepConfig) -> list[tuple[RunSpec, bool]]:
    """Every run and whether it already finished (its results.json exists)."""
    return [(r, (r.run_dir / RESULTS).is_file()) for r in config.runs]


def run_sweep(
    config: SweepConfig,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    max_concurrent: int | None = None,
    ray_timeout_s: float = 120.0,
    console: Any = None,
    report: bool = True,
) -> SweepResult:
    """Run every unfinished run of the sweep on Ray, retrying failures; write sweep.json and
    the report. Uses an already initialised Ray as is (and leaves it running); starts none
    when every run has finished already. Ctrl-C cancels the running attempts, writes
    sweep.json (their status: cancelled) and re-raises."""
    from rich.console import Console

    console = console or Console()
    if max_concurrent is not None and max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sweep_dir = config.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if config.source is not None and config.source.resolve() != (sweep_dir / "sweep.yaml"):
        shutil.copyfile(config.source, sweep_dir / "sweep.yaml")
    outcomes = [RunOutcome(spec, SKIPPED if done else "queued") for spec, done in plan(config)]
    skipped = [o for o in outcomes if o.status == SKIPPED]
    if skipped:
        console.print(f"{len(skipped)} of {len(outcomes)} runs already finished ({RESULTS} "
                      f"present) and are skipped: {', '.join(o.spec.run_id for o in skipped)}",
                      soft_wrap=True)
    start = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    cluster_cpus, interrupted = 0.0, False
    if len(skipped) < len(outcomes):
        try:
            import ray
        except ImportError as exc:
            raise SweepError("crl sweep needs Ray: pip install 'crl[ray]'") from exc
        started_ray = not ray.is_initialized()
        if started_ray:
            start_ray(address, num_cpus, ray_timeout_s)
        try:
            cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
            if _ray_capacity(config.resources) < 1 and not address:
                raise SweepError(f"one run needs {config.resources} but the local Ray instance "
                                 f"has {ray.cluster_resources()}; lower `resources` or raise "
                                 "--num-cpus")
            _drive(config, outcomes, max_concurrent, console)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if started_ray:
                ray.shutdown()
    else:
        console.print("nothing to run: every run of the sweep has finished")
    result = SweepResult(config, outcomes, time.monotonic() - start, sweep_dir / "sweep.json")
    _write_json(result, started_at, cluster_cpus, address)
    print_summary(result, console)
    if interrupted:
        raise KeyboardInterrupt
    done = [o.spec.run_dir for o in outcomes if o.status in (FINISHED, SKIPPED)]
    if report and done:
        result.report_dir, result.report_error = _report(done, sweep_dir / "report", console)
        _write_json(result, started_at, cluster_cpus, address)
    return result


def _drive(config: SweepConfig, outcomes: list[RunOutcome], max_concurrent: int | None,
           console: Any) -> None:
    """Submit attempts as slots free up, collect them with ray.wait, retry failures."""
    import ray
    from rich.live import Live

    threads = max(1, int(config.resources.get("num_cpus", 1)))
    remote = ray.remote(num_cpus=config.resources.get("num_cpus", 1),
                        num_gpus=config.resources.get("num_gpus", 0),
                        memory=config.resources.get("memory"), max_retries=0)(run_attempt)
    queue = deque((o, 1) for o in outcomes if o.status == "queued")
    in_flight: dict[Any, tuple[RunOutcome, int]] = {}
    cwd = os.getcwd()
    t0 = time.monotonic()

    def line() -> str:
        done = sum(o.status == FINISHED for o in outcomes)
        failed = sum(o.status == FAILED for o in outcomes)
        skipped = sum(o.status == SKIPPED for o in outcomes)
        retrying = sum(1 for o, a in [*in_flight.values(), *queue] if a > 1)
        text = (f"[bold]{config.name}[/]: {done} done · {len(in_flight)} running · "
                f"{failed} failed · {len(queue)} queued")
        if skipped:
            text += f" · {skipped} skipped"
        if retrying:
            text += f" ({retrying} retrying)"
        return text + f"  [dim]{time.monotonic() - t0:.0f} s[/]"

    live_ctx = (Live(line(), console=console, refresh_per_second=2, transient=False)
                if console.is_terminal else _PlainProgress(console, line()))
    with live_ctx as live:
        try:
            while queue or in_flight:
                limit = max(1, _ray_capacity(config.resources))
                if max_concurrent:
                    limit = min(limit, max_concurrent)
                while queue and len(in_flight) < limit:
                    outcome, attempt = queue.popleft()
                    outcome.status = "running"
                    spec = outcome.spec
                    task = AttemptTask(
                        spec.run_id, str(spec.run_dir),
                        str(config.sweep_dir / "logs" / spec.run_id), spec.options,
                        command_line(config, spec),
                        command_line(config, spec, resume=True) if config.can_resume
                        else None,
                        cwd, attempt, config.timeout, threads)
                    in_flight[remote.remote(task)] = (outcome, attempt)
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in ready:
                    outcome, attempt = in_flight.pop(ref)
                    try:
                        result: Attempt = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - worker died, task raised
                        result = Attempt(attempt, None, 0.0, False, [], error=(
                            f"the Ray task failed: {type(exc).__name__}: {exc}")[-3000:])
                    outcome.attempts.append(result)
                    _announce(live.console, config, outcome, result)
                    if result.ok:
                        outcome.status = FINISHED
                    elif attempt <= config.retries:
                        outcome.status = "queued"
                        queue.appendleft((outcome, attempt + 1))
                    else:
                        outcome.status = FAILED
                live.update(line())
        except KeyboardInterrupt:
            for ref, (outcome, _) in in_flight.items():
                ray.cancel(ref)
                outcome.status = CANCELLED
            for outcome, _ in queue:
                outcome.status = CANCELLED
            live.update(line() + " [red]interrupted[/]")
            raise


class _PlainProgress:
    """Progress for logs and pipes: the status line printed when it changes (rich's Live
    would only show its last frame there)."""

    def __init__(self, console: Any, text: str) -> None:
        self.console, self._last = console, None
        self.update(text)

    def update(self, text: str) -> None:
        key = re.sub(r"\s*\[dim\].*?\[/\]", "", text)  # the clock alone is no change
        if key != self._last:
            self._last = key
            self.console.print(text, soft_wrap=True)

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _announce(console: Any, config: SweepConfig, outcome: RunOutcome, a: Attempt) -> None:
    from rich.markup import escape

    how = " (resumed)" if a.resumed else ""
    rid = escape(outcome.spec.run_id)
    if a.ok:
        console.print(f"[green]done[/] {rid}{how} in {a.seconds:.1f} s")
        return
    last = (a.error or "").strip().splitlines()[-1:] or [""]
    retry = a.number <= config.retries
    console.print(f"[{'yellow' if retry else 'red'}]{'failed' if not retry else 'retry'}[/] "
                  f"{rid}{how}, attempt {a.number}/{config.retries + 1}: {escape(last[0])}")


def _write_json(result: SweepResult, started_at: str, cluster_cpus: float,
                address: str | None) -> None:
    from crl.tracking import atomic_write_text

    c = result.config
    payload = {
        "name": c.name, "command": c.command, "source": str(c.source) if c.source else None,
        "sweep_dir": str(c.sweep_dir), "started": started_at,
        "wall_seconds": round(result.wall_seconds, 3),
        "ray": {"address": address or "local", "cpus": cluster_cpus},
        "retries": c.retries, "resources": c.resources,
        "counts": {s: result.count(s) for s in (FINISHED, FAILED, SKIPPED, CANCELLED)},
        "runs": [o.to_dict(c) for o in result.outcomes],
        "report": {"dir": str(result.report_dir) if result.report_dir else None,
                   "error": result.report_error},
    }
    atomic_write_text(result.sweep_json, json.dumps(payload, indent=1, default=str))


def _report(run_dirs: list[Path], out_dir: Path, console: Any) -> tuple[Path | None,
                                                                          str | None]:
    """`crl report` on the finished runs; its failure never costs the sweep's results."""
    try:
        from crl.report import report
    except ImportError as exc:
        msg = f"crl.report is not available ({exc}); run `crl report` on the runs later"
        console.print(f"[yellow]report skipped:[/] {msg}")
        return None, msg
    try:
        report([str(p) for p in run_dirs], out_dir, console=console)
    except Exception as exc:  # noqa: BLE001 - the sweep's own results are already saved
        msg = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]report failed:[/] {msg}")
        return None, msg
    console.print(f"report: {out_dir}")
    return out_dir, None


def print_summary(result: SweepResult, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    cancelled = result.count(CANCELLED)
    t = Table(title=f"sweep {result.config.name}: {result.count(FINISHED)} finished, "
              f"{result.count(FAILED)} failed, {result.count(SKIPPED)} skipped"
              + (f", {cancelled} cancelled" if cancelled else "")
              + f" ({result.wall_seconds:.0f} s)")
    for col in ("run", "status", "attempts", "wall time", "run dir"):
        t.add_column(col, overflow="fold")
    colour = {FINISHED: "green", FAILED: "red", SKIPPED: "dim", CANCELLED: "yellow"}
    for o in result.outcomes:
        resumed = sum(a.resumed for a in o.attempts)
        attempts = f"{len(o.attempts)}" + (f" ({resumed} resumed)" if resumed else "")
        t.add_row(escape(o.spec.run_id), f"[{colour.get(o.status, 'white')}]{o.status}[/]",
                  attempts, f"{o.seconds:.1f} s" if o.attempts else "-",
                  escape(str(o.spec.run_dir)))
    console.print(t)
    for o in result.failed:
        console.print(f"[red]{escape(o.spec.run_id)}[/] failed after {len(o.attempts)} "
                      f"attempt(s); stderr tail:\n{escape(o.error or '')}")
    console.print(f"sweep.json: {result.sweep_json}")


def print_dry_run(config: SweepConfig, console: Any) -> None:
    """The runs (id, options, command line) without starting anything."""
    from rich.markup import escape

    rows = plan(config)
    finished = sum(done for _, done in rows)
    console.print(f"sweep [bold]{config.name}[/]: {len(rows)} runs of `crl {config.command}` "
                  f"in {config.sweep_dir} ({finished} already finished and would be skipped); "
                  f"retries {config.retries}, resources {config.resources}", soft_wrap=True)
    for spec, done in rows:
        opts = " ".join(f"{k}={_show(v)}" for k, v in spec.options.items())
        console.print(f"{escape(spec.run_id)}{' [dim](finished: skip)[/]' if done else ''}",
                      soft_wrap=True)
        console.print(f"  options: {escape(opts)}", soft_wrap=True)
        console.print(f"  $ {escape(shlex.join(['crl', *command_line(config, spec)]))}",
                      soft_wrap=True)
    if not config.can_resume:
        console.print(f"[dim]`crl {config.command}` has no --resume here: retries start "
                      "over[/]")
