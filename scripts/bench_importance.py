"""Task-end cost of the importance estimators: the layer path against per-sample Jacobians.

For each network the product trains (the supervised 784-400-400-10 MLP, SAC's actor at our
64-64 and at Continual World's 4x256, PPO's 64-64 policy, PPO's Nature CNN on Atari) and each
estimator (EWC's true and sampled Fisher, MAS), this computes the importance over the same
samples twice, once per path, each in its own fresh process (one at a time, so peak memory
belongs to one computation and timings do not compete), and prints:

- seconds of the task-end computation, fast and torch.func, and their ratio;
- peak memory added by the computation (ru_maxrss after minus before), per path;
- the largest relative difference ‖fast − func‖ / ‖func‖ over the protected parameters.

glibc's allocator settings (crl/allocator.py) stay off unless ``--keep-freed-memory``: the
per-sample Jacobian path is the one they help.

    python scripts/bench_importance.py --threads 1
    python scripts/bench_importance.py --cases atari --estimators true,sampled,mas
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: case -> (what it is, samples at the task end: the defaults of the method that uses it)
CASES: dict[str, tuple[str, int]] = {
    "mlp": ("supervised MLP 784-400-400-10, single head", 256),
    "sac": ("SAC actor 64-64, multi-head (MujocoMix)", 2048),
    "sac-cw": ("SAC actor 4x256, multi-head (Continual World's network)", 2048),
    "ppo": ("PPO policy 64-64, multi-head, 3 actions (ClassicMix)", 2048),
    "atari": ("PPO Nature CNN, multi-head, 18 actions (Atari3)", 512),
}
ESTIMATORS = ("true", "sampled", "mas")


def _host(case: str, samples: int) -> tuple[Any, list[dict[str, Any]]]:
    """(host, its task-end batches), built without training: the cost does not depend on
    the weights' values."""
    import torch

    torch.manual_seed(0)  # the same weights in the fast and the torch.func process
    g = torch.Generator().manual_seed(0)
    if case == "mlp":
        from crl.supervised.models import MLPClassifier
        from crl.supervised.trainer import ClassifierHost, TrainerConfig

        host = ClassifierHost(MLPClassifier(), TrainerConfig(), g)
        x = torch.rand(samples, 784, generator=g)
        y = torch.randint(0, 10, (samples,), generator=g)
        batches = [{"x": x[i : i + 256], "y": y[i : i + 256],
                    "task": torch.zeros(len(x[i : i + 256]), dtype=torch.long)}
                   for i in range(0, samples, 256)]
        return host, batches
    if case in ("sac", "sac-cw"):
        from agents.sac import ContinualSAC
        from envs.continual import ContinualEnv
        from envs.registry import get_sequence

        net = [64, 64] if case == "sac" else [256, 256, 256, 256]
        env = ContinualEnv(get_sequence("MujocoMix"), append_task_id=True)
        agent = ContinualSAC("MlpPolicy", env, num_tasks=3, strategy="ewc",
                             policy_kwargs=dict(net_arch=net), buffer_size=samples, seed=0)
        obs = torch.randn(samples, env.observation_space.shape[0], generator=g)
        obs[:, -3:] = torch.tensor([1.0, 0.0, 0.0])
        return agent.host, [{"obs": obs[i : i + 256]} for i in range(0, samples, 256)]
    from agents.ppo import ContinualPPO
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    if case == "ppo":
        env = ContinualEnv(get_sequence("ClassicMix"), append_task_id=True)
        agent = ContinualPPO("MlpPolicy", env, num_tasks=3, strategy="ewc",
                             policy_kwargs=dict(net_arch=[64, 64]), seed=0)
        obs = torch.randn(samples, env.observation_space.shape[0], generator=g)
        obs[:, -3:] = torch.tensor([1.0, 0.0, 0.0])
        return agent.host, [{"obs": obs[i : i + 64]} for i in range(0, samples, 64)]
    env = ContinualEnv(get_sequence("Atari3"), append_task_id=True)
    agent = ContinualPPO("MultiInputPolicy", env, num_tasks=3, strategy="ewc", seed=0)
    frames = torch.randint(0, 256, (samples, *env.observation_space["observation"].shape),
                           generator=g, dtype=torch.uint8)
    task = torch.zeros(samples, 3)
    task[:, 0] = 1.0
    return agent.host, [
        {"obs.observation": frames[i : i + 256], "obs.task_id": task[i : i + 256]}
        for i in range(0, samples, 256)
    ]


def _one(spec: dict[str, Any]) -> dict[str, Any]:
    """One (case, estimator, path) in a fresh process."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["keep_freed_memory"]:
        from crl.allocator import keep_freed_memory

        keep_freed_memory()
    from crl.strategies.importance import fisher_diagonal, mas_importance

    host, batches = _host(spec["case"], spec["samples"])
    fast = spec["path"] == "fast"
    est = spec["estimator"]

    def run() -> dict[str, torch.Tensor]:
        if est == "mas":
            return mas_importance(host, batches=batches, fast=fast)
        return fisher_diagonal(host, est, batches=batches, seed=1, fast=fast)  # type: ignore[arg-type]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in host.protected_parameters().values())
    torch.save(out, spec["result"])
    return {**spec, "seconds": seconds, "peak_mb": max(0.0, peak - before), "params": params}


def _rel(a: Any, b: Any) -> float:
    worst = 0.0
    for n in b:
        denom = float(b[n].norm())
        diff = float((a[n] - b[n]).norm())
        worst = max(worst, 0.0 if diff == 0 else diff / max(denom, 1e-30))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="turn on crl/allocator.py's glibc settings in every measurement")
    p.add_argument("--out", default="runs/bench_importance")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    ests = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = [c for c in cases if c not in CASES] + [e for e in ests if e not in ESTIMATORS]
    if unknown:
        print(f"unknown {unknown}; cases: {list(CASES)}, estimators: {list(ESTIMATORS)}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CRL_KEEP_FREED_MEMORY", "0")
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    import torch

    for case in cases:
        for est in ests:
            pair = {}
            for path in ("fast", "func"):
                spec = {"case": case, "estimator": est, "path": path, "threads": args.threads,
                        "samples": CASES[case][1], "keep_freed_memory": args.keep_freed_memory,
                        "result": str(out / f"{case}-{est}-{path}.pt")}
                with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    pair[path] = pool.submit(_one, spec).result()
                print(f"{case} {est} {path}: {pair[path]['seconds']:.2f} s, "
                      f"+{pair[path]['peak_mb']:.0f} MB", flush=True)
            rel = _rel(torch.load(pair["fast"]["result"]), torch.load(pair["func"]["result"]))
            rows.append({"case": case, "estimator": est, "params": pair["fast"]["params"],
                         "samples": CASES[case][1], "fast_s": pair["fast"]["seconds"],
                         "func_s": pair["func"]["seconds"], "fast_mb": pair["fast"]["peak_mb"],
                         "func_mb": pair["func"]["peak_mb"], "max_rel_diff": rel})
    lines = [
        f"threads {args.threads}; allocator settings "
        f"{'on' if args.keep_freed_memory else 'off'}",
        "",
        "| network | estimator | protected params | samples | fast s | torch.func s | "
        "speed-up | fast peak MB | torch.func peak MB | max rel diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {CASES[r['case']][0]} | {r['estimator']} | {r['params']:,} | {r['samples']} | "
            f"{r['fast_s']:.2f} | {r['func_s']:.2f} | {r['func_s'] / r['fast_s']:.1f}x | "
            f"{r['fast_mb']:.0f} | {r['func_mb']:.0f} | {r['max_rel_diff']:.1e} |"
        )
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    (out / "runs.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
