"""Supervised benchmark: every method on permuted-MNIST and split-MNIST (task-IL, class-IL).

Prints and saves two tables:
- quality: average accuracy and forgetting, mean and 90% bootstrap CI over seeds;
- cost: seconds per task and peak memory of each method, as ratios to finetune, measured in
  the same invocation (every run in its own fresh process, one at a time, so that peak RSS
  belongs to one run and timings do not compete).

Data: the four MNIST IDX files in ``$CRL_DATA_DIR`` (e.g. ../shared/data/mnist-10k).

    CRL_DATA_DIR=../shared/data/mnist-10k python scripts/bench_supervised.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: row label -> (method, options over crl.supervised.experiment.SUPERVISED_METHOD_DEFAULTS,
#: where the strengths and memory sizes are set and explained); labels are what --methods
#: selects.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {}),
    "l2": ("l2", {}),
    "ewc": ("ewc", {}),
    "ewc-online": ("ewc", {"lam": 30.0, "mode": "online", "gamma": 1.0}),
    "mas": ("mas", {}),
    "packnet": ("packnet", {}),
    "agem": ("agem", {}),
    "replay": ("replay", {}),
    "si": ("si", {}),
    "lwf": ("lwf", {}),
    "der": ("der", {}),  # DER++ at the supervised defaults (beta 0.5)
    "joint": ("joint", {}),
}
#: setting -> (benchmark, scenario, tasks, epochs). Epochs give every setting about the same
#: number of updates per task (~65 of batch 128): a permuted task holds all 8,000 training
#: images of mnist-10k, a split task about 1,600.
SETTINGS = {
    "permuted-mnist/domain-il": ("permuted-mnist", "domain-il", 10, 1),
    "split-mnist/task-il": ("split-mnist", "task-il", 5, 5),
    "split-mnist/class-il": ("split-mnist", "class-il", 5, 5),
}
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One (setting, method, seed) in a fresh process; returns its summary and memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    from crl.supervised.experiment import SupervisedConfig, build_benchmark, run_experiment
    from crl.supervised.trainer import TrainerConfig

    name, scenario, tasks, epochs = SETTINGS[spec["setting"]]
    cfg = SupervisedConfig(
        benchmark=name,
        scenario=scenario,
        tasks=tasks,
        method=VARIANTS[spec["label"]][0],
        seed=spec["seed"],
        data_dir=spec["data_dir"],
        download=False,
        wandb="disabled",
        trainer=TrainerConfig(epochs=spec["epochs"] or epochs, progress=False),
        method_options={VARIANTS[spec["label"]][0]: VARIANTS[spec["label"]][1]},
    )
    benchmark = build_benchmark(cfg)
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(cfg, benchmark=benchmark, run_dir=Path(tmp) / "run")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return res.summary | {
        "method": spec["label"],
        "setting": spec["setting"],
        "seed": spec["seed"],
        "peak_rss_mb": peak,
        "peak_extra_mb": max(peak - base, 0.0),
    }


def _ci(values: list[float]) -> tuple[float, float, float]:
    from crl.metrics import bootstrap_ci

    values = [v for v in values if not np.isnan(v)]
    return bootstrap_ci(values) if values else (np.nan, np.nan, np.nan)


def _cell(ci: tuple[float, float, float], scale: float = 100.0) -> str:
    m, lo, hi = ci
    if np.isnan(m):
        return "n/a"
    return f"{m * scale:.1f} [{lo * scale:.1f}, {hi * scale:.1f}]"


def tables(rows: list[dict[str, Any]], methods: list[str], settings: list[str]) -> str:
    out = ["## Quality: average accuracy / forgetting (%), mean [90% bootstrap CI] over seeds", ""]
    header = "| method | " + " | ".join(f"{s} acc | {s} forgetting" for s in settings) + " |"
    out += [header, "|" + "---|" * (1 + 2 * len(settings))]
    for m in methods:
        cells = []
        for s in settings:
            runs = [r for r in rows if r["method"] == m and r["setting"] == s]
            cells.append(_cell(_ci([r["avg_acc"] for r in runs])))
            cells.append(_cell(_ci([r["forgetting"] for r in runs])))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "## Cost relative to finetune (same invocation, one run per fresh process)", ""]
    out += ["| method | setting | s / task | × finetune | peak RSS MB | extra MB over data "
            "| × finetune (extra) |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        ref = [r for r in rows if r["method"] == "finetune" and r["setting"] == s]
        ref_t = np.mean([r["seconds_per_task"] for r in ref]) if ref else np.nan
        ref_m = np.mean([r["peak_extra_mb"] for r in ref]) if ref else np.nan
        for m in methods:
            runs = [r for r in rows if r["method"] == m and r["setting"] == s]
            if not runs:
                continue
            t = float(np.mean([r["seconds_per_task"] for r in runs]))
            peak = float(np.mean([r["peak_rss_mb"] for r in runs]))
            extra = float(np.mean([r["peak_extra_mb"] for r in runs]))
            out.append(f"| {m} | {s} | {t:.2f} | {t / ref_t:.2f} | {peak:.0f} | {extra:.0f} "
                       f"| {extra / ref_m:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(VARIANTS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--epochs", type=int, default=0, help="override every setting's epochs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="parallel runs (1: clean timings)")
    p.add_argument("--out", default="runs/bench_supervised")
    args = p.parse_args(argv)
    data_dir = os.environ.get("CRL_DATA_DIR")
    if not data_dir or not Path(data_dir).is_dir():
        print("set CRL_DATA_DIR to a folder with the four MNIST IDX files "
              "(e.g. ../shared/data/mnist-10k)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS] + [m for m in methods if m not in VARIANTS]
    if unknown:
        print(f"unknown {unknown}; settings: {list(SETTINGS)}, methods: {list(VARIANTS)}",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = [
        {"setting": s, "label": m, "seed": seed, "data_dir": data_dir, "epochs": args.epochs,
         "threads": args.threads}
        for s in settings for seed in seeds for m in methods
    ]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_one_run, spec): spec for spec in specs}
        for fut in cf.as_completed(futures):
            spec = futures[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - one failed run must not lose the rest
                failures.append(f"{spec['setting']} {spec['label']} seed {spec['seed']}: {exc!r}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            rows.append(row)
            print(f"[{len(rows) + len(failures)}/{len(specs)} {time.perf_counter() - start:.0f}s] "
                  f"{spec['setting']} {spec['label']} seed {spec['seed']}: "
                  f"acc {row['avg_acc']:.3f} forgetting {row['forgetting']:.3f} "
                  f"{row['seconds_per_task']:.2f}s/task", flush=True)
    text = tables(rows, methods, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text + "\n")
    (out / "runs.json").write_text(json.dumps(rows, indent=1, default=float))
    print(text)
    print(f"\nwall time {time.perf_counter() - start:.0f}s; tables in {out / 'tables.md'}")
    if failures:
        print("failed runs:\n" + "\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
