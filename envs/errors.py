"""The errors of envs/: a wrong configuration, a missing pip extra, spaces that do not unify.

Their own module, imported by every other module of envs/, so that none of them has to
import another for its errors (docs/ARCHITECTURE.md, "Layers")."""

from __future__ import annotations


class EnvConfigError(ValueError):
    """A task or sequence is configured wrongly; the message names the problem and the fix."""


class MissingExtraError(ImportError):
    """A task needs an optional dependency group (``pip install "crl[<extra>]"``)."""


class SpaceMismatchError(EnvConfigError):
    """The tasks of a sequence do not share one observation or action space."""
