"""The ``crl`` command: option resolution (defaults < YAML < command line), errors, comparisons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from crl.cli import _build_configs, _resolve, main

FAST = ["--hidden", "32", "--epochs", "1", "--batch-size", "64", "--no-progress",
        "--wandb", "disabled", "--no-download"]


def _params(**given):
    """All options of `crl supervised` as click passes them (None = not given)."""
    cmd = main.commands["supervised"]
    params = {p.name: None for p in cmd.params}
    params.update(given)
    return params


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "benchmark": "permuted-mnist", "tasks": 4, "lr": 0.5, "ewc": {"lam": 7, "mode": "online"},
        "mas-lam": 3,
    }))
    flat = _resolve(_params(config_file=str(cfg), tasks=6, ewc_lam=9.0, method="ewc"))
    (config,) = _build_configs(flat)
    assert config.benchmark == "permuted-mnist"  # from YAML
    assert config.tasks == 6  # command line beats YAML
    assert config.trainer.lr == 0.5  # YAML beats default
    assert config.trainer.batch_size == 128  # default
    assert config.method_options["ewc"] == {"lam": 9.0, "mode": "online"}
    assert config.method_options["mas"] == {"lam": 3}


def test_methods_and_seeds_expand_to_every_pair() -> None:
    configs = _build_configs(_resolve(_params(methods="finetune,ewc", seeds="0,1,2")))
    assert [(c.method, c.seed) for c in configs] == [
        ("finetune", 0), ("finetune", 1), ("finetune", 2), ("ewc", 0), ("ewc", 1), ("ewc", 2)
    ]


def test_unknown_yaml_key_lists_valid_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("benchmrk: split-mnist\n")
    with pytest.raises(ValueError, match=r"unknown config keys: benchmrk\. Valid keys: .*bench"):
        _resolve(_params(config_file=str(cfg)))


def test_bad_inputs_are_usage_errors(tiny_mnist_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["supervised", "--data-dir", str(tiny_mnist_dir), "--run-dir", str(tmp_path), *FAST]
    res = runner.invoke(main, [*base, "--method", "ewk"])
    assert res.exit_code == 2 and "unknown method 'ewk'" in res.output and "ewc" in res.output
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    res = runner.invoke(main, [*base, "--config", str(bad_yaml)])
    assert res.exit_code == 2 and "is not valid YAML" in res.output
    res = runner.invoke(main, [*base, "--tasks", "0"])
    assert res.exit_code == 2 and "--tasks" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(main, ["supervised", "--data-dir", str(empty), *FAST])
    assert res.exit_code == 2
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in res.output


def test_comparison_prints_a_table_and_writes_csv(tiny_mnist_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, [
        "supervised", "--benchmark", "split-mnist", "--scenario", "task-il", "--tasks", "2",
        "--methods", "finetune,l2", "--seeds", "0,1", "--data-dir", str(tiny_mnist_dir),
        "--run-dir", str(tmp_path), "--group", "g", *FAST,
    ])
    assert res.exit_code == 0, res.output
    assert "avg accuracy (90% CI)" in res.output and "forgetting (90% CI)" in res.output
    with (tmp_path / "g" / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["finetune", "l2"]
    assert all(r["seeds"] == "2" for r in rows)
    results = sorted((tmp_path / "g").glob("finetune-seed*/results.json"))
    accs = [json.loads(p.read_text())["avg_acc"] for p in results]
    assert len(accs) == 2
    assert float(rows[0]["avg_acc"]) == pytest.approx(sum(accs) / 2)
    assert float(rows[0]["avg_acc_lo"]) <= float(rows[0]["avg_acc"]) <= float(rows[0]["avg_acc_hi"])


def test_every_method_option_is_a_flag() -> None:
    names = {opt for p in main.commands["supervised"].params for opt in p.opts}
    for flag in ("--ewc-lam", "--ewc-mode", "--ewc-gamma", "--ewc-fisher", "--mas-lam",
                 "--l2-lam", "--packnet-retrain-steps", "--agem-memory-per-task",
                 "--replay-memory-size", "--replay-task-balanced", "--replay-mode"):
        assert flag in names
