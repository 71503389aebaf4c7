"""MLP classifiers for the MNIST benchmarks, single-head or one head per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


class MLPClassifier(nn.Module):
    """A shared MLP trunk and ``n_heads`` linear heads.

    Every head is computed and the task's head is *gathered* rather than chosen with Python
    control flow, so a batch may mix tasks (replay, joint training) and the forward pass runs
    under ``torch.func.vmap`` (per-sample Fisher / MAS importance). With ``n_heads == 1`` the
    task id is ignored and the head is part of the shared, protected network.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (400, 400),
        n_heads: int = 1,
        head_outputs: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if n_heads < 1 or head_outputs < 1 or in_features < 1:
            raise ValueError(
                f"MLPClassifier needs n_heads, head_outputs, in_features >= 1, got "
                f"{n_heads}, {head_outputs}, {in_features}"
            )
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive integers, got {list(hidden)}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
            width = int(h)
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, head_outputs) for _ in range(n_heads))
        self.n_heads = n_heads
        self.head_outputs = head_outputs

    @property
    def multi_head(self) -> bool:
        return self.n_heads > 1

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        z = self.trunk(x.flatten(1))
        if not self.multi_head:
            return self.heads[0](z)
        if task is None:
            raise ValueError("a multi-head model needs the task id of every sample")
        out = torch.stack([head(z) for head in self.heads], dim=1)  # (B, H, O)
        index = task.long().view(-1, 1, 1).expand(-1, 1, self.head_outputs)
        return out.gather(1, index).squeeze(1)

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        """The trunk, plus the head when it is shared (single-head)."""
        return {
            name: p
            for name, p in self.named_parameters()
            if name.startswith("trunk.") or not self.multi_head
        }
