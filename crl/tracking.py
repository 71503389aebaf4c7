"""Run tracking: a local run directory (the source of truth) mirrored to Weights & Biases.

The run directory holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (append-only,
one JSON object per line), ``results.json`` (final metrics, written atomically), ``plots/``
(PNG) and, unless W&B is disabled, W&B's own ``wandb/`` folder. W&B runs offline by default:
no account and no network needed, ``wandb sync`` uploads later. Logging never stops
training: if W&B cannot start or log, the run goes on with the local directory alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import yaml

from crl.plots import plot_matrix_heatmap

WANDB_MODES = ("offline", "online", "disabled")


def to_builtin(value: Any) -> Any:
    """numpy/torch scalars and arrays → JSON-able Python values (nan/inf become None)."""
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_builtin(value.tolist())
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temporary file, fsync and ``os.replace``, so that a crash (even SIGKILL)
    never leaves half a file: the old file, if any, survives any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would hide run files from others
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def count_lines(path: Path) -> int:
    """Rows of a JSON-lines file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


@functools.cache
def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0666 minus the process umask); read once,
    because reading the umask means setting it for a moment."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Files whose presence means a directory already holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "checkpoints")


class RunLockedError(ValueError):
    """Another process holds the run directory (a second resume, or two runs started with
    the same --run-path at once)."""


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as a process uses the run:
    the kernel drops it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.path = run_dir / ".lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise RunLockedError(
                f"{run_dir} is in use by another crl process"
                + (f" (pid {holder})" if holder else "")
                + "; wait for it to end, or stop it, before resuming or starting this run"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class RunTracker:
    """One run: local directory + optional W&B mirror. Use as a context manager."""

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any],
        *,
        wandb_mode: str = "offline",
        project: str = "crl",
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        job_type: str | None = None,
        resume_id: str | None = None,
        resume_rows: int | None = None,
        new_run: bool = False,
    ) -> None:
        """``resume_rows``: continue an interrupted run in ``run_dir``: metrics.jsonl is cut
        back to its first ``resume_rows`` rows (the rows its checkpoint had seen, so no row is
        lost or duplicated) and the W&B run id of ``wandb_run.json`` is reused. ``new_run``:
        the folder must not hold a run yet, checked again under the run's lock (two
        processes given the same folder at once: one runs, the other is refused)."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}"
            )
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.run_dir)  # before anything is written: one process a run
        try:
            if new_run and (existing := [
                    f for f in RUN_FILES if (self.run_dir / f).exists()]):
                raise RunLockedError(
                    f"{self.run_dir} already holds a run ({', '.join(existing)}), started "
                    "by another process just now; choose another --run-path"
                )
            if resume_rows is not None and (self.run_dir / "results.json").exists():
                raise RunLockedError(f"the run in {self.run_dir} finished while this resume "
                                     "was starting; nothing to resume")
        except BaseException:
            self._lock.release()
            raise
        (self.run_dir / "plots").mkdir(exist_ok=True)
        self.config = to_builtin(dict(config))
        atomic_write_text(
            self.run_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False)
        )
        metrics_path = self.run_dir / "metrics.jsonl"
        if resume_rows is not None:
            self._truncate_metrics(metrics_path, resume_rows)
            if resume_id is None:
                resume_id = self.previous_wandb_id(self.run_dir)
        self.rows = count_lines(metrics_path)
        self._metrics = metrics_path.open("a")
        self.finished = False
        self.wandb_mode = "disabled"
        self.wandb_run: Any = None
        self._wandb_failed: set[str] = set()
        if wandb_mode != "disabled":
            self._start_wandb(wandb_mode, project, group, name, tags, job_type, resume_id)

    @staticmethod
    def _truncate_metrics(path: Path, rows: int) -> None:
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        if len(lines) < rows:
            raise ValueError(
                f"{path} has {len(lines)} rows but the checkpoint saw {rows}: the metrics file "
                "was edited or replaced since; restore it or start the run again"
            )
        if len(lines) > rows:
            atomic_write_text(path, "".join(lines[:rows]))

    @staticmethod
    def previous_wandb_id(run_dir: str | Path) -> str | None:
        """The W&B run id an earlier start of this run directory used (None if none)."""
        info = Path(run_dir) / "wandb_run.json"
        try:
            return json.loads(info.read_text())["id"]
        except (OSError, ValueError, KeyError):
            return None

    # -- W&B -------------------------------------------------------------------------------
    def _start_wandb(self, mode: str, project: str, group: str | None, name: str | None,
                     tags: Sequence[str] | None, job_type: str | None,
                     resume_id: str | None) -> None:
        """Start W&B in ``mode``; online falling over goes offline, offline failing goes off."""
        modes = [mode, "offline"] if mode == "online" else [mode]
        for m in modes:
            try:
                import wandb

                # wandb offers Weave (LLM tracing) when a module named like an LLM library is
                # loaded, and our `agents` package matches the OpenAI Agents SDK's name; its
                # documented switch turns that off (a value the user set is kept).
                os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
                self.wandb_run = wandb.init(
                    mode=m, dir=str(self.run_dir), config=self.config, project=project,
                    group=group, name=name, tags=list(tags) if tags else None,
                    job_type=job_type, id=resume_id, resume="allow" if resume_id else None,
                    reinit="create_new", settings=wandb.Settings(silent=True,
                                                                 console="off"),
                )
                self.wandb_mode = m
                break
            except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop a run
                warnings.warn(f"W&B could not start in {m} mode ({exc}); "
                              + ("trying offline" if m == "online" else "logging locally only"),
                              RuntimeWarning, stacklevel=3)
        if self.wandb_run is not None:
            atomic_write_text(self.run_dir / "wandb_run.json", json.dumps(
                {"id": self.wandb_run.id, "mode": self.wandb_mode, "project": project,
                 "group": group, "name": name}, indent=1))

    def _wandb(self, what: str, fn: Callable[[], Any]) -> None:
        """Run a W&B call; a failure is one warning per kind of call, never an exception.

        The run is kept after a failure so that later calls (and ``finish``, which closes
        the offline files) still get their chance.
        """
        if self.wandb_run is None:
            return
        try:
            fn()  # attribute access on the run happens inside, under the guard
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            if what not in self._wandb_failed:
                self._wandb_failed.add(what)
                warnings.warn(f"W&B {what} failed ({type(exc).__name__}: {exc}); the local run "
                              "directory keeps everything, further failures of this kind are "
                              "not repeated", RuntimeWarning, stacklevel=3)

    # -- logging ---------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Append one row to metrics.jsonl (flushed) and mirror it to W&B.

        The row is ``{"step": step, **metrics}`` (no "step" key when step is None); nan/inf
        are stored as null and not sent to W&B. "step" is reserved as a metric name.
        """
        if self.finished:
            raise RuntimeError(f"the run in {self.run_dir} is finished; log before finish()")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument of log(); rename the "
                             "metric or pass it as step=")
        row = to_builtin(dict(metrics))
        if step is not None:
            row = {"step": int(step)} | row
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.rows += 1
        if self.wandb_run is not None:
            payload = {k: v for k, v in row.items() if k != "step" and v is not None}
            self._wandb("log", lambda: self.wandb_run.log(payload, step=step))

    def log_image(self, key: str, path: str | Path) -> Path:
        """Log an image file (kept where it is, normally run_dir/plots/) as ``wandb.Image``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"log_image({key!r}): no image file at {path}; save the "
                                    "plot before logging it")
        if self.wandb_run is not None:
            import wandb

            self._wandb("image", lambda: self.wandb_run.log({key: wandb.Image(str(path))}))
        return path

    def log_matrix(self, key: str, matrix: np.ndarray, row_labels: Sequence[str],
                   col_labels: Sequence[str]) -> Path:
        """Heatmap PNG in plots/, and in W&B a Table of the matrix plus the heatmap image."""
        matrix = np.asarray(matrix, dtype=float)
        path = plot_matrix_heatmap(matrix, self.run_dir / "plots" / f"{key}.png",
                                   list(row_labels), list(col_labels), title=key)
        if self.wandb_run is not None:
            import wandb

            def _log() -> None:
                table = wandb.Table(columns=["after task", *col_labels],
                                    data=[[r, *map(float, row)]
                                          for r, row in zip(row_labels, matrix, strict=True)])
                self.wandb_run.log({f"{key}/table": table, f"{key}/heatmap": wandb.Image(
                    str(path))})

            self._wandb("matrix", _log)
        return path

    def finish(self, results: Mapping[str, Any] | None = None, *, failed: bool = False) -> None:
        """Write results.json, put final metrics in the W&B summary, close everything.

        Idempotent; ``failed=True`` (set by the context manager on an exception) ends the
        W&B run with exit code 1. The W&B summary gets numbers and lists of numbers; nested
        records stay in results.json. wandb-core completes the offline ``.wandb`` file just
        after this returns (asynchronously); the process's exit, or ``wandb.teardown()``,
        waits for it, so run ``wandb sync`` after the process has ended.
        """
        if self.finished:
            return
        self.finished = True
        try:
            self._finish(results, failed)
        finally:
            self._lock.release()

    def _finish(self, results: Mapping[str, Any] | None, failed: bool) -> None:
        if results is not None:
            clean = to_builtin(dict(results))
            atomic_write_text(self.run_dir / "results.json", json.dumps(clean, indent=1))
            if self.wandb_run is not None:
                # numbers and per-task lists of numbers; bulky records (tables, curves) stay
                # in results.json only
                scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) or (
                    isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))}
                self._wandb("summary", lambda: self.wandb_run.summary.update(scalars))
        self._metrics.close()
        if self.wandb_run is not None:
            self._wandb("finish", lambda: self.wandb_run.finish(exit_code=1 if failed else 0))

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(failed=exc_type is not None)
