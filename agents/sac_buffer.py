"""SB3 replay buffer that knows which task wrote each slot, optionally as a reservoir.

Two needs of continual SAC that SB3's ``ReplayBuffer`` does not cover:

* the strategies consolidate "the task just finished" (EWC's Fisher, MAS, PackNet's
  retraining, A-GEM's memory), so the agent must sample that task's transitions even when
  the buffer also holds earlier tasks (no reset at the switch, or replay);
* replay for SAC keeps the buffer across tasks (Continual World's "perfect memory"). A FIFO
  buffer smaller than the whole sequence would silently drop the oldest tasks first; a
  reservoir (Vitter 1985, Algorithm R) keeps a uniform sample of everything seen instead.

Sampling is SB3's own (``BaseBuffer.sample``), so a non-reservoir TaskReplayBuffer draws
exactly the batches a plain ``ReplayBuffer`` would with the same NumPy seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer


class TaskReplayBuffer(ReplayBuffer):
    """``ReplayBuffer`` + a task id per slot; ``reservoir=True`` replaces FIFO overwriting.

    One slot holds one ``add`` call (a transition of each of the ``n_envs`` envs), so the
    reservoir draws over ``add`` calls. ``seed`` seeds the reservoir's own generator, which
    leaves NumPy's global generator (SB3's sampling) untouched.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: Any = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        reservoir: bool = False,
        seed: int | None = None,
    ) -> None:
        if reservoir and optimize_memory_usage:
            raise ValueError(
                "a reservoir replay buffer cannot use optimize_memory_usage=True (that layout "
                "stores next_obs in the following slot, which a reservoir overwrites at "
                "random); set optimize_memory_usage=False"
            )
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.reservoir = bool(reservoir)
        self.rng = np.random.default_rng(seed)
        #: Task written by the next ``add`` (the agent sets it at each task switch).
        self.current_task = 0
        #: Task id of each slot, -1 for never written.
        self.slot_task = np.full(self.buffer_size, -1, dtype=np.int32)
        #: ``add`` calls since the last reset (the reservoir's stream length).
        self.num_seen = 0

    def add(self, *args: Any, **kwargs: Any) -> None:
        if self.reservoir and self.full:
            slot = int(self.rng.integers(0, self.num_seen + 1))
            self.num_seen += 1
            if slot >= self.buffer_size:
                return  # not kept: every item seen so far stays with equal probability
            self.pos = slot
            super().add(*args, **kwargs)
            self.pos, self.full = 0, True
        else:
            slot = self.pos
            self.num_seen += 1
            super().add(*args, **kwargs)
        self.slot_task[slot] = self.current_task

    def reset(self) -> None:
        super().reset()
        self.slot_task.fill(-1)
        self.num_seen = 0

    def valid_slots(self) -> np.ndarray:
        """Indices of the slots holding a transition that can be sampled."""
        if self.full:
            slots = np.arange(self.buffer_size)
            if self.optimize_memory_usage:  # slot pos holds no valid next_obs
                slots = slots[slots != self.pos]
            return slots
        return np.arange(self.pos)

    def task_slots(self, task: int) -> np.ndarray:
        """Valid slots written during ``task``."""
        slots = self.valid_slots()
        return slots[self.slot_task[slots] == task]


__all__ = ["TaskReplayBuffer"]
