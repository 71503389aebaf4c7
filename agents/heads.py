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
from torch import nn


def task_index_from_obs(obs: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """The task index of each sample from the one-hot in the last ``num_tasks`` features."""
    return obs[..., -num_tasks:].argmax(dim=-1)


class MultiHeadLinear(nn.Module):
    """``num_heads`` independent linear layers stored as one (H, out, in) tensor.

    A sample's output uses only its own head's rows, so only that head receives gradient.
    Initialised like ``nn.Linear`` (Kaiming-uniform bounds), head by head.
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
        w = self.weight[task]  # (B, out, in)
        return torch.einsum("boi,bi->bo", w, x) + self.bias[task]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, heads={self.num_heads}"
