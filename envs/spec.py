"""Task specifications: what one task of a sequence is, in a picklable, YAML-friendly form.

A :class:`TaskSpec` names a registered Gymnasium env id plus keyword arguments and a chain of
wrappers. Wrappers are named (a short name from :data:`envs.wrappers.WRAPPERS`, any class in
``gymnasium.wrappers``, or an import path ``"package.module:attr"``) rather than held as
objects, so that a spec survives pickling into ``AsyncVectorEnv``/``SubprocVecEnv`` workers
and can be written in a YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from envs.errors import EnvConfigError, MissingExtraError

SCORE_KINDS = ("return", "success")

WrapperTarget = str | Callable[..., gym.Env]


@dataclass(frozen=True)
class WrapperSpec:
    """One wrapper of a task: ``target(env, **kwargs)``.

    ``target`` is a name resolved by :func:`resolve_wrapper` or a module-level callable
    (module-level so that it pickles). The callable may return a new wrapper or the same
    env after changing it in place (physics perturbations do that: no per-step cost).
    """

    target: WrapperTarget
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        fn = resolve_wrapper(self.target)  # fail at definition time, not in a worker process
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature: checked when applied
            return
        try:
            sig.bind(None, **self.kwargs)
        except TypeError as exc:
            params = [n for n in list(sig.parameters)[1:]
                      if sig.parameters[n].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                        inspect.Parameter.VAR_KEYWORD)]
            unknown = [k for k in self.kwargs if k not in sig.parameters]
            close = {k: difflib.get_close_matches(k, params, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise EnvConfigError(
                f"Wrapper {self.name!r}: bad arguments {dict(self.kwargs)} ({exc}). It takes: "
                f"{', '.join(params) or 'no arguments'}." + (f" {hint}" if hint else "")
            ) from None

    @property
    def name(self) -> str:
        t = self.target
        return t if isinstance(t, str) else getattr(t, "__name__", repr(t))

    def apply(self, env: gym.Env) -> gym.Env:
        return resolve_wrapper(self.target)(env, **self.kwargs)


def resolve_wrapper(target: WrapperTarget) -> Callable[..., gym.Env]:
    """Turn a wrapper name into the callable; unknown names raise :class:`EnvConfigError`."""
    if callable(target):
        return target
    if not isinstance(target, str) or not target:
        raise EnvConfigError(
            f"A wrapper must be a name or a callable, got {target!r}. Use e.g. "
            "'TimeLimit', 'flip_observation' or 'my_package.my_module:MyWrapper'."
        )
    from envs.wrappers import WRAPPERS  # local: wrappers imports nothing from here at import

    if target in WRAPPERS:
        return WRAPPERS[target]
    if ":" in target:
        module_name, _, attr = target.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise EnvConfigError(
                f"Cannot import wrapper {target!r}: {exc}. Give 'package.module:attribute' "
                "of an importable callable."
            ) from exc
        if not callable(obj):
            raise EnvConfigError(f"Wrapper {target!r} is not callable.")
        return obj
    gym_wrapper = getattr(gym.wrappers, target, None)
    if isinstance(gym_wrapper, type) and issubclass(gym_wrapper, gym.Wrapper):
        return gym_wrapper
    known = sorted(WRAPPERS) + [
        n for n in dir(gym.wrappers) if isinstance(getattr(gym.wrappers, n), type)
    ]
    close = difflib.get_close_matches(target, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise EnvConfigError(
        f"Unknown wrapper {target!r}.{hint} Known names: {', '.join(sorted(WRAPPERS))}, any "
        "class in gymnasium.wrappers, or an import path 'package.module:attribute'."
    )


def _as_wrapper(w: WrapperSpec | WrapperTarget | tuple) -> WrapperSpec:
    if isinstance(w, WrapperSpec):
        return w
    if isinstance(w, tuple) and len(w) == 2 and isinstance(w[1], Mapping):
        return WrapperSpec(w[0], w[1])
    return WrapperSpec(w)


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to build its env and how to normalise its score.

    ``low``/``high`` are the return bounds for the normalised score
    ``(R - low) / (high - low)``; ``None`` means "measure them" (random policy and the
    single-task reference run, see docs/ARCHITECTURE.md, "Metrics"). ``requires`` lists
    modules to import before ``gymnasium.make`` (they register the env ids, e.g. ``ale_py``);
    ``extra`` names the ``crl`` extra that installs them, for the error message.
    """

    env_id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    wrappers: Sequence[WrapperSpec] = ()
    name: str = ""
    low: float | None = None
    high: float | None = None
    requires: Sequence[str] = ()
    extra: str | None = None
    #: where configured bounds come from, said beside the scores (e.g. "human-normalised")
    score_basis: str = ""
    #: how the task is scored: "return" (normalised between low and high) or "success"
    #: (the success rate of ``info["success"]``, Meta-World's as in Continual World)
    score_kind: str = "return"

    def __post_init__(self) -> None:
        if not isinstance(self.env_id, str) or not self.env_id:
            raise EnvConfigError(
                f"TaskSpec.env_id must be a non-empty string, got {self.env_id!r}."
            )
        if not isinstance(self.kwargs, Mapping):
            raise EnvConfigError(
                f"TaskSpec.kwargs of {self.env_id!r} must be a mapping, got {self.kwargs!r}."
            )
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "wrappers", tuple(_as_wrapper(w) for w in self.wrappers))
        object.__setattr__(self, "requires", tuple(self.requires))
        if self.score_kind not in SCORE_KINDS:
            raise EnvConfigError(
                f"TaskSpec {self.env_id!r}: score_kind must be one of {SCORE_KINDS}, got "
                f"{self.score_kind!r}."
            )
        if not self.name:
            object.__setattr__(self, "name", self.env_id)
        for bound_name in ("low", "high"):
            v = getattr(self, bound_name)
            if v is not None and (not isinstance(v, int | float) or not math.isfinite(v)):
                raise EnvConfigError(
                    f"Task {self.name!r}: {bound_name} must be a finite number or None, got {v!r}."
                )
        if self.low is not None and self.high is not None and not self.high > self.low:
            raise EnvConfigError(
                f"Task {self.name!r}: score bounds need high > low, got low={self.low}, "
                f"high={self.high}."
            )

    # -- building --------------------------------------------------------------------------
    def import_requirements(self) -> None:
        """Import the modules that register this task's env id; a missing one names the extra."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                extra = self.extra or module
                raise MissingExtraError(
                    f"Task {self.name!r} ({self.env_id}) needs the module {module!r}, which is "
                    f'not installed: pip install "crl[{extra}]" ({exc}).'
                ) from exc

    def requirements_available(self) -> bool:
        try:
            self.import_requirements()
        except MissingExtraError:
            return False
        return True

    def check_env_id(self) -> None:
        """Raise :class:`EnvConfigError` if the env id is not registered with Gymnasium."""
        self.import_requirements()
        if self.env_id in gym.registry:
            return
        close = difflib.get_close_matches(self.env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise EnvConfigError(
            f"Unknown env id {self.env_id!r} in task {self.name!r}.{hint} The id must be "
            "registered with Gymnasium (see gymnasium.pprint_registry()); Atari ids need the "
            "atari extra, MuJoCo ids the mujoco extra."
        )

    def make(
        self, render_mode: str | None = None, *, lean: bool = False, **overrides: Any
    ) -> gym.Env:
        """Build the task's env: ``gymnasium.make(env_id, **kwargs)`` then the wrappers.

        ``lean=True`` leaves out Gymnasium's ``PassiveEnvChecker`` and ``OrderEnforcing``
        layers, for hosts that check spaces and call order themselves (``ContinualEnv``).
        """
        self.check_env_id()
        kwargs = {**self.kwargs, **overrides}
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        env_id: str | gym.envs.registration.EnvSpec = self.env_id
        if lean:
            env_id = dataclasses.replace(gym.spec(self.env_id), order_enforce=False)
            kwargs["disable_env_checker"] = True
        try:
            env = gym.make(env_id, **kwargs)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc) and "missing" not in str(exc):
                raise
            raise EnvConfigError(
                f"Task {self.name!r}: {self.env_id} does not take the kwargs "
                f"{sorted(self.kwargs)} given to it: {str(exc).split(' was raised')[0]}. Fix "
                "the task's kwargs (env constructor arguments, plus gymnasium.make's own such "
                "as max_episode_steps)."
            ) from None
        except gym.error.DependencyNotInstalled as exc:
            raise MissingExtraError(
                f"Task {self.name!r} ({self.env_id}) needs a package that is not installed: "
                f'{exc}. Install the extra: pip install "crl[{self.extra or "..."}]".'
            ) from exc
        for w in self.wrappers:
            env = w.apply(env)
        return env

    def describe(self) -> str:
        parts = [self.env_id]
        if self.kwargs:
            parts.append(", ".join(f"{k}={v}" for k, v in self.kwargs.items()))
        if self.wrappers:
            parts.append("wrappers: " + ", ".join(w.name for w in self.wrappers))
        return "; ".join(parts)
