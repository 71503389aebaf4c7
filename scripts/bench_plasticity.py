"""Loss-of-plasticity benchmark: long task sequences where finetune's end-of-task score falls,
and the plasticity interventions (L2 Init, Shrink & Perturb, ReDo, Continual Backprop) beside
it, 3 seeds, with the checks of the plasticity issue.

Each sweep file (default: ``scripts/sweeps/plasticity-pmnist.yaml``, supervised, and
``scripts/sweeps/plasticity-classicmix-ppo.yaml``, RL) holds the grid: methods x seeds. For
each file the script

1. runs the sweep (``crl sweep``'s library: a second invocation skips finished runs and
   resumes unfinished ones from their checkpoints);
2. reports it with ``crl report`` (CSV + Markdown + plots under ``<sweep>/report``): the
   plasticity slope (least-squares slope of the end-of-task scores over the task index) with
   its 90% bootstrap CI over seeds beside accuracy/performance and forgetting, and one plot
   per plasticity metric over time;
3. prints per method the mean end-of-task score of the first and last fifth of the tasks,
   the final dormant fraction, and the plasticity metrics' share of wall time;
4. checks (PASS/FAIL, ``checks.json`` beside the report): finetune's slope is below zero
   with its CI excluding zero, and at least one intervention keeps the score level (CI
   including zero or above) while it still learns: its mean end-of-task score over the
   tasks and seeds is at least finetune's. A method that stops learning keeps a flat, low
   score (L2 Init at λ 1 on CartPoleRotated20: slope CI [-0.001, 0.007] at a mean
   end-of-task score of 0.22 against finetune's 0.63); it has not kept plasticity.

    CRL_DATA_DIR=../shared/data/mnist-10k python scripts/bench_plasticity.py --num-cpus 2
    python scripts/bench_plasticity.py scripts/sweeps/plasticity-pmnist.yaml --num-cpus 2
    python scripts/bench_plasticity.py --check-only runs/sweeps/plasticity-pmnist
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEPS = (ROOT / "scripts/sweeps/plasticity-pmnist.yaml",
                  ROOT / "scripts/sweeps/plasticity-classicmix-ppo.yaml")
INTERVENTIONS = ("l2init", "snp", "redo", "cbp")


def _float(v: Any) -> float | None:
    return float(v) if v not in ("", None) else None


def check(rows: list[dict[str, Any]], learned: dict[str, float]) -> dict[str, bool]:
    """finetune's slope below zero (CI excludes 0); some intervention level (CI reaches 0)
    whose mean end-of-task score (``learned``, by report label) is at least finetune's."""
    by = {r["method"]: r for r in rows}  # labels: "redo", "l2init (lam=0.01)", ...
    checks: dict[str, bool] = {}
    ft = by.get("finetune")
    if ft is None or _float(ft.get("plasticity")) is None:
        return {"finetune has a plasticity slope": False}
    mean, high = _float(ft["plasticity"]), _float(ft["plasticity_high"])
    checks[f"finetune's end-of-task score falls (slope {mean:.2e}, CI high {high:.2e} < 0)"] = (
        high is not None and high < 0)
    bar = learned.get("finetune")
    if bar is None:  # runs older than end_of_task_score: nothing to compare learning with
        checks["finetune's end-of-task scores are in its results.json"] = False
    level, idle = [], []
    for m, r in by.items():
        if m.split(" ")[0] not in INTERVENTIONS or _float(r.get("plasticity_high")) is None:
            continue
        if _float(r["plasticity_high"]) >= 0:
            text = (f"{m} ({float(r['plasticity']):.2e} [{float(r['plasticity_low']):.2e}, "
                    f"{float(r['plasticity_high']):.2e}], mean end-of-task score "
                    f"{learned.get(m, float('nan')):.3f})")
            (level if bar is not None and learned.get(m, -1.0) >= bar else idle).append(text)
    need = "n/a" if bar is None else f"{bar:.3f}"
    claim = ("an intervention keeps the end-of-task score level (CI reaches 0) and learns "
             f"as well as finetune (mean end-of-task score >= {need}): "
             + (", ".join(level) if level else "none"))
    if idle:
        claim += "; level but learning less than finetune: " + ", ".join(idle)
    checks[claim] = bool(level)
    return checks


def mean_end_of_task(sweep_dir: Path) -> dict[str, float]:
    """Per report label (crl report's grouping): the mean end-of-task score over every task
    and seed, i.e. how well the method still learns each new task."""
    sys.path.insert(0, str(ROOT))
    from crl.report import build_rows
    from crl.report_sources import load_run_dirs

    runs, _ = load_run_dirs([sweep_dir])
    by_source = {r.source: r for r in runs}
    out = {}
    for row in build_rows(runs):
        ends = [float(np.mean(by_source[s].results["end_of_task_score"])) for s in row.runs
                if by_source[s].results.get("end_of_task_score")]
        if ends:
            out[row.method] = float(np.mean(ends))
    return out


def summary(sweep_dir: Path) -> str:
    """Per method: early and late end-of-task scores, final dormant fraction, time share."""
    per: dict[str, list[dict[str, Any]]] = {}
    for res in sorted(sweep_dir.glob("*/results.json")):
        r = json.loads(res.read_text())
        variant = re.sub(r"-seed\d+$", "", res.parent.name)  # the sweep's run name, no seed
        per.setdefault(variant, []).append(r)
    lines = ["| run | seeds | end-of-task score, first 1/5 of tasks | last 1/5 | "
             "dormant units at the end | plasticity metrics' share of wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, runs in per.items():
        ends = [np.asarray(r["end_of_task_score"], dtype=float) for r in runs
                if r.get("end_of_task_score")]
        if not ends:
            continue
        fifth = max(1, len(ends[0]) // 5)
        first = np.mean([e[:fifth].mean() for e in ends])
        last = np.mean([e[-fifth:].mean() for e in ends])
        dormant = np.mean([r["plasticity"]["series"]["plasticity/dormant"][-1] for r in runs])
        shares = []
        for r in runs:
            t = r.get("timings") or {}
            if "plasticity_share" in t:  # RL: measured by the loop
                shares.append(t["plasticity_share"])
            elif r.get("plasticity_seconds") is not None and r.get("seconds_total"):
                shares.append(r["plasticity_seconds"] / r["seconds_total"])
            elif "seconds" in r["plasticity"] and r.get("seconds_total"):  # earlier layout
                shares.append(r["plasticity"]["seconds"] / r["seconds_total"])
        share = f"{100 * np.mean(shares):.2f}%" if shares else "n/a"
        lines.append(f"| {method} | {len(runs)} | {first:.3f} | {last:.3f} | {dormant:.3f} | "
                     f"{share} |")
    return "\n".join(lines)


def print_checks(checks: dict[str, bool], out: Path) -> None:
    for claim, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}: {claim}")
    out.write_text(json.dumps(checks, indent=1))
    print(f"{sum(checks.values())} of {len(checks)} checks pass; written: {out}")


def report_rows(report_dir: Path) -> list[dict[str, Any]]:
    with (report_dir / "report.csv").open() as fh:
        return list(csv.DictReader(fh))


def finish(sweep_dir: Path, report_dir: Path) -> None:
    text = summary(sweep_dir)
    print(text)
    (report_dir / "plasticity_summary.md").write_text(text + "\n")
    print_checks(check(report_rows(report_dir), mean_end_of_task(sweep_dir)),
                 report_dir / "checks.json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="*", type=Path, default=list(DEFAULT_SWEEPS))
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs [all]")
    p.add_argument("--check-only", type=Path, default=None, metavar="SWEEP_DIR",
                   help="only summarise and check an existing sweep (its report/)")
    a = p.parse_args()
    if a.check_only is not None:
        report_dir = a.check_only / "report"
        if not (report_dir / "report.csv").is_file():
            raise SystemExit(f"{a.check_only} has no report ({report_dir / 'report.csv'}); "
                             f"make it with: crl report {a.check_only} --out {report_dir}")
        finish(a.check_only, report_dir)
        return 0
    sys.path.insert(0, str(ROOT))
    from crl.cli import command_options
    from crl.sweep import load_sweep, run_sweep

    for path in a.sweeps:
        sweep = load_sweep(path, options_for=command_options)
        print(f"== {path.name}: {len(sweep.runs)} runs under {sweep.sweep_dir}", flush=True)
        result = run_sweep(sweep, num_cpus=a.num_cpus)
        if result.report_dir is None:
            print(f"no report for {path.name}: {result.report_error}")
            continue
        finish(Path(sweep.sweep_dir), result.report_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
