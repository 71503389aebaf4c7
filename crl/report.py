"""`crl report`: compare methods across runs, with bootstrap confidence intervals over seeds.

Runs are grouped by (kind, sequence or benchmark, agent, method + its non-default options);
each group's seeds give a mean and a 90% percentile-bootstrap interval
(:func:`crl.metrics.bootstrap_ci`, i.e. ``scipy.stats.bootstrap``) of

* RL: final performance P(T), mean forgetting, mean forward transfer (Wołczyk et al. 2021,
  Continual World), read from each run's results;
* supervised: average accuracy, forgetting and FWT (Lopez-Paz & Ranzato 2017).

The table is printed (rich) and written as report.csv and report.md; PNG plots compare the
methods of each setting. Runs that did not finish are listed as skipped, never fatal.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crl.metrics import (
    EvalHistory,
    average_performance,
    bootstrap_ci,
    end_of_task_scores,
    new_task_gain_from_history,
    plasticity_slope,
)
from crl.report_plots import (
    Band,
    Bar,
    MethodCurves,
    plot_bands,
    plot_matrices_side_by_side,
    plot_metric_bars,
    plot_task_curves_by_method,
)
from crl.report_sources import (
    RL,
    SUPERVISED,
    ReportError,
    RLCurves,
    RunData,
    SkippedRun,
    is_run_dir,
    load_run_dirs,
    load_wandb_group_online,
    rl_curves,
    sl_matrix,
)

CONFIDENCE = 0.9
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

__all__ = [
    "MetricCI", "MetricSpec", "ReportError", "ReportResult", "ReportRow", "RunData",
    "SkippedRun", "build_rows", "default_out_dir", "report", "report_runs", "report_wandb",
]


# --------------------------------------------------------------------------------------------
# Metrics of a group
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """A reported metric: its column name, the results key it is read from, and the results
    keys that explain its absence (written by the runners next to null values)."""

    name: str
    key: str
    label: str
    reason_keys: tuple[str, ...] = ()


METRICS: dict[str, tuple[MetricSpec, ...]] = {
    RL: (
        MetricSpec("performance", "final_performance", "performance P(T)", ("metrics_reason",)),
        MetricSpec("forgetting", "mean_forgetting", "forgetting",
                   ("mean_forgetting_reason", "metrics_reason")),
        MetricSpec("new_task_gain", "mean_new_task_gain", "new-task gain",
                   ("mean_new_task_gain_reason", "metrics_reason")),
        MetricSpec("forward_transfer", "mean_forward_transfer", "forward transfer",
                   ("forward_transfer_reason", "metrics_reason")),
        MetricSpec("plasticity", "plasticity_slope", "plasticity slope",
                   ("plasticity_slope_reason", "metrics_reason")),
    ),
    SUPERVISED: (
        MetricSpec("accuracy", "avg_acc", "accuracy"),
        MetricSpec("forgetting", "forgetting", "forgetting"),
        MetricSpec("fwt", "fwt", "FWT"),
        MetricSpec("plasticity", "plasticity_slope", "plasticity slope"),
    ),
}
#: run-level plasticity series drawn by `crl report`: (file name part, y label, how a run's
#: ``plasticity.series`` gives the value at each measurement)
PLASTICITY_SERIES: tuple[tuple[str, str, str], ...] = (
    ("dormant", "dormant units (fraction, all layers)", "plasticity/dormant"),
    ("srank", "effective rank (mean over networks)", "plasticity/srank/"),
    ("weight_abs", "mean |w| (all layers)", "plasticity/weight_abs"),
    ("grad_norm", "gradient norm (all layers)", "plasticity/grad_norm/"),
)
KIND_TITLES = {RL: "RL runs", SUPERVISED: "Supervised runs"}


@dataclass
class MetricCI:
    """Mean over seeds and its bootstrap interval; ``n`` seeds had a value."""

    mean: float
    low: float
    high: float
    n: int
    values: list[float]

    @property
    def single_seed(self) -> bool:
        """One seed: the interval is the mean itself (nothing to resample)."""
        return self.n == 1

    def text(self) -> str:
        if self.single_seed:
            return f"{self.mean:.3f} (1 seed)"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class ReportRow:
    """One method in one setting, aggregated over its seeds."""

    kind: str
    setting: str
    agent: str
    method: str
    seeds: list[int | None]
    runs: list[str]
    metrics: dict[str, MetricCI | None]
    notes: list[str] = field(default_factory=list)

    @property
    def comparison(self) -> tuple[str, str, str]:
        return self.kind, self.setting, self.agent

    def as_dict(self) -> dict[str, Any]:
        """The CSV row: per metric its mean, low, high and seed count (empty when n/a)."""
        out: dict[str, Any] = {"kind": self.kind, "setting": self.setting,
                               "agent": self.agent, "method": self.method,
                               "n_runs": len(self.runs),
                               "seeds": ";".join("?" if s is None else str(s)
                                                 for s in self.seeds)}
        for spec in METRICS[self.kind]:
            ci = self.metrics.get(spec.name)
            out[spec.name] = "" if ci is None else ci.mean
            out[f"{spec.name}_low"] = "" if ci is None else ci.low
            out[f"{spec.name}_high"] = "" if ci is None else ci.high
            out[f"{spec.name}_n"] = 0 if ci is None else ci.n
        return out


@dataclass
class ReportResult:
    rows: list[ReportRow]
    csv_path: Path
    md_path: Path
    plot_paths: list[Path]
    skipped: list[SkippedRun]
    out_dir: Path
    notes: list[str] = field(default_factory=list)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _rl_history(run: RunData) -> EvalHistory | None:
    """An RL run's evaluations as a history over its stages (one pass over distinct tasks
    only): what metrics added after the run was made are computed from."""
    curves = rl_curves(run)
    if curves is None or len(set(curves.schedule)) != len(curves.schedule) or len(
            curves.schedule) < 2:
        return None
    try:
        return EvalHistory(curves.steps, curves.scores[:, curves.schedule],
                           curves.stage_starts, curves.stage_ends[-1])
    except (ValueError, IndexError):
        return None


def _from_history(run: RunData, metric: str) -> float | None:
    """``new_task_gain`` (mean) or ``plasticity_slope`` of a run whose results.json predates
    the metric: from the evaluations (RL) or the accuracy matrix's diagonal (supervised)."""
    if run.kind != RL:
        got = sl_matrix(run)
        if metric != "plasticity_slope" or got is None or got[0].shape[0] < 2:
            return None
        return _finite(plasticity_slope(np.diag(got[0])))
    history = _rl_history(run)
    if history is None:
        return None
    k = int(run.results.get("forgetting_k", 5))
    try:
        if metric == "plasticity_slope":
            return _finite(plasticity_slope(end_of_task_scores(history, k=k)))
        return _finite(float(np.mean(new_task_gain_from_history(history, k=k))))
    except (ValueError, IndexError):
        return None


def metric_value(run: RunData, spec: MetricSpec) -> float | None:
    """The run's value of a reported metric (None where undefined); metrics added after a
    run was made are computed from what its results.json holds."""
    value = _finite(run.results.get(spec.key))
    if value is None and spec.key not in run.results:
        if spec.key == "mean_new_task_gain" and run.kind == RL:
            value = _from_history(run, "new_task_gain")
        elif spec.key == "plasticity_slope":
            value = _from_history(run, "plasticity_slope")
    return value


def metric_ci(values: Sequence[float]) -> MetricCI | None:
    """Mean and the 90% percentile-bootstrap CI over seeds (None without any value)."""
    if not values:
        return None
    mean, low, high = bootstrap_ci(values, confidence=CONFIDENCE, n_resamples=N_RESAMPLES,
                                   seed=BOOTSTRAP_SEED)
    return MetricCI(mean, low, high, len(values), [float(v) for v in values])


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------
def setting_of(run: RunData) -> str:
    cfg = run.config
    if run.kind == RL:
        return str(cfg.get("resolved_sequence") or run.results.get("sequence")
                   or cfg.get("sequence"))
    scenario = cfg.get("resolved_scenario") or cfg.get("scenario")
    tasks = cfg.get("resolved_tasks") or cfg.get("tasks")
    details = ", ".join(str(x) for x in (scenario, f"{tasks} tasks" if tasks else None) if x)
    return f"{cfg.get('benchmark')} ({details})" if details else str(cfg.get("benchmark"))


def _option_defaults(run: RunData) -> dict[str, Any]:
    """Defaults the run's method options are compared with: the constructor's, overridden
    by the supervised or per-agent RL defaults (what a run without the option got)."""
    from crl.strategies import strategy_class

    try:
        cls = strategy_class(run.method)
    except ValueError:  # joint training and unknown methods have no options
        return {}
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    if run.kind == SUPERVISED:
        from crl.supervised.experiment import SUPERVISED_METHOD_DEFAULTS

        defaults |= SUPERVISED_METHOD_DEFAULTS.get(run.method, {})
    else:  # what `crl train` gives the method when the user sets nothing, per agent
        from agents.method_defaults import RL_METHOD_DEFAULTS, rl_method_options

        agent = str(run.config.get("agent"))
        if agent in RL_METHOD_DEFAULTS:
            defaults |= rl_method_options(agent, run.method,
                                          agent_options=run.config.get("agent_options") or {})
    return defaults


def method_label(run: RunData) -> str:
    """The method name plus its options that differ from their defaults, e.g.
    ``ewc (lam=100, mode=online)``: runs with other strengths are other methods."""
    given = (run.config.get("method_options") or {}).get(run.method) or {}
    defaults = _option_defaults(run)
    changed = {k: v for k, v in sorted(given.items())
               if k not in ("seed", "num_tasks") and (k not in defaults or defaults[k] != v)}
    if not changed:
        return run.method
    return f"{run.method} (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"


def group_key(run: RunData) -> tuple[str, str, str, str]:
    agent = str(run.config.get("agent", "")) if run.kind == RL else ""
    return run.kind, setting_of(run), agent, method_label(run)


#: config keys that may differ between the seeds of one group without changing the method
_VOLATILE = {"seed", "run_dir", "group", "progress", "wandb", "wandb_project", "data_dir",
             "download", "device", "torch_threads", "reference_dir", "save_model",
             "score_bounds", "method_options", "resolved_method_options", "trainer.progress",
             "require_references", "resume", "checkpoint_every", "run_path",
             "trainer.checkpoint_every", "trainer.torch_threads", "checkpoint_buffer",
             "method_options_resolved"}


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if key in _VOLATILE or str(k).startswith("_"):
            continue
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def _config_defaults(kind: str) -> dict[str, str]:
    """The flattened defaults of a run's config class: a key an older run's config lacks
    (a field added since) counts as its default, not as a different setting."""
    if kind == RL:
        from agents.config import RunConfig

        return _flatten(dataclasses.asdict(RunConfig()))
    from crl.supervised.experiment import SupervisedConfig

    return _flatten(dataclasses.asdict(SupervisedConfig()))


@functools.cache
def _agent_option_defaults(agent: str) -> dict[str, str]:
    """The agent class's own keyword defaults as flattened ``agent_options.<name>`` keys: a
    run whose config leaves ``multi_head`` out ran with the agent's default, not another
    setting."""
    from agents.factory import agent_keywords

    try:
        params = agent_keywords(agent)
    except ValueError:
        return {}
    return {f"agent_options.{k}": json.dumps(p.default, sort_keys=True, default=str)
            for k, p in params.items()
            if isinstance(p.default, bool | int | float | str) or p.default is None}


def flat_config(run: RunData) -> dict[str, str]:
    """The run's config as comparable strings, absent fields at their defaults (an RL run's
    absent agent options at its agent's)."""
    defaults = _config_defaults(run.kind)
    if run.kind == RL and (agent := run.config.get("agent")):
        defaults |= _agent_option_defaults(str(agent))
    return defaults | _flatten(run.config)


def _group_notes(runs: Sequence[RunData], specs: Sequence[MetricSpec]) -> list[str]:
    notes = []
    seeds = [r.seed for r in runs]
    dup = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
    if dup:
        notes.append(f"seed(s) {dup} appear more than once: repeated runs count as extra "
                     "seeds")
    flat = [flat_config(r) for r in runs]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({f.get(k) for f in flat}) > 1]
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6
                                         else "")
        notes.append(f"settings differ between its runs: {shown}")
    for spec in specs:
        missing = [r for r in runs if metric_value(r, spec) is None]
        if not missing:
            continue
        reason = next((str(r.results[k]) for r in missing for k in spec.reason_keys
                       if r.results.get(k)), None)
        if reason is None and spec.key == "forgetting" and all(r.method == "joint"
                                                               for r in missing):
            reason = "joint training has no task sequence"
        notes.append(f"{spec.label} n/a for {len(missing)} of {len(runs)} runs"
                     + (f": {reason}" if reason else ""))
    return notes


def split_by_settings(
    groups: Mapping[tuple[str, str, str, str], list[RunData]],
) -> dict[tuple[str, str, str, str], list[RunData]]:
    """Runs of one method that differ in other settings (a sweep's overrides: heads, learning
    rate, steps...) are different experiments, not seeds: each variant gets its own row,
    labelled with the settings that tell them apart."""
    out: dict[tuple[str, str, str, str], list[RunData]] = {}
    for key, members in groups.items():
        flat = [flat_config(r) for r in members]
        differ = [k for k in sorted(set().union(*flat)) if len({f.get(k) for f in flat}) > 1]
        if not differ:
            out[key] = list(members)
            continue
        for run, f in zip(members, flat, strict=True):
            parts = [f"{k.rsplit('.', 1)[-1]}={json.loads(f[k]) if k in f else '-'}"
                     for k in differ]
            out.setdefault((*key[:3], f"{key[3]} [{', '.join(parts)}]"), []).append(run)
    return out


def _method_order(label: str) -> tuple[int, str]:
    from crl.strategies import METHODS

    name = label.split(" ", 1)[0]
    order = list(METHODS)
    return (order.index(name) if name in order else len(order), label)


def build_rows(runs: Sequence[RunData]) -> list[ReportRow]:
    """One row per group of runs, sorted by kind, setting, agent, then method (the
    registry's order: finetune first)."""
    groups: dict[tuple[str, str, str, str], list[RunData]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    groups = split_by_settings(groups)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0] != RL, k[1], k[2], _method_order(k[3]))):
        members = sorted(groups[key], key=lambda r: (r.seed is None, r.seed or 0, r.source))
        kind, setting, agent, label = key
        specs = METRICS[kind]
        metrics = {}
        for spec in specs:
            vals = [v for r in members if (v := metric_value(r, spec)) is not None]
            metrics[spec.name] = metric_ci(vals)
        rows.append(ReportRow(kind, setting, agent, label, [r.seed for r in members],
                              [r.source for r in members], metrics,
                              _group_notes(members, specs)))
    return rows


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _kind_columns(kind: str) -> list[str]:
    head = ["sequence", "agent"] if kind == RL else ["benchmark"]
    return [*head, "method", "seeds", *(f"{s.label}" for s in METRICS[kind])]


def _cells(row: ReportRow) -> list[str]:
    head = [row.setting, row.agent] if row.kind == RL else [row.setting]
    metrics = [("n/a" if (ci := row.metrics.get(s.name)) is None else ci.text())
               for s in METRICS[row.kind]]
    return [*head, row.method, str(len(row.runs)), *metrics]


def _kinds(rows: Sequence[ReportRow]) -> list[str]:
    return [k for k in (RL, SUPERVISED) if any(r.kind == k for r in rows)]


def _ci_caption() -> str:
    return (f"mean [{CONFIDENCE:.0%} CI] over seeds: percentile bootstrap (scipy, "
            f"{N_RESAMPLES:,} resamples); \"(1 seed)\": one seed, no interval")


def print_tables(rows: Sequence[ReportRow], skipped: Sequence[SkippedRun],
                 console: Console) -> None:
    for kind in _kinds(rows):
        table = Table(title=KIND_TITLES[kind], caption=_ci_caption())
        for col in _kind_columns(kind):
            table.add_column(col, justify="right" if col == "seeds" else "left",
                             overflow="fold")
        for row in rows:
            if row.kind == kind:
                table.add_row(*(escape(c) for c in _cells(row)))
        console.print(table)
        for row in rows:
            for note in row.notes if row.kind == kind else []:
                console.print(f"[yellow]{escape(row.setting)} / {escape(row.method)}:[/] "
                              f"{escape(note)}", soft_wrap=True)
    for s in skipped:
        console.print(f"[red]skipped[/] {escape(s.source)}: {escape(s.reason)}", soft_wrap=True)


def write_csv(rows: Sequence[ReportRow], path: Path) -> Path:
    """All rows in one file; a metric's columns are empty for kinds that lack it."""
    dicts = [r.as_dict() for r in rows]
    fields: list[str] = []
    for d in dicts:
        fields += [k for k in d if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(dicts)
    return path


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: Sequence[ReportRow], skipped: Sequence[SkippedRun],
                   plots: Sequence[Path], notes: Sequence[str], path: Path) -> Path:
    n_runs = sum(len(r.runs) for r in rows)
    lines = ["# crl report", "",
             f"{n_runs} runs in {len(rows)} groups, {len(skipped)} skipped. Values: "
             f"{_ci_caption()}.", ""]
    for kind in _kinds(rows):
        cols = _kind_columns(kind)
        lines += [f"## {KIND_TITLES[kind]}", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in _cells(r)) + " |"
                  for r in rows if r.kind == kind]
        kind_notes = [f"- {_md(r.setting)} / {_md(r.method)}: {_md(n)}"
                      for r in rows if r.kind == kind for n in r.notes]
        if kind_notes:
            lines += ["", "Notes:", "", *kind_notes]
        lines.append("")
    if notes:
        lines += ["## Plot notes", "", *(f"- {_md(n)}" for n in notes), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    if skipped:
        lines += ["## Skipped runs", ""]
        lines += [f"- `{s.source}`: {_md(s.reason)}" for s in skipped]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def seed_band(values: np.ndarray, seed: int = BOOTSTRAP_SEED,
              n_resamples: int = N_RESAMPLES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its percentile-bootstrap band at every point, in one
    vectorised ``scipy.stats.bootstrap`` call (resamples in batches to bound memory)."""
    x = np.asarray(values, dtype=float)
    mean = x.mean(axis=0)
    kwargs: dict[str, Any] = {"confidence_level": CONFIDENCE, "n_resamples": n_resamples,
                              "method": "percentile", "vectorized": True, "axis": 0,
                              "batch": max(1, min(n_resamples, 2_000_000 // max(x.size, 1)))}
    try:
        res = scipy.stats.bootstrap((x,), np.mean, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = scipy.stats.bootstrap((x,), np.mean, random_state=np.random.default_rng(seed),
                                    **kwargs)
    low = np.minimum(np.asarray(res.confidence_interval.low, dtype=float), mean)
    high = np.maximum(np.asarray(res.confidence_interval.high, dtype=float), mean)
    return mean, low, high


def _band(label: str, x: np.ndarray, per_seed: np.ndarray) -> Band:
    if per_seed.shape[0] == 1:
        return Band(label, x, per_seed[0], None, None, 1)
    mean, low, high = seed_band(per_seed)
    return Band(label, x, mean, low, high, per_seed.shape[0])


def align(steps: Sequence[np.ndarray], values: Sequence[np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-seed series on common steps: as they are when every seed was evaluated at
    the same steps, else linearly interpolated onto the union of steps inside the range all
    seeds cover. ``values[i]`` has shape (len(steps[i]), ...) ; returns (steps, stacked)."""
    if all(s.shape == steps[0].shape and np.array_equal(s, steps[0]) for s in steps):
        return steps[0], np.stack(values)
    lo = max(int(s[0]) for s in steps)
    hi = min(int(s[-1]) for s in steps)
    grid = np.unique(np.concatenate(steps))
    grid = grid[(grid >= lo) & (grid <= hi)]
    out = []
    for s, v in zip(steps, values, strict=True):
        v2 = v.reshape(v.shape[0], -1)
        cols = [np.interp(grid, s, v2[:, j]) for j in range(v2.shape[1])]
        out.append(np.stack(cols, axis=1).reshape((grid.size, *v.shape[1:])))
    return grid, np.stack(out)


def _slug(*parts: str) -> str:
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "report"


def _bars_plot(rows: Sequence[ReportRow], path: Path, title: str) -> Path:
    kind = rows[0].kind
    panels = []
    for spec in METRICS[kind]:
        bars = []
        for r in rows:
            ci = r.metrics.get(spec.name)
            bars.append(Bar(r.method, np.nan, np.nan, np.nan, 0) if ci is None else
                        Bar(r.method, ci.mean, ci.low, ci.high, ci.n))
        panels.append((f"{spec.label} ({CONFIDENCE:.0%} CI)", bars))
    return plot_metric_bars(panels, path, title=title)


def _rl_plots(rows: Sequence[ReportRow], by_source: Mapping[str, RunData], out_dir: Path,
              slug: str, title: str, notes: list[str]) -> list[Path]:
    curves_by_method: list[MethodCurves] = []
    bands: list[Band] = []
    ref: RLCurves | None = None
    for row in rows:
        curves = []
        for src in row.runs:
            c = rl_curves(by_source[src])
            if c is None:
                notes.append(f"{title} / {row.method}: {src} has no evaluation record; left "
                             "out of the curves")
                continue
            if ref is None:
                ref = c
            if c.schedule != ref.schedule or c.stage_ends != ref.stage_ends:
                notes.append(f"{title} / {row.method}: {src} has another schedule or "
                             "budget than the first run; left out of the curves")
                continue
            curves.append(c)
        if not curves:
            continue
        steps, stacked = align([c.steps for c in curves], [c.scores for c in curves])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns stay nan
            mean_scores = np.nanmean(stacked, axis=0)
        curves_by_method.append(MethodCurves(row.method, steps, mean_scores, len(curves)))
        perf = stacked[:, :, ref.schedule].mean(axis=2)
        keep = np.all(np.isfinite(perf), axis=1)
        if not keep.all():
            notes.append(f"{title} / {row.method}: {int((~keep).sum())} run(s) have unknown "
                         "scores (missing score bounds); left out of the performance plot")
        if keep.any():
            bands.append(_band(row.method, steps, perf[keep]))
    paths = []
    if ref is not None and curves_by_method:
        paths.append(plot_task_curves_by_method(
            curves_by_method, ref.task_names, ref.schedule, ref.stage_ends,
            out_dir / f"{slug}_task_curves.png", title=f"{title}: per-task scores"))
    if bands and ref is not None:
        paths.append(plot_bands(
            bands, out_dir / f"{slug}_performance.png", xlabel="step",
            ylabel="average performance P(t)", boundaries=ref.stage_ends[:-1],
            title=f"{title}: average performance ({CONFIDENCE:.0%} CI band)"))
    return paths


def _sl_plots(rows: Sequence[ReportRow], by_source: Mapping[str, RunData], out_dir: Path,
              slug: str, title: str, notes: list[str]) -> list[Path]:
    matrices: list[tuple[str, np.ndarray, int]] = []
    bands: list[Band] = []
    names: list[str] | None = None
    for row in rows:
        mats = []
        for src in row.runs:
            got = sl_matrix(by_source[src])
            if got is None:
                if by_source[src].method != "joint":
                    notes.append(f"{title} / {row.method}: {src} has no accuracy matrix")
                continue
            R, run_names = got
            if names is None:
                names = run_names
            if R.shape[0] != len(names):
                notes.append(f"{title} / {row.method}: {src} has {R.shape[0]} tasks, the "
                             f"first run {len(names)}; left out of the matrices")
                continue
            mats.append(R)
        if not mats:
            continue
        stacked = np.stack(mats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            matrices.append((row.method, np.nanmean(stacked, axis=0), len(mats)))
        try:
            seen = np.stack([average_performance(R, seen_only=True) for R in mats])
        except ValueError as exc:
            notes.append(f"{title} / {row.method}: no accuracy curve ({exc})")
            continue
        bands.append(_band(row.method, np.arange(seen.shape[1]), seen))
    paths = []
    if matrices and names is not None:
        paths.append(plot_matrices_side_by_side(
            matrices, names, out_dir / f"{slug}_accuracy_matrices.png",
            title=f"{title}: accuracy matrices (mean over seeds)"))
    if bands and names is not None:
        paths.append(plot_bands(
            bands, out_dir / f"{slug}_accuracy.png", xlabel="after training task",
            ylabel="average accuracy on seen tasks", xticklabels=names,
            title=f"{title}: average accuracy ({CONFIDENCE:.0%} CI band)"))
    return paths


def _plasticity_values(series: Mapping[str, Sequence[float | None]], key: str
                       ) -> np.ndarray | None:
    """One run-level series: the named summary, or over a family's layers the mean (rank)
    or the root of the sum of squares (gradient norm)."""
    def arr(k: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in series[k]], dtype=float)

    if not key.endswith("/"):
        return arr(key) if key in series else None
    members = [arr(k) for k in series if k.startswith(key)]
    if not members:
        return None
    stacked = np.stack(members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if key.startswith("plasticity/grad_norm"):
            return np.sqrt(np.nansum(stacked**2, axis=0))
        return np.nanmean(stacked, axis=0)


def _plasticity_plots(rows: Sequence[ReportRow], by_source: Mapping[str, RunData],
                      out_dir: Path, slug: str, title: str, notes: list[str]) -> list[Path]:
    """One figure per plasticity metric: each method's mean over seeds (with its band)
    over steps, task boundaries dotted."""
    paths = []
    for name, label, key in PLASTICITY_SERIES:
        bands: list[Band] = []
        boundaries: list[int] = []
        for row in rows:
            steps, values = [], []
            for src in row.runs:
                run = by_source[src]
                hist = run.results.get("plasticity") or {}
                got = _plasticity_values(hist.get("series", {}), key)
                if got is None or not len(hist.get("steps", [])):
                    continue
                steps.append(np.asarray(hist["steps"], dtype=float))
                values.append(got.reshape(-1, 1))
                if not boundaries:  # RL: the stage ends; supervised: measured at task ends
                    curves = rl_curves(run) if run.kind == RL else None
                    ends = curves.stage_ends if curves is not None else hist["steps"]
                    boundaries = [int(b) for b in ends][:-1]
            if not steps:
                continue
            try:
                grid, stacked = align(steps, values)
            except ValueError as exc:
                notes.append(f"{title} / {row.method}: plasticity {name} not drawn ({exc})")
                continue
            bands.append(_band(row.method, grid, stacked[:, :, 0]))
        if bands:
            paths.append(plot_bands(
                bands, out_dir / f"{slug}_plasticity_{name}.png", xlabel="step",
                ylabel=label, boundaries=boundaries,
                title=f"{title}: {label} ({CONFIDENCE:.0%} CI band)"))
    return paths


def make_plots(rows: Sequence[ReportRow], runs: Sequence[RunData], out_dir: Path
               ) -> tuple[list[Path], list[str]]:
    """Per setting (kind, sequence/benchmark, agent): curves, bars, matrices; the notes say
    which runs could not be drawn and why."""
    by_source = {r.source: r for r in runs}
    comparisons: dict[tuple[str, str, str], list[ReportRow]] = {}
    for row in rows:
        comparisons.setdefault(row.comparison, []).append(row)
    paths: list[Path] = []
    notes: list[str] = []
    for (kind, setting, agent), members in comparisons.items():
        slug = _slug(kind, setting, agent)
        title = f"{setting} / {agent}" if agent else setting
        if kind == RL:
            paths += _rl_plots(members, by_source, out_dir, slug, title, notes)
        else:
            paths += _sl_plots(members, by_source, out_dir, slug, title, notes)
        paths += _plasticity_plots(members, by_source, out_dir, slug, title, notes)
        paths.append(_bars_plot(members, out_dir / f"{slug}_metrics.png", title))
    return paths, notes


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def default_out_dir(paths: Sequence[str | Path]) -> Path:
    """``report/`` next to the runs: in the folder given (or the parent of a run directory
    given), in the common parent of several; ``./report`` when they share none."""
    dirs = [Path(p).expanduser().resolve() for p in paths]
    if not dirs:
        return Path("report")
    bases = [d.parent if is_run_dir(d) else d for d in dirs]
    try:
        common = Path(os.path.commonpath([str(b) for b in bases]))
    except ValueError:
        return Path("report")
    if common == Path(common.anchor):
        return Path("report")
    return common / "report"


def report_runs(runs: Sequence[RunData], skipped: Sequence[SkippedRun], out_dir: Path, *,
                console: Console | None = None, plots: bool = True) -> ReportResult:
    """Aggregate, print, and write report.csv, report.md and the plots into ``out_dir``."""
    if not runs:
        listed = "; ".join(f"{s.source}: {s.reason}" for s in skipped) or "none"
        raise ReportError(f"no finished runs to report ({len(skipped)} skipped: {listed}); "
                          "finish or resume them first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs)
    plot_paths, notes = make_plots(rows, runs, out_dir) if plots else ([], [])
    csv_path = write_csv(rows, out_dir / "report.csv")
    md_path = write_markdown(rows, skipped, plot_paths, notes, out_dir / "report.md")
    console = console or Console()
    print_tables(rows, skipped, console)
    for note in notes:
        console.print(f"[yellow]plot note:[/] {escape(note)}", soft_wrap=True)
    return ReportResult(rows, csv_path, md_path, plot_paths, list(skipped), out_dir, notes)


def report(run_dirs: Sequence[Path], out_dir: Path, *, console: Console | None = None,
           wandb_group: str | None = None, plots: bool = True) -> ReportResult:
    """Report the runs in ``run_dirs`` (run directories or folders above them).

    ``wandb_group``: keep only the runs of that W&B group (the group in each run's
    wandb_run.json, i.e. the offline W&B runs of the group). Unfinished or failed runs are
    in ``ReportResult.skipped``; no run at all, or no finished one, raises ReportError.
    """
    runs, skipped = load_run_dirs(run_dirs, wandb_group=wandb_group)
    return report_runs(runs, skipped, out_dir, console=console, plots=plots)


def report_wandb(group: str, out_dir: Path, *, project: str | None = None,
                 entity: str | None = None, console: Console | None = None,
                 timeout_s: float = 30.0, plots: bool = True) -> ReportResult:
    """Report a W&B group read through the W&B API (online); fails within ``timeout_s`` per
    call with "W&B API unreachable: ..." where the API cannot be reached."""
    runs, skipped = load_wandb_group_online(group, project=project, entity=entity,
                                            timeout_s=timeout_s)
    return report_runs(runs, skipped, out_dir, console=console, plots=plots)
