"""Exact resume of `crl supervised` runs: SIGKILL mid-task, resume, same metrics as a run that
was never interrupted; crashes and nan losses keep the last good checkpoint; a corrupt or
mismatched checkpoint is a clear error that leaves the run directory byte for byte as it was.

Every run uses one torch thread (``--torch-threads 1``; CPU kernels reduce in an order that
depends on the thread count), W&B disabled and the generated tiny MNIST of conftest.

Compared: every row of metrics.jsonl, and every key of results.json except the wall-clock
fields ``seconds_per_task`` and ``seconds_total``, which differ between any two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from idx_files import make_tiny_mnist

from crl.checkpoint import checkpoint_path, load_checkpoint
from crl.cli import main
from crl.strategies import Strategy
from crl.supervised.benchmarks import make_benchmark
from crl.supervised.models import MLPClassifier
from crl.supervised.trainer import ClassifierHost, NonFiniteError, TrainerConfig, run_sequence
from crl.tracking import RunTracker

#: results.json keys that measure wall time, so they differ between any two runs.
WALL_TIME_FIELDS = ("seconds_per_task", "seconds_total", "plasticity_seconds")
METHOD_OPTIONS = {
    "ewc": ["--ewc-lam", "100"],
    "l2": ["--l2-lam", "0.5"],
    "replay": ["--replay-memory-size", "50", "--replay-batch-size", "16"],
    "packnet": ["--packnet-retrain-steps", "5"],
    "joint": [],
}


def _args(data_dir: Path, method: str, run_path: Path, epochs: int) -> list[str]:
    """Split-MNIST, 5 tasks of 120 images, 8 batches per epoch, a checkpoint every 5 updates
    and a metrics row every update (so every update is compared)."""
    return ["supervised", "--data-dir", str(data_dir), "--benchmark", "split-mnist",
            "--method", method, *METHOD_OPTIONS[method], "--hidden", "32", "--epochs",
            str(epochs), "--batch-size", "16", "--checkpoint-every", "5", "--log-every", "1",
            "--torch-threads", "1", "--no-progress", "--wandb", "disabled", "--no-download",
            "--run-path", str(run_path)]


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    for key in WALL_TIME_FIELDS:
        results.pop(key, None)  # joint runs measure no plasticity
    return results


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert _rows(resumed) == _rows(reference)
    assert _results(resumed) == _results(reference)
    assert not (resumed / "failed.json").exists()
    assert sorted(p.name for p in checkpoint_path(resumed).parent.iterdir()) == ["last.pt"]


def _tree_digest(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


_REFERENCES: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def reference(tiny_mnist_dir, tmp_path_factory):
    """The uninterrupted run of (method, epochs), made once per module."""
    def get(method: str, epochs: int) -> Path:
        key = (method, epochs)
        if key not in _REFERENCES:
            run = tmp_path_factory.mktemp("reference") / f"{method}-{epochs}"
            res = _invoke(_args(tiny_mnist_dir, method, run, epochs))
            assert res.exit_code == 0, res.output
            _REFERENCES[key] = run
        return _REFERENCES[key]

    return get


# -- SIGKILL in the middle of a task, in a real process ---------------------------------------
def _kill_mid_task(proc: subprocess.Popen, run_dir: Path, min_task: int) -> dict:
    """Watch the run; once its last checkpoint lies inside task >= ``min_task`` and rows were
    logged after it, SIGKILL it. The process is stopped (SIGSTOP) while it is inspected, so
    the checkpoint it is killed with is the one inspected. Returns that checkpoint."""
    ckpt, metrics = checkpoint_path(run_dir), run_dir / "metrics.jsonl"
    seen, state = None, None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            stamp = ckpt.stat().st_mtime_ns
        except FileNotFoundError:
            time.sleep(0.005)
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        if stamp != seen:
            seen, state = ckpt.stat().st_mtime_ns, load_checkpoint(ckpt)
        pos = state["trainer"]["position"]
        rows = sum(1 for _ in metrics.open("rb"))
        if pos["started"] and pos["task"] >= min_task and rows > state["rows"]:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return state
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"the run ended (exit {proc.poll()}) before a checkpoint inside task "
                f">= {min_task}: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("method", ["ewc", "replay"])
def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_run(
        method, tiny_mnist_dir, tmp_path, reference) -> None:
    run = tmp_path / "run"
    epochs = 2
    cmd = [sys.executable, "-m", "crl.cli", *_args(tiny_mnist_dir, method, run, epochs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with ThreadPoolExecutor(1) as pool:  # watch the run while the reference is computed
        watch = pool.submit(_kill_mid_task, proc, run, 2)
        expected = reference(method, epochs)
        state = watch.result()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists()
    rows_at_kill = len(_rows(run))
    assert rows_at_kill > state["rows"]  # rows after the checkpoint: to be cut, not duplicated
    pos = state["trainer"]["position"]
    assert pos["started"] and pos["task"] >= 2 and state["trainer"]["updates"] % 5 == 0

    res = _invoke(["supervised", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert "(resumed)" in res.output
    _assert_same_run(run, expected)


# -- a crash anywhere (any method), in process --------------------------------------------------
def _crash_at_row(monkeypatch, row: int) -> None:
    """Make the run die (as a Ctrl-C would) right after its metrics row ``row`` is written."""
    real_log = RunTracker.log

    def log(self, metrics, step=None):
        real_log(self, metrics, step)
        if self.rows == row:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(RunTracker, "log", log)


#: (method, metrics row after which the run dies, position of its last checkpoint). With 16
#: updates + 1 evaluation row per task, row 47 is update 45, whose checkpoint is never
#: written: the last one is update 40, the end of task 2's first epoch (batch 8 of 8, the
#: edge where the resumed epoch has no batch left). Joint: 38 batches per epoch, row 42 is
#: update 42, its last checkpoint update 40 (epoch 1, batch 2). The other methods: ewc and
#: replay are killed for real above, l2 resumes after a nan below (at epoch 1, batch 6), and
#: every strategy's state is checked bit for bit in test_checkpoint.py.
CRASHES = [("packnet", 47, (2, 0, 8)), ("joint", 42, (0, 1, 2))]


@pytest.mark.parametrize("method,row,position", CRASHES)
def test_crashed_run_resumes_exactly(method, row, position, tiny_mnist_dir, tmp_path,
                                     monkeypatch, reference) -> None:
    run = tmp_path / "run"
    _crash_at_row(monkeypatch, row)
    res = CliRunner().invoke(main, _args(tiny_mnist_dir, method, run, 2))
    assert res.exit_code != 0 and isinstance(res.exception, (KeyboardInterrupt, SystemExit))
    monkeypatch.undo()
    failed = json.loads((run / "failed.json").read_text())
    assert failed["error"] == "KeyboardInterrupt" and failed["last_checkpoint"]
    state = load_checkpoint(checkpoint_path(run))
    assert state["rows"] < row == len(_rows(run))
    assert failed["checkpoint_updates"] == state["trainer"]["updates"]
    task, epoch, batch = position
    assert state["trainer"]["position"] == {"task": task, "epoch": epoch, "batch": batch,
                                            "started": True}
    res = _invoke(["supervised", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    _assert_same_run(run, reference(method, 2))


def test_checkpointing_does_not_change_the_run(tiny_mnist_dir, tmp_path, reference) -> None:
    """Writing a checkpoint every 5 updates draws no random number and moves no weight: the
    run equals one checkpointed only at task boundaries."""
    run = tmp_path / "run"
    res = _invoke([*_args(tiny_mnist_dir, "l2", run, 2), "--checkpoint-every", "0"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(checkpoint_path(run))["config"]["trainer"]["checkpoint_every"] == 0
    assert _rows(run) == _rows(reference("l2", 2))
    assert _results(run) == _results(reference("l2", 2))


# -- nan / inf ----------------------------------------------------------------------------------
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        tiny_mnist_dir, tmp_path, monkeypatch, reference) -> None:
    run = tmp_path / "run"
    real_loss = ClassifierHost.loss
    calls = {"n": 0}

    def loss(self, batch):
        value = real_loss(self, batch)
        calls["n"] += self.module.training  # training updates only (the probe runs in eval)
        return value * float("nan") if calls["n"] == 31 and self.module.training else value

    monkeypatch.setattr(ClassifierHost, "loss", loss)
    res = CliRunner().invoke(main, _args(tiny_mnist_dir, "l2", run, 2))
    monkeypatch.undo()
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    ckpt = checkpoint_path(run)
    assert "loss became nan at task 1, update 31" in out
    assert "Fix: start a new run with a lower --lr or --l2-lam" in out
    assert f"the last good checkpoint is {ckpt} (after update 30, task 1, epoch 1, batch 6)" in (
        res.output.replace("\n", ""))
    assert not (run / "results.json").exists()
    failed = json.loads((run / "failed.json").read_text())
    assert (failed["task"], failed["update"], failed["checkpoint_updates"]) == (1, 31, 30)
    assert failed["checkpoint_position"] == {"task": 1, "epoch": 1, "batch": 6, "started": True}
    assert load_checkpoint(ckpt)["trainer"]["updates"] == 30  # none after the bad step
    # the injected nan was transient, so the kept checkpoint finishes the run exactly
    res = _invoke(["supervised", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    _assert_same_run(run, reference("l2", 2))


class _PoisonAt(Strategy):
    """Writes inf into a weight after update ``at`` (a finite loss can step into inf)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.steps = at, 0

    def after_optimizer_step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            with torch.no_grad():
                self._host().module.trunk[0].weight[0, 0] = float("inf")


def test_non_finite_weights_are_never_checkpointed(tiny_mnist) -> None:
    bench = make_benchmark("split-mnist", tiny_mnist, num_tasks=2, seed=0)
    torch.manual_seed(0)
    model = MLPClassifier(hidden=(8,), n_heads=bench.n_heads, head_outputs=bench.head_outputs)
    written: list[int] = []
    config = TrainerConfig(epochs=1, batch_size=16, checkpoint_every=3, progress=False)
    with pytest.raises(NonFiniteError, match="parameter trunk.0.weight became non-finite "
                       "after update 6 of task 0") as err:
        run_sequence(bench, model, _PoisonAt(6), config,
                     on_checkpoint=lambda s: written.append(s["updates"]))
    assert written == [3] and (err.value.task, err.value.update) == (0, 6)


# -- refusals that leave the run directory untouched --------------------------------------------
@pytest.fixture(scope="module")
def crashed_run(tiny_mnist_dir, tmp_path_factory) -> Path:
    """An l2 run that died inside task 2 (made once; tests work on copies)."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    mp = pytest.MonkeyPatch()
    _crash_at_row(mp, 47)
    CliRunner().invoke(main, _args(tiny_mnist_dir, "l2", run, 2))
    mp.undo()
    assert (run / "failed.json").exists() and not (run / "results.json").exists()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def _refused(run: Path, args: list[str], *patterns: str) -> None:
    before = _tree_digest(run)
    res = CliRunner().invoke(main, ["supervised", "--resume", str(run), *args])
    out = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    for pattern in patterns:
        assert pattern in out, out
    assert _tree_digest(run) == before


def test_conflicting_options_name_the_key(crashed_run, tmp_path) -> None:
    run = _copy(crashed_run, tmp_path)
    _refused(run, ["--lr", "0.5"], "trainer.lr: 0.001 in the checkpoint, 0.5 now")
    _refused(run, ["--l2-lam", "2", "--seed", "3"], "method_options.l2.lam: 0.5 in the "
             "checkpoint, 2.0 now", "resolved_method_options.lam", "seed: 0 in the checkpoint, "
             "3 now")
    edited = (run / "config.yaml").read_text().replace("batch_size: 16", "batch_size: 8")
    (run / "config.yaml").write_text(edited)
    _refused(run, [], "trainer.batch_size: 16 in the checkpoint, 8 now")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _foreign(path: Path) -> None:
    torch.save({"format": 1, "trainer": _PoisonAt(1)}, path)


@pytest.mark.parametrize("damage", [_truncate, _foreign], ids=["truncated", "foreign-class"])
def test_corrupt_checkpoint_is_refused(damage, crashed_run, tmp_path) -> None:
    run = _copy(crashed_run, tmp_path)
    damage(checkpoint_path(run))
    _refused(run, [], "corrupt or not a crl checkpoint", "left untouched")


def test_other_data_and_cut_metrics_are_refused(crashed_run, tmp_path) -> None:
    run = _copy(crashed_run, tmp_path)
    other = make_tiny_mnist(tmp_path / "other-data", 60, 20, seed=1)
    _refused(run, ["--data-dir", str(other)], "the data differ from the data the run was "
             "trained on")
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(rows[:10]))
    _refused(run, [], "has 10 rows but the checkpoint saw")


def test_finished_run_is_not_trained_again(tmp_path, reference) -> None:
    run = _copy(reference("l2", 2), tmp_path)
    before = _tree_digest(run)
    res = _invoke(["supervised", "--resume", str(run)])
    assert res.exit_code == 0
    assert "already finished" in res.output and "nothing to resume" in res.output
    assert _tree_digest(run) == before


def test_run_path_refuses_an_existing_run_and_several_runs(tiny_mnist_dir, tmp_path,
                                                           reference) -> None:
    run = _copy(reference("l2", 2), tmp_path)
    before = _tree_digest(run)
    res = CliRunner().invoke(main, _args(tiny_mnist_dir, "l2", run, 2))
    assert res.exit_code == 2 and "already holds a run" in res.output
    assert _tree_digest(run) == before
    res = CliRunner().invoke(main, [*_args(tiny_mnist_dir, "l2", tmp_path / "new", 2),
                                    "--methods", "l2,ewc"])
    assert res.exit_code == 2 and "--run-path names one run directory but 2 runs" in res.output
    assert not (tmp_path / "new").exists()
    res = CliRunner().invoke(main, ["supervised", "--resume", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a crl run directory" in res.output
    rl_run = tmp_path / "rl"
    rl_run.mkdir()
    (rl_run / "config.yaml").write_text("sequence: CartPoleSwap\nagent: ppo\n")
    res = CliRunner().invoke(main, ["supervised", "--resume", str(rl_run)])
    assert res.exit_code == 2 and "resume it with `crl train --resume`" in res.output
