"""Per-task output heads chosen by the task id carried in the observation.

ContinualEnv(append_task_id=True) appends a one-hot of the task to every observation, so the
task id travels with the observation through SB3's buffers, vector envs and batched
evaluation; a head is picked per sample with a gather (no Python branching), which keeps
batches that mix tasks (replay, evaluation of all tasks at once) and ``torch.func.vmap``
(per-sample Fisher) working.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def task_index_from_obs(
    obs: torch.Tensor | dict[str, torch.Tensor], num_tasks: int
) -> torch.Tensor:
    """Each sample's task: argmax of the one-hot at the end of a Box observation, or of the
    ``task_id`` entry of a Dict observation (what ContinualEnv appends in either case)."""
    if isinstance(obs, dict):
        if "task_id" not in obs:
            raise KeyError(
                "a multi-head policy on Dict observations needs a 'task_id' entry; build the "
                "env with ContinualEnv(..., append_task_id=True)"
            )
        return obs["task_id"].argmax(dim=-1)
    return obs[..., -num_tasks:].argmax(dim=-1)


class MultiHeadLinear(nn.Module):
    """``num_heads`` independent linear layers stored as one (H, out, in) tensor.

    A sample's output uses only its own head's rows, so only that head receives gradient
    (unused heads get an exact zero). Initialised like ``nn.Linear`` (Kaiming-uniform bounds),
    head by head. All heads are computed in one matmul and each sample's head is gathered:
    measured ~3x faster on CPU than gathering a (B, out, in) weight per sample.
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int) -> None:
        super().__init__()
        if min(in_features, out_features, num_heads) < 1:
            raise ValueError(
                "MultiHeadLinear needs in_features, out_features, num_heads >= 1, got "
                f"{in_features}, {out_features}, {num_heads}"
            )
        self.in_features, self.out_features, self.num_heads = in_features, out_features, num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_heads, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        heads, out, inp = self.weight.shape
        flat = F.linear(x, self.weight.reshape(heads * out, inp), self.bias.reshape(-1))
        flat = flat.reshape(*x.shape[:-1], heads, out)
        index = task.reshape(*task.shape, 1, 1).expand(*task.shape, 1, out)
        return flat.gather(-2, index).squeeze(-2)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, heads={self.num_heads}"
