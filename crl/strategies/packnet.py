"""PackNet (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a Single Network by
Iterative Pruning"), with the choices Continual World (Wołczyk et al. 2021) made for RL.

Every protected weight has an owner: ``-1`` (free) or the task that kept it. After task ``t``
the largest-magnitude free weights of each matrix (``ndim >= 2``) are kept for ``t``, the rest
are zeroed and stay free for later tasks, the kept weights are retrained briefly, and from the
next task on they are frozen. Biases and normalisation parameters (``ndim <= 1``) are too small
to split, so they train on task 0 and are frozen after it. Evaluating task ``i`` zeroes every
weight of a later task (and free weights), so task ``i`` sees exactly the network it had.

Share per task, per parameter of ``n`` elements: task ``t`` ends owning
``floor(c_t * n) - floor(c_{t-1} * n)`` weights, ``c_t`` being the cumulative fraction of tasks
``0..t`` (``(t + 1) / num_tasks`` by default, so a 10x10 matrix over 3 tasks splits 33/33/34
and the last task keeps every remaining weight).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crl.strategies.base import Strategy

FREE = -1
_EPS = 1e-9


class PackNet(Strategy):
    """Iterative magnitude pruning with per-task weight ownership.

    ``num_tasks``: length of the task sequence (shares are planned for it).
    ``retrain_steps`` / ``retrain_lr``: the fine-tuning of the kept weights after pruning,
    with a fresh Adam over ``host.trained_parameters()`` on ``host.importance_batches()``.
    ``prune_fractions``: optional fraction of each parameter given to each task (one per task,
    summing to at most 1); overrides the equal split.
    """

    name = "packnet"

    def __init__(
        self,
        num_tasks: int,
        retrain_steps: int = 100,
        retrain_lr: float = 1e-4,
        prune_fractions: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(
                f"PackNet needs num_tasks >= 1 (the length of the task sequence), got "
                f"{num_tasks!r}; pass num_tasks=len(sequence)"
            )
        if num_tasks > torch.iinfo(torch.int16).max:
            raise ValueError(f"num_tasks={num_tasks} exceeds the int16 ownership tensors")
        if (
            isinstance(retrain_steps, bool)
            or not isinstance(retrain_steps, int)
            or (retrain_steps < 0)
        ):
            raise ValueError(f"retrain_steps must be an integer >= 0, got {retrain_steps!r}")
        if not (isinstance(retrain_lr, int | float) and math.isfinite(retrain_lr)) or (
            retrain_lr <= 0
        ):
            raise ValueError(f"retrain_lr must be a positive number, got {retrain_lr!r}")
        self.num_tasks = num_tasks
        self.retrain_steps = retrain_steps
        self.retrain_lr = float(retrain_lr)
        self.prune_fractions = _check_fractions(prune_fractions, num_tasks)
        #: name -> int16 tensor, same shape as the parameter (FREE or owning task).
        self.owner: dict[str, torch.Tensor] = {}
        #: task in training (between on_task_start and on_task_end), else None.
        self.active_task: int | None = None
        self._frozen: dict[str, torch.Tensor] = {}
        self._frozen_values: dict[str, torch.Tensor] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _params(self) -> dict[str, nn.Parameter]:
        params = dict(self._host().protected_parameters())
        if self.owner:
            if set(params) != set(self.owner):
                raise ValueError(
                    "the host's protected parameters changed: PackNet tracks "
                    f"{sorted(self.owner)} but the host now has {sorted(params)}; keep the "
                    "protected trunk fixed across tasks"
                )
        else:
            self.owner = {
                n: torch.full(p.shape, FREE, dtype=torch.int16, device=p.device)
                for n, p in params.items()
            }
        return params

    def _cumulative(self, task: int) -> float:
        if self.prune_fractions is None:
            return (task + 1) / self.num_tasks
        return math.fsum(self.prune_fractions[: task + 1])

    def keep_count(self, numel: int, task: int) -> int:
        """How many of a parameter's ``numel`` weights tasks ``0..task`` own together."""
        if self.prune_fractions is None:
            return (task + 1) * numel // self.num_tasks  # exact integer split
        return min(numel, math.floor(self._cumulative(task) * numel + _EPS))

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be a non-negative integer, got {task!r}")
        if task >= self.num_tasks:
            raise ValueError(
                f"PackNet was built for num_tasks={self.num_tasks} (tasks 0..{self.num_tasks - 1})"
                f" but task {task} started; construct PackNet(num_tasks=...) with the full "
                "sequence length"
            )

    # -- hooks -----------------------------------------------------------------------------
    def on_task_start(self, task: int) -> None:
        self._check_task(task)
        super().on_task_start(task)
        self.active_task = task
        params = self._params()
        self._frozen, self._frozen_values = {}, {}
        for n, p in params.items():
            own = self.owner[n]
            frozen = (own != FREE) & (own != task)
            if bool(frozen.any()):
                self._frozen[n] = frozen
                self._frozen_values[n] = p.detach().clone()

    def before_optimizer_step(self) -> None:
        if not self._frozen:
            return
        params = self._host().protected_parameters()
        for n, frozen in self._frozen.items():
            grad = params[n].grad
            if grad is not None:
                grad.masked_fill_(frozen, 0.0)

    def after_optimizer_step(self) -> None:
        # Adam's moments move a weight even when its gradient is zero: restore exactly.
        if not self._frozen:
            return
        params = self._host().protected_parameters()
        with torch.no_grad():
            for n, frozen in self._frozen.items():
                p = params[n]
                p.copy_(torch.where(frozen, self._frozen_values[n], p))

    def on_task_end(self, task: int) -> None:
        self._check_task(task)
        params = self._params()
        with torch.no_grad():
            for n, p in params.items():
                own = self.owner[n]
                free = own == FREE
                if p.ndim <= 1:
                    if task == 0:
                        own[free] = 0  # biases / norms: trained on task 0, then frozen
                    continue
                owned = int((~free).sum())
                k = self.keep_count(p.numel(), task) - owned
                k = max(0, min(k, int(free.sum())))
                flat_own = own.view(-1)
                if k > 0:
                    score = p.detach().abs().reshape(-1).masked_fill(~free.reshape(-1), -1.0)
                    keep = torch.topk(score, k, sorted=False).indices
                    flat_own[keep] = task
                p.masked_fill_(own == FREE, 0.0)  # pruned: zero, free for later tasks
        self._retrain(task, params)
        self.active_task = None
        self._frozen, self._frozen_values = {}, {}
        super().on_task_end(task)

    def _retrain(self, task: int, params: Mapping[str, nn.Parameter]) -> None:
        """Fine-tune only task ``task``'s kept weights (and unprotected params such as heads)."""
        if self.retrain_steps == 0:
            return
        host = self._host()
        trainable = {n: self.owner[n] == task for n in params}
        fixed = {n: p.detach().clone() for n, p in params.items()}
        trained = [p for p in host.trained_parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=self.retrain_lr)
        batches = iter(host.importance_batches())
        for _ in range(self.retrain_steps):
            batch = next(batches, None)
            if batch is None:  # cycle: ask the host again rather than caching its data
                batches = iter(host.importance_batches())
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(
                        "PackNet retraining needs the finished task's data but "
                        "host.importance_batches() yielded no batch; return the task's "
                        "batches or use retrain_steps=0"
                    )
            optimizer.zero_grad(set_to_none=True)
            host.loss(batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    p.grad.masked_fill_(~trainable[n], 0.0)
            optimizer.step()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(torch.where(trainable[n], p, fixed[n]))
        optimizer.zero_grad(set_to_none=True)

    def _eval_mask(self, name: str, task: int) -> torch.Tensor:
        """Weights task ``task`` must not see: later tasks' and unused free ones."""
        own = self.owner[name]
        later = own > task
        free = own == FREE
        if self.active_task is not None and self.active_task <= task:
            return later  # free weights are the training task's own, in use
        return later | free

    @contextlib.contextmanager
    def evaluation(self, task: int) -> Iterator[None]:
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be a non-negative integer, got {task!r}")
        if not self.owner:
            yield
            return
        params = self._host().protected_parameters()
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    mask = self._eval_mask(n, task)
                    if bool(mask.any()):
                        saved[n] = p.detach().clone()
                        p.masked_fill_(mask, 0.0)
            yield
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    # -- inspection ------------------------------------------------------------------------
    def owned_counts(self) -> dict[str, dict[int, int]]:
        """Per parameter, number of weights per owner (``-1`` = free)."""
        out = {}
        for n, own in self.owner.items():
            ids, counts = torch.unique(own, return_counts=True)
            out[n] = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            num_tasks=self.num_tasks,
            retrain_steps=self.retrain_steps,
            retrain_lr=self.retrain_lr,
            prune_fractions=None if self.prune_fractions is None else list(self.prune_fractions),
            active_task=self.active_task,
            owner={n: t.clone() for n, t in self.owner.items()},
            frozen={n: t.clone() for n, t in self._frozen.items()},
            frozen_values={n: t.clone() for n, t in self._frozen_values.items()},
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_tasks"]) != self.num_tasks:
            raise ValueError(
                f"checkpoint is for num_tasks={state['num_tasks']} but this PackNet has "
                f"num_tasks={self.num_tasks}; construct it with the checkpoint's num_tasks"
            )
        super().load_state_dict(state)
        self.retrain_steps = int(state["retrain_steps"])
        self.retrain_lr = float(state["retrain_lr"])
        fr = state["prune_fractions"]
        self.prune_fractions = None if fr is None else _check_fractions(fr, self.num_tasks)
        self.active_task = None if state["active_task"] is None else int(state["active_task"])
        self.owner = {n: t.clone() for n, t in state["owner"].items()}
        self._frozen = {n: t.clone() for n, t in state["frozen"].items()}
        self._frozen_values = {n: t.clone() for n, t in state["frozen_values"].items()}
        if self.host is not None:
            params = self._host().protected_parameters()
            for n, own in self.owner.items():
                if n not in params or params[n].shape != own.shape:
                    raise ValueError(
                        f"checkpoint ownership of {n!r} does not match the host's protected "
                        "parameters; load it into the same architecture"
                    )
                device = params[n].device
                self.owner[n] = own.to(device)
                if n in self._frozen:
                    self._frozen[n] = self._frozen[n].to(device)
                    self._frozen_values[n] = self._frozen_values[n].to(device)


def _check_fractions(fractions: Sequence[float] | None, num_tasks: int) -> list[float] | None:
    if fractions is None:
        return None
    fr = [float(f) for f in fractions]
    if len(fr) != num_tasks:
        raise ValueError(
            f"prune_fractions needs one fraction per task ({num_tasks}), got {len(fr)}: {fr}"
        )
    if any(not math.isfinite(f) or f < 0 or f > 1 for f in fr):
        raise ValueError(f"every prune fraction must lie in [0, 1], got {fr}")
    if math.fsum(fr) > 1 + 1e-6:
        raise ValueError(
            f"prune_fractions sum to {math.fsum(fr):.6g} > 1; they are fractions of each "
            "parameter given to each task, so together they can use at most all of it"
        )
    return fr
