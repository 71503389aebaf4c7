"""Throughput of Continual World's protocol on one core: SAC with CW's network (4x256),
batch 128 and one gradient step per env step (CW: 50 updates every 50 steps), on the first
tasks of CW10, every method of the CW sweep files. Gives env steps/s per core, with and
without the evaluation, and the core-hours and wall time a full CW10 / CW20 sweep needs.

Run it alone (no other job on the machine): it times.

    python scripts/bench_cw_throughput.py --steps 4000 --tasks 2 --methods finetune,ewc
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.config import RunConfig  # noqa: E402
from agents.runner import train  # noqa: E402

CW_OPTIONS = {"learning_rate": 1e-3, "batch_size": 128, "buffer_size": 1_000_000,
              "gamma": 0.99, "tau": 0.005, "train_freq": 50, "gradient_steps": 50}
#: CW's evaluation: 10 episodes per task every 20,000 steps (here scaled to the budget)
STEPS_PER_TASK_CW = 1_000_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="env steps per task")
    p.add_argument("--tasks", type=int, default=2, help="first N tasks of CW10")
    p.add_argument("--exploration", type=int, default=1000)
    p.add_argument("--methods", default="finetune,ewc")
    p.add_argument("--workers", default="8,32,128", help="cluster sizes for the wall times")
    a = p.parse_args()
    rows = []
    for method in a.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            seq_file = Path(tmp) / "cw.yaml"
            from envs.metaworld import CW10_TASKS

            tasks = "\n".join(f"  - metaworld: {{env_name: {t}}}" for t in CW10_TASKS[:a.tasks])
            seq_file.write_text(f"name: CW{a.tasks}\nsteps_per_task: {a.steps}\ntasks:\n{tasks}\n")
            cfg = RunConfig(sequence=str(seq_file), agent="sac", method=method,
                            eval_every=a.steps, eval_episodes=1, random_episodes=1,
                            net_arch=(256, 256, 256, 256), run_dir=tmp, wandb="disabled",
                            progress=False, save_model=False, torch_threads=1,
                            agent_options={**CW_OPTIONS, "buffer_size": 100_000,
                                           "exploration_steps": a.exploration})
            t0 = time.perf_counter()
            res = train(cfg)
            wall = time.perf_counter() - t0
        s = res.summary
        train_s = s["timings"]["train_seconds"]
        learning = a.tasks * (a.steps - a.exploration)
        rows.append((method, s["env_steps"] / train_s, learning, wall))
        print(f"{method}: {s['env_steps']:,} steps, train {train_s:.1f} s -> "
              f"{s['env_steps'] / train_s:.0f} steps/s (of which {a.exploration} random "
              f"per task), {wall:.1f} s wall with evaluation and set-up", flush=True)
    print("\nCW protocol estimate (1M steps per task; steps/s as measured, whose share of "
          f"random exploration steps is {a.exploration / a.steps:.0%} here vs 1% in CW, so "
          "CW's runs are slower per step than this):")
    workers = [int(w) for w in a.workers.split(",")]
    for method, rate, _, _ in rows:
        for name, n_tasks in (("CW10", 10), ("CW20", 20)):
            hours = n_tasks * STEPS_PER_TASK_CW / rate / 3600
            runs = 7 * 5  # 7 methods x 5 seeds
            walls = ", ".join(f"{w} workers {runs * hours / min(w, runs):.0f} h"
                              for w in workers)
            print(f"  {method:9} {name}: {hours:6.0f} core-hours per run; 7 methods x 5 seeds "
                  f"= {runs * hours:,.0f} core-hours; wall: {walls}")


if __name__ == "__main__":
    main()
