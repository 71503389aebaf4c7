"""RL cost benchmark: env steps per second of ContinualSAC / ContinualPPO per method against
plain stable-baselines3 on the same task, and the share of wall time a CW-like protocol
spends evaluating.

Throughput (one invocation, side by side): every agent first trains task 0 of a two-task
budget (untimed, so that the methods have anchors, importances, memories or masks), ends it,
starts task 1 and explores (SAC, untimed); plain SB3 (single head, same network, same env
with the one-hot) trains the same steps. Then, in ``--repeats`` rounds, each method trains
``--steps`` timed steps of task 1 between two chunks of plain SB3 (plain, m1, plain, m2,
...; order rotated per round), and its ratio is its steps/s over the mean of the two plain
chunks around it. The median over rounds is reported with the quartiles. Chunks seconds
apart see the same load on the shared cores, which drifts over minutes. Both wall-clock and
process-CPU steps/s are recorded; the targets are on wall time.
Targets (issue 4): finetune >= 0.97x, L2/EWC/MAS/PackNet >= 0.90x, A-GEM >= 0.60x.

Evaluation share (CW protocol: every task every 20k steps, 10 episodes, 1M steps per task):
measured on a shortened run, ``t_train`` = seconds per training env step of ContinualSAC with
CW's network (4 x 256, batch 128) on the CW10 sequence (PendulumVariants where Meta-World is
not installed), and ``t_eval`` = seconds of one batched evaluation of every task; the share
over the full protocol is ``t_eval / (t_eval + 20_000 * t_train)`` (one evaluation per 20k
steps; the extra evaluation at step 0 is 1 in 500 and ignored). Target <= 25%.

    python scripts/bench_agents.py --steps 256 --repeats 16 --out bench_agents.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.config import RunConfig  # noqa: E402,I001
from agents.evaluation import BatchedEvaluator, evaluate_per_task  # noqa: E402
from agents.factory import make_agent  # noqa: E402,I001
from crl.strategies import METHODS  # noqa: E402

TARGETS = {"finetune": 0.97, "l2": 0.90, "ewc": 0.90, "mas": 0.90, "packnet": 0.90,
           "agem": 0.60, "replay": None}
SETUPS = {
    # agent: (sequence, SB3 options, warm-up steps of task 0)
    "sac": ("PendulumVariants", {"batch_size": 128, "buffer_size": 100_000}, 1000),
    "ppo": ("CartPoleSwap", {"n_steps": 512, "batch_size": 64, "n_epochs": 10}, 2048),
}


def _sequence(agent: str, timed: int, explore: int):
    from envs.registry import get_sequence

    name, _, warm = SETUPS[agent]
    seq = get_sequence(name)
    budgets = [warm, explore + timed] + [1000] * (seq.num_tasks - 2)
    return seq.replace(steps_per_task=budgets)


def _plain(agent: str, env: Any, net: list[int], opts: dict[str, Any], explore: int) -> Any:
    from stable_baselines3 import PPO, SAC

    kw = dict(opts, policy_kwargs={"net_arch": net}, seed=0, verbose=0, device="cpu")
    if agent == "sac":
        return SAC("MlpPolicy", env, learning_starts=explore, **kw)
    return PPO("MlpPolicy", env, **kw)


def _timed_learn(model: Any, steps: int) -> tuple[float, float]:
    """(wall, process CPU) steps per second of ``model.learn(steps)``. CPU time is what the
    run itself consumed: on cores shared with other jobs it moves far less than wall time."""
    w0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - w0), steps / (time.process_time() - c0)


def build(agent: str, method: str | None, timed: int, net: list[int],
          multi_head: bool = True) -> Any:
    """A model that has trained task 0 (untimed; ended, so the method holds its anchors,
    importances, memories or masks) and started task 1 (SAC: explored), ready for ``timed``
    timed steps of task 1 (method None: plain SB3 after the same steps)."""
    _, opts, warm = SETUPS[agent]
    explore = 100 if agent == "sac" else 0
    seq = _sequence(agent, timed, explore)
    env = seq.make_env(append_task_id=True)
    if method is None:
        model = _plain(agent, env, net, opts, explore)
        model.learn(warm + explore)
        return model
    agent_opts = dict(opts, multi_head=multi_head)
    if agent == "sac":
        agent_opts["exploration_steps"] = explore
    config = RunConfig(sequence=seq.name, agent=agent, method=method, net_arch=tuple(net),
                       agent_options=agent_opts, torch_threads=None)
    model = make_agent(config, env, seq)
    model.start_task(0)
    model.learn(warm)
    model.end_task(0)
    model.start_task(1)
    if explore:
        model.learn(explore, reset_num_timesteps=False)
    return model


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q[0], q[2]


def throughput(agents: list[str], methods: list[str], steps: int, repeats: int,
               net: list[int]) -> list[dict[str, Any]]:
    """Every model is built first (and trained one untimed chunk); then ``repeats`` rounds
    time every method for ``steps`` steps, each chunk between two chunks of plain SB3
    (plain, m1, plain, m2, plain, ...; method order rotated per round). A method's ratio is
    its steps/s over the mean of the two plain chunks around it, seconds apart, so load on
    the shared cores, which drifts over minutes, hits both sides of every ratio alike."""
    rows = []
    for agent in agents:
        opts = SETUPS[agent][1]
        if agent == "ppo":  # whole rollouts only (a rollout must not cross the task switch)
            steps = -(-steps // opts["n_steps"]) * opts["n_steps"]
        labels = [*methods, "finetune (single head)"]
        models = {"plain SB3": build(agent, None, steps * (repeats * (len(labels) + 1) + 2),
                                     net)}
        for lab in labels:
            models[lab] = build(agent, lab.split(" ")[0], steps * (repeats + 1), net,
                                multi_head=lab != "finetune (single head)")
        for model in models.values():  # first-touch allocations, fresh optimiser state
            model.learn(steps, reset_num_timesteps=False)
        speed: dict[str, dict[str, list[float]]] = {
            kind: {lab: [] for lab in ["plain SB3", *labels]} for kind in ("wall", "cpu")}
        ratio: dict[str, dict[str, list[float]]] = {
            kind: {lab: [] for lab in labels} for kind in ("wall", "cpu")}
        for r in range(repeats):
            k = r % len(labels)
            before = _timed_learn(models["plain SB3"], steps)
            for lab in labels[k:] + labels[:k]:
                mine = _timed_learn(models[lab], steps)
                after = _timed_learn(models["plain SB3"], steps)
                for i, kind in enumerate(("wall", "cpu")):
                    speed[kind][lab].append(mine[i])
                    speed[kind]["plain SB3"].append(after[i])
                    ratio[kind][lab].append(mine[i] / ((before[i] + after[i]) / 2))
                before = after
            print(f"  {agent} round {r + 1}/{repeats}: " + ", ".join(
                f"{lab} {ratio['wall'][lab][-1]:.2f}" for lab in labels) + " x plain (wall)",
                flush=True)
        rows.append({"agent": agent, "method": "plain SB3",
                     "steps_per_s": statistics.median(speed["wall"]["plain SB3"]),
                     "cpu_steps_per_s": statistics.median(speed["cpu"]["plain SB3"]),
                     "ratio": 1.0, "target": None, "meets": None})
        for lab in labels:
            target = TARGETS.get(lab)
            med = statistics.median(ratio["wall"][lab])
            rows.append({"agent": agent, "method": lab,
                         "steps_per_s": statistics.median(speed["wall"][lab]),
                         "cpu_steps_per_s": statistics.median(speed["cpu"][lab]),
                         "ratio": med, "ratio_iqr": _quartiles(ratio["wall"][lab]),
                         "ratio_min_max": (min(ratio["wall"][lab]), max(ratio["wall"][lab])),
                         "cpu_ratio": statistics.median(ratio["cpu"][lab]),
                         "cpu_ratio_iqr": _quartiles(ratio["cpu"][lab]),
                         "target": target, "meets": None if target is None else bool(med >= target),
                         "ratios": ratio["wall"][lab], "cpu_ratios": ratio["cpu"][lab]})
        del models
    return rows


def eval_share(train_steps: int, episodes: int) -> dict[str, Any]:
    """Extrapolate CW's evaluation share from a short SAC run and one evaluation."""
    from envs.registry import extra_installed, get_sequence

    name = "CW10" if extra_installed("metaworld") else "PendulumVariants"
    seq = get_sequence(name)
    config = RunConfig(sequence=name, agent="sac", net_arch=(256, 256, 256, 256),
                       agent_options={"batch_size": 128, "exploration_steps": 100,
                                      "buffer_size": 100_000}, torch_threads=None)
    env = seq.make_env(append_task_id=True)
    model = make_agent(config, env, seq)
    model.start_task(0)
    model.learn(100)  # exploration (no updates), untimed
    t0 = time.perf_counter()
    model.learn(train_steps, reset_num_timesteps=False)
    t_train = (time.perf_counter() - t0) / train_steps
    with BatchedEvaluator(seq, episodes) as ev:
        t0 = time.perf_counter()
        res = ev.evaluate(model)
        t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_per_task(model, seq, 1)
    t_loop_one = time.perf_counter() - t0  # per-task loop, 1 episode per task
    every = 20_000
    share = t_eval / (t_eval + every * t_train)
    return {"sequence": name, "tasks": seq.num_tasks, "episodes": episodes,
            "env_steps_per_eval": int(res.lengths.sum()),
            "seconds_per_train_step": t_train, "seconds_per_eval": t_eval,
            "per_task_loop_seconds_1_episode": t_loop_one,
            "eval_every": every, "share": share, "target": 0.25, "meets": share <= 0.25}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", default="sac,ppo")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=256,
                   help="timed env steps per model and round (PPO: rounded up to rollouts)")
    p.add_argument("--repeats", type=int, default=16, help="rounds")
    p.add_argument("--net-arch", default="64,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-train-steps", type=int, default=300)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--skip-eval-share", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench_agents.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    net = [int(x) for x in a.net_arch.split(",")]
    rows = throughput(a.agents.split(","), a.methods.split(","), a.steps, a.repeats, net)
    print(f"\nenv steps/s on task 1 after task 0 ({a.repeats} rounds of {a.steps} timed steps "
          f"(PPO: whole rollouts), torch threads {a.threads}, net {net}); x plain = steps/s "
          "over the mean of the plain SB3 chunks just before and after: median [quartiles] "
          "over rounds, on wall time (the target) and process CPU time")
    print(f"{'agent':5} {'method':24} {'steps/s':>8} {'x plain (wall)':>22} "
          f"{'x plain (CPU)':>22} {'target':>7} meets")
    for r in rows:
        tgt = "-" if r["target"] is None else f">={r['target']:.2f}"
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "NO")
        if r["method"] == "plain SB3":
            wall = cpu = "1"
        else:
            wall = f"{r['ratio']:.3f} [{r['ratio_iqr'][0]:.2f}, {r['ratio_iqr'][1]:.2f}]"
            cpu = f"{r['cpu_ratio']:.3f} [{r['cpu_ratio_iqr'][0]:.2f}, {r['cpu_ratio_iqr'][1]:.2f}]"
        print(f"{r['agent']:5} {r['method']:24} {r['steps_per_s']:8.0f} {wall:>22} {cpu:>22} "
              f"{tgt:>7} {meets}")
    out: dict[str, Any] = {"throughput": rows}
    if not a.skip_eval_share:
        es = eval_share(a.eval_train_steps, a.eval_episodes)
        out["eval_share"] = es
        print(f"\nevaluation share, CW protocol on {es['sequence']} ({es['tasks']} tasks x "
              f"{es['episodes']} episodes every {es['eval_every']:,} steps): one evaluation "
              f"{es['seconds_per_eval']:.1f} s ({es['env_steps_per_eval']:,} env steps), "
              f"training {1000 * es['seconds_per_train_step']:.1f} ms/step -> "
              f"{100 * es['share']:.1f}% of wall time (target <= 25%)")
    a.out.write_text(json.dumps(out, indent=1, default=float))
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
