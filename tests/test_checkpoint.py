"""crl.checkpoint (atomic writes, safe loads, config diffs, RNG states), RunTracker resume, and
every strategy's state surviving a checkpoint file bit for bit."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_hosts import TinyMultiHeadHost

import crl.checkpoint as ckpt
from crl.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_compatible,
    checkpoint_path,
    config_differences,
    generator_state,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_generator_state,
    set_rng_state,
)
from crl.strategies import make_strategy
from crl.tracking import RunTracker


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _payload() -> dict:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "updates": 7, "name": "ewc",
            "nested": {1: [1.5, None, True], "t": (2, "x")}, "blob": b"\x00\x01"}


# -- save / load -----------------------------------------------------------------------------
def test_round_trip_keeps_every_value_and_adds_the_format(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "last.pt"
    size = save_checkpoint(path, _payload())
    assert size == path.stat().st_size > 0
    state = load_checkpoint(path)
    assert state["format"] == CHECKPOINT_FORMAT
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert state["updates"] == 7 and state["name"] == "ewc" and state["blob"] == b"\x00\x01"
    assert state["nested"] == {1: [1.5, None, True], "t": (2, "x")}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


class Foreign:
    """A class no checkpoint may contain: weights_only must refuse to build it."""

    def __init__(self) -> None:
        self.x = 1


def _foreign_pickle(path: Path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "model": Foreign()}, path)


@pytest.mark.parametrize("damage", [_truncated, _random_bytes, _foreign_pickle],
                         ids=["truncated", "random-bytes", "foreign-class"])
def test_corrupt_checkpoint_is_a_checkpoint_error_and_stays_untouched(tmp_path, damage) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload())
    damage(path)
    before = _digest(path)
    with pytest.raises(CheckpointError, match=r"corrupt or not a crl checkpoint.*untouched"):
        load_checkpoint(path)
    assert _digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _RunsCode:
    """Unpickling this would call Path.touch(marker): arbitrary code on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_only_refuses_to_run_code_hidden_in_a_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    # the same file loaded without weights_only does run the code: the test is meaningful
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_foreign_and_other_format_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*without --resume"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a crl checkpoint \\(no 'format' entry\\)"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a crl checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": CHECKPOINT_FORMAT + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"format {CHECKPOINT_FORMAT + 1}.*crl version"):
        load_checkpoint(tmp_path / "future.pt")


def test_a_write_failing_midway_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _payload())
    before = _digest(path)
    real_save = torch.save

    def half_then_fail(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)  # the bytes reach the temporary file...
        fh.truncate(100)
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(ckpt.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "updates": 99})
    monkeypatch.undo()
    assert _digest(path) == before
    assert load_checkpoint(path)["updates"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # temporary file removed


# -- configuration differences ----------------------------------------------------------------
def test_config_differences_name_every_nested_key() -> None:
    saved = {"method": "ewc", "trainer": {"lr": 0.001, "epochs": 1}, "hidden": [400, 400],
             "group": None, "old": 1}
    now = {"method": "ewc", "trainer": {"lr": 0.01, "epochs": 1}, "hidden": [400, 200],
           "group": None, "new": 2}
    assert config_differences(saved, now) == [
        "hidden: [400, 400] in the checkpoint, [400, 200] now",
        "new: '<absent>' in the checkpoint, 2 now",
        "old: 1 in the checkpoint, '<absent>' now",
        "trainer.lr: 0.001 in the checkpoint, 0.01 now",
    ]
    assert config_differences(saved, now, ignore=("trainer.", "hidden", "old", "new")) == []
    assert config_differences({"hidden": (1, 2)}, {"hidden": [1, 2]}) == []  # YAML lists
    with pytest.raises(CheckpointError, match=r"(?s)Differences:\n  trainer.lr: 0.001.*0.01 now"):
        check_compatible(saved, now, ignore=("hidden", "old", "new"))
    check_compatible(saved, dict(saved))


# -- random number generators -----------------------------------------------------------------
def _draws() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())


def test_rng_states_survive_a_checkpoint_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_generator_states_of_numpy_and_torch_generators(tmp_path: Path) -> None:
    npg, tg = np.random.default_rng(5), torch.Generator().manual_seed(5)
    save_checkpoint(tmp_path / "g.pt", {"np": generator_state(npg), "t": generator_state(tg)})
    expected = (npg.random(4).tolist(), torch.rand(4, generator=tg).tolist())
    state = load_checkpoint(tmp_path / "g.pt")
    set_generator_state(npg, state["np"])
    set_generator_state(tg, state["t"])
    assert (npg.random(4).tolist(), torch.rand(4, generator=tg).tolist()) == expected


# -- RunTracker resume ------------------------------------------------------------------------
def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tracker_resume_cuts_metrics_back_to_the_checkpointed_rows(tmp_path: Path) -> None:
    with RunTracker(tmp_path, {"a": 1}, wandb_mode="disabled") as tr:
        for step in range(5):
            tr.log({"loss": float(step)}, step=step)
        assert tr.rows == 5
    # the checkpoint saw 3 rows; rows 3 and 4 were written after it and are redone
    with RunTracker(tmp_path, {"a": 1}, wandb_mode="disabled", resume_rows=3) as tr:
        assert tr.rows == 3
        tr.log({"loss": 30.0}, step=3)
        assert tr.rows == 4
    assert [r["loss"] for r in _rows(tmp_path)] == [0.0, 1.0, 2.0, 30.0]
    with pytest.raises(ValueError, match="has 4 rows but the checkpoint saw 9"):
        RunTracker(tmp_path, {"a": 1}, wandb_mode="disabled", resume_rows=9)


class _FakeRun:
    def __init__(self, run_id: str) -> None:
        self.id = run_id

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def test_tracker_resume_reuses_the_wandb_run_id(tmp_path: Path, monkeypatch) -> None:
    import wandb

    calls: list[dict] = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return _FakeRun(kwargs.get("id") or "firstid1")

    monkeypatch.setattr(wandb, "init", fake_init)
    with RunTracker(tmp_path, {"a": 1}, wandb_mode="offline") as tr:
        tr.log({"x": 1.0}, step=1)
    assert calls[0]["id"] is None and calls[0]["resume"] is None
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == "firstid1"
    with RunTracker(tmp_path, {"a": 1}, wandb_mode="offline", resume_rows=1):
        pass
    assert calls[1]["id"] == "firstid1" and calls[1]["resume"] == "allow"


# -- every strategy through a checkpoint file -------------------------------------------------
STRATEGIES = {
    "l2": {"lam": 0.5},
    "ewc": {"lam": 5.0},
    "ewc-online-sampled": {"lam": 5.0, "mode": "online", "gamma": 0.9, "fisher": "sampled"},
    "mas": {"lam": 1.0},
    "packnet": {"num_tasks": 3, "retrain_steps": 3},
    "agem": {"memory_per_task": 8, "batch_size": 6},
    "replay": {"memory_size": 20, "batch_size": 6, "task_balanced": True},
    "replay-distill": {"memory_size": 20, "batch_size": 6, "mode": "distill"},
}


def _steps(host, strategy, optimizer, task: int, n: int) -> list[float]:
    """``n`` updates on task ``task``'s batches (hooks in the contract's order)."""
    host.task = task
    losses = []
    batches = host.importance_batches()
    for k in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss = host.loss(batches[k % len(batches)])
        penalty = strategy.penalty()
        total = loss if penalty is None else loss + penalty
        total.backward()
        strategy.before_optimizer_step()
        optimizer.step()
        strategy.after_optimizer_step()
        losses.append(total.item())
    return losses


def _outputs(host, strategy) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for t in range(3):
            with strategy.evaluation(t):
                outs.append(host.logits(host.data[t]))
    return outs


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_strategy_state_survives_a_checkpoint_mid_task_bit_for_bit(label, tmp_path) -> None:
    """Train task 0, stop 3 updates into task 1, checkpoint (weights_only), and continue the
    original and a fresh copy built from the file: every loss, weight and evaluation output
    must be identical through the rest of the sequence."""
    method = label.split("-")[0]
    options = STRATEGIES[label]

    def build(seed: int):
        host = TinyMultiHeadHost([5, 8, 6], n_tasks=3, seed=seed)
        strategy = make_strategy(method, seed=0, **options).bind(host)
        return host, strategy, torch.optim.Adam(host.trained_parameters(), lr=0.05)

    host, strategy, opt = build(0)
    strategy.on_task_start(0)
    _steps(host, strategy, opt, 0, 4)
    strategy.on_task_end(0)
    strategy.on_task_start(1)
    _steps(host, strategy, opt, 1, 3)
    save_checkpoint(tmp_path / "s.pt", {"model": host.module.state_dict(),
                                        "optimizer": opt.state_dict(),
                                        "strategy": strategy.state_dict()})
    state = load_checkpoint(tmp_path / "s.pt")
    twin, twin_strategy, twin_opt = build(1)  # other initial weights: all must come from the file
    twin.data = host.data
    twin.module.load_state_dict(state["model"])
    twin_strategy.load_state_dict(state["strategy"])
    twin_opt.load_state_dict(state["optimizer"])

    amnesiac, fresh_strategy, amnesiac_opt = build(1)  # control: the state left out
    amnesiac.data = host.data
    amnesiac.module.load_state_dict(state["model"])
    amnesiac_opt.load_state_dict(state["optimizer"])
    fresh_strategy.on_task_start(1)

    runs = []
    for h, s, o in ((host, strategy, opt), (twin, twin_strategy, twin_opt),
                    (amnesiac, fresh_strategy, amnesiac_opt)):
        losses = _steps(h, s, o, 1, 3)
        s.on_task_end(1)
        s.on_task_start(2)
        losses += _steps(h, s, o, 2, 4)
        s.on_task_end(2)
        runs.append((losses, _outputs(h, s), h.module.state_dict()))
    (la, oa, wa), (lb, ob, wb), (lc, _, wc) = runs
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(oa, ob, strict=True))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # without the strategy's state the same model and optimiser continue differently
    assert la != lc and not all(torch.equal(wa[k], wc[k]) for k in wa)
