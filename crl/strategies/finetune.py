"""Finetune: train on each task in turn with no protection, the lower baseline of every
continual-learning comparison. The base :class:`Strategy` already does nothing at each hook."""

from __future__ import annotations

from crl.strategies.base import Strategy


class Finetune(Strategy):
    """No-op strategy: no penalty, no gradient edits, nothing to checkpoint but the task count."""

    name = "finetune"
