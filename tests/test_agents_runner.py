"""`crl train` / `crl reference` end to end, the runner's metrics, the reference cache and
the errors a user can make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import agents.runner as runner
import agents.training as training
from agents.config import RunConfig, resolve_sequence
from agents.evaluation import BatchedEvaluator
from agents.reference import reference_path
from agents.training import EvalRecord, stage_history
from crl.cli import _resolve, _run_config, main
from envs.registry import get_sequence

# PPO on CartPoleSwap: 512 steps per task, 4 rollouts of 128 per task, tiny nets
TINY = ["--sequence", "CartPoleSwap", "--agent", "ppo", "--steps-per-task", "512",
        "--n-steps", "128", "--batch-size", "64", "--n-epochs", "1", "--net-arch", "16",
        "--eval-every", "256", "--eval-episodes", "2", "--wandb", "disabled", "--no-progress",
        "--random-episodes", "1"]


def _params(command: str, **given):
    params = {p.name: None for p in main.commands[command].params}
    params.pop("force", None)
    params.update(given)
    return params


def _tail_mean(values: np.ndarray, k: int = 5) -> float:
    return float(np.mean(values[-k:]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `crl reference` and one `crl train --require-references` run, shared by tests."""
    root = tmp_path_factory.mktemp("rl")
    refs = root / "refs"
    cli = CliRunner()
    ref = cli.invoke(main, ["reference", *TINY, "--reference-dir", str(refs)])
    assert ref.exit_code == 0, ref.output
    res = cli.invoke(main, ["train", *TINY, "--method", "packnet", "--packnet-retrain-steps",
                            "5", "--run-dir", str(root / "runs"), "--reference-dir", str(refs),
                            "--require-references", "--seed", "2"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (root / "runs" / "CartPoleSwap-ppo").iterdir()
    return {"root": root, "refs": refs, "run_dir": run_dir, "output": res.output,
            "ref_output": ref.output}


def test_train_writes_results_metrics_and_the_plot(trained) -> None:
    run_dir = trained["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    plot = run_dir / "plots" / "task_curves.png"
    assert plot.stat().st_size > 10_000
    assert f"plot: {plot}" in trained["output"]
    assert "forgetting" in trained["output"] and "forward transfer" in trained["output"]
    ev = results["eval"]
    assert ev["steps"] == [0, 256, 512, 768, 1024]
    returns = np.array(ev["mean_returns"])
    scores = np.array(ev["scores"])
    np.testing.assert_allclose(scores, np.clip(returns / 200.0, 0, 1))  # CartPole [0, 200]
    # forgetting of task 0: last-5 mean in its window (0, 512] minus in task 1's (512, 1024]
    # (the evaluation at a window's start precedes the task's training: not an end value)
    expected = _tail_mean(scores[1:3, 0]) - _tail_mean(scores[3:, 0])
    assert results["forgetting"] == [pytest.approx(expected)]
    assert results["final_performance"] == pytest.approx(scores[-1].mean())
    assert results["env_steps"] == 1024
    assert 0.0 < results["eval_share"] < 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eval_rows = [r for r in rows if "eval/0-cartpole/score" in r]
    assert [r.get("_step", r.get("step")) for r in eval_rows] == ev["steps"]
    assert [r["eval/1-cartpole-swapped/return"] for r in eval_rows] == returns[:, 1].tolist()
    assert any(k.startswith("train/") for r in rows for k in r)  # SB3's logger is routed
    assert (run_dir / "checkpoints" / "agent.zip").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"] == "packnet" and config["method_options"] == {
        "packnet": {"retrain_steps": 5}}


def test_forward_transfer_uses_the_cached_references(trained) -> None:
    results = json.loads((trained["run_dir"] / "results.json").read_text())
    scores = np.array(results["eval"]["scores"])
    ft = []
    for task in (0, 1):
        (path,) = (trained["refs"] / "CartPoleSwap" / "ppo").glob(
            f"{['cartpole', 'cartpole-swapped'][task]}-{'?' * 16}.json")
        ref = json.loads(path.read_text())
        assert ref["steps"] == [0, 256, 512] and ref["settings"]["seed"] == 1
        auc_ref = np.mean(np.clip(np.array(ref["mean_returns"]) / 200, 0, 1))
        window = slice(0, 3) if task == 0 else slice(2, 5)
        auc = scores[window, task].mean()
        ft.append((auc - auc_ref) / (1 - auc_ref))
    assert results["forward_transfer"] == pytest.approx(ft)
    assert results["mean_forward_transfer"] == pytest.approx(np.mean(ft))


def test_reference_runs_are_cached_and_not_rerun(trained, monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("a cached reference must not be trained again")

    monkeypatch.setattr(training, "train_stages", fail)
    res = CliRunner().invoke(main, ["reference", *TINY, "--reference-dir", str(trained["refs"])])
    assert res.exit_code == 0, res.output
    assert "cartpole-swapped" in res.output


def test_reference_key_ignores_method_and_seed_but_not_agent_settings(tmp_path: Path) -> None:
    base = RunConfig(steps_per_task=512, reference_dir=str(tmp_path), net_arch=(16,),
                     agent_options={"n_steps": 128})
    seq = resolve_sequence(base)
    same = base.replace(method="ewc", seed=7, method_options={"ewc": {"lam": 3.0}})
    assert reference_path(base, seq, 0) == reference_path(same, seq, 0)
    assert reference_path(base, seq, 0) != reference_path(base, seq, 1)
    for changed in (base.replace(net_arch=(32,)), base.replace(eval_every=100),
                    base.replace(agent_options={"n_steps": 256}), base.replace(reference_seed=2)):
        assert reference_path(changed, seq, 0) != reference_path(base, seq, 0)


def test_missing_references_are_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", *TINY, "--reference-dir", str(tmp_path / "none"),
                                    "--run-dir", str(tmp_path), "--require-references"])
    assert res.exit_code == 2
    assert "no single-task reference runs for tasks ['cartpole', 'cartpole-swapped']" in (
        res.output)
    assert "crl reference --sequence CartPoleSwap --agent ppo --steps-per-task 512" in res.output
    assert not list(tmp_path.glob("CartPoleSwap-ppo/*"))  # failed before any training


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "ewk"], "unknown method 'ewk'"),
    (["--agent", "dqn"], "unknown agent 'dqn'; choose one of: sac, ppo"),
    (["--agent", "sac"], "SAC needs a continuous (Box) action space"),
    (["--n-steps", "100"], "not multiples of 100"),
    (["--sequence", "CartPoleSwapp"], "Did you mean 'CartPoleSwap'"),
    (["--exploration-steps", "5"], "unknown option(s) ['exploration_steps'] for the PPO agent"),
    (["--sb3-kwargs", "{tau"], "--sb3-kwargs must be a JSON object"),
])
def test_bad_runs_are_usage_errors(tmp_path: Path, args, message) -> None:
    res = CliRunner().invoke(main, ["train", *TINY, "--run-dir", str(tmp_path),
                                    "--reference-dir", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_yaml_options_and_command_line_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "sequence": "PendulumVariants", "agent": "sac", "method": "ewc", "steps-per-task": 999,
        "ewc": {"lam": 7.0}, "net-arch": [64, 64], "exploration-steps": 10,
        "sb3-kwargs": {"tau": 0.01}, "multi-head": False,
    }))
    config = _run_config(_resolve(_params("train", config_file=str(cfg), steps_per_task=400,
                                          learning_rate=0.01, cycles=2)))
    assert resolve_sequence(config).schedule == (0, 1, 2, 3) * 2
    assert (config.sequence, config.agent, config.method) == ("PendulumVariants", "sac", "ewc")
    assert config.steps_per_task == 400  # command line beats YAML
    assert config.method_options == {"ewc": {"lam": 7.0}}
    assert config.net_arch == (64, 64)
    assert config.agent_options == {"learning_rate": 0.01, "multi_head": False,
                                    "exploration_steps": 10, "tau": 0.01}
    assert config.eval_episodes == RunConfig().eval_episodes  # default


def test_stage_columns_for_a_sequence_with_cycles() -> None:
    seq = get_sequence("CartPoleSwap", steps_per_task=100, cycles=2)
    rec = EvalRecord((0, 1), steps=[0, 100, 200, 300, 400],
                     scores=[[0.1, 0.2], [0.9, 0.1], [0.3, 0.8], [0.7, 0.4], [0.5, 0.6]])
    h = stage_history(rec, seq)
    # stage s scores task schedule[s] = (0, 1, 0, 1)
    np.testing.assert_array_equal(h.scores[:, 2], [0.1, 0.9, 0.3, 0.7, 0.5])
    np.testing.assert_array_equal(h.scores[:, 3], [0.2, 0.1, 0.8, 0.4, 0.6])
    assert h.task_starts == [0, 100, 200, 300]
    assert runner.stage_names(seq) == ["cartpole#1", "cartpole-swapped#1", "cartpole#2",
                                       "cartpole-swapped#2"]
    rec.scores[1][0] = float("nan")  # a task without bounds: no history, no metrics
    assert stage_history(rec, seq) is None


def test_multi_head_ppo_evaluation_uses_each_slots_head() -> None:
    from agents.ppo import ContinualPPO

    seq = get_sequence("CartPoleSwap", steps_per_task=128)
    agent = ContinualPPO("MlpPolicy", seq.make_env(append_task_id=True), num_tasks=2, n_steps=64,
                         policy_kwargs={"net_arch": [8]}, seed=0)
    head = agent.policy.action_net
    import torch

    with torch.no_grad():  # head 0 always picks action 0, head 1 always action 1
        for h, bias in enumerate(([5.0, -5.0], [-5.0, 5.0])):
            head.weights[h].zero_()
            head.biases[h].copy_(torch.tensor(bias))
    seen = []
    predict = agent.policy.predict

    def recording(obs, *a, **k):
        actions, state = predict(obs, *a, **k)
        seen.append((np.asarray(obs)[:, -2:].argmax(1), actions))
        return actions, state

    agent.policy.predict = recording
    with BatchedEvaluator(seq, 3) as ev:
        ev.evaluate(agent)
    tasks = np.concatenate([t for t, _ in seen])
    actions = np.concatenate([a for _, a in seen])
    assert set(tasks.tolist()) == {0, 1}
    np.testing.assert_array_equal(actions, tasks)


def test_clonex_choices_reach_results_json(tmp_path: Path) -> None:
    """The head ClonEx explored with at each task start, and the returns it chose by, are
    in results.json (``method_summary``), not only in the checkpoint and the log."""
    res = CliRunner().invoke(main, [
        "train", "--sequence", "PendulumVariants", "--agent", "sac", "--method", "bc",
        "--bc-clonex", "--bc-clonex-episodes", "1", "--steps-per-task", "120",
        "--exploration-steps", "60", "--batch-size", "32", "--net-arch", "16",
        "--eval-every", "120", "--eval-episodes", "1", "--random-episodes", "1",
        "--wandb", "disabled", "--no-progress", "--run-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "PendulumVariants-sac").iterdir()
    choices = json.loads((run_dir / "results.json").read_text())["method_summary"][
        "clonex_choices"]
    assert [c["task"] for c in choices] == [1, 2, 3]  # every task after the first
    for c in choices:  # the best of the finished heads (ties: the earliest)
        returns = {int(h): r for h, r in c["returns"].items()}
        assert sorted(returns) == list(range(c["task"]))
        assert c["head"] == min(h for h, r in returns.items() if r == max(returns.values()))
