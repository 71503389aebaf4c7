"""RunTracker: the local run directory and the W&B offline mirror (no network, no account)."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from crl.tracking import RunTracker


def _wandb_records(path: Path) -> list:
    """Records of an offline run's ``.wandb`` file.

    wandb 0.31 writes no files/config.yaml or wandb-summary.json offline; everything is in
    this file: a 7-byte header (":W&B", magic, version) followed by LevelDB-log chunks
    (crc32 u32, length u16, type u8; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in 32 KiB blocks,
    each record a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def _offline_file(run_dir: Path, run_id: str) -> Path:
    """The offline run's ``.wandb`` file, complete.

    ``run.finish()`` returns before wandb-core has flushed and closed the file (the stream's
    close is fire-and-forget); ``wandb.teardown()`` waits for the service to finish, as the
    atexit hook does when a training process ends.
    """
    import wandb

    wandb.teardown()
    (path,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return path


def _by_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _items(update_list) -> dict:  # noqa: ANN001 - protobuf repeated field
    return {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in update_list}


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
    blob = _offline_file(tmp_path, meta["id"]).read_bytes()
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


def test_offline_records_hold_config_history_summary_and_exit_code(tmp_path: Path) -> None:
    from crl.plots import plot_matrix_heatmap

    plt_png = plot_matrix_heatmap(np.eye(2), tmp_path / "img.png")
    config = {"method": "ewc", "lam": np.float32(0.5), "nested": {"k": 3}}
    with pytest.raises(KeyError):
        with RunTracker(tmp_path / "run", config, wandb_mode="offline", group="exp") as tr:
            tr.log({"loss": np.float64(0.25)}, step=5)
            tr.log({"loss": 0.125, "acc": np.float32(0.75)}, step=7)
            tr.log_image("picture", plt_png)
            tr.wandb_run.summary.update({"final_performance": 0.5, "forgetting": [0.1, 0.2]})
            raise KeyError("crash in training")
    meta = json.loads((tmp_path / "run" / "wandb_run.json").read_text())
    records = _wandb_records(_offline_file(tmp_path / "run", meta["id"]))
    (run,) = _by_type(records, "run")
    assert run.run_id == meta["id"] and run.run_group == "exp" and run.project == "crl"
    cfg = _items(run.config.update)
    assert (cfg["method"], cfg["lam"], cfg["nested"]) == ("ewc", 0.5, {"k": 3})
    history = [_items(h.item) for h in _by_type(records, "history")]
    rows = [(h["_step"], h.get("loss"), h.get("acc")) for h in history if "loss" in h]
    assert rows == [(5, 0.25, None), (7, 0.125, 0.75)]
    assert any("picture/path" in h or "picture" in h for h in history)
    summary = {}
    for rec in _by_type(records, "summary"):
        summary |= _items(rec.update)
    assert summary["final_performance"] == 0.5 and summary["forgetting"] == [0.1, 0.2]
    assert summary["loss"] == 0.125 and summary["acc"] == 0.75  # last logged values
    (exit_record,) = _by_type(records, "exit")
    assert exit_record.exit_code == 1  # the exception marked the run failed
    assert not (tmp_path / "run" / "results.json").exists()


def test_offline_finish_puts_results_in_summary_with_exit_code_0(tmp_path: Path) -> None:
    results = {"final_performance": np.float64(0.625), "forgetting": np.array([0.5, 0.25]),
               "table": [{"task": "a"}], "mean_forward_transfer": float("nan")}
    with RunTracker(tmp_path, {}, wandb_mode="offline") as tr:
        tr.finish(results)
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "final_performance": 0.625, "forgetting": [0.5, 0.25], "table": [{"task": "a"}],
        "mean_forward_transfer": None}
    meta = json.loads((tmp_path / "wandb_run.json").read_text())
    records = _wandb_records(_offline_file(tmp_path, meta["id"]))
    summary = {}
    for rec in _by_type(records, "summary"):
        summary |= _items(rec.update)
    assert summary["final_performance"] == 0.625 and summary["forgetting"] == [0.5, 0.25]
    assert "table" not in summary and "mean_forward_transfer" not in summary
    assert [e.exit_code for e in _by_type(records, "exit")] == [0]


class _BrokenRun:
    """A W&B run whose every call fails, as a dead wandb-core service would."""

    id = "broken01"
    finished = False

    def log(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise ConnectionError("wandb-core went away")

    @property
    def summary(self):  # noqa: ANN201
        raise ConnectionError("wandb-core went away")

    def finish(self, exit_code: int = 0) -> None:
        type(self).finished = True


def test_wandb_failures_never_stop_the_run(tmp_path: Path, monkeypatch) -> None:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: _BrokenRun())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RunTracker(tmp_path, {}, wandb_mode="offline") as tr:
            for step in range(3):
                tr.log({"x": step}, step=step)
            tr.log_matrix("m", np.eye(2), ["a", "b"], ["a", "b"])
            tr.finish({"x": 2})
    messages = [str(w.message) for w in caught]
    assert sum("W&B log failed" in m for m in messages) == 1  # one warning per kind of call
    assert any("W&B summary failed" in m for m in messages)
    assert _BrokenRun.finished  # finish still reached the run after the failures
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": s, "x": s} for s in range(3)]
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 2}
    assert (tmp_path / "plots" / "m.png").stat().st_size > 1000


def test_init_failing_in_every_mode_falls_back_to_local_only(tmp_path: Path, monkeypatch) -> None:
    import wandb

    def fail(**kwargs):  # noqa: ANN003, ANN202
        raise OSError(f"cannot start {kwargs['mode']}")

    monkeypatch.setattr(wandb, "init", fail)
    with pytest.warns(RuntimeWarning) as caught:
        tr = RunTracker(tmp_path, {"a": 1}, wandb_mode="online")
    messages = [str(w.message) for w in caught]
    assert any("online mode" in m and "trying offline" in m for m in messages)
    assert any("offline mode" in m and "locally only" in m for m in messages)
    assert tr.wandb_mode == "disabled" and tr.wandb_run is None
    tr.log({"x": 1.0}, step=1)
    tr.finish({"x": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "x": 1.0}\n'


def test_bad_calls_are_clear_errors(tmp_path: Path) -> None:
    tr = RunTracker(tmp_path, {}, wandb_mode="disabled")
    with pytest.raises(ValueError, match="'step' is reserved"):
        tr.log({"step": 3, "x": 1})
    with pytest.raises(FileNotFoundError, match="save the plot"):
        tr.log_image("missing", tmp_path / "nope.png")
    tr.finish({})
    with pytest.raises(RuntimeError, match="finished"):
        tr.log({"x": 1})


def test_heatmap_png_and_no_figure_leak(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from crl.plots import plot_matrix_heatmap

    before = plt.get_fignums()
    R = np.array([[0.9, np.nan, np.nan], [0.5, 0.8, np.nan], [0.4, 0.6, 0.95]])
    for i in range(5):  # repeated plotting, as after every task of a long run
        png = plot_matrix_heatmap(R, tmp_path / f"h{i}.png", ["a", "b", "c"], ["a", "b", "c"],
                                  title="accuracy")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plt.get_fignums() == before
    with pytest.raises(ValueError, match="one label per task"):
        plot_matrix_heatmap(R, tmp_path / "x.png", ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        plot_matrix_heatmap(np.zeros((2, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_matrix_heatmap(R, tmp_path / "x.pdf")
