"""RL reproduction report: every method on the RL-fidelity sequences, over seeds, in the
multi-head (default) and the single-head setting, with the issue's checks.

Each sweep file (default: ``scripts/sweeps/classicmix-ppo-report.yaml`` and
``scripts/sweeps/mujocomix-sac-report.yaml``) holds the grid: methods x seeds x head
settings, with the RL defaults of ``agents/method_defaults.py`` (no method options given).
For each file the script

1. creates the single-task reference runs of every head setting (``crl reference``; cached,
   so a second invocation reuses them): forward transfer's baseline;
2. runs the sweep (``crl sweep``'s library: a second invocation skips finished runs and
   resumes unfinished ones from their checkpoints);
3. reports it with ``crl report`` (CSV + Markdown + plots under ``<sweep>/report``):
   performance P(T), forgetting, new-task gain and AUC forward transfer, mean and 90%
   percentile-bootstrap CI over seeds;
4. checks, per agent and head setting, the claims a user expects to see (PASS/FAIL, saved
   as ``checks.json`` beside the report):

   - finetune forgets: mean forgetting >= 0.3;
   - every method but A-GEM forgets less than finetune (its mean below finetune's CI low)
     while learning the new tasks (mean new-task gain >= half finetune's): no method "wins"
     by not learning;
   - PackNet, replay and bc (with and without ClonEx's exploration) forget <= 0.1 and end
     above finetune's final performance (mean);
   - bc with ClonEx's exploration reaches PackNet's final performance (mean; where the
     report holds several PackNet rows, e.g. more retraining steps, the best of them).

New-task gain: per task after the first, its end-of-task score (mean of the last k
evaluations of its window, as forgetting) minus its score when its training started
(``crl.metrics.new_task_gain_from_history``).

    python scripts/bench_forgetting.py                                  # both sequences
    python scripts/bench_forgetting.py scripts/sweeps/classicmix-ppo-report.yaml --num-cpus 2
    python scripts/bench_forgetting.py --check-only runs/sweeps/classicmix-ppo-report/report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEPS = (ROOT / "scripts/sweeps/classicmix-ppo-report.yaml",
                  ROOT / "scripts/sweeps/mujocomix-sac-report.yaml")
FINETUNE_FORGETTING = 0.3
#: methods that must keep the old tasks (forgetting <= KEEP_FORGETTING) and end above
#: finetune: PackNet (its default and every option variant in the report), replay, bc
#: (ClonEx-SAC's regulariser, from the strategies issue) and its ClonEx variants (random
#: actions among the candidates: --bc-clonex-random)
CLONEX_RANDOM = "bc (clonex=True, clonex_random=True)"
KEEPERS = ("packnet", "replay", "bc", "bc (clonex=True)", CLONEX_RANDOM)
KEEP_FORGETTING = 0.1
#: ClonEx-SAC (bc + exploration with the best earlier head) must reach PackNet's P(T) (its
#: best row in the report); each ClonEx variant in the report is checked on its own
CLONEX, CLONEX_BAR = ("bc (clonex=True)", CLONEX_RANDOM), "packnet"
UNCHECKED = ("finetune", "agem")


def make_references(sweep: Any) -> None:
    """`crl reference` once per distinct head setting of the sweep's override sets (the
    method and its options do not change a reference run)."""
    from crl.strategies import METHODS

    method_option = tuple(f"{m}_" for m in METHODS)
    done: list[dict[str, Any]] = []
    for override in sweep.overrides:
        options = {k: v for k, v in (sweep.base | override).items()
                   if k not in ("method", "seed", "run_path") and not k.startswith(method_option)}
        if options in done:
            continue
        done.append(options)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            yaml.safe_dump(options, fh)
        try:
            print(f"reference runs for {override or 'the base settings'} ...", flush=True)
            subprocess.run(["crl", "reference", "--config", fh.name, "--no-progress"],
                           check=True, cwd=os.getcwd())
        finally:
            os.unlink(fh.name)


def _float(v: str) -> float | None:
    return float(v) if v not in ("", None) else None


def load_rows(report_csv: Path) -> list[dict[str, Any]]:
    with report_csv.open() as fh:
        return list(csv.DictReader(fh))


def _setting(label: str) -> tuple[str, str]:
    """'ewc [multi_head=False]' -> ('ewc', 'multi_head=False'); plain labels -> ''."""
    if " [" in label and label.endswith("]"):
        method, _, rest = label.partition(" [")
        return method, rest[:-1]
    return label, ""


def check(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The claims, per (setting, agent, head setting)."""
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] != "rl":
            continue
        method, variant = _setting(r["method"])
        groups.setdefault((r["setting"], r["agent"], variant), {})[method] = r
    checks: dict[str, bool] = {}
    for (setting, agent, variant), by in groups.items():
        where = f"{setting} {agent.upper()}" + (f" [{variant}]" if variant else "")
        ft = by.get("finetune")
        if ft is None or _float(ft["forgetting"]) is None:
            checks[f"{where}: finetune has results"] = False
            continue
        ft_forg, ft_low = _float(ft["forgetting"]), _float(ft["forgetting_low"])
        ft_gain = _float(ft["new_task_gain"]) or 0.0
        ft_perf = _float(ft["performance"])
        checks[f"{where}: finetune forgets (mean {ft_forg:.3f} >= {FINETUNE_FORGETTING})"] = (
            ft_forg >= FINETUNE_FORGETTING)
        for method, r in by.items():
            if method in UNCHECKED:
                continue
            forg, gain = _float(r["forgetting"]), _float(r["new_task_gain"])
            perf = _float(r["performance"])
            if forg is None or gain is None:
                checks[f"{where}: {method} has results"] = False
                continue
            checks[f"{where}: {method} forgets less than finetune (mean {forg:.3f} < "
                   f"finetune's CI low {ft_low:.3f})"] = forg < ft_low
            checks[f"{where}: {method} learns the new tasks (gain {gain:.3f} >= half of "
                   f"finetune's {ft_gain:.3f})"] = gain >= 0.5 * ft_gain
            if method in KEEPERS or method.partition(" (")[0] == CLONEX_BAR:  # any PackNet
                checks[f"{where}: {method} forgets <= {KEEP_FORGETTING} (mean {forg:.3f})"] = (
                    forg <= KEEP_FORGETTING)
                checks[f"{where}: {method} ends above finetune (P(T) {perf:.3f} > "
                       f"{ft_perf:.3f})"] = perf is not None and perf > ft_perf
        # the bar is PackNet's best row in the report (its default and any option variant)
        bars = [(perf, m) for m, r in by.items()
                if m.partition(" (")[0] == CLONEX_BAR and (perf := _float(r["performance"]))
                is not None]
        if not bars:
            continue
        bar_perf, bar = max(bars)
        for label in CLONEX:
            clonex = by.get(label)
            if clonex is None:
                continue
            perf = _float(clonex["performance"])
            checks[f"{where}: {label} reaches {bar}'s final performance (P(T) "
                   f"{perf} >= {bar_perf})"] = perf is not None and perf >= bar_perf
    return checks


def print_checks(checks: dict[str, bool], out: Path) -> None:
    for claim, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}: {claim}")
    out.write_text(json.dumps(checks, indent=1))
    print(f"{sum(checks.values())} of {len(checks)} checks pass; written: {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="*", type=Path, default=list(DEFAULT_SWEEPS))
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs [all]")
    p.add_argument("--no-references", action="store_true",
                   help="skip step 1 (the references exist already)")
    p.add_argument("--check-only", type=Path, default=None, metavar="REPORT_DIR",
                   help="only check an existing report (its report.csv)")
    a = p.parse_args()
    if a.check_only is not None:
        print_checks(check(load_rows(a.check_only / "report.csv")), a.check_only / "checks.json")
        return 0
    sys.path.insert(0, str(ROOT))
    from crl.cli import command_options
    from crl.sweep import load_sweep, run_sweep

    for path in a.sweeps:
        sweep = load_sweep(path, options_for=command_options)
        print(f"== {path.name}: {len(sweep.runs)} runs under {sweep.sweep_dir}", flush=True)
        if not a.no_references:
            make_references(sweep)
        result = run_sweep(sweep, num_cpus=a.num_cpus)
        if result.report_dir is None:
            print(f"no report for {path.name}: {result.report_error}")
            continue
        print_checks(check(load_rows(result.report_dir / "report.csv")),
                     result.report_dir / "checks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
