"""ContinualEnv: runs a TaskSequence as one Gymnasium env, switching tasks at switch points.

Switching (``switch_mode``):

* ``"immediate"``: the step that reaches a switch point returns ``truncated=True`` (unless the
  episode terminated there) with ``info["task_switch"] = True``; the next ``reset()`` starts
  the next task. The task budget is exact: task ``k`` of the schedule runs exactly for global
  steps ``[stage_ends[k-1], stage_ends[k])``, as in Continual World.
* ``"episode"``: the running episode is finished first; the switch happens at the first
  ``reset()`` after the switch point. The schedule stays absolute: switch points do not move,
  so a task that started late gets fewer steps and the total stays ``total_steps``. If one
  episode outlasts a whole stage, that stage is skipped (recorded in ``switch_history``).

After ``total_steps`` the last task keeps running, ``sequence_done`` is True and the step
that reached the end carries ``info["sequence_done"] = True`` (and is truncated in the
immediate mode).

Every ``info`` carries ``task_index`` (index into ``sequence.tasks``) and ``task_name``.
With ``append_task_id=True`` the task's one-hot is appended to flat Box observations, or
returned as ``{"observation": ..., "task_id": ...}`` for other observations (images).
Each task env is reset with its own seed from ``sequence.task_seeds`` the first time it runs
(and again after ``reset(seed=...)``), so a seed fixes every task's first observations.

The step path does no space checks and no dict copies: one inner ``step``, two ``info``
stores, one counter, one comparison and one store of the action (for checkpoints) (plus,
with the one-hot, one copy of the observation into a preallocated ``[observation | one-hot]``
buffer and one copy out).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.errors import EnvConfigError
from envs.spaces import UnifiedSpaces, adapt_task_env, unify_spaces

if TYPE_CHECKING:  # the sequence builds its envs through this module, not the other way
    from envs.sequence import TaskSequence

_NONE, _FLAT, _DICT = 0, 1, 2  # how the task id joins the observation

SwitchMode = Literal["immediate", "episode"]
SWITCH_MODES = ("immediate", "episode")


def _build_task_envs(
    sequence: TaskSequence, render_mode: str | None, lean: bool = False
) -> tuple[list[gym.Env], UnifiedSpaces]:
    envs: list[gym.Env] = []
    try:
        for task in sequence.tasks:
            envs.append(task.make(render_mode=render_mode, lean=lean))
        unified = unify_spaces(
            sequence.name,
            sequence.task_names,
            [e.observation_space for e in envs],
            [e.action_space for e in envs],
            pad=sequence.pad_observations,
        )
    except BaseException:
        for e in envs:
            e.close()
        raise
    sequence.__dict__["_unified_spaces"] = unified  # cache: eval envs need no rebuild
    envs = [adapt_task_env(e, unified, i) for i, e in enumerate(envs)]
    return envs, unified


def sequence_spaces(sequence: TaskSequence) -> UnifiedSpaces:
    """The sequence's shared spaces (builds each task env once, then cached on the sequence)."""
    cached = sequence.__dict__.get("_unified_spaces")
    if cached is None:
        envs, cached = _build_task_envs(sequence, None)
        for e in envs:
            e.close()
    return cached


def _task_id_space(observation_space: spaces.Space, n: int) -> tuple[spaces.Space, np.dtype]:
    if isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 1:
        dtype = observation_space.dtype
        space = spaces.Box(
            np.concatenate((observation_space.low, np.zeros(n, dtype))),
            np.concatenate((observation_space.high, np.ones(n, dtype))),
            dtype=dtype,
        )
        return space, dtype
    dtype = np.dtype(np.float32)
    space = spaces.Dict(
        {"observation": observation_space, "task_id": spaces.Box(0.0, 1.0, (n,), dtype)}
    )
    return space, dtype


def _one_hots(n: int, dtype: np.dtype) -> list[np.ndarray]:
    eye = np.eye(n, dtype=dtype)
    out = []
    for i in range(n):
        v = eye[i].copy()
        v.flags.writeable = False  # shared by every step: nobody may change it
        out.append(v)
    return out


class ContinualEnv(gym.Env):
    """The whole task sequence as one env (see the module docstring for the semantics)."""

    def __init__(
        self,
        sequence: TaskSequence,
        switch_mode: SwitchMode = "immediate",
        append_task_id: bool = False,
        render_mode: str | None = None,
    ):
        if type(sequence).__name__ != "TaskSequence" or not hasattr(sequence, "schedule"):
            raise EnvConfigError(f"ContinualEnv needs a TaskSequence, got {type(sequence)}.")
        if switch_mode not in SWITCH_MODES:
            raise EnvConfigError(
                f"switch_mode must be one of {SWITCH_MODES}, got {switch_mode!r}."
            )
        self.sequence = sequence
        self.switch_mode: SwitchMode = switch_mode
        self.append_task_id = bool(append_task_id)
        self.render_mode = render_mode
        # The task envs are built without Gymnasium's PassiveEnvChecker and OrderEnforcing:
        # each is a wrapper layer on every step; this env checks the spaces (unify_spaces),
        # enforces reset-before-step itself at no per-step cost (_step_before_reset), and
        # gymnasium.make("crl/...") puts both wrappers around this env.
        self._envs, unified = _build_task_envs(sequence, render_mode, lean=True)
        self.action_space = unified.action_space
        self._inner_observation_space = unified.observation_space
        first_meta = self._envs[0].metadata
        self.metadata = {
            "render_modes": list(first_meta.get("render_modes", [])),
            "render_fps": first_meta.get("render_fps"),
        }
        n = sequence.num_tasks
        self._id_mode = _NONE
        self._one_hots: list[np.ndarray] | None = None
        if self.append_task_id:
            self.observation_space, dtype = _task_id_space(unified.observation_space, n)
            self._one_hots = _one_hots(n, dtype)
            if isinstance(self.observation_space, spaces.Dict):
                self._id_mode = _DICT
            else:
                self._id_mode = _FLAT
                # preallocated [observation | one-hot]: per step, one copy in and one out
                self._obs_size = unified.observation_space.shape[0]
                self._obs_buffer = np.zeros(self.observation_space.shape, dtype)
                self._obs_head = self._obs_buffer[: self._obs_size]
        else:
            self.observation_space = unified.observation_space
        self._task_seeds = sequence.task_seeds()
        self._needs_seed = [True] * n
        self._stage_ends = sequence.stage_ends
        self._schedule = sequence.schedule
        self._immediate = switch_mode == "immediate"
        self._t = 0
        self._switch_due = False
        self._sequence_done = False
        self._last_action: Any = None  # for checkpoints: ALE does not save its sticky action
        self.switch_history: list[tuple[int, int, int]] = []
        self._enter_stage(0)

    # -- state ------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.sequence.num_tasks

    @property
    def task_index(self) -> int:
        return self._task

    @property
    def task_name(self) -> str:
        return self._task_name

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def global_step(self) -> int:
        return self._t

    @property
    def sequence_done(self) -> bool:
        return self._sequence_done

    @property
    def task_envs(self) -> tuple[gym.Env, ...]:
        """The per-task envs (padded where needed), in ``sequence.tasks`` order."""
        return tuple(self._envs)

    # -- checkpoints (envs/snapshot.py captures the task envs themselves) --------------------
    def position_state(self) -> dict[str, Any]:
        """Where the env stands in its schedule, as plain data, for an exact resume."""
        return {
            "num_stages": len(self._schedule), "t": self._t, "stage": self._stage,
            "stage_end": self._stage_end, "switch_due": self._switch_due,
            "sequence_done": self._sequence_done, "needs_seed": list(self._needs_seed),
            "task_seeds": [int(s) for s in self._task_seeds],
            "switch_history": [list(e) for e in self.switch_history],
            "episode_running": self._step != self._step_before_reset,
            "last_action": self._last_action,
            "np_random": None if self._np_random is None else self._np_random.bit_generator.state,
        }

    def load_position_state(self, state: dict[str, Any]) -> None:
        """Put the env where :meth:`position_state` found it (same sequence, fresh env)."""
        if int(state["num_stages"]) != len(self._schedule):
            raise EnvConfigError(
                f"the saved position has {state['num_stages']} stages, sequence "
                f"{self.sequence.name!r} has {len(self._schedule)}: another schedule"
            )
        self._enter_stage(int(state["stage"]))
        self._t = int(state["t"])
        self._stage_end = state["stage_end"]
        self._switch_due = bool(state["switch_due"])
        self._sequence_done = bool(state["sequence_done"])
        self._needs_seed = [bool(b) for b in state["needs_seed"]]
        self._task_seeds = tuple(int(s) for s in state["task_seeds"])
        self.switch_history = [tuple(int(x) for x in e) for e in state["switch_history"]]
        if state["episode_running"]:
            self._step = self._env.step
        self._last_action = state["last_action"]
        if state["np_random"] is not None:
            self._np_random = np.random.Generator(
                getattr(np.random, state["np_random"]["bit_generator"])())
            self._np_random.bit_generator.state = state["np_random"]

    def _enter_stage(self, stage: int) -> None:
        self._stage = stage
        self._task = self._schedule[stage]
        self._task_name = self.sequence.tasks[self._task].name
        self._env = self._envs[self._task]
        self._step = self._step_before_reset  # the task's step, bound at its first reset
        self._stage_end = self._stage_ends[stage]
        if self._one_hots is None:
            self._one_hot = None
        else:
            self._one_hot = self._one_hots[self._task]
            if self._id_mode == _FLAT:  # the task's one-hot sits in the buffer's tail
                self._obs_buffer[self._obs_size :] = self._one_hot
        self.switch_history.append((self._t, stage, self._task))

    def _advance(self) -> None:
        self._switch_due = False
        stage, last = self._stage, len(self._schedule) - 1
        while stage < last and self._t >= self._stage_ends[stage]:
            stage += 1
            if stage < last and self._t >= self._stage_ends[stage]:
                self.switch_history.append((self._t, stage, self._schedule[stage]))  # skipped
        self._enter_stage(stage)

    def _on_stage_end(self, terminated: bool, truncated: bool, info: dict) -> bool:
        """Rare path: the step count reached the current stage's end. Returns ``truncated``."""
        if self._stage == len(self._schedule) - 1:
            self._sequence_done = True
            self._stage_end = math.inf
            info["sequence_done"] = True
            return truncated or (self._immediate and not terminated)
        if self._immediate:
            self._switch_due = True
            self._stage_end = math.inf
            info["task_switch"] = True
            return truncated or not terminated
        if terminated or truncated:
            self._switch_due = True
            self._stage_end = math.inf
            info["task_switch"] = True
        return truncated

    # -- gymnasium API ----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._task_seeds = self.sequence.task_seeds(seed)
            self._needs_seed = [True] * self.num_tasks
        if self._switch_due:
            self._advance()
        task = self._task
        task_seed = None
        if self._needs_seed[task]:
            task_seed = self._task_seeds[task]
            self._needs_seed[task] = False
        obs, info = self._env.reset(seed=task_seed, options=options)
        self._last_action = None
        self._step = self._env.step  # bound once: one attribute lookup less per step
        info["task_index"] = task
        info["task_name"] = self._task_name
        info["stage"] = self._stage
        if self._id_mode:
            obs = self._with_task_id(obs)
        return obs, info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self._step(action)
        self._last_action = action
        info["task_index"] = self._task
        info["task_name"] = self._task_name
        self._t = t = self._t + 1
        if t >= self._stage_end:
            truncated = self._on_stage_end(terminated, truncated, info)
        mode = self._id_mode
        if mode == _FLAT:
            self._obs_head[...] = obs
            obs = self._obs_buffer.copy()
        elif mode:
            obs = {"observation": obs, "task_id": self._one_hot.copy()}
        return obs, reward, terminated, truncated, info

    def _step_before_reset(self, action: Any):
        raise gym.error.ResetNeeded(
            f"Call reset() before step(): task {self._task_name!r} of sequence "
            f"{self.sequence.name!r} has not been reset since it became active."
        )

    def _with_task_id(self, obs: Any) -> Any:
        if self._id_mode == _DICT:
            return {"observation": obs, "task_id": self._one_hot.copy()}
        self._obs_head[...] = obs
        return self._obs_buffer.copy()

    def render(self):
        return self._env.render()

    def close(self) -> None:
        for e in self._envs:
            e.close()
        super().close()


class TaskIdWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """One task of a sequence as the agent sees it in the continual env: the sequence's
    spaces, ``info["task_index"]``/``info["task_name"]``, the optional one-hot, and the
    task's own seed on the first reset. Used for per-task evaluation envs."""

    def __init__(
        self,
        env: gym.Env,
        task_index: int,
        task_name: str,
        num_tasks: int,
        observation_space: spaces.Space,
        append_task_id: bool = False,
        seed: int | None = None,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self,
            task_index=task_index,
            task_name=task_name,
            num_tasks=num_tasks,
            observation_space=observation_space,
            append_task_id=append_task_id,
            seed=seed,
        )
        gym.Wrapper.__init__(self, env)
        self._task = task_index
        self._task_name = task_name
        self._first_seed = seed
        self._dict_obs = False
        self._one_hot: np.ndarray | None = None
        if append_task_id:
            self.observation_space, dtype = _task_id_space(observation_space, num_tasks)
            self._dict_obs = isinstance(self.observation_space, spaces.Dict)
            self._one_hot = _one_hots(num_tasks, dtype)[task_index]
        else:
            self.observation_space = observation_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._first_seed is not None:
            seed, self._first_seed = self._first_seed, None
        else:
            self._first_seed = None
        obs, info = self.env.reset(seed=seed, options=options)
        info["task_index"] = self._task
        info["task_name"] = self._task_name
        return self._obs(obs), info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["task_index"] = self._task
        info["task_name"] = self._task_name
        return self._obs(obs), reward, terminated, truncated, info

    def _obs(self, obs: Any) -> Any:
        if self._one_hot is None:
            return obs
        if self._dict_obs:
            return {"observation": obs, "task_id": self._one_hot.copy()}
        return np.concatenate((obs, self._one_hot))


def make_task_env(
    sequence: TaskSequence,
    task_index: int,
    append_task_id: bool = False,
    render_mode: str | None = None,
    seed: int | None = None,
) -> gym.Env:
    """Evaluation env of one task (module-level, so ``functools.partial`` of it pickles).

    ``seed`` defaults to the task's evaluation seed (``sequence.eval_seeds()``), distinct
    from its training seed.
    """
    if isinstance(task_index, bool) or not isinstance(task_index, int | np.integer) or not (
        0 <= task_index < sequence.num_tasks
    ):
        raise EnvConfigError(
            f"task_index must be an integer in [0, {sequence.num_tasks}) for sequence "
            f"{sequence.name!r}, got {task_index!r}."
        )
    task_index = int(task_index)
    unified = sequence_spaces(sequence)
    env = sequence.tasks[task_index].make(render_mode=render_mode)
    env = adapt_task_env(env, unified, task_index)
    return TaskIdWrapper(
        env,
        task_index,
        sequence.tasks[task_index].name,
        sequence.num_tasks,
        unified.observation_space,
        append_task_id=append_task_id,
        seed=sequence.eval_seeds()[task_index] if seed is None else seed,
    )
