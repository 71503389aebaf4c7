"""Replay of earlier tasks, in the three forms the design needs.

* ``mode="rehearsal"`` — experience replay for classifiers (Rebuffi et al. 2017 iCaRL's
  exemplars; Chaudhry et al. 2019 "On Tiny Episodic Memories in Continual Learning"): the
  finished task's samples go to a reservoir memory, and every update adds
  ``lam * host.loss(memory batch)``. With ``lam = 1`` and equal batch sizes this is the same
  gradient as mixing the memory batch into the training batch (up to the weighting of the two
  halves), without the host having to know about the memory.
* ``mode="distill"`` — policy distillation, the replay of on-policy PPO
  (docs/ARCHITECTURE.md, "RL conventions"): PPO cannot learn from old transitions, so the
  memory stores states of earlier tasks together with the old model's output distribution on
  them (logits for categorical outputs, loc/scale for Gaussian ones), and every update adds
  ``lam * KL(old || new)`` averaged over a memory batch.
  On a classifier this is logit distillation in the manner of dark experience replay
  (Buzzega et al. 2020), with a KL instead of an MSE on logits.
* ``mode="buffer"`` — Continual World's "perfect memory" (Wołczyk et al. 2021): every
  transition (or training sample) of each finished task goes to the memory
  (``host.experience_batches()``; a reservoir once ``memory_size`` is reached), and every
  update trains on a batch drawn uniformly from everything seen so far (S samples of the
  finished tasks, F of the running one; :meth:`Replay.replay_batch`): a host that draws a
  batch of ``n`` (SAC) takes ``k ~ Binomial(n, S / (S + F))`` from the memory and the rest
  from its own data; a host that appends to its own ``n`` (the supervised trainer, whose
  epochs cover the task) gets ``n S / F`` stored samples on average (stochastic rounding),
  so that each epoch weighs every sample seen equally. For SAC this is CW's replay buffer
  that spans the whole sequence, with the agent's own buffer holding the running task; the
  memory is the strategy core's reservoir, not agent code. No penalty.
* ``mode="balanced"`` — the same memory, with a fixed ``share`` of every batch from it
  (0.5: the equal halves of Chaudhry et al. 2019's experience replay and of CLEAR's 50-50
  mix, Rolnick et al. 2019): the uniform draw gives a task that follows long ones a small
  part of each batch (after 30,000 transitions of earlier tasks, 3% when the new task has
  1,000), which on short RL tasks leaves it unlearnt. A drawing host takes ``n * share``
  stored samples (stochastic rounding), an appending host ``n * share / (1 - share)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributions import Distribution

from crl.strategies.base import Batch, Strategy, experience_batches
from crl.strategies.distill import (
    check_keys,
    distribution_parameters,
    kl_to,
    rebuild_distribution,
    split_stored,
)
from crl.strategies.memory import (
    ReservoirMemory,
    check_positive_int,
    module_device,
    to_device,
)

MODES = ("rehearsal", "distill", "buffer", "balanced")
#: the modes that keep the finished tasks' data and mix it into the host's batches
MIXING = ("buffer", "balanced")


class Replay(Strategy):
    """Rehearsal, distillation or a kept replay buffer (see the module docstring).

    ``memory_size``: reservoir capacity (samples over all tasks). ``batch_size``: memory
    samples per update. ``task_balanced``: equal memory quota per task instead of a reservoir
    over the whole stream. ``lam``: weight of the replay term (not used by ``buffer`` and
    ``balanced``, whose samples join the training batch). ``share``: balanced mode's part
    of each batch from the memory.
    """

    name = "replay"
    option_choices = {"mode": MODES}  # noqa: RUF012 - read-only
    on_policy_options = {"mode": "distill"}  # noqa: RUF012 - read-only class default

    def __init__(
        self,
        memory_size: int = 10_000,
        batch_size: int = 64,
        task_balanced: bool = False,
        mode: str = "rehearsal",
        lam: float = 1.0,
        share: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown replay mode {mode!r}; choose one of: {', '.join(MODES)}")
        if (isinstance(share, bool) or not isinstance(share, int | float)
                or not 0.0 < share < 1.0):
            raise ValueError(f"share must be a number in (0, 1) (the memory's part of each "
                             f"batch), got {share!r}; --replay-mode buffer draws uniformly "
                             "over every sample seen instead")
        self.share = float(share)
        self._warned_short = False  # the memory is smaller than the share asks (warned once)
        if (
            not isinstance(lam, int | float)
            or isinstance(lam, bool)
            or not math.isfinite(lam)
            or (lam < 0)
        ):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        self.mode = mode
        self.lam = float(lam)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.memory = ReservoirMemory(memory_size, task_balanced=task_balanced, seed=seed)
        #: kind and event dims of the stored output distributions (distill mode).
        self.dist_kind: str | None = None
        self.dist_ndims = 0
        self.learns_from_stored_transitions = mode != "distill"
        self.keeps_experience = mode in MIXING
        self.penalty_is_host_loss = mode == "rehearsal"

    @property
    def penalty_label(self) -> str:
        return "distillation_kl" if self.mode == "distill" else super().penalty_label

    def _device(self) -> torch.device:
        return module_device(self._host().module)

    def on_task_end(self, task: int) -> None:
        if self.mode == "rehearsal":
            for batch in self._host().importance_batches():
                self.memory.add(batch, task)
        elif self.mode == "distill":
            for batch in self._host().importance_batches():
                self.memory.add(self._with_old_outputs(batch), task)
        else:
            for batch in experience_batches(self._host()):
                self.memory.add(batch, task)
        super().on_task_end(task)

    def unused_options(self) -> dict[str, str]:
        share = {"share": "it sets the memory's part of the training batch in balanced mode "
                          "(--replay-mode balanced; PPO has none), and this run's replay is "
                          f"in {self.mode} mode"}
        if self.mode not in MIXING:
            return share
        why = (f"replay's {self.mode} mode mixes stored samples into the training batch "
               "itself, with no separate memory batch or weight")
        return {"batch_size": why, "lam": why} | (share if self.mode == "buffer" else {})

    def replay_batch(self, n: int, fresh: int, *, appended: bool = False) -> Batch | None:
        """Buffer mode: stored samples such that the mixed batch is a uniform draw over
        every sample seen (the memory's stream, of which the stored ones are a uniform
        sample, and the host's ``fresh`` own), or (balanced) holds the fixed ``share``; see
        the module docstring."""
        if self.mode not in MIXING or len(self.memory) == 0 or n <= 0:
            return None
        seen, fresh = float(self.memory.seen), float(max(int(fresh), 0))
        gen = self.memory.generator
        uniform = self.mode == "buffer"
        if uniform and not appended:
            share = torch.tensor(seen / (seen + fresh), dtype=torch.float64)
            k = int(torch.binomial(torch.tensor(float(n), dtype=torch.float64), share,
                                   generator=gen))
        else:
            if fresh == 0:  # nothing of the host's own to mix with yet
                mean = float(n)
            elif uniform:
                mean = n * seen / fresh
            else:
                mean = n * self.share / (1.0 - self.share) if appended else n * self.share
            # stochastic rounding: the expected count is exact
            k = int(mean) + int(torch.rand((), generator=gen, dtype=torch.float64)
                                < mean - int(mean))
        if k == 0:
            return None
        if not uniform and k > len(self.memory) and not self._warned_short:
            self._warned_short = True
            warnings.warn(f"replay's memory holds {len(self.memory)} samples, fewer than the "
                          f"{k} a batch of {n} takes at share {self.share}: batches get "
                          f"{len(self.memory)} (each stored sample once); raise "
                          "--replay-memory-size or lower --replay-share", stacklevel=2)
        return to_device(self.memory.sample(k), self._device())

    def _with_old_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        check_keys(batch)
        with torch.no_grad():
            kind, ndims, params = distribution_parameters(self._host().output_distribution(batch))
        if self.dist_kind is not None and (kind, ndims) != (self.dist_kind, self.dist_ndims):
            raise ValueError(
                f"output distribution changed from {self.dist_kind} (event dims "
                f"{self.dist_ndims}) to {kind} (event dims {ndims}) between tasks; replay "
                "distillation needs one output type for the whole sequence"
            )
        self.dist_kind, self.dist_ndims = kind, ndims
        return {**batch, **params}

    def penalty(self, batch: Batch | None = None,
                outputs: Distribution | None = None) -> torch.Tensor | None:
        if self.mode in MIXING or len(self.memory) == 0:
            return None
        host = self._host()
        sample = to_device(self.memory.sample(self.batch_size), self._device())
        if self.mode == "rehearsal":
            return self.lam * host.loss(sample)
        inputs, stored = split_stored(sample)
        assert self.dist_kind is not None
        old = rebuild_distribution(self.dist_kind, self.dist_ndims, stored)
        return self.lam * kl_to(old, host.output_distribution(inputs))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            mode=self.mode,
            lam=self.lam,
            batch_size=self.batch_size,
            dist_kind=self.dist_kind,
            dist_ndims=self.dist_ndims,
            memory=self.memory.state_dict(),
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(
                f"checkpoint is for replay mode {state['mode']!r} but this one is {self.mode!r}; "
                f"construct Replay(mode={state['mode']!r})"
            )
        super().load_state_dict(state)
        self.lam = float(state["lam"])
        self.batch_size = int(state["batch_size"])
        self.dist_kind = state["dist_kind"]
        self.dist_ndims = int(state["dist_ndims"])
        self.memory.load_state_dict(state["memory"])
