"""Where `crl report` gets its runs: local run directories and W&B (offline or the API).

Every source is read into the same :class:`RunData` (resolved config, final results, metric
rows), so aggregation and plots never care whether a run came from disk or from W&B. A run
that cannot be used (unfinished, failed, unreadable) becomes a :class:`SkippedRun` with the
reason: a report over a sweep must list its failures, not die on them.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from crl.metric_keys import EVAL_PREFIX, RL_SCORE, SL_ACC_PREFIX, parse_rl_task_key

RL = "rl"
SUPERVISED = "supervised"

class ReportError(ValueError):
    """Bad input to `crl report`; the message names the problem and the fix."""


@dataclass
class SkippedRun:
    source: str
    reason: str


@dataclass
class RunData:
    """One finished run, whatever its source.

    ``rows`` are the evaluation rows of the metric history (training rows dropped), read on
    first use from ``metrics_path`` for local runs, or given by the W&B API.
    """

    source: str
    kind: str
    config: dict[str, Any]
    results: dict[str, Any]
    name: str
    wandb_group: str | None = None
    metrics_path: Path | None = None
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed", self.results.get("seed"))
        return None if seed is None else int(seed)

    @property
    def method(self) -> str:
        return str(self.config.get("method", self.results.get("method", "?")))

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = _read_eval_rows(self.metrics_path) if self.metrics_path else []
        return self._rows


def _is_eval_row(row: Mapping[str, Any]) -> bool:
    return any(k.startswith(EVAL_PREFIX) for k in row) or "stage" in row


def _read_eval_rows(path: Path) -> list[dict[str, Any]]:
    """Evaluation rows of metrics.jsonl; a torn last line (killed writer) is ignored."""
    rows = []
    if not path.is_file():
        return rows
    with path.open() as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and _is_eval_row(row):
                rows.append(row)
    return rows


def run_kind(config: Mapping[str, Any]) -> str | None:
    if "benchmark" in config:
        return SUPERVISED
    if "sequence" in config and "agent" in config:
        return RL
    return None


# --------------------------------------------------------------------------------------------
# Local run directories
# --------------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    # W&B's own files/ folder holds a config.yaml too, but never a metrics.jsonl
    return (path / "config.yaml").is_file() and (
        (path / "metrics.jsonl").is_file() or (path / "results.json").is_file()
    )


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories given directly or anywhere below the given folders (sorted, unique).

    The walk does not descend into a run directory or a ``wandb`` folder.
    """
    if not paths:
        raise ReportError("no run directories given; pass run directories or folders that "
                          "hold them (e.g. runs/), or --wandb-group")
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ReportError(f"{p} does not exist; pass run directories or folders that hold "
                              "them")
        if not p.is_dir():
            raise ReportError(f"{p} is not a directory; pass a run directory (the folder with "
                              "config.yaml and results.json) or a folder above it")
        if is_run_dir(p):
            found[p.resolve()] = None
            continue
        for root, dirs, _files in os.walk(p):
            here = Path(root)
            if is_run_dir(here):
                found[here.resolve()] = None
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if d != "wandb" and not d.startswith("."))
    if not found:
        shown = ", ".join(str(p) for p in paths)
        raise ReportError(f"no run directories (config.yaml with metrics.jsonl/results.json) "
                          f"found under {shown}; pass the --run-dir of crl train / crl "
                          "supervised, or a folder above it")
    return sorted(found)


def _read_wandb_group(path: Path) -> str | None:
    try:
        group = json.loads((path / "wandb_run.json").read_text()).get("group")
    except (OSError, ValueError, AttributeError):
        return None
    return None if group is None else str(group)


def load_run_dir(path: Path) -> RunData | SkippedRun:
    """A finished run of ``path``, or the reason it cannot be reported."""
    src = str(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        return SkippedRun(src, f"config.yaml unreadable: {exc}")
    if not isinstance(config, dict):
        return SkippedRun(src, "config.yaml does not hold a mapping")
    kind = run_kind(config)
    if kind is None:
        return SkippedRun(src, "config.yaml names neither a sequence + agent (crl train) nor "
                          "a benchmark (crl supervised)")
    results_path = path / "results.json"
    if not results_path.is_file():
        return SkippedRun(src, "no results.json: the run is unfinished or failed"
                          + (" (checkpoints exist: resume it)" if (path / "checkpoints")
                             .is_dir() else ""))
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as exc:
        return SkippedRun(src, f"results.json unreadable: {exc}")
    if not isinstance(results, dict):
        return SkippedRun(src, "results.json does not hold a mapping")
    group = _read_wandb_group(path) or config.get("group")
    return RunData(src, kind, config, results, name=path.name, wandb_group=group,
                   metrics_path=path / "metrics.jsonl")


def load_run_dirs(paths: Sequence[str | Path], *, wandb_group: str | None = None
                  ) -> tuple[list[RunData], list[SkippedRun]]:
    """Every run under ``paths``; with ``wandb_group``, only that W&B group's runs (offline:
    the group recorded in each run's wandb_run.json, else its config)."""
    runs: list[RunData] = []
    skipped: list[SkippedRun] = []
    dirs = find_run_dirs(paths)
    groups_seen: set[str] = set()
    for d in dirs:
        if wandb_group is not None:
            group = _read_wandb_group(d)
            if group is None:
                try:
                    group = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("group")
                except (OSError, yaml.YAMLError, AttributeError):
                    group = None
            if group != wandb_group:
                if group is not None:
                    groups_seen.add(str(group))
                continue
        item = load_run_dir(d)
        (runs if isinstance(item, RunData) else skipped).append(item)
    if wandb_group is not None and not runs and not skipped:
        known = ", ".join(sorted(groups_seen)) or "none"
        raise ReportError(f"no runs of W&B group {wandb_group!r} under "
                          f"{', '.join(map(str, paths))} (groups found there: {known}); "
                          "check the group name, pass the folder that holds its runs, or "
                          "add --wandb-online to read it from the W&B API")
    return runs, skipped


# --------------------------------------------------------------------------------------------
# W&B API (online)
# --------------------------------------------------------------------------------------------
T = TypeVar("T")


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run a W&B API call in a daemon thread and give up after ``timeout_s``.

    The W&B client retries network errors for minutes; a report must fail fast instead.
    A daemon thread left waiting never blocks interpreter exit.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"crl-report-wandb-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ReportError(f"W&B API unreachable: no answer to {what} within {timeout_s:g} s; "
                          "pass run directories instead")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, ReportError):
            raise exc
        raise ReportError(f"W&B API unreachable: {what} failed ({type(exc).__name__}: {exc}); "
                          "pass run directories instead") from exc
    return box["value"]


def make_wandb_api(timeout_s: float) -> Any:
    """The real W&B API client (tests replace this function with a fake)."""
    import wandb

    return wandb.Api(timeout=max(1, int(timeout_s)))


def _plain(value: Any) -> Any:
    """W&B config values sometimes come wrapped as {"value": x}; nested mappings to dicts."""
    if isinstance(value, Mapping):
        if set(value) == {"value"}:
            return _plain(value["value"])
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _history_rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """W&B history rows as metrics.jsonl rows: ``_step`` becomes ``step``, W&B's own
    underscore keys are dropped, and rows without evaluations are left out."""
    for row in rows:
        out = {k: v for k, v in row.items() if not str(k).startswith("_")}
        if "_step" in row:
            out = {"step": row["_step"]} | out
        if _is_eval_row(out):
            yield out


def load_wandb_group_online(group: str, *, project: str | None = None,
                            entity: str | None = None, timeout_s: float = 30.0
                            ) -> tuple[list[RunData], list[SkippedRun]]:
    """Runs of a W&B group through ``wandb.Api()``: config, summary (the final metrics, as
    the tracker writes them) and the full history (evaluation rows) of each run.

    Runs that are not in state "finished" are skipped. Every call is bounded by
    ``timeout_s``; a failure is a :class:`ReportError` starting "W&B API unreachable".
    """
    project = project or os.environ.get("WANDB_PROJECT") or "crl"
    entity = entity or os.environ.get("WANDB_ENTITY")
    api = _bounded(lambda: make_wandb_api(timeout_s), timeout_s, "connecting")
    path = f"{entity}/{project}" if entity else project
    api_runs = _bounded(lambda: list(api.runs(path, filters={"group": group})), timeout_s,
                        f"listing the runs of group {group!r} in {path}")
    if not api_runs:
        raise ReportError(f"no W&B runs in group {group!r} of project {path}; check the group, "
                          "--wandb-project and --wandb-entity")
    runs: list[RunData] = []
    skipped: list[SkippedRun] = []
    for r in api_runs:
        rid = str(getattr(r, "id", "?"))
        src = f"wandb:{path}/{rid}"
        state = str(getattr(r, "state", "finished"))
        if state != "finished":
            skipped.append(SkippedRun(src, f"W&B run state is {state!r}, not finished"))
            continue
        # config and summary load lazily over the network too: bound the whole read
        config, summary, rows = _bounded(lambda r=r: _read_api_run(r), timeout_s,
                                         f"reading run {rid}")
        kind = run_kind(config)
        if kind is None:
            skipped.append(SkippedRun(src, "its W&B config names neither a sequence + agent "
                                      "nor a benchmark: not a crl run"))
            continue
        runs.append(RunData(src, kind, config, summary, name=str(getattr(r, "name", rid)),
                            wandb_group=group, _rows=rows))
    return runs, skipped


def _read_api_run(r: Any) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Config, summary and evaluation rows of one W&B API run (network calls inside)."""
    config = _plain(dict(r.config))
    summary = _plain({k: r.summary[k] for k in r.summary.keys()})
    rows = list(_history_rows(r.scan_history())) if run_kind(config) else []
    return config, summary, rows


# --------------------------------------------------------------------------------------------
# Evaluations of one run
# --------------------------------------------------------------------------------------------
@dataclass
class RLCurves:
    """Per-task scores of one RL run at every evaluation (nan where unknown).

    Stage ``s`` of the schedule trains task ``schedule[s]`` during [starts[s], ends[s]].
    """

    steps: np.ndarray
    scores: np.ndarray
    task_names: list[str]
    schedule: list[int]
    stage_ends: list[int]

    @property
    def stage_starts(self) -> list[int]:
        return [0, *self.stage_ends[:-1]]

    def performance(self) -> np.ndarray:
        """P(t): the mean over the schedule's stages, as the runner's final_performance."""
        return self.scores[:, self.schedule].mean(axis=1)


def _floats(values: Iterable[Any]) -> list[float]:
    return [np.nan if v is None else float(v) for v in values]


def rl_curves(run: RunData) -> RLCurves | None:
    """The run's evaluations from results.json's eval record, else from its metric rows
    (W&B history); None when the run has no evaluations or no schedule in its config."""
    cfg = run.config
    names = [str(n) for n in cfg.get("tasks") or []]
    schedule = [int(s) for s in cfg.get("schedule") or []]
    stage_steps = [int(s) for s in cfg.get("steps_per_task_resolved") or []]
    if not names or not schedule or len(stage_steps) != len(schedule):
        return None
    ends = np.cumsum(stage_steps).astype(int).tolist()
    record = run.results.get("eval")
    if isinstance(record, Mapping) and record.get("steps"):
        tasks = [int(t) for t in record["tasks"]]
        steps = np.asarray(record["steps"], dtype=np.int64)
        scores = np.full((steps.size, len(names)), np.nan)
        raw = np.array([_floats(r) for r in record["scores"]], dtype=float)
        for j, t in enumerate(tasks):
            scores[:, t] = raw[:, j]
    else:
        by_step: dict[int, dict[int, float]] = {}
        for row in run.rows:
            for key, value in row.items():
                parsed = parse_rl_task_key(str(key))
                if parsed and parsed[2] == RL_SCORE and row.get("step") is not None and (
                        value is not None):
                    by_step.setdefault(int(row["step"]), {})[parsed[0]] = float(value)
        if not by_step:
            return None
        steps = np.array(sorted(by_step), dtype=np.int64)
        scores = np.full((steps.size, len(names)), np.nan)
        for i, s in enumerate(steps):
            for t, v in by_step[int(s)].items():
                if t < len(names):
                    scores[i, t] = v
    return RLCurves(steps, scores, names, schedule, ends)


def sl_matrix(run: RunData) -> tuple[np.ndarray, list[str]] | None:
    """The accuracy matrix R[i, j] (after task i, on task j) and the task names; from
    results.json, else rebuilt from the end-of-task evaluation rows (W&B history). None for
    runs without a sequence (joint training)."""
    rows = [r for r in run.rows if "task" in r and any(
        str(k).startswith(SL_ACC_PREFIX) for k in r)]
    names: list[str] = []
    if rows:
        names = [str(k)[len(SL_ACC_PREFIX):] for k in rows[0] if
                 str(k).startswith(SL_ACC_PREFIX)]
    matrix = run.results.get("accuracy_matrix")
    if matrix is not None:
        R = np.array([_floats(r) for r in matrix], dtype=float)
    elif rows:
        T = len(names)
        R = np.full((T, T), np.nan)
        for r in rows:
            i = int(r["task"])
            if 0 <= i < T:
                R[i] = _floats(r.get(SL_ACC_PREFIX + n) for n in names)
    else:
        return None
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        return None
    if len(names) != R.shape[0]:
        names = [f"task {i}" for i in range(R.shape[0])]
    return R, names
