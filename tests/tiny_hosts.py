"""A tiny multi-head MLP classifier host for strategy tests (no crl.supervised code)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TinyMultiHeadHost:
    """Shared trunk (Linear + ``act`` per width) and one Linear head of 3 classes per task;
    ``n`` random samples per task, served in batches of 8."""

    def __init__(self, widths: Sequence[int], n_tasks: int, act: type[nn.Module] = nn.ReLU,
                 seed: int = 0, n: int = 24) -> None:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), act()]
        self.module = nn.ModuleDict({
            "trunk": nn.Sequential(*layers),
            "heads": nn.ModuleList(nn.Linear(widths[-1], 3) for _ in range(n_tasks)),
        })
        self.data = {
            t: {
                "x": torch.randn(n, widths[0], generator=g),
                "y": torch.randint(0, 3, (n,), generator=g),
                "task": torch.full((n,), t),
            }
            for t in range(n_tasks)
        }
        self.task = 0
        self.empty = False

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if n.startswith("trunk.")}

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def importance_batches(self) -> list[dict[str, torch.Tensor]]:
        if self.empty:
            return []
        d = self.data[self.task]
        return [{k: v[i : i + 8] for k, v in d.items()} for i in range(0, len(d["x"]), 8)]

    def experience_batches(self) -> list[dict[str, torch.Tensor]]:
        """The running task's whole data (what a perfect memory keeps)."""
        return [dict(self.data[self.task])]

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.module["trunk"](batch["x"])
        out = torch.stack([head(h) for head in self.module["heads"]])
        return out[batch["task"], torch.arange(h.shape[0])]

    def output_distribution(self, batch: dict[str, torch.Tensor]):
        return torch.distributions.Categorical(logits=self.logits(batch), validate_args=False)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["y"])
