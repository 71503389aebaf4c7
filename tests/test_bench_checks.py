"""The reproduction report's claims (scripts/bench_forgetting.py) on hand-made report rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """A benchmark script of scripts/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _script("bench_forgetting")


def row(method: str, perf: float, forg: float, gain: float, low: float | None = None) -> dict:
    return {"kind": "rl", "setting": "MujocoMix", "agent": "sac",
            "method": f"{method} [multi_head=True]", "performance": str(perf),
            "forgetting": str(forg), "forgetting_low": str(forg if low is None else low),
            "new_task_gain": str(gain)}


def test_claims_on_hand_made_rows(bench) -> None:
    rows = [row("finetune", 0.40, 0.60, 0.80, low=0.50), row("packnet", 0.90, 0.02, 0.70),
            row("ewc", 0.85, 0.05, 0.30),  # forgets less but learns under half of 0.80
            row("bc", 0.88, 0.08, 0.75), row("bc (clonex=True)", 0.89, 0.12, 0.78)]
    checks = bench.check(rows)
    where = "MujocoMix SAC [multi_head=True]"

    def verdict(start: str) -> bool:
        hits = [ok for claim, ok in checks.items() if claim.startswith(f"{where}: {start}")]
        assert len(hits) == 1, (start, list(checks))
        return hits[0]

    assert verdict("finetune forgets")
    assert verdict("ewc forgets less than finetune") and not verdict("ewc learns the new")
    assert verdict("bc forgets <= 0.1") and verdict("bc ends above finetune")
    assert not verdict("bc (clonex=True) forgets <= 0.1")  # 0.12
    assert not verdict("bc (clonex=True) reaches packnet")  # 0.89 < 0.90
    rows[-1] = row("bc (clonex=True)", 0.90, 0.05, 0.78)
    assert bench.check(rows)[f"{where}: bc (clonex=True) reaches packnet's final performance "
                             "(P(T) 0.9 >= 0.9)"]
    # the variant with random actions among ClonEx's candidates is checked on its own
    rows.append(row("bc (clonex=True, clonex_random=True)", 0.85, 0.02, 0.7))
    checks = bench.check(rows)
    assert verdict("bc (clonex=True, clonex_random=True) forgets <= 0.1")
    assert not verdict("bc (clonex=True, clonex_random=True) reaches packnet")  # 0.85
    assert verdict("bc (clonex=True) reaches packnet")
    # a PackNet row with other options that ends higher becomes the bar
    rows.append(row("packnet (retrain_steps=10000)", 0.95, 0.0, 0.7))
    rows.append(row("packnet (retrain_steps=10)", 0.20, 0.0, 0.7))
    checks = bench.check(rows)
    assert checks[f"{where}: bc (clonex=True) reaches packnet (retrain_steps=10000)'s final "
                  "performance (P(T) 0.9 >= 0.95)"] is False
    assert not verdict("bc (clonex=True) reaches packnet")
    # PackNet's variants are keepers like its default: each gets the keeper checks
    assert verdict("packnet (retrain_steps=10000) forgets <= 0.1")
    assert verdict("packnet (retrain_steps=10000) ends above finetune")
    assert not verdict("packnet (retrain_steps=10) ends above finetune")  # 0.20 < 0.40


def test_references_once_per_head_setting(bench, monkeypatch) -> None:
    calls: list[list[str]] = []
    written: list[str] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        written.append(Path(cmd[cmd.index("--config") + 1]).read_text())

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    sweep = SimpleNamespace(base={"agent": "sac", "sequence": "MujocoMix", "seed": 0},
                            overrides=[{"method": "bc", "multi_head": True},
                                       {"method": "bc", "bc_clonex": True, "multi_head": True},
                                       {"method": "ewc", "multi_head": False}])
    bench.make_references(sweep)
    assert len(calls) == 2  # the method and its options do not make another reference
    assert "multi_head: true" in written[0] and "multi_head: false" in written[1]
    assert all("bc_clonex" not in w and "method" not in w for w in written)


@pytest.fixture(scope="module")
def plasticity():
    return _script("bench_plasticity")


def slope_row(method: str, mean: float, low: float, high: float) -> dict:
    return {"method": method, "plasticity": str(mean), "plasticity_low": str(low),
            "plasticity_high": str(high)}


def test_plasticity_claims_need_a_level_intervention_that_still_learns(plasticity) -> None:
    rows = [slope_row("finetune", -0.013, -0.016, -0.009),
            slope_row("l2init (lam=1.0)", -0.002, -0.005, 0.001),  # level, learns little
            slope_row("snp (shrink=0.4)", -0.001, -0.002, -0.0004),  # learns, CI below 0
            slope_row("ewc", 0.0, -0.001, 0.001)]  # level, but not an intervention
    learned = {"finetune": 0.40, "l2init (lam=1.0)": 0.20, "snp (shrink=0.4)": 0.61,
               "ewc": 0.90}
    checks = plasticity.check(rows, learned)
    (falls, falls_ok), (level, level_ok) = checks.items()
    assert falls.startswith("finetune's end-of-task score falls") and falls_ok
    assert not level_ok and "none; level but learning less than finetune: l2init" in level
    assert "snp" not in level and "ewc" not in level
    learned["l2init (lam=1.0)"] = 0.40  # as well as finetune: it counts
    (_, _), (level, level_ok) = plasticity.check(rows, learned).items()
    assert level_ok and "score >= 0.400): l2init (lam=1.0)" in level
    rows[0] = slope_row("finetune", -0.001, -0.004, 0.002)  # CI reaches 0: no loss shown
    assert not next(iter(plasticity.check(rows, learned).values()))
    del learned["finetune"]  # no end-of-task scores to compare learning with: said so
    missing = plasticity.check(rows, learned)
    assert missing["finetune's end-of-task scores are in its results.json"] is False
