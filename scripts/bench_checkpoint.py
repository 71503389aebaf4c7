"""What checkpoints and the nan/inf check cost.

1. The README run (PPO on CartPoleSwap, ``--single-head --n-steps 1024 --eval-every 2048
   --eval-episodes 5``) at the default ``--checkpoint-every`` and at tighter intervals: the
   time spent writing checkpoints (building the payload, ``torch.save``, fsync, rename) as a
   share of the run's wall time, measured inside the run (``timings.checkpoint_seconds``), and
   the checkpoint size.
2. A CW10-sized SAC checkpoint (Continual World's network: 4 hidden layers of 256; a 1M
   replay buffer; 39-dim Meta-World observations + the 10-task one-hot; 4-dim actions; EWC
   state after 9 finished tasks): size and write/read time with and without the replay
   buffer. The buffer is filled synthetically (uniform random transitions, every slot
   written, 100k per task) instead of training 1M steps: the size depends on the buffer's
   shape, not on its content. Needs the ``metaworld`` extra (the real CW10 env is built).
3. The nan/inf loss check: the time spent inside it (every call timed) as a share of
   learning one task, for PPO (CartPoleSwap) and SAC (PendulumVariants) with SB3's defaults.

    python scripts/bench_checkpoint.py [--skip-cw10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agents.checkpoint import agent_state, load_agent_state  # noqa: E402
from agents.config import CHECKPOINT_EVERY, RunConfig  # noqa: E402
from agents.continual import ContinualAgent  # noqa: E402
from agents.factory import make_agent  # noqa: E402
from agents.runner import train  # noqa: E402
from crl.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

README = dict(sequence="CartPoleSwap", agent="ppo", method="finetune", eval_every=2048,
              eval_episodes=5, agent_options={"multi_head": False, "n_steps": 1024},
              wandb="disabled", progress=False, save_model=False)


def readme_overhead(every: int, repeats: int) -> dict[str, Any]:
    shares, seconds, counts, sizes = [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = train(RunConfig(**README, checkpoint_every=every, run_dir=tmp))
            t = res.timings
            shares.append(t["checkpoint_seconds"] / t["total_seconds"])
            seconds.append(t["total_seconds"])
            counts.append(t["checkpoint_count"])
            sizes.append((res.run_dir / "checkpoints" / "last.pt").stat().st_size)
    return {"every": every, "share": float(np.mean(shares)), "share_max": float(max(shares)),
            "seconds": float(np.mean(seconds)), "count": counts[0],
            "per_checkpoint_ms": 1000 * float(np.mean(shares) * np.mean(seconds)) / counts[0],
            "size": sizes[0]}


def cw10_sizes() -> dict[str, Any]:
    from envs.registry import get_sequence

    sequence = get_sequence("CW10")
    config = RunConfig(sequence="CW10", agent="sac", method="ewc", net_arch=(256,) * 4,
                       agent_options={"buffer_size": 1_000_000, "batch_size": 128},
                       wandb="disabled", progress=False)
    env = sequence.make_env(append_task_id=True)
    agent = make_agent(config, env, sequence)
    buf = agent.replay_buffer
    obs_dim, act_dim = buf.observations.shape[-1], buf.actions.shape[-1]
    rng = np.random.default_rng(0)

    def fill(n: int) -> None:
        """n synthetic transitions of the running task (the buffer tags them)."""
        for name in ("observations", "next_observations"):
            getattr(buf, name)[:n] = rng.random((n, *buf.observations.shape[1:]),
                                                dtype=np.float32)
        buf.actions[:n] = rng.uniform(-1, 1, (n, *buf.actions.shape[1:])).astype(np.float32)
        buf.rewards[:n] = rng.random((n, buf.n_envs), dtype=np.float32)
        buf.slot_task[:n] = agent.current_task
        buf.pos, buf.full = n % buf.buffer_size, n == buf.buffer_size
        buf.num_seen = n

    t0 = time.perf_counter()
    for task in range(sequence.num_tasks - 1):  # EWC keeps an anchor and a Fisher per task
        agent.start_task(task)  # CW resets the buffer at every task
        fill(4096)
        agent.end_task(task)
    ewc = time.perf_counter() - t0
    agent.start_task(sequence.num_tasks - 1)
    t0 = time.perf_counter()
    fill(buf.buffer_size)  # the last task's 1M steps: a full buffer
    fill_seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"obs_dim": int(obs_dim), "act_dim": int(act_dim),
                           "buffer_size": int(buf.buffer_size), "fill_seconds": fill_seconds,
                           "ewc_seconds": ewc,
                           "params": sum(p.numel() for p in agent.policy.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        for include in (True, False):
            path = Path(tmp) / f"cw10-{include}.pt"
            t0 = time.perf_counter()
            size = save_checkpoint(path, {"agent": agent_state(agent, include_buffer=include,
                                                               sequence="CW10")})
            write = time.perf_counter() - t0
            t0 = time.perf_counter()
            state = load_checkpoint(path)
            fresh = make_agent(config, sequence.make_env(append_task_id=True), sequence)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_agent_state(fresh, state["agent"], sequence="CW10")
            read = time.perf_counter() - t0
            if include:
                assert np.array_equal(fresh.replay_buffer.observations[-1],
                                      buf.observations[-1])
            out["with" if include else "without"] = {"bytes": size, "write_s": write,
                                                     "read_s": read}
            del state, fresh
            path.unlink()
    env.close()
    return out


def check_share(kind: str) -> dict[str, float]:
    """Time spent inside the nan/inf check while an agent learns one task, measured by
    timing every call (an A/B comparison of wall times is lost in the noise of a shared
    machine)."""
    from stable_baselines3.common.logger import Logger

    from envs.registry import get_sequence

    original = ContinualAgent.check_finite_losses
    spent = {"seconds": 0.0, "calls": 0}

    def timed(self: Any, total: Any, terms: Any) -> None:
        t0 = time.perf_counter()
        original(self, total, terms)
        spent["seconds"] += time.perf_counter() - t0
        spent["calls"] += 1

    ContinualAgent.check_finite_losses = timed  # type: ignore[method-assign]
    try:
        if kind == "ppo":
            seq = get_sequence("CartPoleSwap", steps_per_task=8192)
            config = RunConfig(agent="ppo", agent_options={"n_steps": 1024})
        else:
            seq = get_sequence("PendulumVariants", steps_per_task=1500)
            config = RunConfig(sequence="PendulumVariants", agent="sac",
                               agent_options={"exploration_steps": 500})
        agent = make_agent(config, seq.make_env(append_task_id=True), seq)
        agent.set_logger(Logger(None, []))
        agent.start_task(0)
        t0 = time.perf_counter()
        agent.learn(seq.stage_steps[0], reset_num_timesteps=False)
        total = time.perf_counter() - t0
    finally:
        ContinualAgent.check_finite_losses = original  # type: ignore[method-assign]
    return {"share": spent["seconds"] / total, "calls": spent["calls"],
            "us_per_call": 1e6 * spent["seconds"] / max(spent["calls"], 1), "seconds": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cw10", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"1. README run (PPO, CartPoleSwap, 2 x 20,480 steps), mean of {args.repeats} runs")
    for every in (CHECKPOINT_EVERY, 10_000, 2_048):
        r = readme_overhead(every, args.repeats)
        tag = " (default)" if every == CHECKPOINT_EVERY else ""
        print(f"   --checkpoint-every {every:>6}{tag}: {r['count']} checkpoints, "
              f"{r['per_checkpoint_ms']:.1f} ms each, {100 * r['share']:.2f}% of "
              f"{r['seconds']:.1f} s wall time (max {100 * r['share_max']:.2f}%), "
              f"{r['size'] / 1e3:.0f} kB each")

    if not args.skip_cw10:
        r = cw10_sizes()
        print(f"2. CW10-sized SAC (net 256x4: {r['params']:,} parameters; "
              f"{r['buffer_size']:,} transitions of {r['obs_dim']}-dim obs, "
              f"{r['act_dim']}-dim actions, filled synthetically in {r['fill_seconds']:.1f} s; "
              f"EWC state of 9 tasks computed in {r['ewc_seconds']:.1f} s)")
        for key in ("with", "without"):
            x = r[key]
            print(f"   {key:>7} replay buffer: {x['bytes'] / 1e6:8.1f} MB, write "
                  f"{x['write_s']:.2f} s, read + restore {x['read_s']:.2f} s")

    print("3. nan/inf loss check (time inside the check while learning one task)")
    for kind, what in (("ppo", "PPO, CartPoleSwap, 8,192 steps, SB3 defaults"),
                       ("sac", "SAC, Pendulum, 1,500 steps, SB3 defaults")):
        r = check_share(kind)
        print(f"   {what}: {r['calls']:,} checks, {r['us_per_call']:.1f} us each, "
              f"{100 * r['share']:.3f}% of {r['seconds']:.1f} s")

if __name__ == "__main__":
    main()
