"""The defaults shown by `crl train --help`, `crl supervised --help` and `crl list methods`
are the ones runs resolve, per agent and for supervised runs."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from agents.config import RunConfig, resolve_sequence
from agents.factory import make_agent
from agents.method_defaults import RL_METHOD_DEFAULTS, rl_method_options
from crl.cli import main
from crl.config import method_options
from crl.supervised.experiment import SupervisedConfig, method_options_for

OPTIONS = [mo for mo in method_options() if mo.type in (int, float, str, bool)]


def _help_default(command: str, flag: str) -> str:
    out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    text = " ".join(out.split())  # undo click's wrapping
    mo = next(o for o in method_options() if o.flag == flag)
    m = re.search(rf"--{re.escape(flag)}[ /].*?{mo.method}: {mo.param} \[([^\]]*)\]", text)
    assert m, f"--{flag} not in `crl {command} --help`"
    assert "default: (" not in text  # no stray click show_default text
    return m.group(1)


def _show(v, mo=None) -> str:
    if mo is not None and mo.type is list and v is None:
        return "none: equal shares per task"
    return "none" if v is None else str(v)


@pytest.mark.parametrize("mo", OPTIONS, ids=lambda mo: mo.flag)
def test_supervised_help_default_is_what_a_run_resolves(mo):
    config = SupervisedConfig(benchmark="split-mnist", method=mo.method)
    resolved = method_options_for(config, 5)
    expected = resolved.get(mo.param, mo.default)
    assert _help_default("supervised", mo.flag) == _show(expected, mo)


@pytest.mark.parametrize("mo", OPTIONS, ids=lambda mo: mo.flag)
def test_train_help_default_is_what_each_agent_resolves(mo):
    shown = _help_default("train", mo.flag)
    for agent in RL_METHOD_DEFAULTS:
        value = rl_method_options(agent, mo.method).get(mo.param, mo.default)
        if mo.param == "max_samples" and value is None:
            assert "importance-samples" in shown
        elif all(rl_method_options(a, mo.method).get(mo.param, mo.default) == value
                 for a in RL_METHOD_DEFAULTS):
            assert shown == _show(value, mo)
        else:
            assert f"{agent.upper()} {_show(value)}" in shown


@pytest.mark.parametrize("agent", ["ppo", "sac"])
def test_the_strengths_shown_are_the_built_strategies(agent):
    """The help's numbers are the strategy objects' numbers in a real agent."""
    for method in ("l2", "ewc", "mas"):
        config = RunConfig(sequence="CartPoleSwap" if agent == "ppo" else "PendulumVariants",
                           agent=agent, method=method, wandb="disabled", progress=False)
        seq = resolve_sequence(config)
        env = seq.make_env(append_task_id=True)
        try:
            model = make_agent(config, env, seq)
        finally:
            env.close()
        shown = _help_default("train", f"{method}-lam")
        value = float(model.strategy.lam)
        assert value == RL_METHOD_DEFAULTS[agent][method]["lam"]
        assert f"{agent.upper()} {value}" in shown or shown == str(value)


def test_list_methods_shows_both_defaults_and_text_values():
    out = CliRunner().invoke(main, ["list", "methods"], terminal_width=200).output
    ewc = next(line for line in out.splitlines() if "--ewc-lam" in line)
    ppo, sac = (RL_METHOD_DEFAULTS[a]["ewc"]["lam"] for a in ("ppo", "sac"))
    assert "supervised: 10.0" in ewc and f"PPO {ppo}" in ewc and f"SAC {sac}" in ewc
    mode = next(line for line in out.splitlines() if "--ewc-mode" in line)
    assert "separate" in mode  # not swallowed as rich markup
    replay_mode = next(line for line in out.splitlines() if "--replay-mode" in line)
    assert "PPO distill" in replay_mode
    assert "--replay-mode [rehearsal|distill|buffer|balanced]" in replay_mode  # its words
    assert "--ewc-fisher [true|sampled|empirical]" in out


def test_single_head_defaults_replace_the_multi_head_ones(monkeypatch):
    """A strength calibrated for the single-head setting is what a --single-head run gets,
    and what --help and the report's labels compare with."""
    from agents import method_defaults

    monkeypatch.setitem(method_defaults.RL_SINGLE_HEAD_DEFAULTS["sac"], "l2", {"lam": 100.0})
    multi = rl_method_options("sac", "l2")
    assert multi == RL_METHOD_DEFAULTS["sac"]["l2"]
    assert rl_method_options("sac", "l2", agent_options={"multi_head": False}) == {"lam": 100.0}
    assert rl_method_options("sac", "l2", {"lam": 5.0}, {"multi_head": False}) == {"lam": 5.0}
    from crl.cli import method_default_text

    mo = next(o for o in method_options() if o.flag == "l2-lam")
    shown = method_default_text(mo, "train")  # what --help and crl list methods print
    assert f"SAC {_show(multi['lam'])} (single head 100.0)" in shown
