"""The layers' arrows point one way: no import cycle in crl/, envs/ or agents/ (lazy imports
inside functions count), and nothing below the command line imports it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" /
                                                  "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle_and_no_import_of_the_cli_from_below() -> None:
    g = _graph_module()
    edges = g.graph()
    assert "agents.runner" in edges and "crl.cli" in edges and "envs.continual" in edges
    assert g.cycles(edges) == []
    assert g.forbidden(edges) == []


def test_the_checker_finds_a_cycle_and_a_forbidden_import() -> None:
    """The checker itself: a made-up graph with a lazy-import cycle and a strategy that
    imports the CLI is reported."""
    g = _graph_module()
    edges = {"envs.sequence": {"envs.continual"}, "envs.continual": {"envs.sequence"},
             "crl.strategies.ewc": {"crl.cli"}, "crl.cli": {"crl.strategies.ewc"}}
    assert sorted(map(tuple, g.cycles(edges))) == [("crl.cli", "crl.strategies.ewc"),
                                                    ("envs.continual", "envs.sequence")]
    assert g.forbidden(edges) == [("crl.strategies.ewc", "crl.cli")]
