"""Sweep scaling: the same grid of runs through `crl sweep` on a local Ray instance with 1 CPU
and with 2 CPUs, measured side by side in one invocation; prints wall times and their ratio.

Each setting gets a fresh Ray instance and a fresh output folder (so no run is skipped as
finished), one run per CPU (``resources: {num_cpus: 1}``, one torch thread per run). Ray's
start-up is timed apart from the sweep itself. ``--repeats R`` alternates the settings
(1, 2, 1, 2, ...) so that drifting load on a shared machine hits both alike, and each repeat
first measures how much parallelism the machine has to give at that moment (two busy
processes against one): on cores shared with other work that, not Ray, bounds the ratio.

Presets:
- ``supervised`` (default): split-MNIST, 5 tasks, 3 epochs per task, 400-400 MLP, methods
  finetune / ewc / l2 x seeds 0, 1 (6 runs) on the MNIST IDX files of ``--data-dir``
  (default ``$CRL_DATA_DIR``, else ../shared/data/mnist-10k).
- ``rl``: PPO on CartPoleSwap, 4,096 steps per task, finetune / ewc x seeds 0, 1 (4 runs).

    python scripts/bench_sweep.py                    # supervised preset
    python scripts/bench_sweep.py --preset rl --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str, data_dir: str | None) -> dict[str, Any]:
    if name == "supervised":
        data = data_dir or os.environ.get("CRL_DATA_DIR") or str(
            ROOT.parent / "shared" / "data" / "mnist-10k")
        if not Path(data).is_dir():
            sys.exit(f"no MNIST IDX folder at {data}; pass --data-dir or set $CRL_DATA_DIR")
        return {
            "name": "bench-sweep-supervised", "command": "supervised",
            "base": {"benchmark": "split-mnist", "epochs": 3, "data_dir": data,
                     "download": False, "torch_threads": 1},
            "grid": {"method": ["finetune", "ewc", "l2"], "seed": [0, 1]},
            "retries": 0, "resources": {"num_cpus": 1},
        }
    return {
        "name": "bench-sweep-rl", "command": "train",
        "base": {"agent": "ppo", "sequence": "CartPoleSwap", "steps_per_task": 4096,
                 "eval_every": 2048, "eval_episodes": 3, "torch_threads": 1},
        "grid": {"method": ["finetune", "ewc"], "seed": [0, 1]},
        "retries": 0, "resources": {"num_cpus": 1},
    }


def _burn(n: int) -> float:
    start = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - start


def parallel_capacity(n: int = 10_000_000) -> float:
    """Throughput of 2 CPU-bound processes over 1 at this moment (2.0 on 2 idle cores): the
    ceiling of the sweep's 1-vs-2 CPU ratio on a machine shared with other work."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [1000, 1000])  # workers started before timing
        one = pool.apply(_burn, (n,))
        t0 = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - t0
    return 2 * one / two


def measure(config: Any, cpus: int, out: Path) -> dict[str, Any]:
    """One setting: fresh Ray with ``cpus`` CPUs, the whole grid, Ray shut down."""
    import ray
    from rich.console import Console

    from crl.sweep import run_sweep, start_ray

    if out.exists():
        shutil.rmtree(out)
    sweep = config.with_out(out)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    start_ray(num_cpus=cpus)
    ray_start = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        result = run_sweep(sweep, console=Console(quiet=True), report=False)
        wall = time.perf_counter() - t1
    finally:
        ray.shutdown()
    runs = [o.seconds for o in result.outcomes]
    cpu = [a.cpu_seconds or 0.0 for o in result.outcomes for a in o.attempts]
    return {"cpus": cpus, "ray_start_s": ray_start, "sweep_wall_s": wall,
            "sum_run_s": sum(runs), "mean_run_s": sum(runs) / len(runs),
            "mean_run_cpu_s": sum(cpu) / max(len(cpu), 1),
            # 1-minute load average of the machine before and after (other users' work too)
            "load_before": load0, "load_after": os.getloadavg()[0],
            "finished": result.count("finished"), "failed": result.count("failed"),
            "errors": [o.error for o in result.failed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["supervised", "rl"], default="supervised")
    parser.add_argument("--data-dir", help="MNIST IDX folder (supervised preset)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_sweep")
    args = parser.parse_args()

    from crl.cli import command_options
    from crl.sweep import parse_sweep

    spec = preset(args.preset, args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec | {"out": str(args.out)}, sort_keys=False))
    config = parse_sweep(yaml.safe_load(path.read_text()), source=path,
                         options_for=command_options)
    print(f"{len(config.runs)} runs of `crl {config.command}`: "
          + ", ".join(r.run_id for r in config.runs), flush=True)
    rows = []
    for rep in range(args.repeats):
        capacity = parallel_capacity()
        print(f"repeat {rep}: 2 busy processes get {capacity:.2f}x the throughput of one "
              "right now (ceiling of the ratio below)", flush=True)
        for cpus in (1, 2):
            row = measure(config, cpus, args.out / f"cpus{cpus}-rep{rep}")
            row["repeat"], row["parallel_capacity"] = rep, capacity
            rows.append(row)
            print(f"repeat {rep}, {cpus} CPU(s): sweep {row['sweep_wall_s']:.1f} s (Ray start "
                  f"{row['ray_start_s']:.1f} s), mean run {row['mean_run_s']:.1f} s wall / "
                  f"{row['mean_run_cpu_s']:.1f} s CPU, {row['finished']} finished, "
                  f"{row['failed']} failed; load {row['load_before']:.1f} -> "
                  f"{row['load_after']:.1f} on {os.cpu_count()} cores", flush=True)
            for err in row["errors"]:
                print(f"  error: {err}")
    walls = {c: [r["sweep_wall_s"] for r in rows if r["cpus"] == c] for c in (1, 2)}
    mean = {c: sum(v) / len(v) for c, v in walls.items()}
    ratio = mean[1] / mean[2]
    print(f"\n{'CPUs':>4} {'sweep wall s':>13} {'run wall s':>11} {'run CPU s':>10}  "
          f"(means over {args.repeats} repeat(s))")
    for c in (1, 2):
        mine = [r for r in rows if r["cpus"] == c]
        run_wall = sum(r["mean_run_s"] for r in mine) / len(mine)
        run_cpu = sum(r["mean_run_cpu_s"] for r in mine) / len(mine)
        print(f"{c:>4} {mean[c]:>13.1f} {run_wall:>11.1f} {run_cpu:>10.1f}")
    caps = [r["parallel_capacity"] for r in rows if r["cpus"] == 1]
    print(f"ratio wall(1 CPU) / wall(2 CPUs) = {ratio:.2f} (ideal 2.00 for "
          f"{len(config.runs)} equal runs on 2 free cores; the machine gave 2 processes "
          f"{sum(caps) / len(caps):.2f}x the throughput of one meanwhile)")
    (args.out / "bench_sweep.json").write_text(json.dumps(
        {"preset": args.preset, "runs": [r.run_id for r in config.runs], "rows": rows,
         "mean_wall_s": mean, "ratio_1_over_2": ratio, "cpu_count": os.cpu_count()},
        indent=1))
    print(f"results: {args.out / 'bench_sweep.json'}")


if __name__ == "__main__":
    main()
