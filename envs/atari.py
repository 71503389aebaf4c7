"""Atari tasks (``atari`` extra: ale-py ships the ROMs, OpenCV does the resizing).

Every game uses the full 18-action space and the standard preprocessing with Gymnasium's
own wrappers: ``AtariPreprocessing`` (grey, 84×84, frame skip 4 with max-pooling, up to 30
no-op starts) and ``FrameStackObservation`` (4 frames), giving ``Box(0, 255, (4, 84, 84),
uint8)`` observations and ``Discrete(18)`` actions for every game. The ALE env runs at
``frameskip=1`` (the skipping is the wrapper's) with the v5 default sticky actions
(``repeat_action_probability=0.25``, Machado et al. 2018).

Observation transforms for the Pong variants (flip, noise) act on the 84×84 frame, before
stacking, like the "Pong soup" of the progressive-networks paper (Rusu et al. 2016).
"""

from __future__ import annotations

from typing import Any, Literal

from envs.sequence import TaskSequence
from envs.spec import TaskSpec, WrapperSpec

Transform = Literal["hflip", "vflip", "noisy"]
Scores = Literal["human", "reference"]
NOISE_STD = 25.0  # pixel units on 0..255 grey frames

#: game -> (random, human) scores of the human-normalised score of Mnih et al. 2015
#: ("Human-level control through deep reinforcement learning"), as tabulated by Badia et
#: al. 2020 (Agent57, appendix: random and human scores of the 57 games)
HUMAN_SCORES: dict[str, tuple[float, float]] = {
    "SpaceInvaders": (148.0, 1668.7),
    "Krull": (1598.0, 2665.5),
    "BeamRider": (363.9, 16926.5),
    "Hero": (1027.0, 30826.4),
    "StarGunner": (664.0, 10250.0),
    "MsPacman": (307.3, 6951.6),
    "Pong": (-20.7, 14.6),
}
HUMAN_BASIS = "human-normalised: (return - random) / (human - random), Mnih et al. 2015"


def atari_task(
    game: str,
    *,
    name: str | None = None,
    mode: int | None = None,
    difficulty: int | None = None,
    transform: Transform | None = None,
    repeat_action_probability: float = 0.25,
    low: float | None = None,
    high: float | None = None,
    scores: Scores = "human",
) -> TaskSpec:
    """One ALE game (``game`` as in ``ALE/<game>-v5``) with the standard preprocessing.

    Scores: ``"human"`` (the default for games in :data:`HUMAN_SCORES`) normalises between
    the published random and human scores, Atari's standard, so scores need no reference
    run; ``"reference"`` measures the random policy and takes the single-task reference
    run's return as the top (as for the other task families). ``low``/``high`` given
    explicitly win. Variants (modes, difficulties, flips, noise) keep their game's scale.
    """
    if scores not in ("human", "reference"):
        raise ValueError(f"Atari scores must be 'human' or 'reference', got {scores!r}.")
    basis = ""
    if scores == "human" and game in HUMAN_SCORES and low is None and high is None:
        low, high = HUMAN_SCORES[game]
        basis = HUMAN_BASIS
    kwargs: dict[str, Any] = {
        "frameskip": 1,
        "full_action_space": True,
        "repeat_action_probability": repeat_action_probability,
    }
    if mode is not None:
        kwargs["mode"] = mode
    if difficulty is not None:
        kwargs["difficulty"] = difficulty
    wrappers = [
        WrapperSpec(
            "AtariPreprocessing",
            {"noop_max": 30, "frame_skip": 4, "screen_size": 84, "grayscale_obs": True},
        )
    ]
    if transform == "hflip":
        wrappers.append(WrapperSpec("flip_observation", {"axes": -1}))
    elif transform == "vflip":
        wrappers.append(WrapperSpec("flip_observation", {"axes": -2}))
    elif transform == "noisy":
        wrappers.append(WrapperSpec("noisy_observation", {"std": NOISE_STD}))
    elif transform is not None:
        raise ValueError(f"Unknown Atari transform {transform!r}; use 'hflip', 'vflip', 'noisy'.")
    wrappers.append(WrapperSpec("FrameStackObservation", {"stack_size": 4}))
    return TaskSpec(
        f"ALE/{game}-v5",
        kwargs=kwargs,
        wrappers=wrappers,
        name=name or game.lower(),
        low=low,
        high=high,
        requires=("ale_py",),
        extra="atari",
        score_basis=basis,
    )


ATARI6_GAMES = ("SpaceInvaders", "Krull", "BeamRider", "Hero", "StarGunner", "MsPacman")


def atari6(scores: Scores = "human") -> TaskSequence:
    """The 6-game sequence of CLEAR (Rolnick et al. 2019) and CORA (Powers et al. 2021).

    Default budget: 12.5M agent steps per task (50M frames at frame skip 4), 3 cycles.
    ``scores``: see :func:`atari_task` (``envs.get_sequence("Atari6", scores="reference")``).
    """
    return TaskSequence(
        "Atari6",
        [atari_task(g, scores=scores) for g in ATARI6_GAMES],
        steps_per_task=12_500_000,
        cycles=3,
        description="CLEAR/CORA's 6 Atari games",
    )


def atari3(scores: Scores = "human") -> TaskSequence:
    return TaskSequence(
        "Atari3",
        [atari_task(g, scores=scores) for g in ATARI6_GAMES[:3]],
        steps_per_task=2_500_000,
        description="The first 3 games of Atari6, a cheaper version",
    )


def pong_soup(scores: Scores = "human") -> TaskSequence:
    """Pong variants: ALE game modes and difficulties, plus flipped and noisy screens (each
    scored on Pong's human-normalised scale by default)."""
    return TaskSequence(
        "PongSoup",
        [
            atari_task("Pong", name="pong", scores=scores),
            atari_task("Pong", name="pong-mode1", mode=1, scores=scores),
            atari_task("Pong", name="pong-difficulty3", difficulty=3, scores=scores),
            atari_task("Pong", name="pong-hflip", transform="hflip", scores=scores),
            atari_task("Pong", name="pong-vflip", transform="vflip", scores=scores),
            atari_task("Pong", name="pong-noisy", transform="noisy", scores=scores),
        ],
        steps_per_task=2_500_000,
        description="Pong with ALE modes/difficulties and flipped or noisy screens",
    )


SEQUENCES = {"Atari6": atari6, "Atari3": atari3, "PongSoup": pong_soup}
