"""`crl report`: hand-made run directories with chosen numbers (means, bootstrap intervals, CSV,
Markdown, plots, skipped runs, W&B groups offline and through a fake API), and one end-to-end
run of two tiny real supervised runs through the CLI."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import yaml
from click.testing import CliRunner
from rich.console import Console

import crl.report as rep
import crl.report_sources as sources
from agents.method_defaults import RL_METHOD_DEFAULTS
from crl.cli import main
from crl.report import ReportError, align, default_out_dir, report, report_wandb, seed_band

PPO_EWC = RL_METHOD_DEFAULTS["ppo"]["ewc"]["lam"]
SAC_EWC = RL_METHOD_DEFAULTS["sac"]["ewc"]["lam"]

STEPS = [0, 50, 100, 150, 200]


def scipy_percentile_ci(values: list[float]) -> tuple[float, float]:
    """The interval the report must give: scipy's percentile bootstrap, 90%, seed 0."""
    res = scipy.stats.bootstrap((np.asarray(values),), np.mean, confidence_level=0.9,
                                n_resamples=10_000, method="percentile",
                                rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def write_rl_run(root: Path, name: str, *, method: str, seed: int, perf: float | None,
                 forgetting: float | None, ft: float | None,
                 scores: list[list[float]] | None = None,
                 method_options: dict[str, Any] | None = None, group: str = "Seq-sac",
                 sequence: str = "Seq", agent: str = "sac") -> Path:
    """A finished `crl train` run directory as the runner writes it (2 tasks of 100 steps)."""
    d = root / name
    d.mkdir(parents=True)
    config = {"sequence": sequence, "agent": agent, "method": method, "seed": seed,
              "method_options": method_options or {}, "run_dir": str(root), "group": None,
              "resolved_sequence": sequence, "tasks": ["a", "b"], "schedule": [0, 1],
              "steps_per_task_resolved": [100, 100], "agent_options": {"multi_head": True}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    scores = scores if scores is not None else [[0.0, 0.0]] * len(STEPS)
    rows = [{"step": s, "eval/0-a/score": sc[0], "eval/1-b/score": sc[1]}
            for s, sc in zip(STEPS, scores, strict=True)]
    rows.insert(1, {"step": 0, "task": 0, "stage": 0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"method": method, "agent": agent, "sequence": sequence, "seed": seed,
               "final_performance": perf, "mean_forgetting": forgetting,
               "mean_forward_transfer": ft,
               "eval": {"tasks": [0, 1], "steps": STEPS, "scores": scores}}
    if ft is None:
        results["forward_transfer_reason"] = "reference runs missing"
    (d / "results.json").write_text(json.dumps(results))
    (d / "wandb_run.json").write_text(json.dumps({"id": f"id{name}", "mode": "offline",
                                                  "project": "crl", "group": group,
                                                  "name": name}))
    return d


def write_sl_run(root: Path, name: str, *, method: str, seed: int, matrix: list[list[float]],
                 fwt: float, group: str = "split-mnist-task-il") -> Path:
    """A finished `crl supervised` run directory (2 tasks) with a chosen accuracy matrix."""
    d = root / name
    d.mkdir(parents=True)
    config = {"benchmark": "split-mnist", "scenario": None, "method": method, "seed": seed,
              "method_options": {}, "resolved_scenario": "task-il", "resolved_tasks": 2,
              "trainer": {"epochs": 1}, "hidden": [32]}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    R = np.asarray(matrix)
    names = ["digits 0/1", "digits 2/3"]
    rows = [{"step": 10 * (i + 1), **{f"eval/acc/{n}": float(R[i, j]) for j, n in
                                      enumerate(names)}, "task": i} for i in range(2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"method": method, "avg_acc": float(R[-1].mean()),
               "forgetting": float(R[0, 0] - R[1, 0]), "fwt": fwt,
               "accuracy_matrix": R.tolist()}
    (d / "results.json").write_text(json.dumps(results))
    (d / "wandb_run.json").write_text(json.dumps({"id": name, "group": group}))
    return d


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def assert_real_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    img = matplotlib.image.imread(path)
    pixels = img.reshape(-1, img.shape[-1])
    assert len(np.unique(pixels, axis=0)) > 20, f"{path} is (nearly) a single colour"


EWC_FORGETTING = [0.1, 0.2, 0.6]
EWC_PERF = [0.5, 0.7, 0.9]
EWC_FT = [0.0, 0.1, 0.5]


@pytest.fixture
def rl_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed in range(3):
        s = 0.2 * seed
        scores = [[0.0, 0.0], [0.5, 0.1], [0.8 + s / 4, 0.1], [0.4, 0.6], [0.3 + s, 0.9]]
        write_rl_run(root / "Seq-sac", f"ewc-seed{seed}", method="ewc", seed=seed,
                     perf=EWC_PERF[seed], forgetting=EWC_FORGETTING[seed], ft=EWC_FT[seed],
                     scores=scores, method_options={"ewc": {"lam": SAC_EWC}})
        write_rl_run(root / "Seq-sac", f"finetune-seed{seed}", method="finetune", seed=seed,
                     perf=0.4 + 0.01 * seed, forgetting=0.8 - 0.1 * seed, ft=None,
                     scores=[[0.1, 0.0]] * 2 + [[1.0, 0.0], [0.2, 0.5], [0.0, 1.0]])
    return root


# --------------------------------------------------------------------------------------------
def test_rl_means_and_intervals_equal_scipy_and_files(rl_runs: Path, tmp_path: Path) -> None:
    res = report([rl_runs], tmp_path / "out", console=quiet(), plots=False)
    # SAC_EWC is what `crl train` gives SAC's EWC when the user sets nothing: no label
    assert [r.method for r in res.rows] == ["finetune", "ewc"]
    ewc = res.rows[1]
    assert ewc.seeds == [0, 1, 2] and len(ewc.runs) == 3
    for name, values, mean in (("forgetting", EWC_FORGETTING, 0.3),
                               ("performance", EWC_PERF, 0.7),
                               ("forward_transfer", EWC_FT, 0.2)):
        ci = ewc.metrics[name]
        low, high = scipy_percentile_ci(values)
        assert ci.mean == pytest.approx(mean, abs=1e-12)
        assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
        assert ci.low < ci.mean < ci.high and ci.n == 3
    fin = res.rows[0]
    assert fin.metrics["forward_transfer"] is None
    assert any("forward transfer n/a for 3 of 3 runs: reference runs missing" in n
               for n in fin.notes)

    rows = read_csv(res.csv_path)
    assert [r["method"] for r in rows] == ["finetune", "ewc"]
    lo, hi = scipy_percentile_ci(EWC_FORGETTING)
    assert rows[1]["kind"] == "rl" and rows[1]["setting"] == "Seq" and rows[1]["agent"] == "sac"
    assert rows[1]["seeds"] == "0;1;2" and rows[1]["n_runs"] == "3"
    assert float(rows[1]["forgetting"]) == pytest.approx(0.3)
    assert float(rows[1]["forgetting_low"]) == pytest.approx(lo)
    assert float(rows[1]["forgetting_high"]) == pytest.approx(hi)
    assert rows[1]["forgetting_n"] == "3"
    assert rows[0]["forward_transfer"] == "" and rows[0]["forward_transfer_n"] == "0"
    assert float(rows[0]["performance"]) == pytest.approx(0.41)

    md = res.md_path.read_text()
    assert "## RL runs" in md and "## Supervised runs" not in md
    assert "| Seq | sac | ewc | 3 | 0.700 [" in md
    assert f"0.300 [{lo:.3f}, {hi:.3f}]" in md
    assert "| Seq | sac | finetune | 3 |" in md and "| n/a |" in md
    assert res.plot_paths == [] and "## Plots" not in md


def test_rl_plots_exist_and_curves_are_seed_means(rl_runs: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real_curves, real_bands = rep.plot_task_curves_by_method, rep.plot_bands

    def spy_curves(methods, *args, **kwargs):
        seen["curves"] = methods
        return real_curves(methods, *args, **kwargs)

    def spy_bands(lines, *args, **kwargs):
        seen["bands"] = lines
        return real_bands(lines, *args, **kwargs)

    monkeypatch.setattr(rep, "plot_task_curves_by_method", spy_curves)
    monkeypatch.setattr(rep, "plot_bands", spy_bands)
    res = report([rl_runs], tmp_path / "out", console=quiet())
    md = res.md_path.read_text()
    for p in res.plot_paths:
        assert f"![{p.stem}]({p.name})" in md
    names = sorted(p.name for p in res.plot_paths)
    assert names == ["rl-Seq-sac_metrics.png", "rl-Seq-sac_performance.png",
                     "rl-Seq-sac_task_curves.png"]
    for p in res.plot_paths:
        assert_real_png(p)
    ewc = next(m for m in seen["curves"] if m.label == "ewc")
    assert ewc.n_seeds == 3
    np.testing.assert_array_equal(ewc.steps, STEPS)
    # task a at the last evaluation: 0.3 + 0.2 * seed over seeds 0, 1, 2 -> mean 0.5
    assert ewc.scores[-1, 0] == pytest.approx(0.5)
    assert ewc.scores[2, 0] == pytest.approx(np.mean([0.8, 0.85, 0.9]))
    band = next(b for b in seen["bands"] if b.label == "ewc")
    # P(t) at the last evaluation: mean over seeds of (0.3 + 0.2 s + 0.9) / 2
    assert band.mean[-1] == pytest.approx(np.mean([(0.3 + 0.2 * s + 0.9) / 2 for s in range(3)]))
    assert band.low is not None and np.all(band.low <= band.mean + 1e-12)
    assert band.low[0] == band.high[0] == band.mean[0] == 0.0  # all seeds equal there


def test_single_seed_is_marked_and_has_no_interval(tmp_path: Path) -> None:
    write_rl_run(tmp_path / "r", "ewc-seed3", method="ewc", seed=3, perf=0.25,
                 forgetting=0.125, ft=0.5)
    res = report([tmp_path / "r"], tmp_path / "out", console=quiet(), plots=False)
    (row,) = res.rows
    ci = row.metrics["forgetting"]
    assert ci.single_seed and ci.mean == ci.low == ci.high == 0.125
    assert "0.125 (1 seed)" in res.md_path.read_text()
    (csv_row,) = read_csv(res.csv_path)
    assert csv_row["forgetting_low"] == csv_row["forgetting_high"] == "0.125"
    assert csv_row["forgetting_n"] == "1"


def test_unfinished_and_broken_runs_are_skipped_with_reasons(rl_runs: Path,
                                                             tmp_path: Path) -> None:
    unfinished = rl_runs / "Seq-sac" / "ewc-seed9-crashed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"sequence": "Seq", "agent": "sac",
                                                            "method": "ewc", "seed": 9}))
    (unfinished / "metrics.jsonl").write_text('{"step": 0}\n{"step": 5, "eval/0-a/sc')
    (unfinished / "checkpoints").mkdir()
    broken = write_rl_run(rl_runs, "broken", method="ewc", seed=8, perf=1, forgetting=1, ft=1)
    (broken / "results.json").write_text("{not json")
    console = quiet()
    res = report([rl_runs], tmp_path / "out", console=console, plots=False)
    reasons = {Path(s.source).name: s.reason for s in res.skipped}
    assert set(reasons) == {"ewc-seed9-crashed", "broken"}
    assert "no results.json" in reasons["ewc-seed9-crashed"]
    assert "resume" in reasons["ewc-seed9-crashed"]
    assert "results.json unreadable" in reasons["broken"]
    assert res.rows[1].seeds == [0, 1, 2]  # the skipped seeds 8 and 9 count nowhere
    md = res.md_path.read_text()
    assert "## Skipped runs" in md and "ewc-seed9-crashed" in md
    assert "skipped" in console.file.getvalue()


def test_method_options_and_other_settings_split_groups(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_rl_run(root, "a", method="ewc", seed=0, perf=0.5, forgetting=0.1, ft=0.0)
    write_rl_run(root, "b", method="ewc", seed=1, perf=0.6, forgetting=0.2, ft=0.0,
                 method_options={"ewc": {"lam": 100, "mode": "online"}, "l2": {"lam": 5}})
    write_rl_run(root, "c", method="ewc", seed=1, perf=0.6, forgetting=0.2, ft=0.0,
                 method_options={"ewc": {"lam": PPO_EWC}}, agent="ppo")  # PPO's default
    c = yaml.safe_load((root / "a" / "config.yaml").read_text())
    c["agent_options"]["multi_head"] = False
    (root / "a" / "config.yaml").write_text(yaml.safe_dump(c))
    write_rl_run(root, "d", method="ewc", seed=0, perf=0.7, forgetting=0.3, ft=0.0)
    write_rl_run(root, "e", method="ewc", seed=0, perf=0.9, forgetting=0.0, ft=0.0)
    res = report([root], tmp_path / "out", console=quiet(), plots=False)
    keys = [(r.agent, r.method, len(r.runs)) for r in res.rows]
    # a sweep override (here the heads) is another experiment, not another seed: own row
    assert keys == [("ppo", "ewc", 1), ("sac", "ewc (lam=100, mode=online)", 1),
                    ("sac", "ewc [multi_head=False]", 1), ("sac", "ewc [multi_head=True]", 2)]
    assert res.rows[2].metrics["performance"].mean == pytest.approx(0.5)
    assert res.rows[3].metrics["performance"].mean == pytest.approx(0.8)
    notes = " ".join(res.rows[3].notes)
    assert "seed(s) [0] appear more than once" in notes
    assert "settings differ" not in notes
    assert res.plot_paths == []


def test_a_field_older_runs_lack_counts_as_its_default(tmp_path: Path) -> None:
    """Runs made before a RunConfig field existed are the same setting as runs that hold its
    default value, and a different one from runs that changed it."""
    root = tmp_path / "r"
    for name, seed, plasticity in (("old", 0, None), ("new", 1, True), ("off", 2, False)):
        d = write_rl_run(root, name, method="ewc", seed=seed, perf=0.5, forgetting=0.1, ft=0.0)
        if plasticity is not None:
            c = yaml.safe_load((d / "config.yaml").read_text())
            c["plasticity"] = plasticity
            (d / "config.yaml").write_text(yaml.safe_dump(c))
    res = report([root], tmp_path / "out", console=quiet(), plots=False)
    assert sorted((r.method, sorted(r.seeds)) for r in res.rows) == [
        ("ewc [plasticity=False]", [2]), ("ewc [plasticity=True]", [0, 1])]


def test_an_agent_option_a_run_leaves_out_counts_as_the_agents_default(tmp_path: Path) -> None:
    """A run whose config leaves ``multi_head`` out ran multi-head (the agent's default): it
    groups with runs that say ``multi_head: true``, not with single-head ones."""
    root = tmp_path / "r"
    for name, seed, multi in (("bare", 0, None), ("said", 1, True), ("single", 2, False)):
        d = write_rl_run(root, name, method="ewc", seed=seed, perf=0.5, forgetting=0.1, ft=0.0)
        if multi is not None:
            c = yaml.safe_load((d / "config.yaml").read_text())
            c.setdefault("agent_options", {})["multi_head"] = multi
            (d / "config.yaml").write_text(yaml.safe_dump(c))
    res = report([root], tmp_path / "out", console=quiet(), plots=False)
    assert sorted((r.method, sorted(r.seeds)) for r in res.rows) == [
        ("ewc [multi_head=False]", [2]), ("ewc [multi_head=True]", [0, 1])]


def test_supervised_matrices_are_averaged_over_seeds(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sl"
    R = {("finetune", 0): [[1.0, 0.4], [0.5, 0.9]], ("finetune", 1): [[0.8, 0.6], [0.7, 0.95]],
         ("ewc", 0): [[0.9, 0.5], [0.85, 0.8]], ("ewc", 1): [[0.95, 0.5], [0.9, 0.9]]}
    for (m, s), matrix in R.items():
        write_sl_run(root, f"{m}-seed{s}", method=m, seed=s, matrix=matrix, fwt=0.1 * (s + 1))
    captured: dict[str, Any] = {}
    real = rep.plot_matrices_side_by_side

    def spy(matrices, names, *args, **kwargs):
        captured["matrices"], captured["names"] = matrices, names
        return real(matrices, names, *args, **kwargs)

    monkeypatch.setattr(rep, "plot_matrices_side_by_side", spy)
    res = report([root], tmp_path / "out", console=quiet())
    assert [r.method for r in res.rows] == ["finetune", "ewc"]
    assert res.rows[0].setting == "split-mnist (task-il, 2 tasks)"
    mats = {label: (M, n) for label, M, n in captured["matrices"]}
    np.testing.assert_allclose(mats["finetune"][0], [[0.9, 0.5], [0.6, 0.925]])
    np.testing.assert_allclose(mats["ewc"][0], [[0.925, 0.5], [0.875, 0.85]])
    assert mats["ewc"][1] == 2 and captured["names"] == ["digits 0/1", "digits 2/3"]
    fin = res.rows[0]
    assert fin.metrics["accuracy"].mean == pytest.approx((0.7 + 0.825) / 2)
    assert fin.metrics["forgetting"].mean == pytest.approx((0.5 + 0.1) / 2)
    lo, hi = scipy_percentile_ci([0.5, 0.1])
    assert (fin.metrics["forgetting"].low, fin.metrics["forgetting"].high) == pytest.approx(
        (lo, hi))
    assert fin.metrics["fwt"].mean == pytest.approx(0.15)
    assert sorted(p.name for p in res.plot_paths) == [
        "supervised-split-mnist_task-il_2_tasks_accuracy.png",
        "supervised-split-mnist_task-il_2_tasks_accuracy_matrices.png",
        "supervised-split-mnist_task-il_2_tasks_metrics.png"]
    for p in res.plot_paths:
        assert_real_png(p)
    rows = read_csv(res.csv_path)
    assert rows[0]["accuracy"] and "performance" not in rows[0]


def test_matrix_rebuilt_from_metric_rows_equals_results(tmp_path: Path) -> None:
    d = write_sl_run(tmp_path, "x", method="l2", seed=0, matrix=[[0.9, 0.2], [0.7, 0.8]],
                     fwt=0.0)
    run = sources.load_run_dir(d)
    R, names = sources.sl_matrix(run)
    run.results.pop("accuracy_matrix")  # as the W&B summary has it
    R2, names2 = sources.sl_matrix(run)
    np.testing.assert_array_equal(R, R2)
    assert names == names2 == ["digits 0/1", "digits 2/3"]


def test_mixed_kinds_get_separate_tables(rl_runs: Path, tmp_path: Path) -> None:
    write_sl_run(rl_runs / "sl", "finetune-seed0", method="finetune", seed=0,
                 matrix=[[1.0, 0.5], [0.5, 1.0]], fwt=0.0)
    console = quiet()
    res = report([rl_runs], tmp_path / "out", console=console, plots=False)
    assert [r.kind for r in res.rows] == ["rl", "rl", "supervised"]
    md = res.md_path.read_text()
    assert md.index("## RL runs") < md.index("## Supervised runs")
    assert "| benchmark | method | seeds | accuracy | forgetting | FWT |" in md
    text = console.file.getvalue()
    assert "RL runs" in text and "Supervised runs" in text
    rows = read_csv(res.csv_path)
    assert rows[2]["kind"] == "supervised" and rows[2]["performance"] == ""
    assert float(rows[2]["accuracy"]) == pytest.approx(0.75)


def test_bad_input_is_a_clear_error(tmp_path: Path, rl_runs: Path) -> None:
    with pytest.raises(ReportError, match=r"nowhere does not exist"):
        report([tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"no run directories .* found under .*empty"):
        report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ReportError, match=r"is not a directory"):
        report([tmp_path / "f.txt"], tmp_path / "out")
    with pytest.raises(ReportError, match=r"no run directories given"):
        report([], tmp_path / "out")
    lone = tmp_path / "lone" / "run"
    lone.mkdir(parents=True)
    (lone / "config.yaml").write_text("benchmark: split-mnist\n")
    (lone / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match=r"no finished runs to report \(1 skipped: .*no "
                                          r"results.json"):
        report([tmp_path / "lone"], tmp_path / "out")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(main, ["report", str(rl_runs), "--wandb-project", "p"])
    assert res.exit_code == 2 and "add --wandb-online" in res.output


def test_wandb_group_offline_selects_the_group(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_rl_run(root, "a0", method="ewc", seed=0, perf=0.5, forgetting=0.1, ft=0.0, group="A")
    write_rl_run(root, "a1", method="ewc", seed=1, perf=0.7, forgetting=0.3, ft=0.0, group="A")
    write_rl_run(root, "b0", method="ewc", seed=2, perf=0.1, forgetting=0.9, ft=0.0, group="B")
    res = report([root], tmp_path / "out", console=quiet(), wandb_group="A", plots=False)
    (row,) = res.rows
    assert row.seeds == [0, 1] and row.metrics["forgetting"].mean == pytest.approx(0.2)
    with pytest.raises(ReportError, match=r"no runs of W&B group 'C' .*groups found there: A, B"):
        report([root], tmp_path / "out", wandb_group="C")
    cli = CliRunner().invoke(main, ["report", "--wandb-group", "B", str(root), "--out",
                                    str(tmp_path / "cli"), "--no-plots"])
    assert cli.exit_code == 0, cli.output
    (csv_row,) = read_csv(tmp_path / "cli" / "report.csv")
    assert csv_row["seeds"] == "2" and float(csv_row["forgetting"]) == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------
# W&B API through a fake client
# --------------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, rid: str, config: dict, summary: dict, history: list[dict],
                 state: str = "finished") -> None:
        self.id, self.name, self.state = rid, f"run-{rid}", state
        self.config, self.summary, self._history = config, summary, history

    def scan_history(self):
        return iter(self._history)


class FakeApi:
    def __init__(self, runs: list[FakeRun], delay: float = 0.0) -> None:
        self._runs, self.delay, self.calls = runs, delay, []

    def runs(self, path: str, filters: dict | None = None):
        self.calls.append((path, filters))
        time.sleep(self.delay)
        return [r for r in self._runs if r.config.get("_group") == filters["group"]]


def fake_rl_run(rid: str, seed: int, forgetting: float, last_a: float) -> FakeRun:
    config = {"_group": "G", "sequence": "Seq", "agent": "sac", "method": "l2", "seed": seed,
              "method_options": {}, "resolved_sequence": "Seq", "tasks": ["a", "b"],
              "schedule": [0, 1], "steps_per_task_resolved": [100, 100]}
    summary = {"final_performance": (last_a + 1.0) / 2, "mean_forgetting": forgetting,
               "mean_forward_transfer": 0.1, "auc": [0.5, 0.5], "_runtime": 3.0}
    history = [  # W&B merges the rows logged at one step into one
        {"_step": 0, "eval/0-a/score": 0.0, "eval/1-b/score": 0.0, "task": 0, "stage": 0},
        {"_step": 50, "train/loss": 1.0},
        {"_step": 100, "eval/0-a/score": 1.0, "eval/1-b/score": 0.0, "task": 1, "stage": 1},
        {"_step": 200, "eval/0-a/score": last_a, "eval/1-b/score": 1.0},
    ]
    return FakeRun(rid, config, summary, history)


def test_wandb_api_runs_of_a_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi([fake_rl_run("r1", 0, 0.4, 0.6), fake_rl_run("r2", 1, 0.6, 0.4),
                   FakeRun("r3", {"_group": "G", "sequence": "Seq", "agent": "sac"}, {}, [],
                           state="crashed"),
                   fake_rl_run("other", 2, 0.0, 1.0)])
    api._runs[3].config["_group"] = "H"
    monkeypatch.setattr(sources, "make_wandb_api", lambda timeout_s: api)
    res = report_wandb("G", tmp_path / "out", project="proj", entity="ent", console=quiet(),
                       plots=False)
    assert api.calls == [("ent/proj", {"group": "G"})]
    (row,) = res.rows
    assert row.method == "l2" and row.seeds == [0, 1]
    assert row.runs == ["wandb:ent/proj/r1", "wandb:ent/proj/r2"]
    assert row.metrics["forgetting"].mean == pytest.approx(0.5)
    low, high = scipy_percentile_ci([0.4, 0.6])
    assert (row.metrics["forgetting"].low, row.metrics["forgetting"].high) == pytest.approx(
        (low, high))
    assert [(s.source, "crashed" in s.reason) for s in res.skipped] == [
        ("wandb:ent/proj/r3", True)]
    runs, _ = sources.load_wandb_group_online("G", project="proj", entity="ent")
    curves = sources.rl_curves(runs[0])  # rebuilt from the W&B history rows
    np.testing.assert_array_equal(curves.steps, [0, 100, 200])
    np.testing.assert_allclose(curves.scores, [[0, 0], [1, 0], [0.6, 1]])
    assert curves.stage_ends == [100, 200]
    assert runs[0].rows[0] == {"step": 0, "eval/0-a/score": 0.0, "eval/1-b/score": 0.0,
                               "task": 0, "stage": 0}
    assert all("train/loss" not in r for r in runs[0].rows)


def test_wandb_api_unreachable_is_a_clear_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(timeout_s: float):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sources, "make_wandb_api", refuse)
    with pytest.raises(ReportError, match=r"^W&B API unreachable: .*Name or service not known.*"
                                          r"pass run directories instead"):
        report_wandb("G", tmp_path / "out")
    slow = FakeApi([fake_rl_run("r1", 0, 0.4, 0.6)], delay=30.0)
    monkeypatch.setattr(sources, "make_wandb_api", lambda timeout_s: slow)
    t0 = time.monotonic()
    with pytest.raises(ReportError, match=r"W&B API unreachable: no answer .* within 0.3 s"):
        report_wandb("G", tmp_path / "out", timeout_s=0.3)
    assert time.monotonic() - t0 < 5.0

    class LazyRun(FakeRun):  # the real client loads config and summary over the network
        @property
        def config(self):
            time.sleep(30.0)

        @config.setter
        def config(self, value):
            pass

    lazy = FakeApi([LazyRun("r1", {}, {}, [])])
    lazy.runs = lambda path, filters=None: lazy._runs
    monkeypatch.setattr(sources, "make_wandb_api", lambda timeout_s: lazy)
    with pytest.raises(ReportError, match=r"no answer to reading run r1 within 0.3 s"):
        report_wandb("G", tmp_path / "out", timeout_s=0.3)
    assert time.monotonic() - t0 < 10.0
    monkeypatch.setattr(sources, "make_wandb_api", refuse)
    res = CliRunner().invoke(main, ["report", "--wandb-group", "G", "--wandb-online"])
    assert res.exit_code == 2 and "W&B API unreachable" in res.output
    monkeypatch.setattr(sources, "make_wandb_api", lambda timeout_s: FakeApi([]))
    with pytest.raises(ReportError, match=r"no W&B runs in group 'G' of project crl"):
        report_wandb("G", tmp_path / "out", project="crl")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_seed_band_is_a_bootstrap_interval_of_the_mean() -> None:
    x = np.array([[0.1, 0.5, 0.3], [0.2, 0.5, 0.9], [0.6, 0.5, 0.0], [0.3, 0.5, 0.4]])
    mean, low, high = seed_band(x)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    assert low[1] == high[1] == 0.5  # every seed equal: no spread
    for j in (0, 2):  # each point's band is that point's percentile bootstrap (own draws)
        lo, hi = scipy_percentile_ci(list(x[:, j]))
        assert low[j] == pytest.approx(lo, abs=0.03) and high[j] == pytest.approx(hi, abs=0.03)
        assert low[j] < mean[j] < high[j]


def test_align_interpolates_onto_common_steps() -> None:
    steps, stacked = align([np.array([0, 10, 20]), np.array([0, 5, 20])],
                           [np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [0.8], [2.0]])])
    np.testing.assert_array_equal(steps, [0, 5, 10, 20])
    np.testing.assert_allclose(stacked[:, :, 0], [[0, 0.5, 1, 2], [0, 0.8, 1.2, 2]])
    same, st = align([np.array([0, 1])] * 2, [np.zeros((2, 2)), np.ones((2, 2))])
    assert st.shape == (2, 2, 2) and list(same) == [0, 1]


def test_default_out_dir_is_next_to_the_runs(rl_runs: Path, tmp_path: Path) -> None:
    run = rl_runs / "Seq-sac" / "ewc-seed0"
    assert default_out_dir([rl_runs]) == rl_runs.resolve() / "report"
    assert default_out_dir([run]) == (rl_runs / "Seq-sac").resolve() / "report"
    other = tmp_path / "other"
    other.mkdir()
    assert default_out_dir([rl_runs, other]) == tmp_path.resolve() / "report"


# --------------------------------------------------------------------------------------------
# End to end: two tiny real supervised runs, then `crl report` through the CLI
# --------------------------------------------------------------------------------------------
def test_end_to_end_two_real_runs_through_the_cli(tiny_mnist_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, [
        "supervised", "--benchmark", "split-mnist", "--scenario", "task-il", "--tasks", "2",
        "--method", "finetune", "--seeds", "0,1", "--data-dir", str(tiny_mnist_dir),
        "--run-dir", str(tmp_path / "runs"), "--hidden", "32", "--epochs", "1",
        "--batch-size", "64", "--no-progress", "--wandb", "disabled", "--no-download"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["report", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "report"
    assert "Supervised runs" in res.output and str(out / "report.md") in res.output
    results = [json.loads(p.read_text()) for p in
               sorted((tmp_path / "runs").glob("*/finetune-seed*/results.json"))]
    assert len(results) == 2
    (row,) = read_csv(out / "report.csv")
    assert row["method"] == "finetune" and row["seeds"] == "0;1"
    accs = [r["avg_acc"] for r in results]
    assert float(row["accuracy"]) == pytest.approx(np.mean(accs))
    lo, hi = scipy_percentile_ci(accs)
    assert float(row["accuracy_low"]) == pytest.approx(lo)
    assert float(row["accuracy_high"]) == pytest.approx(hi)
    assert float(row["forgetting"]) == pytest.approx(np.mean([r["forgetting"] for r in results]))
    pngs = sorted(out.glob("*.png"))
    # matrices, accuracy, metric bars, and one figure per plasticity metric (4)
    assert len(pngs) == 7
    assert {p.name.rsplit("_plasticity_", 1)[-1] for p in pngs if "_plasticity_" in p.name} == {
        "dormant.png", "srank.png", "weight_abs.png", "grad_norm.png"}
    for p in pngs:
        assert_real_png(p)
    # the plasticity slope is a reported metric: mean of the runs' own
    assert float(row["plasticity"]) == pytest.approx(
        np.mean([r["plasticity_slope"] for r in results]))


def test_rl_labels_compare_with_the_agents_defaults(tmp_path: Path) -> None:
    """An RL run given the strength `crl train` uses anyway is the same method as one given
    nothing; the constructor's 1.0 is not PPO's default, so it is labelled."""
    assert PPO_EWC != 1.0
    root = tmp_path / "r"
    write_rl_run(root, "given", method="ewc", seed=0, perf=0.5, forgetting=0.1, ft=0.0,
                 method_options={"ewc": {"lam": PPO_EWC}}, agent="ppo")
    write_rl_run(root, "none", method="ewc", seed=1, perf=0.7, forgetting=0.1, ft=0.0,
                 agent="ppo")
    write_rl_run(root, "one", method="ewc", seed=0, perf=0.2, forgetting=0.1, ft=0.0,
                 method_options={"ewc": {"lam": 1.0}}, agent="ppo")
    res = report([root], tmp_path / "out", console=quiet(), plots=False)
    assert sorted((r.method, len(r.runs)) for r in res.rows) == [("ewc", 2),
                                                                 ("ewc (lam=1.0)", 1)]
