"""SB3 replay buffer that knows which task wrote each slot.

The strategies consolidate "the task just finished" (EWC's Fisher, MAS, PackNet's
retraining, A-GEM's memory, replay's perfect memory), so the agent must read that task's
transitions even when the buffer also holds earlier tasks (``reset_buffer=False``). Memories
that span the sequence (replay) live in the strategy core (:mod:`crl.strategies.memory`),
not here.

Sampling is SB3's own (``BaseBuffer.sample``), so a TaskReplayBuffer draws exactly the
batches a plain ``ReplayBuffer`` would with the same NumPy seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer


class TaskReplayBuffer(ReplayBuffer):
    """``ReplayBuffer`` + the task id of each slot (set by the agent at each switch)."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: Any = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=handle_timeout_termination,
        )
        #: Task written by the next ``add`` (the agent sets it at each task switch).
        self.current_task = 0
        #: Task id of each slot, -1 for never written.
        self.slot_task = np.full(self.buffer_size, -1, dtype=np.int32)

    def add(self, *args: Any, **kwargs: Any) -> None:
        slot = self.pos
        super().add(*args, **kwargs)
        self.slot_task[slot] = self.current_task

    def reset(self) -> None:
        super().reset()
        self.slot_task.fill(-1)

    def task_slots(self, task: int) -> np.ndarray:
        """Valid slots written during ``task``."""
        slots = valid_slots(self)
        return slots[self.slot_task[slots] == task]


def valid_slots(buf: ReplayBuffer) -> np.ndarray:
    """Indices of the slots of an SB3 replay buffer holding a transition that can be
    sampled."""
    if buf.full:
        slots = np.arange(buf.buffer_size)
        if buf.optimize_memory_usage:  # slot pos holds no valid next_obs
            slots = slots[slots != buf.pos]
        return slots
    return np.arange(buf.pos)


def valid_count(buf: ReplayBuffer) -> int:
    """``len(valid_slots(buf))`` without building the index array (asked every update)."""
    if buf.full:
        return buf.buffer_size - int(buf.optimize_memory_usage)
    return buf.pos


__all__ = ["TaskReplayBuffer", "valid_count", "valid_slots"]
