"""Steps per second of ContinualEnv against the raw env of the same task, in one run.

For each family, the raw env is the sequence's first task built alone (``TaskSpec.make()``:
``gymnasium.make`` plus the task's wrappers) and the continual env is ``ContinualEnv`` of
the same sequence with a budget large enough that no switch happens while timing. (The
continual env builds its task envs without Gymnasium's PassiveEnvChecker and OrderEnforcing
layers, ``TaskSpec.make(lean=True)``; the raw env is also timed that way, "raw env, lean",
to show the cost of ContinualEnv's own layer.) All run
the same pre-drawn actions with the same loop (reset at episode ends); repetitions
alternate which one runs first; the table reports the medians and the overhead
``1 - median(continual) / median(raw)``.

    python scripts/bench_envs.py                 # classic control and Atari (+ MuJoCo, Meta-World)
    python scripts/bench_envs.py --reps 9 --families cartpole atari
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import gymnasium as gym
import numpy as np

try:
    import envs  # noqa: F401
except ModuleNotFoundError:  # run from a checkout where envs/ is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from envs import ContinualEnv, get_sequence  # noqa: E402
from envs.registry import extra_installed  # noqa: E402

FAMILIES = {
    # name: (sequence, extra, steps per repetition)
    "cartpole": ("CartPoleSwap", None, 40_000),
    "pendulum": ("PendulumVariants", None, 20_000),
    "atari": ("Atari3", "atari", 3_000),
    "mujoco": ("HalfCheetahPhysics", "mujoco", 10_000),
    "metaworld": ("CW10", "metaworld", 3_000),
}


def _time(env: gym.Env, actions: list, seed: int) -> float:
    env.reset(seed=seed)
    step, reset = env.step, env.reset
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = step(a)
        if terminated or truncated:
            reset()
    return len(actions) / (time.perf_counter() - start)


def bench(family: str, reps: int, steps: int | None) -> list[dict] | None:
    name, extra, default_steps = FAMILIES[family]
    if extra and not extra_installed(extra):
        print(f"skip {family}: needs the '{extra}' extra")
        return None
    n = steps or default_steps
    seq = get_sequence(name, steps_per_task=10 * n * (reps + 1))
    raw = seq.tasks[0].make()
    variants = {
        "raw env, lean": seq.tasks[0].make(lean=True),
        "ContinualEnv": ContinualEnv(seq),
        "ContinualEnv + one-hot": ContinualEnv(seq, append_task_id=True),
    }
    raw.action_space.seed(0)
    actions = [raw.action_space.sample() for _ in range(n)]
    _time(raw, actions[: n // 10], 0)  # warm-up (imports, caches)
    for env in variants.values():
        _time(env, actions[: n // 10], 0)
    raw_sps: list[float] = []
    sps: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps):
        order = [("raw", raw), *variants.items()]
        if rep % 2:
            order.reverse()
        for label, env in order:
            value = _time(env, actions, seed=rep)
            (raw_sps if label == "raw" else sps[label]).append(value)
    raw_median = statistics.median(raw_sps)
    rows = [dict(family=family, task=seq.tasks[0].name, env="raw env", sps=raw_median, ovh=None)]
    for label, values in sps.items():
        med = statistics.median(values)
        task = seq.tasks[0].name
        rows.append(dict(family=family, task=task, env=label, sps=med, ovh=1 - med / raw_median))
    raw.close()
    for env in variants.values():
        env.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per repetition")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for family in args.families:
        out = bench(family, args.reps, args.steps)
        if out:
            rows += out
            for r in out:
                ovh = "" if r["ovh"] is None else f"{100 * r['ovh']:+.1f}%"
                print(f"  {r['family']:<10} {r['env']:<24} {r['sps']:>10,.0f} steps/s {ovh}")
    versions = f"gymnasium {gym.__version__}, numpy {np.__version__}"
    print(f"\nmedian of {args.reps} repetitions; {versions}")
    print("| family | task | env | steps/s (median) | overhead vs raw |")
    print("| --- | --- | --- | ---: | ---: |")
    for r in rows:
        ovh = "" if r["ovh"] is None else f"{100 * r['ovh']:+.1f}%"
        print(f"| {r['family']} | {r['task']} | {r['env']} | {r['sps']:,.0f} | {ovh} |")


if __name__ == "__main__":
    main()
