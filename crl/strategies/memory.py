"""Sample memories shared by the rehearsal methods (A-GEM, replay).

Batches are mappings of tensors that share their leading dimension (see
:mod:`crl.strategies.base`). Memories keep them detached and on the CPU, so that a memory of
earlier tasks never holds autograd graphs or accelerator memory, and hand samples back as plain
dicts; :func:`to_device` moves a sample to the model before use.

Two memories:

* :class:`ReservoirMemory` — Vitter's Algorithm R (Vitter 1985, "Random sampling with a
  reservoir") over the stream of every sample ever added, or with ``task_balanced=True`` an
  equal quota per task seen so far, each quota a reservoir over that task's stream.
* :class:`EpisodicMemory` — A-GEM's episodic memory (Chaudhry et al. 2019): a fixed number of
  samples per finished task, drawn uniformly from the task's data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from crl.strategies.base import Batch

#: Column a :class:`ReservoirMemory` uses for the task id of each stored sample.
TASK_KEY = "__memory_task__"


# -- batch helpers ---------------------------------------------------------------------------
def batch_length(batch: Batch) -> int:
    """The shared leading dimension, or a ValueError that says which key disagrees."""
    if not isinstance(batch, Mapping) or len(batch) == 0:
        raise ValueError(
            "a batch must be a non-empty mapping of tensors sharing their leading dimension, "
            f"e.g. {{'x': x, 'y': y}}; got {type(batch).__name__}"
        )
    length: int | None = None
    first = ""
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"batch[{key!r}] is a {type(value).__name__}, not a tensor; convert it with "
                "torch.as_tensor before handing the batch to a strategy"
            )
        if value.ndim == 0:
            raise ValueError(
                f"batch[{key!r}] is a scalar tensor; every entry needs a leading batch "
                "dimension (use value.reshape(1) or expand it to the batch size)"
            )
        if length is None:
            length, first = value.shape[0], key
        elif value.shape[0] != length:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} rows but batch[{first!r}] has {length}; "
                "all entries of a batch must share their leading (batch) dimension"
            )
    assert length is not None
    return int(length)


def detach_to_cpu(batch: Batch) -> dict[str, torch.Tensor]:
    """A copy safe to keep across tasks: no autograd history, no accelerator memory."""
    batch_length(batch)
    return {k: v.detach().to("cpu") for k, v in batch.items()}


def index_batch(batch: Batch, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """Rows ``index`` of every entry (one indexing op per key, not per row)."""
    return {k: v[index] for k, v in batch.items()}


def concat_batches(batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """Concatenate batches with the same keys along the leading dimension."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    keys = set(batches[0])
    for b in batches[1:]:
        if set(b) != keys:
            raise ValueError(
                f"cannot concatenate batches with different keys: {sorted(keys)} vs {sorted(b)}"
            )
    return {k: torch.cat([b[k] for b in batches], dim=0) for k in batches[0]}


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a memory sample must go: the device of the model's parameters (CPU if none)."""
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Batch, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Move a memory sample to the model's device."""
    return {k: v.to(device) for k, v in batch.items()}


def sample_indices(population: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``min(n, population)`` distinct indices, uniform over ordered subsets.

    For ``n² < population`` whole draws with replacement are rejected until they hold no
    duplicate (exactly uniform, expected O(n) work, fewer than 1.7 draws on average); otherwise
    a random permutation is cut. This keeps a per-update memory sample cheap on memories of
    millions of samples, where ``randperm`` alone costs ~10 ms.
    """
    if population <= 0:
        raise ValueError("cannot sample from an empty memory; add a finished task first")
    n = min(int(n), population)
    if n * n < population:
        while True:
            idx = torch.randint(population, (n,), generator=generator)
            if torch.unique(idx).numel() == n:
                return idx
    return torch.randperm(population, generator=generator)[:n]


# -- one reservoir ---------------------------------------------------------------------------
class _Reservoir:
    """Algorithm R over one stream, vectorised over each added batch.

    Storage grows geometrically up to ``capacity`` so that a large configured capacity does
    not allocate memory for samples that never arrive.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.data: dict[str, torch.Tensor] = {}
        self.size = 0
        self.seen = 0

    def _check_schema(self, batch: Mapping[str, torch.Tensor]) -> None:
        if not self.data:
            return
        if set(batch) != set(self.data):
            raise ValueError(
                f"batch keys {sorted(batch)} differ from the keys already in memory "
                f"{sorted(self.data)}; every batch added to a memory needs the same keys"
            )
        for k, v in batch.items():
            old = self.data[k]
            if v.shape[1:] != old.shape[1:] or v.dtype != old.dtype:
                raise ValueError(
                    f"batch[{k!r}] has per-sample shape {tuple(v.shape[1:])} and dtype "
                    f"{v.dtype}, but memory stores {tuple(old.shape[1:])} / {old.dtype}; "
                    "convert it to the same shape and dtype as earlier batches"
                )

    def _grow(self, needed: int) -> None:
        current = next(iter(self.data.values())).shape[0] if self.data else 0
        if needed <= current:
            return
        new = min(self.capacity, max(needed, 2 * current, 64))
        for k, v in self.data.items():
            grown = v.new_zeros((new, *v.shape[1:]))
            grown[: self.size] = v[: self.size]
            self.data[k] = grown

    def add(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> None:
        m = batch_length(batch)
        self._check_schema(batch)
        if not self.data:
            self.data = {k: v.new_zeros((0, *v.shape[1:])) for k, v in batch.items()}
        if m == 0 or self.capacity == 0:
            self.seen += m
            return
        # Stream positions n (0-based) of the new samples. Algorithm R: sample n goes to slot n
        # while the reservoir fills, afterwards to slot j ~ U{0..n} if j < capacity.
        pos = torch.arange(self.seen, self.seen + m, dtype=torch.float64)
        draw = torch.floor(torch.rand(m, generator=generator, dtype=torch.float64) * (pos + 1))
        slot = torch.where(pos < self.capacity, pos, draw).long()
        accepted = torch.nonzero(slot < self.capacity).squeeze(1)
        if accepted.numel():
            # Several samples of one batch may hit the same slot; sequentially the last one
            # wins, so keep the largest batch position per slot.
            slots, inverse = torch.unique(slot[accepted], return_inverse=True)
            src = torch.full((slots.numel(),), -1, dtype=torch.long)
            src.scatter_reduce_(0, inverse, accepted, reduce="amax")
            self._grow(int(slots.max()) + 1)
            for k, v in batch.items():
                self.data[k][slots] = v[src]
            self.size = min(self.capacity, self.size + max(0, min(m, self.capacity - self.seen)))
        self.seen += m

    def shrink(self, capacity: int, generator: torch.Generator) -> None:
        """Keep a uniform random subset; a uniform subset of a uniform sample is uniform over
        the stream, so Algorithm R continues correctly with the smaller capacity."""
        capacity = int(capacity)
        if self.size > capacity:
            keep = torch.randperm(self.size, generator=generator)[:capacity]
            self.data = {k: v[keep].clone() for k, v in self.data.items()}
            self.size = capacity
        else:
            self.data = {k: v[: self.size].clone() for k, v in self.data.items()}
        self.capacity = capacity

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: v[: self.size] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "size": self.size,
            "seen": self.seen,
            "data": {k: v.clone() for k, v in self.stored().items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Reservoir:
        res = cls(int(state["capacity"]))
        res.size = int(state["size"])
        res.seen = int(state["seen"])
        res.data = {k: v.clone() for k, v in state["data"].items()}
        return res


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate a size option early, naming the option, instead of failing deep in torch."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _gather(reservoirs: Sequence[_Reservoir], n: int, gen: torch.Generator) -> dict:
    """Uniform sample without replacement over the union of several reservoirs."""
    if len(reservoirs) == 1:  # the general path's sample, without its five bookkeeping ops
        return index_batch(reservoirs[0].stored(), sample_indices(reservoirs[0].size, n, gen))
    sizes = torch.tensor([r.size for r in reservoirs], dtype=torch.long)
    total = int(sizes.sum())
    idx = sample_indices(total, n, gen)
    ends = torch.cumsum(sizes, 0)
    owner = torch.bucketize(idx, ends, right=True)
    parts = []
    for i, res in enumerate(reservoirs):
        local = idx[owner == i] - (ends[i] - sizes[i])
        if local.numel():
            parts.append(index_batch(res.stored(), local))
    return concat_batches(parts)


class _Memory:
    """Seeded generator and the strip of the internal task column, shared by both memories."""

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _prepare(batch: Batch, task: int) -> dict[str, torch.Tensor]:
        if TASK_KEY in batch:
            raise ValueError(f"batch key {TASK_KEY!r} is reserved by the memory; rename it")
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be a non-negative integer id, got {task!r}")
        data = detach_to_cpu(batch)
        data[TASK_KEY] = torch.full((batch_length(batch),), task, dtype=torch.long)
        return data

    @staticmethod
    def _public(sample: dict[str, torch.Tensor], with_task: bool) -> dict[str, torch.Tensor]:
        if with_task:
            return sample
        return {k: v for k, v in sample.items() if k != TASK_KEY}


class ReservoirMemory(_Memory):
    """A bounded memory whose content is a uniform sample of everything added so far.

    ``task_balanced=False``: Algorithm R over the stream of all samples of all tasks, so old
    tasks get a share proportional to how much data they had. ``task_balanced=True``: each of
    the ``n`` tasks seen so far gets ``capacity // n`` slots (the remainder stays unused), each
    slot set a reservoir over that task's stream; when a new task arrives the older tasks keep
    a uniform random subset of their samples.
    """

    def __init__(self, capacity: int, task_balanced: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.capacity = check_positive_int("capacity (memory_size)", capacity)
        self.task_balanced = bool(task_balanced)
        self._pool = _Reservoir(self.capacity)  # task_balanced=False
        self._tasks: dict[int, _Reservoir] = {}  # task_balanced=True

    def _reservoirs(self) -> list[_Reservoir]:
        if self.task_balanced:
            return [self._tasks[t] for t in sorted(self._tasks)]
        return [self._pool]

    def add(self, batch: Batch, task: int) -> None:
        """Offer every sample of ``batch`` (from task ``task``) to the memory."""
        data = self._prepare(batch, task)
        if not self.task_balanced:
            self._pool.add(data, self.generator)
            return
        if task not in self._tasks:
            quota = self.capacity // (len(self._tasks) + 1)
            if quota == 0:
                raise ValueError(
                    f"a task-balanced memory of capacity {self.capacity} cannot hold "
                    f"{len(self._tasks) + 1} tasks; raise memory_size to at least the number "
                    "of tasks or use task_balanced=False"
                )
            for t in sorted(self._tasks):
                self._tasks[t].shrink(quota, self.generator)
            self._tasks[task] = _Reservoir(quota)
        self._tasks[task].add(data, self.generator)

    def __len__(self) -> int:
        return sum(r.size for r in self._reservoirs())

    @property
    def seen(self) -> int:
        """Samples ever offered (what the stored ones are a uniform sample of)."""
        return sum(r.seen for r in self._reservoirs())

    def counts(self) -> dict[int, int]:
        """Stored samples per task id."""
        out: dict[int, int] = {}
        for res in self._reservoirs():
            tasks = res.stored().get(TASK_KEY)
            if tasks is None:
                continue
            ids, n = torch.unique(tasks, return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist(), strict=True):
                out[i] = out.get(i, 0) + c
        return out

    def stored(self, with_task: bool = False) -> dict[str, torch.Tensor]:
        """Everything in memory (a copy), e.g. for inspection or export."""
        parts = [r.stored() for r in self._reservoirs() if r.size]
        if not parts:
            raise ValueError("the memory is empty; add a finished task first")
        return self._public(concat_batches(parts), with_task)

    def sample(self, n: int, with_task: bool = False) -> dict[str, torch.Tensor]:
        """``min(n, len(self))`` distinct stored samples, uniformly at random (on the CPU)."""
        check_positive_int("n", n)
        if len(self) == 0:
            raise ValueError("the memory is empty; add a finished task before sampling")
        sample = _gather([r for r in self._reservoirs() if r.size], n, self.generator)
        return self._public(sample, with_task)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "task_balanced": self.task_balanced,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "pool": self._pool.state_dict(),
            "tasks": {int(t): r.state_dict() for t, r in self._tasks.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity or bool(state["task_balanced"]) != (
            self.task_balanced
        ):
            raise ValueError(
                f"checkpoint memory has capacity={state['capacity']}, task_balanced="
                f"{state['task_balanced']} but this one has capacity={self.capacity}, "
                f"task_balanced={self.task_balanced}; construct it with the checkpoint's options"
            )
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        self._pool = _Reservoir.from_state(state["pool"])
        self._tasks = {int(t): _Reservoir.from_state(s) for t, s in state["tasks"].items()}


class EpisodicMemory(_Memory):
    """A-GEM's episodic memory: ``per_task`` samples of each finished task.

    Each task's samples are a reservoir over the batches added for it, so the task's data can
    be streamed (e.g. a whole replay buffer) without concatenating it first, and the kept
    samples are uniform over it.
    """

    def __init__(self, per_task: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.per_task = check_positive_int("per_task (memory_per_task)", per_task)
        self._tasks: dict[int, _Reservoir] = {}

    def add(self, batch: Batch, task: int) -> None:
        data = self._prepare(batch, task)
        self._tasks.setdefault(task, _Reservoir(self.per_task)).add(data, self.generator)

    def add_task(self, batches: Iterable[Batch], task: int) -> None:
        """Stream all batches of a finished task into its slot."""
        for batch in batches:
            self.add(batch, task)

    @property
    def tasks(self) -> list[int]:
        return sorted(t for t, r in self._tasks.items() if r.size)

    def counts(self) -> dict[int, int]:
        return {t: r.size for t, r in sorted(self._tasks.items())}

    def __len__(self) -> int:
        return sum(r.size for r in self._tasks.values())

    def task_samples(self, task: int) -> dict[str, torch.Tensor]:
        """The stored samples of one task."""
        if task not in self._tasks:
            raise KeyError(f"no samples of task {task} in memory; stored tasks: {self.tasks}")
        return self._public(self._tasks[task].stored(), with_task=False)

    def sample(self, n: int, with_task: bool = False) -> dict[str, torch.Tensor]:
        """``min(n, len(self))`` distinct samples, uniform over all stored tasks' samples."""
        check_positive_int("n", n)
        if len(self) == 0:
            raise ValueError("the episodic memory is empty; add a finished task first")
        res = [self._tasks[t] for t in self.tasks]
        return self._public(_gather(res, n, self.generator), with_task)

    def state_dict(self) -> dict[str, Any]:
        return {
            "per_task": self.per_task,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "tasks": {int(t): r.state_dict() for t, r in self._tasks.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["per_task"]) != self.per_task:
            raise ValueError(
                f"checkpoint memory keeps {state['per_task']} samples per task but this one "
                f"{self.per_task}; construct it with memory_per_task={state['per_task']}"
            )
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        self._tasks = {int(t): _Reservoir.from_state(s) for t, s in state["tasks"].items()}
