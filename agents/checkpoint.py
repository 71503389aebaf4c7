"""The state of a continual SB3 agent as plain data, so a checkpoint continues bit for bit.

SB3's own ``save()`` pickles the model's attributes and leaves out what training needs next
(replay buffer, the env and its position, RNG streams, the logger's pending values), and its
files cannot be read with ``torch.load(weights_only=True)``. :func:`agent_state` gathers,
as tensors, numbers, strings, bytes, lists and dicts only:

* the weights (``policy.state_dict()``: actor, critics and target critics for SAC) and every
  optimiser's ``state_dict`` (SAC: actor, critic, entropy coefficient, plus ``log_ent_coef``
  itself, which lives outside the policy);
* the continual state (``continual_state_dict``: strategy, task progress, PPO's task store,
  SAC's re-armed ``learning_starts``);
* SB3's counters and the step in flight (``num_timesteps``, ``_n_updates``,
  ``_episode_num``, ``_current_progress_remaining``, ``_last_obs``,
  ``_last_original_obs``, ``_last_episode_starts``, the episode info/success windows);
* the logger's values recorded but not yet written (PPO's ``train/`` values are written
  with the next rollout's statistics, after a checkpoint at the rollout start);
* the generators of our own and SB3's that are not global: the action space's (SAC's
  random exploration), SAC's importance sampler;
* the replay buffer (optional, it is large): its filled part as tensors, ``pos``, ``full``
  and the task tag of each slot;
* the training env (:func:`envs.snapshot.capture_env`).

The global RNGs (Python, NumPy, torch) are the caller's to save (``crl.checkpoint``), right
next to this state. :func:`load_agent_state` writes it all into an agent built with the same
settings; an agent of another kind, method, task count or spaces is a
:class:`~crl.checkpoint.CheckpointError` that lists what differs.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from envs.snapshot import capture_env, decode, encode, not_captured_warning, restore_env

#: Bumped when the layout of the agent state changes incompatibly.
AGENT_STATE_FORMAT = 1

_COUNTERS = ("num_timesteps", "_n_updates", "_episode_num", "_current_progress_remaining",
             "_total_timesteps", "_num_timesteps_at_start")
_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones",
                  "timeouts", "slot_task")


def agent_kind(agent: Any) -> str:
    """``"sac"`` or ``"ppo"`` (the runner's agent names)."""
    from stable_baselines3 import PPO, SAC

    if isinstance(agent, SAC):
        return "sac"
    if isinstance(agent, PPO):
        return "ppo"
    raise TypeError(f"not a continual SAC/PPO agent: {type(agent).__name__}")


def agent_identity(agent: Any, sequence: str | None = None) -> dict[str, Any]:
    """What must agree between a checkpoint and the agent it is loaded into."""
    out = {
        "agent": agent_kind(agent),
        "method": agent.strategy.name,
        "num_tasks": int(agent.num_tasks),
        "observation_space": repr(agent.observation_space),
        "action_space": repr(agent.action_space),
        "policy": type(agent.policy).__name__,
    }
    if sequence is not None:
        out["sequence"] = sequence
    return out


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every field of the identity that differs."""
    diffs = [f"{k}: {saved.get(k, '<absent>')!r} in the checkpoint, {current.get(k, '<absent>')!r}"
             " here" for k in sorted(set(saved) | set(current))
             if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if diffs:
        raise CheckpointError(
            "the checkpoint belongs to another agent; loading it would mix two runs. "
            "Differences:\n  " + "\n  ".join(diffs)
            + "\nBuild the agent with the checkpoint's settings (crl train --resume does)"
        )


# --------------------------------------------------------------------------------------------
# Replay buffer
# --------------------------------------------------------------------------------------------
def _filled(buf: Any) -> int:
    """Slots that hold data (one more with optimize_memory_usage: the next observation)."""
    if buf.full:
        return int(buf.buffer_size)
    return min(int(buf.pos) + (1 if buf.optimize_memory_usage else 0), int(buf.buffer_size))


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr))  # shares memory: no copy of 400 MB


def replay_buffer_state(buf: Any, *, include_arrays: bool = True) -> dict[str, Any]:
    """Position and task tags; the filled part of the arrays if asked."""
    meta = {
        "class": type(buf).__name__, "buffer_size": int(buf.buffer_size),
        "n_envs": int(buf.n_envs), "pos": int(buf.pos), "full": bool(buf.full),
        "optimize_memory_usage": bool(buf.optimize_memory_usage),
        "obs_shape": repr(getattr(buf, "obs_shape", None)),
        "action_dim": int(getattr(buf, "action_dim", 0)),
    }
    if hasattr(buf, "current_task"):
        meta["current_task"] = buf.current_task
    arrays = None
    if include_arrays:
        n = _filled(buf)
        arrays = {}
        for name in _BUFFER_ARRAYS:
            arr = getattr(buf, name, None)
            if isinstance(arr, dict):
                arrays[name] = {k: _as_tensor(v[:n]) for k, v in arr.items()}
            elif isinstance(arr, np.ndarray):
                arrays[name] = _as_tensor(arr[:n])
    return {"meta": meta, "arrays": arrays}


def _put(buf: Any, name: str, target: np.ndarray, saved: torch.Tensor,
         container: dict[str, Any] | None = None, key: str | None = None) -> None:
    src = saved.numpy()
    if src.dtype != target.dtype or src.shape[1:] != target.shape[1:] or len(src) > len(target):
        raise CheckpointError(
            f"replay buffer array {name} is {src.dtype}{tuple(src.shape)} in the checkpoint, "
            f"{target.dtype}{tuple(target.shape)} here: another buffer layout"
        )
    if src.shape == target.shape:  # the whole array: take the loaded memory as it is
        if container is not None:
            container[key] = src
        else:
            setattr(buf, name, src)
    else:
        target[: len(src)] = src


def load_replay_buffer_state(buf: Any, state: Mapping[str, Any]) -> bool:
    """Restore :func:`replay_buffer_state` into ``buf``; returns whether the data was there."""
    meta = state["meta"]
    for key in ("class", "buffer_size", "n_envs", "optimize_memory_usage", "obs_shape",
                "action_dim"):
        here = replay_buffer_state(buf, include_arrays=False)["meta"][key]
        if meta[key] != here:
            raise CheckpointError(
                f"replay buffer {key} is {meta[key]!r} in the checkpoint, {here!r} here; build "
                "the agent with the checkpoint's buffer settings"
            )
    if hasattr(buf, "current_task") and "current_task" in meta:
        buf.current_task = int(meta["current_task"])
    if state["arrays"] is None:
        buf.reset()
        return False
    for name, saved in state["arrays"].items():
        target = getattr(buf, name)
        if isinstance(saved, dict):
            for key, tensor in saved.items():
                _put(buf, f"{name}.{key}", target[key], tensor, target, key)
        else:
            _put(buf, name, target, saved)
    buf.pos, buf.full = int(meta["pos"]), bool(meta["full"])
    return True


# --------------------------------------------------------------------------------------------
# The whole agent
# --------------------------------------------------------------------------------------------
def _logger_state(agent: Any) -> dict[str, Any] | None:
    logger = getattr(agent, "_logger", None)
    if logger is None:
        return None
    return encode({"name_to_value": dict(logger.name_to_value),
                   "name_to_count": dict(logger.name_to_count),
                   "name_to_excluded": dict(logger.name_to_excluded)}, "logger")


def agent_state(agent: Any, *, include_buffer: bool = True,
                sequence: str | None = None) -> dict[str, Any]:
    """Everything :func:`load_agent_state` needs (see the module docstring), plain data."""
    kind = agent_kind(agent)
    tensors: dict[str, torch.Tensor] = {}
    if kind == "sac" and getattr(agent, "log_ent_coef", None) is not None:
        tensors["log_ent_coef"] = agent.log_ent_coef.detach().clone()
    rngs: dict[str, Any] = {}
    space_rng = getattr(agent.action_space, "_np_random", None)
    rngs["action_space"] = None if space_rng is None else space_rng.bit_generator.state
    importance = getattr(agent, "_importance_rng", None)
    if isinstance(importance, np.random.Generator):
        rngs["importance"] = importance.bit_generator.state
    buf = getattr(agent, "replay_buffer", None)
    return {
        "format": AGENT_STATE_FORMAT,
        "identity": agent_identity(agent, sequence),
        "policy": agent.policy.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in agent._optimizers().items()},
        "tensors": tensors,
        "continual": agent.continual_state_dict(),
        "counters": {k: getattr(agent, k) for k in _COUNTERS if hasattr(agent, k)},
        "rollout": encode({
            "last_obs": agent._last_obs,
            "last_original_obs": agent._last_original_obs,
            "last_episode_starts": agent._last_episode_starts,
            "ep_info_buffer": None if agent.ep_info_buffer is None else list(
                agent.ep_info_buffer),
            "ep_success_buffer": None if agent.ep_success_buffer is None else list(
                agent.ep_success_buffer),
        }, "the agent's rollout state"),
        "logger": _logger_state(agent),
        "rng": rngs,
        "replay_buffer": None if buf is None else replay_buffer_state(
            buf, include_arrays=include_buffer),
        "env": capture_env(agent.env),
    }


def _buffer_warning(agent: Any, state: Mapping[str, Any]) -> str | None:
    """Why a checkpoint without replay data is not exact (None when nothing is lost)."""
    meta = state["meta"]
    if not meta["full"] and meta["pos"] == 0:
        return None
    if not agent.task_running and getattr(agent, "reset_buffer", False):
        return None  # the next start_task empties the buffer anyway
    return ("the checkpoint holds no replay buffer (written with --no-checkpoint-buffer): "
            "training continues from an empty buffer and collects a batch before its next "
            "update; resume is not bit-exact")


def load_agent_state(agent: Any, state: Mapping[str, Any], *, sequence: str | None = None,
                     ) -> list[str]:
    """Write :func:`agent_state` into ``agent`` (built with the same settings).

    Returns the warnings of a resume that is not bit-exact (env not captured, replay buffer
    left out), each also issued as a RuntimeWarning; a mismatch raises CheckpointError.
    """
    if state.get("format") != AGENT_STATE_FORMAT:
        raise CheckpointError(f"agent state format {state.get('format')!r}, this crl reads "
                              f"{AGENT_STATE_FORMAT}")
    check_identity(state["identity"], agent_identity(
        agent, sequence if "sequence" in state["identity"] else None))
    try:
        agent.policy.load_state_dict(state["policy"])
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit this agent's network "
                              f"(other net_arch or heads?): {exc}") from exc
    optimizers = agent._optimizers()
    if sorted(optimizers) != sorted(state["optimizers"]):
        raise CheckpointError(f"optimisers {sorted(state['optimizers'])} in the checkpoint, "
                              f"{sorted(optimizers)} here (entropy coefficient learned in one "
                              "and fixed in the other?)")
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, tensor in state["tensors"].items():
        with torch.no_grad():
            getattr(agent, name).copy_(tensor)
    if ((state.get("replay_buffer") or {}).get("meta") or {}).get("reservoir"):
        raise CheckpointError(
            "the checkpoint's replay buffer is a reservoir over the whole sequence, written by "
            "a crl version before replay's perfect memory moved into the strategy's memory: "
            "finish the run with that version, or start it again"
        )
    try:
        agent.load_continual_state_dict(state["continual"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint's continual state does not fit: {exc}") from exc
    for key, value in state["counters"].items():
        setattr(agent, key, value)
    rollout = decode(state["rollout"])
    agent._last_obs = rollout["last_obs"]
    agent._last_original_obs = rollout["last_original_obs"]
    agent._last_episode_starts = rollout["last_episode_starts"]
    window = agent._stats_window_size
    agent.ep_info_buffer = None if rollout["ep_info_buffer"] is None else collections.deque(
        rollout["ep_info_buffer"], maxlen=window)
    agent.ep_success_buffer = None if rollout["ep_success_buffer"] is None else (
        collections.deque(rollout["ep_success_buffer"], maxlen=window))
    if state["logger"] is not None and getattr(agent, "_logger", None) is not None:
        pending = decode(state["logger"])
        agent._logger.name_to_value = collections.defaultdict(float, pending["name_to_value"])
        agent._logger.name_to_count = collections.defaultdict(int, pending["name_to_count"])
        agent._logger.name_to_excluded = dict(pending["name_to_excluded"])
    if state["rng"].get("action_space") is not None:
        agent.action_space.np_random.bit_generator.state = state["rng"]["action_space"]
    if "importance" in state["rng"]:
        agent._importance_rng.bit_generator.state = state["rng"]["importance"]

    notes: list[str] = []
    if state["replay_buffer"] is not None and getattr(agent, "replay_buffer", None) is not None:
        if not load_replay_buffer_state(agent.replay_buffer, state["replay_buffer"]):
            note = _buffer_warning(agent, state["replay_buffer"])
            if note is not None:
                notes.append(note)
                # updates from a handful of transitions would be degenerate: wait for a batch
                agent.learning_starts = max(int(agent.learning_starts),
                                            int(agent.num_timesteps) + int(agent.batch_size))
    problems = restore_env(agent.env, state["env"])
    if problems:
        notes.append(not_captured_warning(problems))
        agent._last_obs = agent.env.reset()
        agent._last_episode_starts = np.ones((agent.env.num_envs,), dtype=bool)
        agent._last_original_obs = None
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return notes


def save_agent(agent: Any, path: str | Path, *, include_buffer: bool = True,
               sequence: str | None = None) -> int:
    """An atomic checkpoint file of the agent alone (global RNGs included); returns bytes."""
    from crl.checkpoint import rng_state

    return save_checkpoint(path, {"kind": "agent", "agent": agent_state(
        agent, include_buffer=include_buffer, sequence=sequence), "rng": rng_state()})


def restore_agent(agent: Any, path: str | Path, *, sequence: str | None = None,
                  restore_rng: bool = True) -> list[str]:
    """Load a :func:`save_agent` file (or a run's ``checkpoints/last.pt``) into ``agent``."""
    from crl.checkpoint import set_rng_state

    state = load_checkpoint(path)
    if "agent" not in state:
        raise CheckpointError(f"{path} holds no agent state (a supervised checkpoint?)")
    notes = load_agent_state(agent, state["agent"], sequence=sequence)
    if restore_rng:
        set_rng_state(state["rng"])
    return notes


__all__ = [
    "AGENT_STATE_FORMAT",
    "agent_identity",
    "agent_kind",
    "agent_state",
    "check_identity",
    "load_agent_state",
    "load_replay_buffer_state",
    "replay_buffer_state",
    "restore_agent",
    "save_agent",
]
