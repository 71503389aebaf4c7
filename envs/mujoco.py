"""MuJoCo tasks (``mujoco`` extra): HalfCheetah and Hopper with changed gravity, body-part
sizes and masses, and HalfCheetah running forward or backward.

How each perturbation is applied (reproducible, no randomness):

* gravity: ``model.opt.gravity = (0, 0, -gravity)`` after construction (m/s², default 9.81).
* masses: ``model.body_mass[b]`` and ``model.body_inertia[b]`` are multiplied by the same
  factor (a denser body of the same shape), for all bodies or the named ones.
* sizes: a modified copy of the env's XML is passed as ``xml_file`` (Gymnasium v5 MuJoCo envs
  accept it). Scaling body ``b`` by ``s`` scales, about the point where ``b`` hangs from its
  parent (its first hinge joint; the body origin if it has none), the sizes and positions of
  ``b``'s own geoms, sites and joints, and moves the attachment points of ``b``'s child
  bodies accordingly, so the chain stays connected and the children keep their own size.
  Masses follow from the geoms where the model derives them (``inertiafromgeom``); note that
  HalfCheetah's XML sets ``settotalmass="14"``, so there a bigger part takes a larger share
  of the same total mass. Longer legs can start the robot slightly inside the floor; MuJoCo's
  soft contacts push it out within the first steps.
* running backward: HalfCheetah's ``forward_reward_weight=-1`` (reward is ``-x_velocity``
  minus the control cost).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator

from envs.errors import EnvConfigError
from envs.sequence import TaskSequence
from envs.spec import TaskSpec, WrapperSpec

MORPH_ENV_ID = "crl/MujocoMorph-v0"
_REQUIRES = ("mujoco",)


# -- sizes: XML ------------------------------------------------------------------------------


def _vec(text: str | None, n: int = 3) -> np.ndarray:
    return np.zeros(n) if text is None else np.array([float(x) for x in text.split()])


def _fmt(v: np.ndarray) -> str:
    return " ".join(f"{x:.10g}" for x in v)


def _anchor(body: ET.Element) -> np.ndarray:
    for joint in body.findall("joint"):
        if joint.get("type", "hinge") in ("hinge", "ball"):
            return _vec(joint.get("pos"))
    return np.zeros(3)


_ROTATION_ATTRS = ("quat", "euler", "axisangle", "xyaxes", "zaxis")


def _scale_body(body: ET.Element, s: float) -> None:
    a = _anchor(body)
    for el in body.findall("geom") + body.findall("site"):
        if el.get("size") is not None:
            el.set("size", _fmt(_vec(el.get("size"), 0) * s))
        if el.get("pos") is not None:
            el.set("pos", _fmt(a + s * (_vec(el.get("pos")) - a)))
        if el.get("fromto") is not None:
            p = _vec(el.get("fromto"), 6)
            el.set("fromto", _fmt(np.concatenate((a + s * (p[:3] - a), a + s * (p[3:] - a)))))
    for joint in body.findall("joint"):
        if joint.get("pos") is not None:
            joint.set("pos", _fmt(a + s * (_vec(joint.get("pos")) - a)))
    for child in body.findall("body"):
        child_anchor = _anchor(child)
        if any(child.get(r) is not None for r in _ROTATION_ATTRS) and np.any(child_anchor):
            raise EnvConfigError(
                f"Cannot scale body {body.get('name')!r}: its child {child.get('name')!r} is "
                "rotated and hangs from an offset joint; scale a body without such children."
            )
        attach = _vec(child.get("pos")) + child_anchor
        child.set("pos", _fmt(a + s * (attach - a) - child_anchor))


def scaled_xml(xml_path: str, body_scales: Mapping[str, float]) -> str:
    """Write a copy of the MuJoCo XML with the named bodies scaled; return its path.

    The file name is a hash of the input and the scales, in a per-user temp folder, so
    repeated calls (and parallel workers) reuse one file.
    """
    with open(xml_path, "rb") as f:
        source = f.read()
    key = repr(sorted((str(k), float(v)) for k, v in body_scales.items()))
    digest = hashlib.sha256(source + key.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"crl-mujoco-{os.getuid()}")
    out = os.path.join(folder, f"{os.path.splitext(os.path.basename(xml_path))[0]}-{digest}.xml")
    if os.path.exists(out):
        return out
    root = ET.fromstring(source)
    bodies = {b.get("name"): b for b in root.iter("body")}
    for name, factor in body_scales.items():
        if name not in bodies:
            raise EnvConfigError(
                f"Unknown body {name!r} in {os.path.basename(xml_path)}; bodies: "
                f"{', '.join(n for n in bodies if n)}."
            )
        if not float(factor) > 0:
            raise EnvConfigError(f"Size scale of body {name!r} must be > 0, got {factor}.")
        _scale_body(bodies[name], float(factor))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    ET.ElementTree(root).write(tmp)
    os.replace(tmp, out)  # atomic: parallel workers never read a half-written file
    return out


def make_morphed(base_env_id: str | None = None, body_scales: Mapping[str, float] | None = None,
                 **kwargs: Any) -> gym.Env:
    """Gymnasium entry point of :data:`MORPH_ENV_ID`: the base MuJoCo env built from a copy
    of its XML with ``body_scales`` applied (see the module docstring)."""
    if base_env_id is None or not body_scales:
        raise EnvConfigError(
            f'{MORPH_ENV_ID} needs the env to change and the body scales: gymnasium.make('
            f'"{MORPH_ENV_ID}", base_env_id="HalfCheetah-v5", body_scales={{"bthigh": 1.5}}) '
            "(body names as in the env's MuJoCo XML)."
        )
    base = gym.spec(base_env_id)
    creator = load_env_creator(base.entry_point)
    default_xml = inspect.signature(creator).parameters.get("xml_file")
    if default_xml is None or not isinstance(default_xml.default, str):
        raise EnvConfigError(f"{base_env_id} does not take an xml_file; cannot scale its bodies.")
    xml = kwargs.pop("xml_file", default_xml.default)
    if not os.path.isabs(xml):
        import gymnasium.envs.mujoco as gym_mujoco

        xml = os.path.join(os.path.dirname(gym_mujoco.__file__), "assets", xml)
    return creator(**{**base.kwargs, **kwargs, "xml_file": scaled_xml(xml, body_scales)})


def register_morph_env() -> None:
    if MORPH_ENV_ID not in gym.registry:
        gym.register(MORPH_ENV_ID, entry_point="envs.mujoco:make_morphed")


register_morph_env()  # importing this module (a task's ``requires``) registers the id


# -- tasks and sequences ---------------------------------------------------------------------


def mujoco_task(
    base_env_id: str,
    name: str,
    *,
    gravity: float | None = None,
    mass_scale: float | Mapping[str, float] | None = None,
    size_scale: Mapping[str, float] | None = None,
    max_episode_steps: int = 1000,
    **env_kwargs: Any,
) -> TaskSpec:
    """A MuJoCo task with perturbed physics. Score bounds are left to measurement."""
    wrappers = []
    if gravity is not None or mass_scale is not None:
        wrappers.append(
            WrapperSpec("mujoco_physics", {"gravity": gravity, "mass_scale": mass_scale})
        )
    kwargs: dict[str, Any] = {**env_kwargs, "max_episode_steps": max_episode_steps}
    requires = _REQUIRES
    if size_scale:
        requires = (*_REQUIRES, "envs.mujoco")
        env_id = MORPH_ENV_ID
        kwargs.update(base_env_id=base_env_id, body_scales=dict(size_scale))
    else:
        env_id = base_env_id
    return TaskSpec(
        env_id, kwargs=kwargs, wrappers=wrappers, name=name, requires=requires, extra="mujoco"
    )


def half_cheetah_physics() -> TaskSequence:
    e = "HalfCheetah-v5"
    return TaskSequence(
        "HalfCheetahPhysics",
        [
            mujoco_task(e, "halfcheetah"),
            mujoco_task(e, "halfcheetah-gravity-15", gravity=15.0),
            mujoco_task(e, "halfcheetah-big-thighs", size_scale={"bthigh": 1.3, "fthigh": 1.3}),
            mujoco_task(e, "halfcheetah-heavy-torso", mass_scale={"torso": 2.0}),
            mujoco_task(e, "halfcheetah-small-feet", size_scale={"bfoot": 0.7, "ffoot": 0.7}),
        ],
        steps_per_task=1_000_000,
        description="HalfCheetah with changed gravity, body-part sizes and masses",
    )


def hopper_physics() -> TaskSequence:
    e = "Hopper-v5"
    return TaskSequence(
        "HopperPhysics",
        [
            mujoco_task(e, "hopper"),
            mujoco_task(e, "hopper-gravity-5", gravity=5.0),
            mujoco_task(e, "hopper-big-foot", size_scale={"foot": 1.3}),
            mujoco_task(e, "hopper-heavy", mass_scale=1.5),
            mujoco_task(e, "hopper-short-thigh", size_scale={"thigh": 0.75}),
        ],
        steps_per_task=1_000_000,
        description="Hopper with changed gravity, body-part sizes and masses",
    )


def half_cheetah_direction() -> TaskSequence:
    e = "HalfCheetah-v5"
    return TaskSequence(
        "HalfCheetahDir",
        [
            mujoco_task(e, "halfcheetah-forward"),
            mujoco_task(e, "halfcheetah-backward", forward_reward_weight=-1.0),
        ],
        steps_per_task=1_000_000,
        description="HalfCheetah running forward, then backward",
    )


SEQUENCES = {
    "HalfCheetahPhysics": half_cheetah_physics,
    "HopperPhysics": hopper_physics,
    "HalfCheetahDir": half_cheetah_direction,
}
