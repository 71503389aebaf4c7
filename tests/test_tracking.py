"""RunTracker: the local run directory and the W&B offline mirror (no network, no account)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from crl.tracking import RunTracker


@pytest.fixture(autouse=True)
def _no_wandb_account(monkeypatch, tmp_path) -> None:
    """No API key, no user settings: the tests see what a fresh machine sees."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_disabled_run_directory_has_config_metrics_results(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {"method": "ewc", "lam": np.float64(0.5), "hidden": (4, 3)}
    with RunTracker(run, config, wandb_mode="disabled") as tr:
        tr.log({"loss": np.float32(1.5)}, step=10)
        tr.log({"acc": 0.25, "bad": float("nan")}, step=20)
        tr.finish({"avg_acc": np.float64(0.75), "matrix": np.eye(2)})
        tr.finish({"avg_acc": 0.0})  # idempotent: the first results stay
    assert yaml.safe_load((run / "config.yaml").read_text()) == {
        "method": "ewc", "lam": 0.5, "hidden": [4, 3]
    }
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 1.5}, {"step": 20, "acc": 0.25, "bad": None}]
    assert json.loads((run / "results.json").read_text()) == {
        "avg_acc": 0.75, "matrix": [[1.0, 0.0], [0.0, 1.0]]
    }
    assert not (run / "wandb").exists() and not (run / "wandb_run.json").exists()
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_metrics_file_is_appended_across_trackers(tmp_path: Path) -> None:
    for step in (1, 2):
        with RunTracker(tmp_path, {}, wandb_mode="disabled") as tr:
            tr.log({"x": step}, step=step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["x"] for x in lines] == [1, 2]


def test_exception_inside_marks_run_failed_without_results(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker(tmp_path, {}, wandb_mode="disabled") as tr:
            tr.log({"x": 1})
            raise RuntimeError("boom")
    assert tr.finished
    assert not (tmp_path / "results.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"x": 1}'


def test_offline_run_mirrors_config_metrics_matrix_and_summary(tmp_path: Path) -> None:
    R = np.array([[0.9, 0.1], [0.4, 0.8]])
    with RunTracker(tmp_path, {"benchmark": "split-mnist"}, wandb_mode="offline",
                    group="g", name="n") as tr:
        assert tr.wandb_mode == "offline"
        tr.log({"eval/avg_acc": 0.6}, step=3)
        png = tr.log_matrix("accuracy_matrix", R, ["t0", "t1"], ["t0", "t1"])
        tr.finish({"avg_acc": 0.6, "final_performance_marker": 0.123})
    assert png.stat().st_size > 1000
    meta = json.loads((tmp_path / "wandb_run.json").read_text())
    assert meta["mode"] == "offline" and meta["group"] == "g" and len(meta["id"]) >= 8
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{meta['id']}")
    (table,) = offline.glob("files/media/table/accuracy_matrix/*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["after task", "t0", "t1"]
    assert content["data"] == [["t0", 0.9, 0.1], ["t1", 0.4, 0.8]]
    assert list(offline.glob("files/media/images/accuracy_matrix/*.png"))
    # config, history and summary live in the run's protobuf log: the keys are in it verbatim
    blob = (offline / f"run-{meta['id']}.wandb").read_bytes()
    for key in (b"benchmark", b"split-mnist", b"eval/avg_acc", b"final_performance_marker"):
        assert key in blob


def test_online_without_account_falls_back_to_offline_with_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = RunTracker(tmp_path, {}, wandb_mode="online")
    tr.log({"x": 1.0}, step=1)
    tr.finish({"x": 1.0})
    assert tr.wandb_mode == "offline"
    assert any("could not start in online mode" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 1.0}


def test_unknown_mode_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offline, online, disabled"):
        RunTracker(tmp_path, {}, wandb_mode="offlne")


def test_plots_are_written_and_reject_bad_input(tmp_path: Path) -> None:
    from crl.metrics import EvalHistory
    from crl.plots import plot_average_and_forgetting, plot_task_curves

    history = EvalHistory(
        steps=np.array([0, 50, 100, 150, 200]),
        scores=np.array([[0.0, 0.0], [0.5, 0.1], [1.0, 0.2], [0.6, 0.7], [0.4, 1.0]]),
        task_starts=[0, 100],
        total_steps=200,
    )
    curves = plot_task_curves(history, tmp_path / "curves.png", ["a", "b"], title="t")
    both = plot_average_and_forgetting(np.array([[0.9, 0.1], [0.4, 0.8]]), tmp_path / "m.png")
    for png in (curves, both):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(TypeError, match="EvalHistory"):
        plot_task_curves(np.zeros((2, 2)), tmp_path / "x.png")
