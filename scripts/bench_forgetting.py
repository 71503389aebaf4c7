"""RL quality benchmark: the README sequence with finetune and every method, over seeds.

Runs `crl train`'s runner on CartPoleSwap with PPO (single head: with one head per task the
swapped task gets its own output layer and nothing is forgotten), after creating the
single-task reference runs once. Every method runs with the options `crl train` uses when the
user gives none (``agents.method_defaults.RL_METHOD_DEFAULTS``; each row prints them).

Reports, per method, the final average performance P(T), the mean forgetting, the mean
forward transfer and the *new-task gain* (per later task: its end-of-task score minus its
score when it started, i.e. did the agent learn it), with 90% percentile bootstrap confidence
intervals over seeds. Checks the issue's claims: finetune forgets clearly (forgetting >= 0.5);
L2, EWC, MAS, PackNet and replay (distillation for PPO) each forget less than finetune (their
mean forgetting below finetune's CI lower bound) and still learn the new task (mean gain
>= 0.5, half the score range).

``--grid METHOD=v1,v2,...`` (repeatable) runs a strength calibration instead: METHOD at each
value of its ``lam`` (or ``--grid-option``), plus finetune, on the given seeds, and prints
forgetting and new-task gain per value.

    python scripts/bench_forgetting.py --seeds 0,1,2 --out bench_forgetting
    python scripts/bench_forgetting.py --seeds 0 --grid l2=1,10,100 --grid ewc=1,10,100
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.method_defaults import rl_method_options  # noqa: E402
from agents.reference import run_references  # noqa: E402
from agents.runner import RunConfig, RunResult, aggregate, load_sequence, train  # noqa: E402
from crl.metrics import bootstrap_ci  # noqa: E402

METHODS = ("finetune", "l2", "ewc", "mas", "packnet", "agem", "replay")
#: methods that must forget less than finetune and learn the new task
PROTECTING = ("l2", "ewc", "mas", "packnet", "replay")
#: a later task counts as learnt when its end-of-task score exceeds its start by this much
MIN_GAIN = 0.5
#: the README demo: PPO, single head, 20k steps per task
BASE = {
    "sequence": "CartPoleSwap", "agent": "ppo", "steps_per_task": 20_480, "eval_every": 2048,
    "eval_episodes": 5, "agent_options": {"n_steps": 1024, "multi_head": False},
}


def _fmt(ci: tuple[float, float, float] | list[float]) -> str:
    m, lo, hi = ci
    return "n/a" if np.isnan(m) else f"{m:6.3f} [{lo:6.3f}, {hi:6.3f}]"


def new_task_gain(res: RunResult) -> float:
    """Mean over the stages after the first of (end-of-task score - score at the stage's
    start): how much of each new task the agent learnt (nan without scores)."""
    h = res.history
    if h is None or h.n_tasks < 2:
        return float("nan")
    gains = []
    for s in range(1, h.n_tasks):
        window = h.scores[h.window_mask(s), s]
        gains.append(float(res.rows[s]["end_of_task"]) - float(window[0]))
    return float(np.mean(gains))


def run_one(base: RunConfig, label: str, method: str, options: dict[str, Any],
            seed: int) -> dict[str, Any]:
    cfg = base.replace(method=method, seed=seed, method_options={method: options},
                       require_references=True)
    t0 = time.perf_counter()
    res = train(cfg)
    s = res.summary
    resolved = rl_method_options(cfg.agent, method, options, cfg.agent_options)
    resolved = {k: v for k, v in resolved.items() if k not in ("num_tasks", "seed")}
    row = {"variant": label, "method": method, "options": resolved, "seed": seed,
           "final_performance": s["final_performance"],
           "mean_forgetting": s["mean_forgetting"],
           "mean_forward_transfer": s["mean_forward_transfer"],
           "new_task_gain": new_task_gain(res),
           "seconds": time.perf_counter() - t0, "run_dir": str(res.run_dir)}
    print(f"  {label} seed {seed} {resolved}: P(T) {s['final_performance']:.3f}, forgetting "
          f"{s['mean_forgetting']:.3f}, FT {s['mean_forward_transfer']:.3f}, new-task gain "
          f"{row['new_task_gain']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return row


def _grid(specs: list[str], option: str) -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = [("finetune", "finetune", {})]
    for spec in specs:
        method, _, values = spec.partition("=")
        if method not in METHODS or not values:
            raise SystemExit(f"--grid wants METHOD=v1,v2,... with METHOD in {METHODS}, got "
                             f"{spec!r}")
        for v in values.split(","):
            out.append((f"{method} {option}={v}", method, {option: float(v)}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps-per-task", type=int, default=BASE["steps_per_task"])
    p.add_argument("--multi-head", action="store_true", help="one head per task instead")
    p.add_argument("--grid", action="append", default=[],
                   help="calibration: METHOD=v1,v2,... (repeatable); replaces --methods")
    p.add_argument("--grid-option", default="lam")
    p.add_argument("--reference-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("bench_forgetting"))
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    base = RunConfig(**{**BASE, "steps_per_task": a.steps_per_task},
                     run_dir=str(a.out / "runs"), wandb="disabled", progress=False,
                     reference_dir=a.reference_dir, group="bench_forgetting")
    if a.multi_head:
        base = base.replace(agent_options={**base.agent_options, "multi_head": True})
    seq = load_sequence(base)
    t0 = time.perf_counter()
    refs = run_references(base, seq)
    print(f"reference runs ready ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{r.task_name} final return {r.final_return:.1f}" for r in refs.values()),
          flush=True)
    if a.grid:
        variants = _grid(a.grid, a.grid_option)
    else:
        variants = [(m, m, {}) for m in a.methods.split(",")]
    runs: list[dict[str, Any]] = []
    for label, method, options in variants:
        for seed in seeds:
            runs.append(run_one(base, label, method, options, seed))
    table = []
    for label in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == label]
        agg = aggregate(rs)
        gains = [r["new_task_gain"] for r in rs if np.isfinite(r["new_task_gain"])]
        gain = bootstrap_ci(gains) if gains else (float("nan"),) * 3
        table.append({"variant": label, "options": rs[0]["options"], "seeds": len(rs),
                      **{k: list(v) for k, v in agg.items()}, "new_task_gain": list(gain),
                      "seconds_per_run": float(np.mean([r["seconds"] for r in rs]))})
    head = "multi-head" if a.multi_head else "single head"
    print(f"\n{seq.name}, PPO ({head}), {a.steps_per_task:,} steps/task, seeds {seeds}; "
          "mean [90% bootstrap CI]")
    print(f"{'method':16} {'performance P(T)':26} {'forgetting':26} {'forward transfer':26} "
          f"{'new-task gain':26} s/run  options")
    for row in table:
        print(f"{row['variant']:16} {_fmt(row['final_performance']):26} "
              f"{_fmt(row['mean_forgetting']):26} {_fmt(row['mean_forward_transfer']):26} "
              f"{_fmt(row['new_task_gain']):26} {row['seconds_per_run']:5.0f}  {row['options']}")
    checks = {}
    by = {row["variant"]: row for row in table}
    if "finetune" in by and not a.grid:
        ft_forg = by["finetune"]["mean_forgetting"]
        checks["finetune forgets clearly (mean forgetting >= 0.5)"] = bool(ft_forg[0] >= 0.5)
        for label in PROTECTING:
            if label in by:
                checks[f"{label} forgets less than finetune (mean below finetune's CI low)"] = (
                    bool(by[label]["mean_forgetting"][0] < ft_forg[1]))
                checks[f"{label} learns the new task (mean gain >= {MIN_GAIN})"] = bool(
                    by[label]["new_task_gain"][0] >= MIN_GAIN)
    for claim, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}: {claim}")
    a.out.mkdir(parents=True, exist_ok=True)
    name = "bench_forgetting_grid" if a.grid else "bench_forgetting"
    (a.out / f"{name}.json").write_text(json.dumps(
        {"table": table, "runs": runs, "checks": checks}, indent=1, default=float))
    with (a.out / f"{name}.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    print(f"\nwritten: {a.out / (name + '.json')}, {a.out / (name + '.csv')}")


if __name__ == "__main__":
    main()
