"""Capture and restore a training env's state as plain data, so a resumed run steps on exactly.

A checkpoint is loaded with ``torch.load(weights_only=True)``, which accepts only plain data
(numbers, strings, bytes, lists, tuples, dicts, tensors). The state of a Gymnasium env is
spread over its wrapper layers and its base env, so :func:`capture_env` walks the chain:

* every layer (Gymnasium's and SB3's wrappers, ours, the base env) contributes its instance
  attributes that are data: numbers, strings, arrays, lists/dicts/deques of them and NumPy
  generators (their bit-generator state). ``TimeLimit._elapsed_steps``, SB3 ``Monitor``'s
  episode rewards and lengths, ``FrameStackObservation``'s frames, CartPole's ``state``,
  Meta-World's goal and path length and every ``np_random`` are found this way. Links to other
  envs, spaces, specs and functions are structure, rebuilt with the env, and are skipped;
* the physics of some families lives outside Python attributes and is captured with the
  simulator's own tools: MuJoCo (Gymnasium's MuJoCo envs and Meta-World) with
  ``mj_getState(mjSTATE_INTEGRATION)`` (time, qpos, qvel, act, ctrl, warm start, applied
  forces, mocap, userdata: everything the next step depends on), Atari with ALE's
  ``cloneState(include_rng=True)`` serialised to bytes (emulator, frame counters, the
  sticky-action RNG);
* :class:`envs.continual.ContinualEnv` gives its position in the schedule
  (``position_state``), and each of its task envs is captured as a chain of its own (an idle
  task keeps its RNG for when it runs again);
* an SB3 ``DummyVecEnv`` contributes the seeds of its next reset and each sub-env's chain.

Arrays shared by several attributes (a view kept twice, a frame held by a deque and a padding
value) are stored once and shared again on restore. :func:`restore_env` writes the state into
a freshly built env of the same construction. An attribute that is neither data nor known
structure (an unknown C object, a file, a simulator this module does not know) makes the env
*not captured*: :func:`restore_env` then restores what it can and reports what it could not,
and the caller resets the env (a resume that is not bit-exact, never a crash).
"""

from __future__ import annotations

import collections
import types
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np

#: Bumped when the layout of snapshots changes incompatibly.
SNAPSHOT_FORMAT = 1

#: Instance attributes that are structure (links, specs, constructor records, render set-up).
_STRUCTURE_NAMES = frozenset({
    "env", "envs", "spec", "_cached_spec", "metadata", "_metadata", "_saved_kwargs",
    "_ezpickle_args", "_ezpickle_kwargs", "render_mode", "observation_space", "action_space",
    "_observation_space", "_action_space", "results_writer",
})


class SnapshotError(ValueError):
    """A value or an env cannot be captured/restored; the message names it."""


# --------------------------------------------------------------------------------------------
# Plain-data encoding
# --------------------------------------------------------------------------------------------
def _is_structure(value: Any) -> bool:
    """Values rebuilt with the env rather than captured: envs, spaces, specs, functions."""
    return (
        isinstance(value, gym.Env | gym.Space | gym.envs.registration.EnvSpec | types.ModuleType
                   | type)
        or (callable(value) and not isinstance(value, np.ndarray | np.generic))
    )


class _Codec:
    """Encoder/decoder of plain data. Arrays and generators go into one table and are
    referred to by index, so objects shared by several attributes stay shared, and decoding
    does not depend on the order in which the parts of a snapshot are restored."""

    def __init__(self, table: list[Any] | None = None) -> None:
        self.ids: dict[int, int] = {}
        self.table: list[Any] = [] if table is None else table  # encoded leaves
        self._keep: list[Any] = []  # keeps encoded objects alive so their ids stay unique
        self._decoded: dict[int, Any] = {}

    # -- encode ------------------------------------------------------------------------------
    def encode(self, value: Any, where: str) -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        if type(value) is bytes:  # b"" pickles as a call to bytes(), which weights_only refuses
            return value if value else {"__t": "empty_bytes"}
        if isinstance(value, np.ndarray | np.random.Generator):
            ref = self.ids.get(id(value))
            if ref is None:
                ref = self.ids[id(value)] = len(self.table)
                self.table.append(None)
                self._keep.append(value)
                self.table[ref] = self._encode_leaf(value, where)
            return {"__t": "ref", "i": ref}
        if isinstance(value, np.generic):
            if value.dtype.hasobject:
                raise SnapshotError(f"{where}: NumPy object scalar {value!r}")
            return {"__t": "npscalar", "dtype": value.dtype.str, "data": value.tobytes()}
        if isinstance(value, np.dtype):
            return {"__t": "dtype", "dtype": value.str}
        if isinstance(value, np.random.RandomState):
            return {"__t": "randomstate", "state": self.encode(value.get_state(), where)}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__t": "tuple", "items": [self.encode(v, f"{where}[{i}]")
                                              for i, v in enumerate(value)]}
        if isinstance(value, collections.deque):
            return {"__t": "deque", "maxlen": value.maxlen,
                    "items": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, set | frozenset):
            return {"__t": "set", "frozen": isinstance(value, frozenset),
                    "items": [self.encode(v, where) for v in value]}
        if type(value) in (dict, collections.OrderedDict):  # SB3 keeps Dict observations in
            return {"__t": "dict", "ordered": type(value) is collections.OrderedDict,  # ODicts
                    "items": [[self.encode(k, where), self.encode(v, f"{where}.{k}")]
                              for k, v in value.items()]}
        raise SnapshotError(f"{where} holds a {type(value).__module__}.{type(value).__name__}, "
                            "which is not plain data")

    def _encode_leaf(self, value: np.ndarray | np.random.Generator, where: str) -> Any:
        if isinstance(value, np.random.Generator):
            return {"__t": "generator", "state": value.bit_generator.state}
        if value.dtype.hasobject:
            return {"__t": "object_array", "shape": list(value.shape),
                    "items": self.encode(value.ravel().tolist(), where)}
        return {"__t": "ndarray", "dtype": value.dtype.str, "shape": list(value.shape),
                "data": np.ascontiguousarray(value).tobytes() if value.size else None,
                "writeable": bool(value.flags.writeable)}

    # -- decode ------------------------------------------------------------------------------
    def decode(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        tag = value.get("__t")
        if tag == "ref":
            i = int(value["i"])
            if i not in self._decoded:
                if not 0 <= i < len(self.table):
                    raise SnapshotError(f"snapshot refers to object {i} of {len(self.table)}: "
                                        "a corrupt snapshot")
                self._decoded[i] = self._decode_leaf(self.table[i])
            return self._decoded[i]
        if tag == "empty_bytes":
            return b""
        if tag == "npscalar":
            return np.frombuffer(value["data"], dtype=np.dtype(value["dtype"]))[0].copy()
        if tag == "dtype":
            return np.dtype(value["dtype"])
        if tag == "randomstate":
            rs = np.random.RandomState()
            rs.set_state(self.decode(value["state"]))
            return rs
        if tag == "tuple":
            return tuple(self.decode(value["items"]))
        if tag == "deque":
            return collections.deque(self.decode(value["items"]), maxlen=value["maxlen"])
        if tag == "set":
            items = self.decode(value["items"])
            return frozenset(items) if value["frozen"] else set(items)
        if tag == "dict":
            items = [(self.decode(k), self.decode(v)) for k, v in value["items"]]
            return collections.OrderedDict(items) if value.get("ordered") else dict(items)
        raise SnapshotError(f"unknown snapshot entry {sorted(value)}: a corrupt snapshot, or one "
                            "written by another crl version")

    def _decode_leaf(self, leaf: dict[str, Any]) -> Any:
        tag = leaf.get("__t")
        if tag == "ndarray":
            dtype = np.dtype(leaf["dtype"])
            if leaf["data"] is None:
                arr = np.zeros(leaf["shape"], dtype=dtype)
            else:
                arr = np.frombuffer(leaf["data"], dtype=dtype).reshape(leaf["shape"]).copy()
            arr.flags.writeable = bool(leaf["writeable"])
            return arr
        if tag == "object_array":
            arr = np.empty(int(np.prod(leaf["shape"])), dtype=object)
            arr[:] = self.decode(leaf["items"])
            return arr.reshape(leaf["shape"])
        if tag == "generator":
            state = leaf["state"]
            gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
            gen.bit_generator.state = state
            return gen
        raise SnapshotError(f"unknown snapshot object {sorted(leaf)}: a corrupt snapshot")


def encode(value: Any, where: str = "value") -> dict[str, Any]:
    """``value`` as plain data (arrays as bytes; tuples, deques, sets, dicts tagged; shared
    arrays stored once). Raises :class:`SnapshotError` naming ``where`` for non-data."""
    codec = _Codec()
    out = codec.encode(value, where)
    return {"value": out, "objects": codec.table}


def decode(blob: dict[str, Any]) -> Any:
    """The inverse of :func:`encode` (arrays come back as copies, shared ones shared)."""
    return _Codec(list(blob["objects"])).decode(blob["value"])


# --------------------------------------------------------------------------------------------
# Families whose state lives outside Python attributes
# --------------------------------------------------------------------------------------------
def _module_of(value: Any) -> str:
    return type(value).__module__ or ""


def _family(layer: Any) -> str | None:
    d = vars(layer)
    if _module_of(d.get("data")).startswith("mujoco") and _module_of(
            d.get("model")).startswith("mujoco"):
        return "mujoco"
    if _module_of(d.get("ale")).startswith("ale_py"):
        return "atari"
    return None


#: Attributes each family captures with the simulator's tools, or that only serve rendering.
_FAMILY_NAMES = {
    "mujoco": frozenset({"model", "data", "mujoco_renderer", "viewer", "_viewers"}),
    "atari": frozenset({"ale", "_action_set", "viewer"}),
}


#: MjModel arrays that are assets (meshes, textures, collision trees, names): static, large.
_MJ_ASSETS = ("mesh_", "tex_", "hfield_", "skin_", "flex", "bvh_", "oct_", "names", "paths",
              "text_", "tuple_", "key_", "plugin", "mat_", "light_", "cam_")


def _mj_model_arrays(model: Any) -> dict[str, np.ndarray]:
    """The model's parameter arrays (body/site/geom poses, masses, equality data...):
    envs change some while running (Meta-World moves goals and objects at every reset), so
    they are state too. Assets are left out: they never change and are megabytes."""
    out = {}
    for name in dir(model):
        if name.startswith(("_", *_MJ_ASSETS)):
            continue
        try:
            value = getattr(model, name)
        except Exception:  # noqa: BLE001,S112 - properties that cannot be read are not state
            continue
        if isinstance(value, np.ndarray):
            out[name] = value
    for name in dir(model.opt):
        value = getattr(model.opt, name)
        if not name.startswith("_") and isinstance(value, np.ndarray | int | float):
            out[f"opt.{name}"] = value
    return out


def _capture_family(family: str, layer: Any) -> dict[str, Any]:
    if family == "mujoco":
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(layer.model, spec), dtype=np.float64)
        mujoco.mj_getState(layer.model, layer.data, state, spec)
        model = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                 for k, v in _mj_model_arrays(layer.model).items()}
        return {"mj_state": state.tobytes(), "size": int(state.size),
                "model": encode(model, "MjModel")}
    if family == "atari":
        return {"ale_state": bytes(layer.ale.cloneState(include_rng=True).serialize())}
    raise AssertionError(family)


def _restore_family(family: str, layer: Any, state: dict[str, Any]) -> None:
    if family == "mujoco":
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        size = mujoco.mj_stateSize(layer.model, spec)
        if size != state["size"]:
            raise SnapshotError(f"the MuJoCo model has a state of {size} numbers, the snapshot "
                                f"{state['size']}: another model")
        here = _mj_model_arrays(layer.model)
        for name, value in decode(state["model"]).items():
            if name.startswith("opt."):
                if isinstance(value, np.ndarray):
                    here[name][...] = value
                else:
                    setattr(layer.model.opt, name[4:], value)
            elif name not in here or here[name].shape != value.shape:
                raise SnapshotError(f"MjModel.{name} differs in shape: another model")
            else:
                here[name][...] = value
        values = np.frombuffer(state["mj_state"], dtype=np.float64).copy()
        mujoco.mj_setState(layer.model, layer.data, values, spec)
        # positions, contacts and sensors of the restored state (an observation read before
        # the next step sees them); mj_forward also writes the solver's warm start, which is
        # part of the integration state, so that state is set once more after it
        mujoco.mj_forward(layer.model, layer.data)
        mujoco.mj_setState(layer.model, layer.data, values, spec)
        return
    if family == "atari":
        import ale_py

        layer.ale.restoreState(ale_py.ALEState(state["ale_state"]))
        return
    raise AssertionError(family)


#: Frames emulated to set ALE's remembered action; each keeps the old one with p = 0.25.
_PRIMING_FRAMES = 16


def _prime_sticky_action(env: Any, action: Any) -> None:
    """Make ALE remember ``action`` (the last action the env was given) as its last one.

    With sticky actions (Machado et al. 2018) each frame repeats ALE's previously executed
    action with probability p, and that action is not part of ``cloneState``. It is set by
    emulating frames with ``action`` from the restored state and restoring the state again:
    after 16 frames ALE executes ``action`` with probability 1 - p**16. The original env
    remembers the last commanded action unless every frame of its last step repeated the one
    before (p**frame_skip: 0.4% for Atari's 4 frames); that case is not reproduced.
    """
    layers = list(_layers(env))
    base = layers[-1]
    if _family(base) != "atari" or getattr(base, "continuous", False):
        return  # continuous ALE actions (paddle strengths) are not primed
    for layer in layers[:-1]:  # the action as the base env receives it
        if isinstance(layer, gym.ActionWrapper):
            action = layer.action(action)
    state = base.ale.cloneState(include_rng=True)
    for _ in range(_PRIMING_FRAMES):
        base.ale.act(base._action_set[int(action)], 1.0)
    base.ale.restoreState(state)


# --------------------------------------------------------------------------------------------
# Chains of layers
# --------------------------------------------------------------------------------------------
def _layers(env: Any) -> Iterator[Any]:
    """The env and every layer below it, outermost first, down to the base env."""
    layer = env
    while True:
        yield layer
        if not isinstance(layer, gym.Wrapper):
            return
        layer = layer.env


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _capture_layer(layer: Any, codec: _Codec, problems: list[str]) -> dict[str, Any]:
    name = type(layer).__name__
    try:
        items = vars(layer)
    except TypeError:
        problems.append(f"{name} (no instance attributes to read)")
        return {"type": _type_name(layer), "attrs": {}, "family": None}
    family = _family(layer)
    skip = _STRUCTURE_NAMES | _FAMILY_NAMES.get(family or "", frozenset())
    attrs: dict[str, Any] = {}
    for key, value in items.items():
        if key in skip or _is_structure(value):
            continue
        try:
            attrs[key] = codec.encode(value, f"{name}.{key}")
        except SnapshotError as exc:
            problems.append(str(exc))
    out: dict[str, Any] = {"type": _type_name(layer), "attrs": attrs, "family": family}
    if family is not None:
        try:
            out["family_state"] = _capture_family(family, layer)
        except Exception as exc:  # noqa: BLE001 - a simulator refusing must not stop training
            problems.append(f"{name} ({family} state: {type(exc).__name__}: {exc})")
            out["family"] = None
    return out


def _capture_chain(env: Any, codec: _Codec, problems: list[str]) -> dict[str, Any]:
    layers = []
    continual = None
    for layer in _layers(env):
        if hasattr(layer, "position_state") and hasattr(layer, "task_envs"):
            continual = {
                "position": codec.encode(layer.position_state(), "ContinualEnv position"),
                "tasks": [_capture_chain(e, codec, problems) for e in layer.task_envs],
            }
            layers.append({"type": _type_name(layer), "attrs": {}, "family": None})
        else:
            layers.append(_capture_layer(layer, codec, problems))
    return {"layers": layers, "continual": continual}


def _is_vec_env(env: Any) -> bool:
    return hasattr(env, "num_envs") and hasattr(env, "step_async") and not isinstance(
        env, gym.Env)


def capture_env(env: Any) -> dict[str, Any]:
    """The state of ``env`` (a Gymnasium env with any wrappers, or an SB3 ``DummyVecEnv``) as
    plain data. Never raises for an env it cannot fully capture: ``snapshot["problems"]``
    names what is missing (empty when the snapshot is complete)."""
    codec = _Codec()
    problems: list[str] = []
    vec = None
    if _is_vec_env(env):
        if not hasattr(env, "envs"):
            problems.append(f"{type(env).__name__} (its envs run in other processes)")
            chains: list[dict[str, Any]] = []
        else:
            vec = {key: codec.encode(getattr(env, key, None), f"{type(env).__name__}.{key}")
                   for key in ("_seeds", "_options")}
            chains = [_capture_chain(e, codec, problems) for e in env.envs]
        kind = "vec"
    else:
        chains, kind = [_capture_chain(env, codec, problems)], "env"
    return {"format": SNAPSHOT_FORMAT, "kind": kind, "vec": vec, "envs": chains,
            "objects": codec.table, "problems": problems}


def _restore_chain(env: Any, snap: dict[str, Any], codec: _Codec, problems: list[str]) -> None:
    layers = list(_layers(env))
    saved = snap["layers"]
    got = [_type_name(layer) for layer in layers]
    want = [layer["type"] for layer in saved]
    if got != want:
        problems.append(f"the env's wrapper layers {got} differ from the snapshot's {want}")
        return
    for layer, state in zip(layers, saved, strict=True):
        if hasattr(layer, "position_state") and snap["continual"] is not None:
            tasks = list(layer.task_envs)
            if len(tasks) != len(snap["continual"]["tasks"]):
                problems.append(f"{type(layer).__name__} has {len(tasks)} task envs, the "
                                f"snapshot {len(snap['continual']['tasks'])}")
                return
            position = codec.decode(snap["continual"]["position"])
            layer.load_position_state(position)
            for task_env, task_snap in zip(tasks, snap["continual"]["tasks"], strict=True):
                _restore_chain(task_env, task_snap, codec, problems)
            if position["episode_running"] and position["last_action"] is not None:
                _prime_sticky_action(tasks[layer.task_index], position["last_action"])
            continue
        attrs = vars(layer)
        for key, value in state["attrs"].items():
            attrs[key] = codec.decode(value)
        if state["family"] is not None:
            try:
                _restore_family(state["family"], layer, state["family_state"])
            except Exception as exc:  # noqa: BLE001 - reported, the caller resets the env
                problems.append(f"{type(layer).__name__} ({state['family']} state: "
                                f"{type(exc).__name__}: {exc})")


def restore_env(env: Any, snapshot: dict[str, Any]) -> list[str]:
    """Write ``snapshot`` (from :func:`capture_env`) into ``env``, a freshly built env of the
    same construction. Returns what could not be restored (empty: the next steps are
    bit-identical to the captured env's); the caller must then reset the env."""
    if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT:
        found = snapshot.get("format") if isinstance(snapshot, dict) else type(snapshot)
        return [f"the env snapshot has format {found!r}, this crl reads {SNAPSHOT_FORMAT}"]
    problems = list(snapshot.get("problems", []))
    codec = _Codec(list(snapshot["objects"]))
    try:
        if snapshot["kind"] == "vec":
            if not _is_vec_env(env) or not hasattr(env, "envs"):
                return [*problems, f"the snapshot is of a vector env, got {type(env).__name__}"]
            if snapshot["vec"] is None:
                return problems
            if len(env.envs) != len(snapshot["envs"]):
                return [*problems, f"the vector env has {len(env.envs)} envs, the snapshot "
                        f"{len(snapshot['envs'])}"]
            for key, value in snapshot["vec"].items():
                setattr(env, key, codec.decode(value))
            for sub, chain in zip(env.envs, snapshot["envs"], strict=True):
                _restore_chain(sub, chain, codec, problems)
        else:
            _restore_chain(env, snapshot["envs"][0], codec, problems)
    except (SnapshotError, KeyError, TypeError, ValueError) as exc:
        problems.append(f"a damaged env snapshot ({type(exc).__name__}: {exc})")
    return problems


def not_captured_warning(problems: list[str]) -> str:
    """The warning a resume gives when the training env was not restored exactly."""
    return ("training env state not captured for " + "; ".join(problems)
            + "; resume is not bit-exact (the env starts a fresh episode)")


__all__ = [
    "SNAPSHOT_FORMAT",
    "SnapshotError",
    "capture_env",
    "decode",
    "encode",
    "not_captured_warning",
    "restore_env",
]
