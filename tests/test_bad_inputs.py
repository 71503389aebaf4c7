"""Bad input, as a user would give it: every case exits non-zero with no traceback, a
message naming the option or file and the problem, and nothing that existed before changed
or left half-written (no run directory is created by a refused run)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from crl.cli import main

FAST_PPO = ["--steps-per-task", "64", "--n-steps", "32", "--batch-size", "32",
            "--eval-every", "32", "--eval-episodes", "1", "--wandb", "disabled",
            "--no-progress"]


@dataclass
class Case:
    id: str
    args: Callable[[Path], list[str]]  # tmp folder -> the command line (after `crl`)
    words: tuple[str, ...]  # each must appear in the output (case-insensitive)
    setup: Callable[[Path], None] | None = None


def _yaml(name: str, text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / name).write_text(text)
    return write


def _file(name: str, text: str = "x") -> Callable[[Path], None]:
    return _yaml(name, text)


def _train(*args: str) -> Callable[[Path], list[str]]:
    # the case's options come last: they win over the fast defaults
    return lambda tmp: ["train", *FAST_PPO, "--run-dir", str(tmp / "runs"),
                        "--reference-dir", str(tmp / "refs"), *args]


def _sup(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["supervised", "--data-dir", str(tmp / "mnist"), "--no-download",
                        "--wandb", "disabled", "--no-progress", "--run-dir", str(tmp / "runs"),
                        "--train-per-task", "20", *args]


CARTPOLE_KWARG_TYPO = ("name: B\nsteps_per_task: 64\ntasks:\n  - env_id: CartPole-v1\n"
                       "    kwargs: {max_episode_stepz: 10}\n")
WRAPPER_TYPO = ("name: B\nsteps_per_task: 64\ntasks:\n  - env_id: CartPole-v1\n    wrappers:\n"
                "      - cartpole_physics: {gravty: 3}\n")

CASES = [
    # -- crl train: options ------------------------------------------------------------------
    Case("net-arch-text", _train("--net-arch", "abc"), ("--net-arch", "'abc'", "integer")),
    Case("gamma-above-1", _train("--gamma", "2"), ("gamma", "(0, 1]")),
    Case("gamma-zero", _train("--gamma", "0"), ("gamma", "(0, 1]")),
    Case("device-bogus", _train("--device", "gpu9"), ("device", "gpu9")),
    Case("prune-count", _train("--method", "packnet", "--packnet-prune-fractions", "0.5"),
         ("--packnet-prune-fractions", "one fraction per task")),
    Case("prune-text", _train("--method", "packnet", "--packnet-prune-fractions", "abc"),
         ("--packnet-prune-fractions", "comma-separated")),
    Case("prune-sum", _train("--method", "packnet", "--packnet-prune-fractions", "0.8,0.8"),
         ("prune_fractions", "sum")),
    Case("sac-never-trains", lambda tmp: ["train", "--sequence", "PendulumVariants", "--agent",
                                          "sac", "--steps-per-task", "1000", "--wandb",
                                          "disabled", "--run-dir", str(tmp / "runs")],
         ("--exploration-steps", "never train")),
    Case("unknown-method", _train("--method", "ewk"), ("ewk",)),
    Case("unknown-agent", _train("--agent", "dqn"), ("dqn", "ppo")),
    Case("unknown-sequence", _train("--sequence", "CartPoleSwapp"), ("CartPoleSwapp",
                                                                       "CartPoleSwap")),
    Case("missing-yaml-sequence", _train("--sequence", "nope.yaml"), ("nope.yaml",
                                                                        "does not exist")),
    Case("sac-on-discrete", _train("--agent", "sac"), ("SAC", "Box")),
    Case("n-steps-not-dividing", lambda tmp: ["train", "--steps-per-task", "100", "--n-steps",
                                              "64", "--wandb", "disabled", "--run-dir",
                                              str(tmp / "runs")], ("n_steps", "100")),
    Case("eval-every-zero", _train("--eval-every", "0"), ("--eval-every",)),
    Case("batch-size-zero", _train("--batch-size", "0"), ("--batch-size",)),
    Case("steps-zero", _train("--steps-per-task", "0"), ("--steps-per-task",)),
    Case("cycles-zero", _train("--cycles", "0"), ("--cycles",)),
    Case("wandb-mode", _train("--wandb", "sometimes"), ("--wandb", "sometimes")),
    Case("seed-negative", _train("--seed", "-1"), ("seed", "-1")),
    Case("ewc-lam-negative", _train("--method", "ewc", "--ewc-lam", "-1"), ("lam", "-1")),
    Case("replay-mode-ppo", _train("--method", "replay", "--replay-mode", "rehearsal"),
         ("rehearsal", "distill")),
    Case("replay-mode-typo", _train("--method", "replay", "--replay-mode", "bufer"),
         ("--replay-mode", "'bufer' is not one of", "'buffer'")),
    Case("ewc-fisher-typo", _train("--method", "ewc", "--ewc-fisher", "exact"),
         ("--ewc-fisher", "'exact' is not one of", "'empirical'")),
    Case("ewc-empirical-on-rl", _train("--method", "ewc", "--ewc-fisher", "empirical"),
         ("batch['y']", "PPO's batches", "--ewc-fisher true", "--ewc-target-key")),
    Case("ewc-empirical-on-sac", lambda tmp: ["train", "--sequence", "PendulumVariants",
                                              "--agent", "sac", "--method", "ewc",
                                              "--ewc-fisher", "empirical", "--run-dir",
                                              str(tmp / "runs")],
         ("batch['y']", "SAC's batches", "--ewc-target-key")),
    Case("gsde-multi-head-sac", lambda tmp: ["train", "--sequence", "PendulumVariants",
                                             "--agent", "sac", "--sb3-kwargs",
                                             '{"use_sde": true}', "--run-dir",
                                             str(tmp / "runs")],
         ("gSDE", "--single-head")),
    Case("replay-share-on-ppo", _train("--method", "replay", "--replay-share", "0.5"),
         ("--replay-share would do nothing", "PPO has none", "distill mode")),
    Case("replay-share-range", lambda tmp: ["train", "--sequence", "PendulumVariants",
                                            "--agent", "sac", "--method", "replay",
                                            "--replay-mode", "balanced",
                                            "--replay-share", "1", "--run-dir",
                                            str(tmp / "runs")],
         ("share must be a number in (0, 1)", "--replay-mode buffer")),
    Case("agem-memory-zero", _train("--method", "agem", "--agem-memory-per-task", "0"),
         ("memory",)),
    Case("sb3-kwargs-json", _train("--sb3-kwargs", "{bad"), ("--sb3-kwargs",)),
    Case("sb3-kwargs-unknown", _train("--sb3-kwargs", '{"learning_ratee": 0.1}'),
         ("learning_ratee",)),
    Case("require-references", _train("--require-references"), ("reference", "crl reference")),
    # -- crl train: files --------------------------------------------------------------------
    Case("yaml-env-kwarg-typo", lambda tmp: _train("--sequence", str(tmp / "k.yaml"))(tmp),
         ("max_episode_stepz", "kwargs"), _yaml("k.yaml", CARTPOLE_KWARG_TYPO)),
    Case("yaml-wrapper-typo", lambda tmp: _train("--sequence", str(tmp / "w.yaml"))(tmp),
         ("gravty", "gravity"), _yaml("w.yaml", WRAPPER_TYPO)),
    Case("yaml-not-yaml", lambda tmp: _train("--sequence", str(tmp / "b.yaml"))(tmp),
         ("b.yaml", "yaml"), _yaml("b.yaml", "name: [unclosed\n")),
    Case("yaml-unknown-key", lambda tmp: _train("--sequence", str(tmp / "u.yaml"))(tmp),
         ("u.yaml", "stepz_per_task"),
         _yaml("u.yaml", "name: U\nstepz_per_task: 5\ntasks: [{env_id: CartPole-v1}]\n")),
    Case("config-missing", _train("--config", "nowhere.yaml"), ("nowhere.yaml",)),
    Case("config-unknown-option", lambda tmp: _train("--config", str(tmp / "c.yaml"))(tmp),
         ("c.yaml", "ewc_lamda"), _yaml("c.yaml", "ewc_lamda: 3\n")),
    Case("run-dir-under-file", lambda tmp: ["train", *FAST_PPO, "--run-dir",
                                            str(tmp / "afile" / "runs")],
         ("afile", "not a folder"), _file("afile")),
    Case("resume-missing", lambda tmp: ["train", "--resume", str(tmp / "gone")], ("gone",)),
    Case("resume-not-a-run", lambda tmp: ["train", "--resume", str(tmp / "empty")],
         ("empty", "not a crl run directory"), lambda tmp: (tmp / "empty").mkdir()),
    Case("run-path-holds-run", lambda tmp: _train("--run-path", str(tmp / "held"))(tmp),
         ("held", "already holds a run"),
         lambda tmp: ((tmp / "held").mkdir(), (tmp / "held" / "config.yaml").write_text("a: 1"))),
    Case("corrupt-reference", lambda tmp: ["train", "--sequence", "CartPoleSwap", *FAST_PPO,
                                           "--run-dir", str(tmp / "runs"), "--reference-dir",
                                           str(tmp / "refs")],
         ("unreadable", "crl reference"), None),  # setup below: needs a real cache key
    # -- crl supervised ----------------------------------------------------------------------
    Case("split-tasks-7", _sup("--benchmark", "split-mnist", "--tasks", "7"),
         ("at most 5", "7")),
    Case("hidden-text", _sup("--hidden", "400,abc"), ("--hidden", "'abc'")),
    Case("seeds-text", _sup("--seeds", "a,b"), ("--seeds", "'a'")),
    Case("sup-unknown-method", _sup("--method", "ewk"), ("ewk",)),
    Case("sup-scenario", _sup("--scenario", "open-il"), ("--scenario", "open-il")),
    Case("sup-no-data", lambda tmp: ["supervised", "--data-dir", str(tmp / "nodata"),
                                     "--no-download", "--wandb", "disabled"],
         ("nodata", "--data-dir")),
    Case("sup-prune-count", _sup("--method", "packnet", "--packnet-prune-fractions", "0.5"),
         ("prune_fractions",)),
    Case("sup-run-dir-under-file", lambda tmp: ["supervised", "--data-dir", str(tmp / "mnist"),
                                                "--no-download", "--wandb", "disabled",
                                                "--no-progress", "--train-per-task", "20",
                                                "--tasks", "2", "--run-dir",
                                                str(tmp / "afile" / "r")],
         ("afile", "not a folder"), _file("afile")),
    # -- crl sweep / report / list -------------------------------------------------------------
    Case("sweep-missing", lambda tmp: ["sweep", str(tmp / "none.yaml")], ("none.yaml",)),
    Case("sweep-bad-grid", lambda tmp: ["sweep", str(tmp / "s.yaml"), "--dry-run"],
         ("s.yaml", "grid"), _yaml("s.yaml", "name: s\ncommand: train\ngrid: 3\n")),
    Case("report-nothing", lambda tmp: ["report", str(tmp / "empty2")], ("empty2",),
         lambda tmp: (tmp / "empty2").mkdir()),
    Case("list-unknown", lambda tmp: ["list", "metrics"], ("metrics",)),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path: Path, tiny_mnist_dir: Path) -> Path:
    shutil.copytree(tiny_mnist_dir, tmp_path / "mnist")
    return tmp_path


def _corrupt_reference(tmp: Path) -> None:
    """Create the reference runs of the FAST_PPO CartPoleSwap run, then break one file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = CliRunner().invoke(main, ["reference", "--sequence", "CartPoleSwap", *FAST_PPO,
                                        "--reference-dir", str(tmp / "refs")])
    assert res.exit_code == 0, res.output
    files = sorted((tmp / "refs").rglob("cartpole-*.json"))
    assert files
    files[0].write_text("{")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_clearly_and_changes_nothing(case: Case, workdir: Path) -> None:
    if case.id == "device-bogus" and torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    if case.setup is not None:
        case.setup(workdir)
    if case.id == "corrupt-reference":
        _corrupt_reference(workdir)
    before = _snapshot(workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = CliRunner().invoke(main, case.args(workdir))
    out = res.output + (str(res.exception) if res.exception and not isinstance(
        res.exception, SystemExit) else "")
    assert res.exit_code != 0, out
    assert not (res.exception and not isinstance(res.exception, SystemExit)), (
        f"uncaught {type(res.exception).__name__}: {res.exception}")
    assert "Traceback" not in out
    for word in case.words:
        assert word.lower() in out.lower(), f"{word!r} not in: {out}"
    after = _snapshot(workdir)
    assert after == before, "files changed: " + json.dumps(
        sorted(set(after.items()) ^ set(before.items())), default=str)[:500]
    assert not (workdir / "runs").exists() or not any((workdir / "runs").rglob("config.yaml"))


@pytest.mark.parametrize("code, words", [
    (errno.ENOTDIR, ("not a folder",)), (errno.EROFS, ("read-only",)),
    (errno.ENOSPC, ("disk is full", "checkpoint is kept")), (errno.EACCES, ("permission",)),
])
def test_file_system_errors_name_the_path_and_the_fix(code: int, words: tuple[str, ...]) -> None:
    """Read-only file systems and full disks cannot be made in a test without privileges:
    the one translation every command uses is checked on the errors the OS raises."""
    from crl.cli import filesystem_message

    exc = OSError(code, os.strerror(code), "/data/runs/x/checkpoints/last.pt")
    msg = filesystem_message(exc)
    assert msg is not None and "/data/runs/x/checkpoints/last.pt" in msg
    for w in words:
        assert w in msg
    # torch reports a full disk while saving as a RuntimeError without an errno
    wrapped = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")
    assert "disk is full" in (filesystem_message(wrapped) or "")
    assert filesystem_message(RuntimeError("shape mismatch")) is None
