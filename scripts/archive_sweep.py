"""Keep what a sweep measured in the repository: each finished run's ``config.yaml`` and
``results.json`` (a few KB; no checkpoints, no metrics rows) and the sweep's report, under
``scripts/results/<sweep name>/``. ``crl report scripts/results/<name>/runs`` rebuilds the
tables and plots from them; a sweep folder restored from it skips those runs.

    python scripts/archive_sweep.py ../runs/sweeps/classicmix-ppo-report
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("config.yaml", "results.json", "run.yaml")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--dest", type=Path, default=ROOT / "scripts" / "results")
    p.add_argument("--plots", default=None, metavar="GLOB",
                   help="also keep the report's plots matching GLOB (e.g. '*plasticity*.png')")
    a = p.parse_args()
    src = a.sweep_dir.resolve()
    if not (src / "sweep.yaml").is_file():
        raise SystemExit(f"{src} is not a sweep folder (no sweep.yaml); give out/<name> of a "
                         "crl sweep")
    dest = a.dest / src.name
    runs = dest / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "sweep.yaml", dest / "sweep.yaml")
    kept = 0
    for run in sorted(d for d in src.iterdir() if (d / "results.json").is_file()):
        out = runs / run.name
        out.mkdir(exist_ok=True)
        for name in KEEP:
            if (run / name).is_file():
                shutil.copy2(run / name, out / name)
        kept += 1
    for name in ("report.md", "report.csv", "checks.json", "plasticity_summary.md"):
        if (src / "report" / name).is_file():
            shutil.copy2(src / "report" / name, dest / name)
    plots = sorted(p for p in (src / "report").glob(a.plots) if p.is_file()) if a.plots else []
    if a.plots and not plots:
        raise SystemExit(f"no plot in {src / 'report'} matches {a.plots!r}; the runs and the "
                         "report were kept")
    if len({p.name for p in plots}) < len(plots):
        raise SystemExit(f"{a.plots!r} matches plots of the same name in different folders; "
                         "give a pattern without '**'")
    for plot in plots:
        shutil.copy2(plot, dest / plot.name)
    print(f"{kept} finished runs, the report of {src.name} and {len(plots)} plots kept in {dest}")


if __name__ == "__main__":
    main()
