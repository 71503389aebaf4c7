"""The sweep files committed under scripts/sweeps/ are what the README and the closing notes
tell users to rerun: each must pass `crl sweep`'s own file check (options, grid, every run's
config as `crl train` / `crl supervised` would build it) with today's code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crl.cli import command_options
from crl.sweep import CommandOptions, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "scripts" / "sweeps").glob("*.yaml"))
#: Meta-World's CW sequences take ~45 s each to build for the per-run check: only their
#: options and grid are checked here (`crl sweep --dry-run FILE` checks the runs too)
SLOW = {"cw10-sac-protocol.yaml", "cw20-sac-protocol.yaml"}


def _is_sweep(path: Path) -> bool:
    """The *-base.yaml files are `crl train --config` files shared by sweeps, not sweeps."""
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and "command" in data


@pytest.mark.parametrize("path", [p for p in SWEEPS if _is_sweep(p)], ids=lambda p: p.name)
def test_committed_sweep_file_passes_the_sweep_check(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # their relative paths (../runs, ../shared) are from the repo root
    data_dir = (yaml.safe_load(path.read_text()).get("base") or {}).get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        pytest.skip(f"{path.name} reads MNIST from {data_dir}, absent here")

    def options_for(command: str) -> CommandOptions:
        real = command_options(command)
        return CommandOptions(real.params, (lambda flat: None) if path.name in SLOW
                              else real.check)

    config = load_sweep(path, options_for=options_for)
    assert config.runs, f"{path.name} expands to no runs"
    assert len({r.run_id for r in config.runs}) == len(config.runs)


def test_the_check_catches_a_bad_committed_value(tmp_path: Path, monkeypatch) -> None:
    """The check above is not vacuous: a committed file whose options are all valid but
    whose runs cannot be built (SAC on ClassicMix's discrete actions) fails it, through the
    per-run check that `crl train` itself makes."""
    from crl.sweep import SweepConfigError

    monkeypatch.chdir(ROOT)
    data = yaml.safe_load((ROOT / "scripts/sweeps/classicmix-ppo-report.yaml").read_text())
    data["base"]["agent"] = "sac"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SweepConfigError, match="continuous"):
        load_sweep(bad, options_for=command_options)
