"""A-GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

After each task a fixed number of its samples goes to an episodic memory. Every update then
computes the reference gradient ``g_ref`` of the host's loss on a memory batch drawn over all
stored tasks; if the update's gradient ``g`` would increase that loss (``g·g_ref < 0``) it is
projected onto the half-space where it does not:

    g ← g − (g·g_ref / ‖g_ref‖²) g_ref

over all trained parameters concatenated (for SAC: actor and critic together, as in Continual
World). Parameters whose ``.grad`` is ``None`` count as zero gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from crl.strategies.base import Strategy
from crl.strategies.memory import EpisodicMemory, check_positive_int, to_device


class AGEM(Strategy):
    """Averaged gradient episodic memory.

    ``memory_per_task``: samples kept per finished task (uniform over its
    ``importance_batches``). ``batch_size``: memory samples per reference gradient.
    ``num_updates`` / ``num_projections`` count the updates that had a reference gradient and
    those that were projected (their ratio is the conflict rate worth logging).
    """

    name = "agem"
    needs_joint_update = True

    def __init__(self, memory_per_task: int = 256, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.memory = EpisodicMemory(memory_per_task, seed=seed)
        self.num_updates = 0
        self.num_projections = 0
        #: g·g_ref of the last update, before projection (for logging).
        self.last_dot: float | None = None

    def on_task_end(self, task: int) -> None:
        self.memory.add_task(self._host().importance_batches(), task)
        super().on_task_end(task)

    def before_optimizer_step(self) -> None:
        if len(self.memory) == 0:
            return
        host = self._host()
        params = [p for p in host.trained_parameters() if p.requires_grad]
        if not params:
            return
        batch = to_device(self.memory.sample(self.batch_size), params[0].device)
        # autograd.grad leaves .grad untouched, so g survives and g_ref never lands in .grad.
        ref = torch.autograd.grad(host.loss(batch), params, allow_unused=True)
        pairs = [(p, r) for p, r in zip(params, ref, strict=True) if r is not None]
        self.num_updates += 1
        if not pairs:
            self.last_dot = 0.0
            return
        # One flat vector per side: two dot products instead of a few kernels per tensor
        # (A-GEM runs every update, over actor + critic for SAC: dozens of tensors).
        r_flat = torch.cat([r.reshape(-1) for _, r in pairs])
        g_flat = torch.cat([(torch.zeros_like(r) if p.grad is None else p.grad).reshape(-1)
                            for p, r in pairs])
        dot, ref_sq = torch.dot(g_flat, r_flat), torch.dot(r_flat, r_flat)
        dot_value, sq_value = torch.stack([dot, ref_sq]).tolist()  # one host read
        self.last_dot = float(dot_value)
        if not (dot_value < 0 and sq_value > 0):
            return
        coeff = dot / ref_sq
        with torch.no_grad():
            steps = torch._foreach_mul([r for _, r in pairs], coeff)
            for (p, _), step in zip(pairs, steps, strict=True):
                if p.grad is None:
                    p.grad = -step
                else:
                    p.grad.sub_(step)
        self.num_projections += 1

    def diagnostics(self) -> dict[str, float]:
        """Counters for logging."""
        rate = self.num_projections / self.num_updates if self.num_updates else 0.0
        return {
            "agem/updates": float(self.num_updates),
            "agem/projections": float(self.num_projections),
            "agem/projection_rate": rate,
            "agem/memory_size": float(len(self.memory)),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            batch_size=self.batch_size,
            memory=self.memory.state_dict(),
            num_updates=self.num_updates,
            num_projections=self.num_projections,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.batch_size = int(state["batch_size"])
        self.memory.load_state_dict(state["memory"])
        self.num_updates = int(state["num_updates"])
        self.num_projections = int(state["num_projections"])
