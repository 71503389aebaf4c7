"""PNG plots of continual-learning results.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas,
never through pyplot: nothing is registered in pyplot's global figure list, so long runs
that plot after every task cannot leak figures, and importing this module does not change
the user's interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crl.metrics import (
    EvalHistory,
    average_performance,
    check_matrix,
    forgetting_curve,
    performance_curve,
)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got {out}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=dpi)
    finally:
        fig.clear()
    return out


#: the figure helpers under public names, for the other plot modules (crl.report_plots)
new_figure = _new_figure
save_png = _save


def _labels(given: Sequence[str] | None, n: int, what: str) -> list[str]:
    if given is None:
        return [f"task {i}" for i in range(n)]
    labels = [str(x) for x in given]
    if len(labels) != n:
        raise ValueError(f"{what} must have one label per task ({n}), got {len(labels)}.")
    return labels


def plot_matrix_heatmap(
    R: np.ndarray,
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Annotated heatmap of R[i, j]: rows "after training task", columns "evaluated on task".

    Colours span [0, 1] when all values lie there (accuracies, normalised scores), else the
    data range; nan cells (tasks not evaluated) are left blank and marked "–".
    """
    M = check_matrix(R)
    T = M.shape[0]
    rows = _labels(row_labels, T, "row_labels")
    cols = _labels(col_labels, T, "col_labels")
    finite = M[np.isfinite(M)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        vmin, vmax = 0.0, 1.0
    elif finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
    else:
        vmin, vmax = 0.0, 1.0
    size = max(4.0, 0.6 * T + 2.5)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(T), cols, rotation=45, ha="right")
    ax.set_yticks(range(T), rows)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    if title:
        ax.set_title(title)
    fontsize = 9 if T <= 10 else 6
    for i in range(T):
        for j in range(T):
            v = M[i, j]
            if np.isfinite(v):
                frac = (v - vmin) / (vmax - vmin)
                color = "black" if frac > 0.6 else "white"  # readable on viridis
                text = f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
            else:
                color, text = "gray", "–"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    return _save(fig, path)


def plot_average_and_forgetting(
    R: np.ndarray,
    path: str | Path,
    task_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Two panels over the task sequence: average accuracy, and average forgetting.

    Left: mean over seen tasks (supervised "average accuracy") and, when the whole matrix is
    evaluated, mean over all tasks (CW's P). Right: :func:`crl.metrics.forgetting_curve`,
    the mean forgetting of the earlier tasks after each task (undefined after the first).
    """
    M = check_matrix(R)
    T = M.shape[0]
    labels = _labels(task_labels, T, "task_labels")
    x = np.arange(T)
    fig = _new_figure(10.0, 4.0)
    ax_acc, ax_fgt = fig.subplots(1, 2)
    ax_acc.plot(x, average_performance(M, seen_only=True), marker="o", label="seen tasks")
    if np.all(np.isfinite(M)):
        ax_acc.plot(x, average_performance(M), marker="s", ls="--", label="all tasks")
    ax_acc.set_title("average accuracy")
    ax_acc.set_ylabel("average score")
    ax_acc.legend()
    curve = forgetting_curve(M)
    ax_fgt.plot(x[1:], curve[1:], marker="o", color="tab:red")
    ax_fgt.axhline(0.0, color="gray", lw=0.8)
    ax_fgt.set_title("average forgetting of earlier tasks")
    ax_fgt.set_ylabel("forgetting")
    for ax in (ax_acc, ax_fgt):
        ax.set_xticks(x, labels, rotation=45, ha="right")
        ax.set_xlabel("after training task")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_task_curves(
    history: EvalHistory,
    path: str | Path,
    task_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Every task's score p_i(t) over the run, with task windows shaded and boundaries
    marked, plus the average performance P(t) as a dashed black line."""
    if not isinstance(history, EvalHistory):
        raise TypeError(f"plot_task_curves needs a crl.metrics.EvalHistory, got {type(history)}")
    names = _labels(task_names, history.n_tasks, "task_names")
    fig = _new_figure(11.0, 4.5)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(history.n_tasks)]
    for i in range(history.n_tasks):
        start, end = history.window(i)
        ax.axvspan(start, end, color=colors[i], alpha=0.08, lw=0)
        if i > 0:
            ax.axvline(start, color="gray", ls=":", lw=1)
        ax.plot(history.steps, history.scores[:, i], color=colors[i], label=names[i], lw=1.5)
    ax.plot(
        history.steps, performance_curve(history), color="black", ls="--", lw=2, label="average"
    )
    ax.set_xlim(min(history.task_starts[0], int(history.steps[0])), history.total_steps)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("score p_i(t)")
    if title:
        ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


#: the plasticity metric families, in panel order: (key prefix, panel title)
PLASTICITY_PANELS: tuple[tuple[str, str], ...] = (
    ("plasticity/dormant", "dormant units (fraction)"),
    ("plasticity/srank", "effective rank of features"),
    ("plasticity/weight_abs", "mean |w|"),
    ("plasticity/grad_norm", "gradient norm"),
)


def plot_plasticity(
    history: dict,
    boundaries: Sequence[int],
    path: str | Path,
    title: str | None = None,
) -> Path | None:
    """One panel per plasticity metric over steps (a line per layer or network, the run-level
    summary in black), with the task boundaries as vertical lines. ``history`` is
    :meth:`crl.plasticity.Probe.history`; None when nothing was measured."""
    steps = np.asarray(history.get("steps", []), dtype=float)
    series: dict[str, list] = history.get("series", {})
    if steps.size == 0 or not series:
        return None
    fig = _new_figure(11, 7)
    axes = fig.subplots(2, 2).ravel()
    for ax, (prefix, label) in zip(axes, PLASTICITY_PANELS, strict=True):
        for key in sorted(series):
            if key != prefix and not key.startswith(prefix + "/"):
                continue
            y = np.array([np.nan if v is None else v for v in series[key]], dtype=float)
            summary = key == prefix
            ax.plot(steps, y, color="black" if summary else None, lw=2.0 if summary else 1.0,
                    label="all layers" if summary else key[len(prefix) + 1:])
        for b in boundaries[:-1]:
            ax.axvline(b, color="grey", lw=0.8, ls="--")
        ax.set_title(label)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
