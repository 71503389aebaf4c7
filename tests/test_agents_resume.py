"""Checkpoints and exact resume of `crl train`, and runs that diverge.

A run is SIGKILLed in the middle of its second task (after a checkpoint inside that task) and
resumed with `crl train --resume`; its results.json and metrics.jsonl must equal those of the
same run left alone, except wall-time fields (named in WALL_TIME_*). PPO with EWC on
CartPoleSwap, and SAC with replay (CW's perfect memory: the strategy's memory of the first
task and the replay buffer of the second both live in the checkpoint) on two Pendulum tasks.
One torch thread, fixed seeds.
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from stable_baselines3.common.logger import Logger

from agents.checkpoint import agent_state, load_agent_state, restore_agent, save_agent
from agents.config import RunConfig
from agents.factory import make_agent
from agents.runner import load_agent, train
from agents.sac import ContinualSAC
from crl.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from crl.cli import main
from crl.runs import RunFailed
from envs.registry import get_sequence

#: Wall-clock fields of metrics rows and results.json (everything else must be equal).
WALL_TIME_ROW_KEYS = ("time/fps", "time/time_elapsed")
WALL_TIME_RESULT_KEYS = ("timings", "eval_share", "steps_per_second")
ROOT = Path(__file__).resolve().parents[1]

PPO_ARGS = ["--sequence", "CartPoleSwap", "--agent", "ppo", "--method", "ewc", "--seed", "3",
            "--steps-per-task", "1024", "--n-steps", "128", "--batch-size", "64",
            "--n-epochs", "2", "--net-arch", "16", "--eval-every", "256", "--eval-episodes", "2",
            "--checkpoint-every", "128", "--wandb", "disabled", "--no-progress",
            "--torch-threads", "1"]

PENDULUM_PAIR = """\
name: PendulumPair
steps_per_task: 200
tasks:
  - env_id: Pendulum-v1
    name: pendulum
    kwargs: {max_episode_steps: 100}
    low: -1000
    high: 0
  - env_id: Pendulum-v1
    name: pendulum-reversed
    kwargs: {max_episode_steps: 100}
    wrappers: [negate_actions]
    low: -1000
    high: 0
"""


def _sac_args(sequence: Path) -> list[str]:
    return ["--sequence", str(sequence), "--agent", "sac", "--method", "replay", "--seed", "1",
            "--exploration-steps", "40", "--batch-size", "32", "--buffer-size", "250",
            "--net-arch", "32", "--eval-every", "100", "--eval-episodes", "1",
            "--checkpoint-every", "30", "--wandb", "disabled", "--no-progress",
            "--torch-threads", "1", "--reference-dir", str(sequence.parent / "refs")]


def _kill_in_second_task(run_dir: Path, args: list[str], timeout: float = 240) -> dict:
    """Start `crl train` in a subprocess; SIGKILL it once a checkpoint inside task 1 exists.
    Returns that checkpoint's position."""
    ckpt = checkpoint_path(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "crl.cli", "train", *args, "--run-path",
                             str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen, deadline = None, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpt.is_file() and ckpt.stat().st_mtime_ns != seen:
                seen = ckpt.stat().st_mtime_ns
                position = torch.load(ckpt, weights_only=True)["position"]
                if position["stage"] == 1 and position["started"]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    assert proc.returncode == -signal.SIGKILL
                    return position
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pytest.fail(f"the run ended (rc {proc.returncode}) before a checkpoint inside task 1 was "
                f"seen: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_TIME_ROW_KEYS} for r in rows]


def _results(run_dir: Path) -> dict[str, Any]:
    res = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in (*WALL_TIME_RESULT_KEYS, "resumed")}


def _files(run_dir: Path) -> dict[str, tuple[str, int]]:
    """Every file of a run directory: content hash and modification time."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                          p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _invoke(args: list[str]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, args)


def _kill_resume_and_reference(root: Path, args: list[str],
                               resume_args: list[str]) -> dict[str, Any]:
    """Kill a run inside task 1, keep a copy of what the kill left, resume it with
    ``resume_args`` (same run options, or ones that may differ), run it uninterrupted."""
    killed, reference = root / "killed", root / "reference"
    position = _kill_in_second_task(killed, args)
    pristine = root / "pristine"
    shutil.copytree(killed, pristine)  # the interrupted run, for the error tests
    resumed_from = load_checkpoint(checkpoint_path(killed))["num_timesteps"]
    resumed = _invoke(["train", *resume_args, "--resume", str(killed)])
    assert resumed.exit_code == 0, resumed.output
    plain = _invoke(["train", *args, "--run-path", str(reference)])
    assert plain.exit_code == 0, plain.output
    return {"position": position, "killed": killed, "reference": reference,
            "pristine": pristine, "args": args, "resumed_from": resumed_from}


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ppo")
    args = [*PPO_ARGS, "--reference-dir", str(root / "refs")]
    # the resume checkpoints at another interval (a setting that may change on resume)
    i = args.index("--checkpoint-every")
    resume_args = [*args[:i], "--checkpoint-every", "256", *args[i + 2:]]
    return _kill_resume_and_reference(root, args, resume_args)


@pytest.fixture(scope="module")
def sac_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sac")
    (root / "pendulum_pair.yaml").write_text(PENDULUM_PAIR)
    args = _sac_args(root / "pendulum_pair.yaml")
    return _kill_resume_and_reference(root, args, args)


@pytest.mark.parametrize("runs", ["ppo_runs", "sac_runs"])
def test_killed_mid_task_and_resumed_equals_the_uninterrupted_run(runs: str,
                                                                  request: Any) -> None:
    r = request.getfixturevalue(runs)
    killed, reference = r["killed"], r["reference"]
    assert r["position"]["stage"] == 1 and r["position"]["steps_done"] > 0
    # the kill left rows written after the checkpoint: the resume cut them and wrote them again
    ckpt = load_checkpoint(checkpoint_path(r["pristine"]))
    assert len((r["pristine"] / "metrics.jsonl").read_text().splitlines()) >= ckpt[
        "tracker_rows"]
    assert not (r["pristine"] / "results.json").exists()
    assert _rows(killed) == _rows(reference)
    resumed, plain = _results(killed), _results(reference)
    assert resumed == plain
    assert resumed["final_performance"] is not None and resumed["mean_forgetting"] is not None
    info = json.loads((killed / "results.json").read_text())["resumed"]
    assert info["exact"] is True and info["notes"] == []
    assert info["from_step"] == r["resumed_from"] > (1024 if runs == "ppo_runs" else 200)
    assert (killed / "plots" / "task_curves.png").stat().st_size > 10_000


def test_ppo_checkpoints_hold_the_update_boundary_state(ppo_runs: dict[str, Any]) -> None:
    ckpt = load_checkpoint(checkpoint_path(ppo_runs["pristine"]))
    position = ckpt["position"]
    assert position["stage"] == 1 and position["started"]
    assert ckpt["num_timesteps"] == 1024 + position["steps_done"]
    assert ckpt["num_timesteps"] % 128 == 0  # a rollout start
    agent = ckpt["agent"]
    assert agent["identity"] == {"agent": "ppo", "method": "ewc", "num_tasks": 2,
                                 "observation_space": agent["identity"]["observation_space"],
                                 "action_space": "Discrete(2)", "policy": agent[
                                     "identity"]["policy"], "sequence": "CartPoleSwap"}
    assert agent["continual"]["strategy_name"] == "ewc" and agent["continual"]["task_running"]
    assert agent["env"]["problems"] == []
    assert ckpt["record"]["steps"][-1] <= ckpt["num_timesteps"]


def test_load_agent_rebuilds_the_agent_of_a_run(ppo_runs: dict[str, Any]) -> None:
    agent = load_agent(ppo_runs["pristine"])
    ckpt = load_checkpoint(checkpoint_path(ppo_runs["pristine"]))
    for name, value in agent.policy.state_dict().items():
        assert torch.equal(value, ckpt["agent"]["policy"][name]), name
    assert agent.strategy.name == "ewc" and agent.current_task == 1 and agent.task_running
    assert agent.num_timesteps == ckpt["num_timesteps"] > 1024
    assert agent.env.envs[0].unwrapped.global_step == agent.num_timesteps
    action, _ = agent.predict(agent._last_obs, deterministic=True)
    assert action.shape == (1,)


def _assert_refused(run_dir: Path, args: list[str], code: int, *needles: str) -> str:
    before = _files(run_dir)
    result = _invoke(args)
    assert result.exit_code == code, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert _files(run_dir) == before  # nothing in the run directory changed
    return result.output


def test_resume_refuses_bad_input_and_leaves_the_run_untouched(ppo_runs: dict[str, Any],
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ppo_runs["pristine"], run)
    args = ppo_runs["args"]
    # an option that conflicts with the run's config names the key
    _assert_refused(run, ["train", *args, "--resume", str(run), "--learning-rate", "0.5"], 1,
                    "agent_options.learning_rate: '<absent>' in the checkpoint, 0.5 now")
    _assert_refused(run, ["train", "--resume", str(run), "--method", "l2"], 1,
                    "method: 'ewc' in the checkpoint, 'l2' now")
    # a new run may not reuse the folder; --resume continues in place
    _assert_refused(run, ["train", *args, "--run-path", str(run)], 2, "already holds a run",
                    f"crl train --resume {run}")
    _assert_refused(run, ["train", "--resume", str(run), "--run-path", str(tmp_path)], 2,
                    "drop --run-path")
    # a corrupt checkpoint
    ckpt = checkpoint_path(run)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _assert_refused(run, ["train", "--resume", str(run)], 1, "is corrupt or not a crl "
                    "checkpoint", "left untouched")
    ckpt.unlink()
    _assert_refused(run, ["train", "--resume", str(run)], 1, "no checkpoint at")
    # a metrics file shorter than the checkpoint saw
    shutil.copy(checkpoint_path(ppo_runs["pristine"]), ckpt)
    (run / "metrics.jsonl").write_text("")
    _assert_refused(run, ["train", "--resume", str(run)], 1, "has 0 rows but the checkpoint")
    _assert_refused(tmp_path, ["train", "--resume", str(tmp_path)], 2,
                    "is not a crl run directory (no config.yaml)")


def test_resume_of_a_finished_run_says_so(ppo_runs: dict[str, Any]) -> None:
    out = _assert_refused(ppo_runs["reference"], ["train", "--resume",
                                                  str(ppo_runs["reference"])], 0,
                          "already finished (results.json, performance P(T)")
    assert "nothing to resume" in out


class _Crash(BaseException):
    """Stands for a kill: nothing of the run catches it."""


def test_resume_from_the_first_checkpoint_and_a_task_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint 1 is taken after the evaluation at step 0, checkpoint 2 at the boundary
    after task 0 (end_task, evaluation): a run dying right after either resumes exactly."""
    import agents.runner as runner

    config = RunConfig(sequence="CartPoleSwap", agent="ppo", method="l2", seed=4,
                       steps_per_task=256, eval_every=128, eval_episodes=1, net_arch=(8,),
                       agent_options={"n_steps": 128, "batch_size": 64, "n_epochs": 1},
                       checkpoint_every=0, wandb="disabled", progress=False)
    original = runner.save_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = train(config.replace(run_path=str(tmp_path / "plain")))
        for crash_after in (1, 2):
            def save_then_crash(path: Path, payload: dict[str, Any], after: int = crash_after,
                                saves: list[int] = [0]) -> int:  # noqa: B006 - per loop
                size = original(path, payload)
                saves[0] += 1
                if saves[0] == after:
                    raise _Crash
                return size

            run = tmp_path / f"crashed-{crash_after}"
            monkeypatch.setattr(runner, "save_checkpoint", save_then_crash)
            with pytest.raises(_Crash):
                train(config.replace(run_path=str(run)))
            monkeypatch.setattr(runner, "save_checkpoint", original)
            ckpt = load_checkpoint(checkpoint_path(run))
            assert ckpt["position"] == {"stage": crash_after - 1, "steps_done": 0,
                                        "started": False}
            resumed = runner.resume(run)
            assert _rows(run) == _rows(tmp_path / "plain")
            assert _results(run) == _results(tmp_path / "plain")
            assert resumed.summary["final_performance"] == plain.summary["final_performance"]


# -- divergence ------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--sequence", "CartPoleSwap", "--agent", "ppo", "--method", "ewc",
            "--ewc-lam", "1e300", "--steps-per-task", "512", "--n-steps", "128",
            "--batch-size", "64", "--n-epochs", "1", "--net-arch", "16", "--eval-every", "256",
            "--eval-episodes", "1", "--wandb", "disabled", "--no-progress", "--run-path",
            str(run)]
    result = _invoke(args)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "non-finite training loss at env step 640 of task 1: penalty = nan" in out
    assert "lower the learning rate (--learning-rate)" in out and "--ewc-lam" in out
    assert f"the last good checkpoint is {checkpoint_path(run)} (env step 512" in out
    assert not (run / "results.json").exists()
    failed = json.loads((run / "failed.json").read_text())
    assert failed["step"] == 640 and failed["checkpoint_step"] == 512
    ckpt = load_checkpoint(checkpoint_path(run))
    assert ckpt["num_timesteps"] == 512  # nothing was saved after the bad update
    assert ckpt["position"] == {"stage": 1, "steps_done": 0, "started": False}


def test_sac_names_the_diverged_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = ContinualSAC.batch_losses
    calls = {"n": 0}

    def poisoned(self: ContinualSAC, batch: Any, between: Any = None) -> Any:
        calls["n"] += 1
        losses = original(self, batch, between)
        if calls["n"] == 60:
            losses.critic_loss = losses.critic_loss * float("inf")
        return losses

    monkeypatch.setattr(ContinualSAC, "batch_losses", poisoned)
    config = RunConfig(sequence="PendulumVariants", agent="sac", steps_per_task=100,
                       eval_every=100, eval_episodes=1, checkpoint_every=25, net_arch=(16,),
                       agent_options={"exploration_steps": 20, "batch_size": 16},
                       method_options={}, wandb="disabled", progress=False,
                       random_episodes=1, run_path=str(tmp_path / "run"))
    with pytest.raises(RunFailed, match=r"non-finite training loss at env step 80 of task 0: "
                       r"critic = inf") as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(config)
    assert isinstance(err.value, FloatingPointError)
    assert err.value.checkpoint == checkpoint_path(tmp_path / "run")
    assert load_checkpoint(err.value.checkpoint)["num_timesteps"] == 75


# -- the agent state -------------------------------------------------------------------------
def _agent(sequence: str, agent: str, method: str, steps: int, **options: Any) -> Any:
    seq = get_sequence(sequence, steps_per_task=steps)
    config = RunConfig(sequence=sequence, agent=agent, method=method, net_arch=(16,),
                       agent_options=options)
    a = make_agent(config, seq.make_env(append_task_id=True), seq)
    a.set_logger(Logger(None, []))
    return a, seq


@pytest.mark.parametrize(("kind", "method"), [("sac", "packnet"), ("sac", "agem"),
                                               ("ppo", "replay"), ("ppo", "mas")])
def test_agent_state_through_a_file_continues_bit_for_bit(kind: str, method: str,
                                                          tmp_path: Path) -> None:
    """Half of task 1 -> checkpoint file (weights_only load) -> a fresh agent continues
    exactly as the original does: same weights and strategy state after end_task."""
    if kind == "sac":
        options: dict[str, Any] = {"exploration_steps": 20, "batch_size": 16,
                                   "buffer_size": 300}
        build = lambda: _agent("PendulumVariants", "sac", method, 80, **options)  # noqa: E731
    else:
        options = {"n_steps": 64, "batch_size": 32, "n_epochs": 1}
        build = lambda: _agent("CartPoleSwap", "ppo", method, 256, **options)  # noqa: E731
    a, seq = build()
    steps = seq.stage_steps[0]
    a.start_task(0)
    a.learn(steps, reset_num_timesteps=False)
    a.end_task(0)
    a.start_task(1)
    a.learn(steps // 2, reset_num_timesteps=False)
    save_agent(a, tmp_path / "a.pt")  # agent state + global RNGs, atomically
    a.learn(steps - steps // 2, reset_num_timesteps=False)
    a.end_task(1)
    b, _ = build()
    assert restore_agent(b, tmp_path / "a.pt") == []
    b.learn(steps - steps // 2, reset_num_timesteps=False)
    b.end_task(1)
    for (name, x), y in zip(a.policy.state_dict().items(), b.policy.state_dict().values(),
                            strict=True):
        assert torch.equal(x, y), name
    for x, y in zip(torch.utils._pytree.tree_leaves(a.continual_state_dict()),
                    torch.utils._pytree.tree_leaves(b.continual_state_dict()), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_loading_into_another_agent_names_the_differences() -> None:
    ppo, _ = _agent("CartPoleSwap", "ppo", "ewc", 128, n_steps=64)
    state = agent_state(ppo, sequence="CartPoleSwap")
    other, _ = _agent("CartPoleSwap", "ppo", "l2", 128, n_steps=64)
    with pytest.raises(CheckpointError, match="method: 'ewc' in the checkpoint, 'l2' here"):
        load_agent_state(other, state, sequence="CartPoleSwap")
    five, _ = _agent("CartPoleVariants", "ppo", "ewc", 128, n_steps=64)
    with pytest.raises(CheckpointError) as err:
        load_agent_state(five, state, sequence="CartPoleVariants")
    msg = str(err.value)
    assert "num_tasks: 2 in the checkpoint, 5 here" in msg
    assert "sequence: 'CartPoleSwap' in the checkpoint, 'CartPoleVariants' here" in msg
    sac, _ = _agent("PendulumVariants", "sac", "ewc", 128)
    with pytest.raises(CheckpointError, match="agent: 'ppo' in the checkpoint, 'sac' here"):
        load_agent_state(sac, state)


def test_a_checkpoint_without_buffer_or_env_state_warns_and_goes_on() -> None:
    a, seq = _agent("PendulumVariants", "sac", "finetune", 100, exploration_steps=10,
                    batch_size=16)
    a.start_task(0)
    a.learn(60, reset_num_timesteps=False)
    state = agent_state(a, include_buffer=False)
    state["env"]["problems"] = ["PendulumEnv.sim (a simulator handle)"]
    b, _ = _agent("PendulumVariants", "sac", "finetune", 100, exploration_steps=10,
                  batch_size=16)
    with pytest.warns(RuntimeWarning) as caught:
        notes = load_agent_state(b, state)
    assert [str(w.message) for w in caught] == notes
    assert notes[0].startswith("the checkpoint holds no replay buffer")
    assert notes[1].startswith("training env state not captured for PendulumEnv.sim")
    assert "resume is not bit-exact" in notes[1]
    assert b.replay_buffer.pos == 0 and not b.replay_buffer.full
    assert b.learning_starts == 60 + 16  # waits for a batch before updating again
    inner = b.env.envs[0].unwrapped
    assert inner.global_step == 60  # the position is restored, the episode starts afresh
    assert np.array_equal(b._last_obs[0][:3], inner.task_envs[0].unwrapped._get_obs())
    b.learn(20, reset_num_timesteps=False)
    assert b.num_timesteps == 80


def test_two_resumes_at_once_one_runs_the_other_is_refused(ppo_runs: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """A lock per run directory: two `crl train --resume` of one interrupted run started
    together; exactly one continues it, the other exits non-zero with a message naming the
    folder, and no traceback."""
    run = tmp_path / "run"
    shutil.copytree(ppo_runs["pristine"], run)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "crl.cli", "train", *ppo_runs["args"], "--resume", str(run)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = next(out for p, out in zip(procs, outs, strict=True) if p.returncode != 0)
    text = loser[0] + loser[1]
    assert "Traceback" not in text
    assert str(run) in text and ("in use by another crl process" in text
                                 or "finished" in text), text
    assert (run / "results.json").is_file()


def test_a_refused_resume_leaves_the_running_one_alone(ppo_runs: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """The second of two resumes is refused before it touches the folder: the first one's
    checkpoint temporary file (an atomic write in progress) and failure record stay."""
    from agents.runner import resume
    from crl.checkpoint import checkpoint_path
    from crl.tracking import RunLock, RunLockedError

    run = tmp_path / "run"
    shutil.copytree(ppo_runs["pristine"], run)
    held = RunLock(run)  # the first resume, running
    try:
        tmp = checkpoint_path(run).parent / f".{checkpoint_path(run).name}.tmp"
        tmp.write_bytes(b"being written")
        failed = run / "failed.json"
        failed.write_text("{}")
        with pytest.raises(RunLockedError, match="in use by another crl process"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no reference runs: FT n/a
            resume(run, {"progress": False})
        assert tmp.read_bytes() == b"being written" and failed.is_file()
    finally:
        held.release()
