"""What a finished run reports: the per-task metric rows, :class:`RunResult`, the model
files and aggregates over seeds."""


from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.config import RunConfig
from agents.training import EvalRecord
from crl.metrics import EvalHistory, bootstrap_ci, end_scores

if TYPE_CHECKING:
    pass

def metric_rows(summary: Mapping[str, Any], history: EvalHistory | None,
                names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """Per stage: end-of-task score, final score, forgetting, AUC, forward transfer."""
    rows = []
    n = len(names)
    for s in range(n):
        row: dict[str, Any] = {"task": names[s]}
        if history is not None:
            row["end_of_task"] = float(summary["end_of_task_score"][s])
            row["final"] = float(end_scores(history, n - 1, s, k).mean())
            row["auc"] = summary["auc"][s]
            row["forgetting"] = summary["forgetting"][s] if s < n - 1 else None
            ft = summary.get("forward_transfer")
            row["forward_transfer"] = ft[s] if ft is not None else None
        rows.append(row)
    return rows


@dataclass
class RunResult:
    config: RunConfig
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    record: EvalRecord
    history: EvalHistory | None
    plot_path: Path | None
    timings: dict[str, float]
    agent: Any = None


def save_model_files(agent: Any, folder: Path) -> None:
    """SB3's zip (weights, optimisers, settings) + the strategy's state; the strategy and
    host are left out of the zip (they point back at the agent) and buffers are not saved.
    A failure warns: it must not cost the run's results."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        agent.save(folder / "agent.zip",
                   exclude=["replay_buffer", "rollout_buffer", "strategy", "host"])
        torch.save(agent.continual_state_dict(), folder / "continual_state.pt")
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not save the checkpoint in {folder}: {exc}", RuntimeWarning,
                      stacklevel=2)


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Mean and 90% bootstrap CI over seeds of the headline metrics (nan where undefined)."""
    out = {}
    for key in ("final_performance", "mean_forgetting", "mean_forward_transfer"):
        vals = [s.get(key) for s in summaries]
        vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
        out[key] = bootstrap_ci(vals) if vals else (float("nan"),) * 3
    return out
