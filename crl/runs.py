"""The life cycle of a run directory, shared by `crl train` and `crl supervised`.

A run directory is *new* (none of :data:`RUN_FILES`), *running or interrupted* (config and
metrics, maybe a checkpoint), *finished* (``results.json``) or *failed* (``failed.json``,
no results). Both hosts refuse to start a new run over an existing one, resume only
unfinished runs and record failures the same way, so that `crl sweep` and `crl report` can
read any run without knowing which command wrote it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from crl.checkpoint import CheckpointError, checkpoint_path
from crl.tracking import RUN_FILES, atomic_write_text, count_lines, to_builtin

FAILED = "failed.json"

#: kind -> (config key that identifies it, the command that resumes it)
_KINDS = {"train": ("sequence", "crl train --resume"),
          "supervised": ("benchmark", "crl supervised --resume")}


class RunFinished(Exception):
    """A resume of a run that already wrote its results; nothing was run."""

    def __init__(self, run_dir: Path, results: dict[str, Any]) -> None:
        super().__init__(f"the run in {run_dir} already finished (results.json exists); "
                         "nothing to resume")
        self.run_dir = run_dir
        self.results = results


class RunFailed(FloatingPointError):
    """Training diverged (a nan/inf loss). The run directory keeps its last good checkpoint
    (``checkpoint``, None if none was written) and ``failed.json``; it has no results.json.

    ``step`` is the env step (RL) or update (supervised) of the bad loss; ``position`` is
    where the checkpoint stands, as the host describes it.
    """

    def __init__(self, message: str, *, run_dir: Path, checkpoint: Path | None,
                 task: int | None, step: int | None, position: Any = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.task = task
        self.step = step
        self.position = position

    @property
    def update(self) -> int | None:
        """The supervised hosts' name for ``step``."""
        return self.step


class RunDirError(ValueError):
    """A folder given as a run directory is not one, or belongs to the other command."""


def holds_run(run_dir: str | Path) -> list[str]:
    """The run files already in ``run_dir`` (empty: a new run may start there)."""
    return [f for f in RUN_FILES if (Path(run_dir) / f).exists()]


def raise_if_finished(run_dir: str | Path) -> None:
    """:class:`RunFinished` (with the run's results) if ``run_dir`` has results.json."""
    results = Path(run_dir) / "results.json"
    if results.is_file():
        try:
            summary = json.loads(results.read_text())
        except ValueError:
            summary = {}
        raise RunFinished(Path(run_dir), summary)


def read_run_config(run_dir: str | Path, kind: str) -> dict[str, Any]:
    """The config.yaml of a ``kind`` ("train" or "supervised") run; anything else is a clear
    error naming the right command."""
    key, command = _KINDS[kind]
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a crl run directory (no config.yaml); give the folder that "
            f"`crl {kind}` printed as its run directory"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunDirError(f"{path} is not valid YAML ({exc}); restore it from the run") from exc
    if not isinstance(data, dict) or key not in data:
        other = next((c for k, (other_key, c) in _KINDS.items()
                      if k != kind and isinstance(data, dict) and other_key in data), None)
        hint = f"; resume it with `{other}`" if other else ""
        raise RunDirError(f"{path} is not the config of a `crl {kind}` run (no {key!r} "
                          f"key){hint}")
    return data


def check_metrics_rows(run_dir: str | Path, expected: int) -> None:
    """A resume cuts ``metrics.jsonl`` back to the rows its checkpoint saw; fewer rows than
    that mean the file was changed, a :class:`CheckpointError` before anything is written."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = count_lines(path)
    if rows < expected:
        raise CheckpointError(
            f"{path} has {rows} rows but the checkpoint saw {expected}: the metrics file was "
            "edited or replaced; restore it, or start the run again"
        )


def clear_for_resume(run_dir: str | Path) -> None:
    """Once a resume is validated: drop the failure record and the temporary file of a
    checkpoint write cut short by a kill."""
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
    for stale in checkpoint_path(run_dir).parent.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def record_failure(run_dir: str | Path, exc: BaseException, details: Mapping[str, Any]) -> Path:
    """Write ``failed.json`` (error, message, time and the host's ``details``)."""
    record = {"error": type(exc).__name__, "message": str(exc), **details,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(run_dir) / FAILED
    atomic_write_text(path, json.dumps(to_builtin(record), indent=1))
    return path


def record_run_failure(run_dir: Path, exc: BaseException, *, diverged: bool,
                       checkpoint: Path | None, checkpoint_at: str, details: Mapping[str, Any],
                       command: str, fix: str, task: int | None, step: int | None,
                       position: Any = None) -> RunFailed | None:
    """The one failure path of both hosts: write ``failed.json`` (the error, the host's
    ``details``: where it happened and where the last checkpoint stands) and, for a diverged
    run (``diverged``: a nan/inf loss), return the :class:`RunFailed` to raise, whose message
    names the checkpoint kept, the failure record and the fix. ``checkpoint`` is None when
    none was written; ``checkpoint_at`` says where it stands in the host's words."""
    record_failure(run_dir, exc, details)
    if not diverged:
        return None
    where = "no checkpoint was written before it" if checkpoint is None else (
        f"the last good checkpoint is {checkpoint} ({checkpoint_at})")
    return RunFailed(
        f"training diverged: {exc}. The run stopped and {where}; the failure is recorded in "
        f"{run_dir / FAILED} and the run has no results. Fix: {fix}; `{command} --resume "
        f"{run_dir}` would continue from that checkpoint with the same settings, which "
        "diverge again",
        run_dir=run_dir, checkpoint=checkpoint, task=task, step=step, position=position)
