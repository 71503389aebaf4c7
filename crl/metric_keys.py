"""The names of the evaluation metrics in ``metrics.jsonl`` and W&B: one schema for the
writers (the RL training loop, the supervised experiment) and the reader (``crl report``),
so a renamed key cannot silently break the report (docs/ARCHITECTURE.md, "Metrics")."""

from __future__ import annotations

import re

EVAL_PREFIX = "eval/"

#: RL: per task ``eval/<task index>-<task name>/<what>``
RL_RETURN, RL_SUCCESS, RL_SCORE = "return", "success", "score"
_RL_TASK_KEY = re.compile(r"^eval/(\d+)-(.+)/(return|success|score)$")
RL_AVERAGE_RETURN = "eval/average_return"
RL_AVERAGE_SCORE = "eval/average_score"

#: supervised: accuracy per task after each task ``eval/acc/<task name>``
SL_ACC_PREFIX = "eval/acc/"
SL_AVG_ACC = "eval/avg_acc"
SL_AVG_ACC_SEEN = "eval/avg_acc_seen"


def rl_task_key(task: int, name: str, what: str) -> str:
    """``eval/<task>-<name>/<what>``, ``what`` one of return, success, score."""
    return f"{EVAL_PREFIX}{task}-{name}/{what}"


def parse_rl_task_key(key: str) -> tuple[int, str, str] | None:
    """(task index, task name, what) of a per-task RL key, else None."""
    m = _RL_TASK_KEY.match(key)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


def sl_acc_key(name: str) -> str:
    return f"{SL_ACC_PREFIX}{name}"
