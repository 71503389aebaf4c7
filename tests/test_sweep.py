"""`crl sweep`: config checks and --dry-run without Ray; one real 2x2 sweep on a local Ray
instance (2 CPUs) with a run that diverges, retried from its checkpoint. Ray 2.60 cannot
bind to 127.0.0.1 on Linux (see crl.sweep.start_ray); its token authentication guards it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from crl.cli import click_params, command_options, main
from crl.sweep import SweepConfigError, load_sweep, run_id, run_sweep


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _supervised_sweep(tmp_path: Path, data_dir: Path, **changes) -> dict:
    """Tiny split-MNIST runs (2 tasks, 16 hidden units) on the generated IDX files."""
    return {
        "name": "tiny",
        "command": "supervised",
        "base": {"benchmark": "split-mnist", "tasks": 2, "hidden": [16],
                 "data_dir": str(data_dir), "download": False},
        # the EWC penalty times 1e300 overflows float32: nan loss on the first update of
        # task 1 (after the task-0 checkpoint), while finetune ignores ewc_lam. The failing
        # run comes first, so that its retry overlaps the other runs (2 CPUs, 5 attempts)
        "grid": {"method": ["ewc", "finetune"], "seed": [0]},
        "overrides": [{"ewc_lam": 1.0e300}, {}],
        "retries": 1,
        "resources": {"num_cpus": 1},
        "out": str(tmp_path / "sweeps"),
    } | changes


# --------------------------------------------------------------------------------------------
# Config checks (no Ray)
# --------------------------------------------------------------------------------------------
def test_every_problem_of_a_bad_sweep_is_listed_at_once(tmp_path: Path, tiny_mnist_dir) -> None:
    cfg = _supervised_sweep(tmp_path, tiny_mnist_dir)
    cfg |= {
        "retry": 2,  # typo of retries
        "retries": -1,
        "resources": {"num_cpus": 0, "gpus": 1},
        "timeout": "soon",
    }
    cfg["base"] |= {"lrr": 0.1, "epochs": 0, "run_dir": "elsewhere", "benchmark": "cifar"}
    cfg["grid"] = {"method": ["finetune", "ewcc"], "seed": [], "lr": 0.1}
    cfg["overrides"] = [{}, "lr=3"]
    with pytest.raises(SweepConfigError) as err:
        load_sweep(_write(tmp_path / "bad.yaml", cfg), options_for=command_options)
    msg = str(err.value)
    expected = [
        "retry: unknown key (did you mean 'retries'?)",
        "retries: must be an integer >= 0, got -1",
        "resources.num_cpus: must be a number > 0, got 0",
        "resources.gpus: unknown resource; valid: num_cpus, num_gpus, memory",
        "timeout: must be a number of seconds > 0 per attempt, got 'soon'",
        "grid.seed: is empty: a grid axis needs at least one value",
        "grid.lr: must be a list of values, got 0.1",
        "overrides[1]: must be a mapping of option: value, got 'lr=3'",
        "base.lrr: unknown option of `crl supervised` (did you mean 'lr'?)",
        "base.epochs: Invalid value for '--epochs': 0 is not in the range x>=1.",
        "base.run_dir: cannot be set in a sweep",
        "base.benchmark: Invalid value for '--benchmark': 'cifar' is not one of",
        "grid.method[1]: unknown method 'ewcc'",
    ]
    for line in expected:
        assert line in msg, f"missing {line!r} in:\n{msg}"
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}: {len(expected)} problems:")


def test_run_level_checks_name_the_runs(tmp_path: Path, tiny_mnist_dir) -> None:
    """Checks that need a whole run config go through the command's own code: a negative
    strength fails in the strategy's constructor, a missing data folder before loading."""
    cfg = _supervised_sweep(tmp_path, tiny_mnist_dir, overrides=[{}, {"ewc_lam": -1.0}])
    cfg["grid"]["seed"] = [0, 1]
    cfg["base"]["data_dir"] = str(tmp_path / "no-such-folder")
    with pytest.raises(SweepConfigError) as err:
        load_sweep(_write(tmp_path / "s.yaml", cfg), options_for=command_options)
    msg = str(err.value)
    assert "no-such-folder is not a folder" in msg
    assert "runs ewc-split-mnist-seed0, ewc-split-mnist-ewc_lam=-1-seed0, " \
           "ewc-split-mnist-seed1 and 5 more: data-dir" in msg
    cfg["base"]["data_dir"] = str(tiny_mnist_dir)
    with pytest.raises(SweepConfigError) as err:
        load_sweep(_write(tmp_path / "s.yaml", cfg), options_for=command_options)
    assert "runs ewc-split-mnist-ewc_lam=-1-seed0, ewc-split-mnist-ewc_lam=-1-seed1: ewc: " \
           "lam (regularisation strength) must be a finite number >= 0, got -1.0" in str(err.value)
    assert "(options given: --ewc-lam)" in str(err.value)  # crl supervised's own message


def test_sweep_checks_a_run_the_way_crl_train_does(tmp_path: Path) -> None:
    """A grid point `crl train` would refuse before its run directory (SAC replay's
    rehearsal mode) is a problem of the sweep file, not a failed run."""
    cfg = {"command": "train", "base": {"sequence": "PendulumVariants", "agent": "sac",
                                        "method": "replay"},
           "grid": {"replay_mode": ["buffer", "rehearsal"]}, "out": str(tmp_path / "out")}
    with pytest.raises(SweepConfigError) as err:
        load_sweep(_write(tmp_path / "s.yaml", cfg), options_for=command_options)
    msg = str(err.value)
    assert "1 problem" in msg and "replay_mode=rehearsal" in msg
    assert "critic would never rehearse" in msg and "replay_mode=buffer" not in msg


def test_unknown_sequence_and_agent_option_of_rl_runs(tmp_path: Path) -> None:
    cfg = {"command": "train", "base": {"agent": "ppo", "buffer_size": 1000},
           "grid": {"sequence": ["CartPoleSwap", "NoSuchSequence"], "seed": [0]}}
    with pytest.raises(SweepConfigError) as err:
        load_sweep(_write(tmp_path / "rl.yaml", cfg), options_for=command_options)
    msg = str(err.value)
    assert "run ppo-NoSuchSequence-seed0: Unknown sequence 'NoSuchSequence'" in msg
    assert "run ppo-CartPoleSwap-seed0: unknown option(s) ['buffer_size'] for the PPO agent" \
        in msg
    assert msg.startswith(f"{tmp_path / 'rl.yaml'}: 2 problems:")


def test_grid_expands_to_typed_runs_with_stable_ids(tmp_path: Path) -> None:
    cfg = {
        "command": "train",
        "base": {"agent": "ppo", "steps-per-task": 2048, "ewc": {"lam": 10}},
        "grid": {"sequence": ["CartPoleSwap"], "method": ["finetune", "ewc"],
                 "learning-rate": ["1e-3", 0.01], "seed": [0, 1]},
        "overrides": [{}, {"ewc_lam": 100}],
        "out": str(tmp_path / "out"),
    }
    sweep = load_sweep(_write(tmp_path / "cartpole-methods.yaml", cfg), options_for=command_options)
    assert sweep.name == "cartpole-methods"  # the file stem
    assert len(sweep.runs) == 1 * 2 * 2 * 2 * 2
    ids = [r.run_id for r in sweep.runs]
    assert ids[:4] == [
        "ppo-finetune-CartPoleSwap-learning_rate=0.001-seed0",
        "ppo-finetune-CartPoleSwap-learning_rate=0.001-ewc_lam=100-seed0",
        "ppo-finetune-CartPoleSwap-learning_rate=0.001-seed1",
        "ppo-finetune-CartPoleSwap-learning_rate=0.001-ewc_lam=100-seed1",
    ]
    assert "ppo-ewc-CartPoleSwap-learning_rate=0.01-ewc_lam=100-seed1" in ids
    assert len(set(ids)) == len(ids)
    run = sweep.runs[1]
    # dashes and nested method options become the command's dests; "1e-3" (text in YAML
    # 1.1) is converted by --learning-rate's own type to the float 0.001
    assert run.options == {"agent": "ppo", "steps_per_task": 2048, "ewc_lam": 100.0,
                           "sequence": "CartPoleSwap", "method": "finetune",
                           "learning_rate": 0.001, "seed": 0}
    assert run.run_dir == (tmp_path / "out" / "cartpole-methods" / run.run_id).resolve()
    assert run_id("supervised", {"method": "ewc", "benchmark": "split-mnist", "seed": 3,
                                 "hidden": [64, 64], "sequence": "x/y.yaml"}, ["hidden"]) \
        == "ewc-split-mnist-hidden=64,64-seed3"


def test_colliding_ids_and_overrides_of_grid_axes_are_errors(tmp_path: Path,
                                                             tiny_mnist_dir) -> None:
    cfg = _supervised_sweep(tmp_path, tiny_mnist_dir, overrides=[{"seed": 1}])
    with pytest.raises(SweepConfigError, match=r"overrides\[0\]\.seed: is also a grid axis"):
        load_sweep(_write(tmp_path / "a.yaml", cfg), options_for=command_options)
    cfg = _supervised_sweep(tmp_path, tiny_mnist_dir, overrides=[{}])
    cfg["grid"]["lr"] = ["0.1", 0.1]  # different YAML values, same option value
    with pytest.raises(SweepConfigError, match="2 grid points get this id"):
        load_sweep(_write(tmp_path / "b.yaml", cfg), options_for=command_options)


def test_dry_run_lists_runs_and_commands_and_starts_nothing(tmp_path: Path,
                                                            tiny_mnist_dir) -> None:
    path = _write(tmp_path / "tiny.yaml", _supervised_sweep(tmp_path, tiny_mnist_dir))
    sweep_dir = (tmp_path / "sweeps" / "tiny").resolve()
    finished = sweep_dir / "finetune-split-mnist-seed0"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"],
                                terminal_width=400)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sweep tiny: 4 runs of `crl supervised`" in out
    assert "(1 already finished and would be skipped)" in out
    assert "finetune-split-mnist-seed0 (finished: skip)" in out
    for rid in ("finetune-split-mnist-ewc_lam=1e+300-seed0", "ewc-split-mnist-seed0",
                "ewc-split-mnist-ewc_lam=1e+300-seed0"):
        run_dir = sweep_dir / rid
        assert (f"$ crl supervised --config {run_dir}/run.yaml --run-path {run_dir} "
                "--group tiny --no-progress") in out
        assert not run_dir.exists()
    assert "method=ewc seed=0 ewc_lam=1e+300" in out
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["finetune-split-mnist-seed0"]


def test_bad_sweep_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    path = _write(tmp_path / "x.yaml", {"command": "evaluate", "grid": {"seed": [0]}})
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "command: must be one of train, supervised, got 'evaluate'" in result.output


# --------------------------------------------------------------------------------------------
# A real sweep on Ray
# --------------------------------------------------------------------------------------------
def _wandb_run_record(run_dir: Path):
    """The ``run`` record of the offline .wandb file (its run_group, run_id, job_type)."""
    from test_tracking import _by_type, _wandb_records

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return _by_type(_wandb_records(path), "run")[0]


def test_sweep_on_local_ray_retries_the_failing_run_and_completes_the_others(
        tmp_path: Path, tiny_mnist_dir) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    assert {"run_path", "resume"} <= click_params("supervised")
    path = _write(tmp_path / "tiny.yaml", _supervised_sweep(tmp_path, tiny_mnist_dir))
    env = dict(os.environ, COLUMNS="200", HOME=str(tmp_path / "home"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    env.pop("WANDB_MODE", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "crl.cli", "sweep", str(path), "--num-cpus",
                           "2", "--ray-timeout", "60"], capture_output=True, text=True,
                          env=env, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # a failed run makes the sweep exit 1...
    assert "Error: 1 of 4 runs failed" in out
    sweep_dir = (tmp_path / "sweeps" / "tiny").resolve()
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    runs = {r["id"]: r for r in summary["runs"]}
    bad = "ewc-split-mnist-ewc_lam=1e+300-seed0"
    good = ["ewc-split-mnist-seed0", "finetune-split-mnist-ewc_lam=1e+300-seed0",
            "finetune-split-mnist-seed0"]
    assert list(runs) == [bad, *good]
    assert summary["counts"] == {"finished": 3, "failed": 1, "skipped": 0, "cancelled": 0}
    assert summary["ray"]["cpus"] == 2.0
    # ... after retries + 1 attempts, with its error; a checkpoint of task 0 existed, so the
    # retry resumed from it (and diverged again at the same update)
    assert runs[bad]["status"] == "failed"
    assert runs[bad]["attempts"] == 2
    details = runs[bad]["attempt_details"]
    assert [a["returncode"] for a in details] == [1, 1]
    assert "loss became nan at task 1" in runs[bad]["error"]
    assert (sweep_dir / bad / "checkpoints" / "last.pt").is_file()
    assert runs[bad]["resumed_attempts"] == [2]
    assert f"--run-path {sweep_dir / bad} " in details[0]["command"]
    assert f"--resume {sweep_dir / bad} " in details[1]["command"]
    for a in details:  # each attempt's stderr is kept in logs/<run-id>/
        assert "loss became nan at task 1" in Path(a["stderr"]).read_text()
    assert sorted(p.name for p in (sweep_dir / "logs" / bad).iterdir()) == [
        "attempt-1.err", "attempt-1.out", "attempt-2.err", "attempt-2.out"]
    assert f"{bad} failed after 2 attempt(s); stderr tail:" in out
    for rid in good:  # the others completed, in the sweep's W&B group
        assert runs[rid]["status"] == "finished" and runs[rid]["attempts"] == 1
        run_dir = sweep_dir / rid
        assert runs[rid]["run_dir"] == str(run_dir)
        results = json.loads((run_dir / "results.json").read_text())
        assert 0.0 <= results["avg_acc"] <= 1.0
        assert json.loads((run_dir / "wandb_run.json").read_text())["group"] == "tiny"
        record = _wandb_run_record(run_dir)
        assert record.run_group == "tiny"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["method"] == rid.split("-")[0]
        assert config["trainer"]["progress"] is False
    assert yaml.safe_load((sweep_dir / good[1] / "run.yaml").read_text())["ewc_lam"] == 1e300
    assert "ewc_lam" not in yaml.safe_load((sweep_dir / good[0] / "run.yaml").read_text())
    assert "3 done · 0 running · 1 failed · 0 queued" in out
    report = summary["report"]
    assert report["error"] is None, report
    assert (Path(report["dir"]) / "report.csv").is_file()

    # A second invocation of the sweep without the diverging override: every run has its
    # results.json, so nothing runs (Ray is not even started) and the report is redone.
    smaller = _supervised_sweep(tmp_path, tiny_mnist_dir, overrides=[{}])
    result = CliRunner().invoke(main, ["sweep", str(_write(tmp_path / "tiny.yaml", smaller))],
                                terminal_width=300)
    assert result.exit_code == 0, result.output
    assert ("2 of 2 runs already finished (results.json present) and are skipped: "
            "ewc-split-mnist-seed0, finetune-split-mnist-seed0") in result.output
    again = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in again["runs"]] == ["skipped", "skipped"]


def test_run_sweep_needs_nothing_when_all_runs_finished(tmp_path: Path, tiny_mnist_dir) -> None:
    """The skip path through the Python API (no Ray, no report)."""
    path = _write(tmp_path / "tiny.yaml", _supervised_sweep(tmp_path, tiny_mnist_dir))
    sweep = load_sweep(path, options_for=command_options)
    for run in sweep.runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "results.json").write_text("{}")
    result = run_sweep(sweep, report=False)
    assert [o.status for o in result.outcomes] == ["skipped"] * 4
    assert json.loads(result.sweep_json.read_text())["counts"]["skipped"] == 4


def test_attempt_moves_a_stale_run_aside_and_requires_results(tmp_path: Path) -> None:
    """A fresh attempt in a folder an earlier attempt left without a checkpoint moves that
    folder to the logs (no metrics row is appended to a dead run); a command that exits 0
    without results.json is a failure. Runs `crl --version` in place of a real run."""
    from crl.sweep import AttemptTask, run_attempt

    run_dir, logs = tmp_path / "sweep" / "r1", tmp_path / "sweep" / "logs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    task = AttemptTask("r1", str(run_dir), str(logs), {"method": "ewc", "ewc_lam": 100.0},
                       ["--version"], ["--help"], str(tmp_path), 1, 60.0, 1)
    attempt = run_attempt(task)
    assert not attempt.resumed and attempt.command == ["crl", "--version"]
    assert attempt.returncode == 0
    assert attempt.error.startswith(f"exited with code 0 but wrote no results.json in {run_dir}")
    assert (logs / "before-attempt-1" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.yaml"]
    assert yaml.safe_load((run_dir / "run.yaml").read_text()) == {"method": "ewc",
                                                                  "ewc_lam": 100.0}
    assert "version 0.1.0" in Path(attempt.stdout).read_text()
    assert attempt.stdout == str(logs / "attempt-1.out")
    assert attempt.cpu_seconds > 0
