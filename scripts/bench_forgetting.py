"""RL quality benchmark: the README sequence with finetune and every method, over seeds.

Runs `crl train`'s runner on CartPoleSwap with PPO (single head: with one head per task the
swapped task gets its own output layer and nothing is forgotten, see the notes below),
after creating the single-task reference runs once. Reports, per method, the final average
performance P(T), the mean forgetting and the mean forward transfer with 90% percentile
bootstrap confidence intervals over seeds, and checks the issue's claims: finetune forgets
clearly (forgetting >= 0.5), and EWC, PackNet and replay (distillation for PPO) each forget
less than finetune (their mean forgetting below finetune's CI lower bound).

Method strengths are set in VARIANTS below (the constructors' defaults are tuned for the
supervised benchmarks); every row says which options it used.

    python scripts/bench_forgetting.py --seeds 0,1,2 --out bench_forgetting
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

from agents.reference import run_references  # noqa: E402
from agents.runner import RunConfig, aggregate, load_sequence, train  # noqa: E402

#: row label -> (method, options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {}),
    "l2": ("l2", {"lam": 1000.0}),
    "ewc": ("ewc", {"lam": 1000.0}),
    "mas": ("mas", {"lam": 100.0}),
    "packnet": ("packnet", {}),
    "agem": ("agem", {}),
    "replay": ("replay", {}),
}
#: the README demo: PPO, single head, 20k steps per task
BASE = {
    "sequence": "CartPoleSwap", "agent": "ppo", "steps_per_task": 20_480, "eval_every": 2048,
    "eval_episodes": 5, "agent_options": {"n_steps": 1024, "multi_head": False},
}


def _fmt(ci: tuple[float, float, float]) -> str:
    m, lo, hi = ci
    return "n/a" if np.isnan(m) else f"{m:6.3f} [{lo:6.3f}, {hi:6.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps-per-task", type=int, default=BASE["steps_per_task"])
    p.add_argument("--multi-head", action="store_true", help="one head per task instead")
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
    runs: list[dict[str, Any]] = []
    for label in a.methods.split(","):
        method, options = VARIANTS[label]
        for seed in seeds:
            cfg = base.replace(method=method, seed=seed, method_options={method: options},
                               require_references=True)
            t0 = time.perf_counter()
            res = train(cfg)
            s = res.summary
            runs.append({"variant": label, "method": method, "options": options, "seed": seed,
                         "final_performance": s["final_performance"],
                         "mean_forgetting": s["mean_forgetting"],
                         "mean_forward_transfer": s["mean_forward_transfer"],
                         "seconds": time.perf_counter() - t0, "run_dir": str(res.run_dir)})
            print(f"  {label} seed {seed}: P(T) {s['final_performance']:.3f}, forgetting "
                  f"{s['mean_forgetting']:.3f}, FT {s['mean_forward_transfer']:.3f} "
                  f"({runs[-1]['seconds']:.0f} s)", flush=True)
    table = []
    for label in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == label]
        agg = aggregate(rs)
        table.append({"variant": label, "options": rs[0]["options"], "seeds": len(rs),
                      **{k: list(v) for k, v in agg.items()},
                      "seconds_per_run": float(np.mean([r["seconds"] for r in rs]))})
    head = "multi-head" if a.multi_head else "single head"
    print(f"\n{seq.name}, PPO ({head}), {a.steps_per_task:,} steps/task, seeds {seeds}; "
          "mean [90% bootstrap CI]")
    print(f"{'method':10} {'performance P(T)':26} {'forgetting':26} {'forward transfer':26} s/run")
    for row in table:
        print(f"{row['variant']:10} {_fmt(row['final_performance']):26} "
              f"{_fmt(row['mean_forgetting']):26} {_fmt(row['mean_forward_transfer']):26} "
              f"{row['seconds_per_run']:.0f}")
    by = {row["variant"]: row for row in table}
    checks = {}
    if "finetune" in by:
        ft_forg = by["finetune"]["mean_forgetting"]
        checks["finetune forgets clearly (mean forgetting >= 0.5)"] = bool(ft_forg[0] >= 0.5)
        for label in ("ewc", "packnet", "replay"):
            if label in by:
                checks[f"{label} forgets less than finetune (mean below finetune's CI low)"] = (
                    bool(by[label]["mean_forgetting"][0] < ft_forg[1]))
    for claim, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}: {claim}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_forgetting.json").write_text(json.dumps(
        {"table": table, "runs": runs, "checks": checks}, indent=1, default=float))
    with (a.out / "bench_forgetting.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    print(f"\nwritten: {a.out / 'bench_forgetting.json'}, {a.out / 'bench_forgetting.csv'}")


if __name__ == "__main__":
    main()
