"""SB3's own save()/load() keep the continual state: a ContinualPPO / ContinualSAC saved
after two tasks and loaded again has the same strategy state (Fishers, PackNet masks,
replay memories) and position in the sequence, and continues to a third task as the agent
that was never saved does."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.ppo import ContinualPPO
from agents.sac import ContinualSAC
from envs.continual import ContinualEnv
from envs.registry import get_sequence


def _same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality; tensors bit for bit (a round trip of the same values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _shapes(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), str(a.dtype))
    if isinstance(a, dict):
        return {k: _shapes(v) for k, v in a.items()}
    if isinstance(a, list | tuple):
        return [_shapes(v) for v in a]
    return type(a).__name__


def _ppo(method: str) -> tuple[ContinualPPO, ContinualEnv, int]:
    env = ContinualEnv(get_sequence("CartPoleVariants", steps_per_task=128), append_task_id=True)
    agent = ContinualPPO("MlpPolicy", env, strategy=method, num_tasks=5, n_steps=64,
                         batch_size=32, n_epochs=1, seed=0, policy_kwargs={"net_arch": [16]},
                         strategy_options={"lam": 100.0} if method == "ewc" else None)
    return agent, env, 128


#: SAC's replay as crl train builds it (SAC refuses the constructor's rehearsal mode)
SAC_OPTIONS = {"ewc": {"lam": 100.0}, "replay": {"mode": "balanced"}}


def _sac(method: str) -> tuple[ContinualSAC, ContinualEnv, int]:
    env = ContinualEnv(get_sequence("PendulumVariants", steps_per_task=80), append_task_id=True)
    agent = ContinualSAC("MlpPolicy", env, strategy=method, num_tasks=4, exploration_steps=40,
                         batch_size=16, buffer_size=500, seed=0,
                         policy_kwargs={"net_arch": [16]},
                         strategy_options=SAC_OPTIONS.get(method))
    return agent, env, 80


def _task(agent: Any, task: int, steps: int) -> None:
    agent.start_task(task)
    agent.learn(steps, reset_num_timesteps=task == 0)
    agent.end_task(task)


@pytest.mark.parametrize("method", ["ewc", "packnet", "replay"])
@pytest.mark.parametrize("agent_kind", ["ppo", "sac"])
def test_sb3_save_and_load_keep_the_continual_state(agent_kind: str, method: str,
                                                    tmp_path: Path) -> None:
    build = _ppo if agent_kind == "ppo" else _sac
    agent, env, steps = build(method)
    cls = type(agent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (0, 1):
            _task(agent, t, steps)
        before = agent.continual_state_dict()
        agent.save(tmp_path / "model.zip")
        loaded = cls.load(tmp_path / "model.zip", env=env)
    # the strategy state and the position in the sequence came back as they were saved
    assert type(loaded.strategy) is type(agent.strategy)
    _same(before, loaded.continual_state_dict())
    assert loaded.current_task == 1 and loaded.num_tasks == agent.num_tasks
    if method == "ewc":
        assert loaded.strategy.lam == 100.0  # the option, not the constructor default
    # both continue to a third task: the same state at its start, the same structure after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent.start_task(2)
        loaded.start_task(2)
        _same(agent.strategy.state_dict(), loaded.strategy.state_dict())
        for a in (agent, loaded):
            a.learn(steps, reset_num_timesteps=False)
            a.end_task(2)
    assert _shapes(agent.continual_state_dict()) == _shapes(loaded.continual_state_dict())
    assert loaded.current_task == 2


def test_set_parameters_from_a_zip_path_restores_the_state(tmp_path: Path) -> None:
    agent, env, steps = _ppo("ewc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _task(agent, 0, steps)
        agent.save(tmp_path / "m.zip")
        fresh, _, _ = _ppo("ewc")
        fresh.set_parameters(str(tmp_path / "m.zip"))
    _same(agent.continual_state_dict(), fresh.continual_state_dict())
