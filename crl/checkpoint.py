"""Checkpoint files: atomic writes, safe loads, compatibility checks and RNG states.

A checkpoint is one ``torch.save`` file of plain data: tensors, numbers, strings, bytes and
lists/tuples/dicts of them. Loading uses ``torch.load(weights_only=True)``, which refuses to
unpickle arbitrary objects, so a checkpoint from an untrusted source cannot run code. Writes go
to a temporary file in the same folder, are fsynced and then renamed over the old file, so a
crash (even SIGKILL) mid-write leaves the previous checkpoint intact.

Both hosts (the supervised trainer and the RL runner) build their payload on top of this
module; :func:`check_compatible` turns a resume with a different configuration into an error
that names every key that differs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl.tracking import atomic_write

#: Bumped when the layout of checkpoints changes incompatibly.
CHECKPOINT_FORMAT = 1
#: File name of the latest checkpoint inside a run directory's ``checkpoints/`` folder.
LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used; the message names the problem and fix."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / LAST


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> int:
    """Write ``payload`` atomically (temporary file, fsync, rename); returns its size in bytes.

    The ``format`` key is added. The previous file at ``path`` survives any failure.
    """
    path = Path(path)
    atomic_write(path, lambda fh: torch.save({"format": CHECKPOINT_FORMAT, **payload}, fh))
    return path.stat().st_size


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects.

    Any problem (missing, truncated, corrupt, foreign objects, other format) is a
    :class:`CheckpointError` naming the file; nothing on disk is touched.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; a run writes one at every task boundary and every "
            "--checkpoint-every steps, so this run has none yet: start it again without --resume"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a crl checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it was left untouched. "
            "Resume from a copy of the run with an intact checkpoints/last.pt, or start again"
        ) from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a crl checkpoint (no 'format' entry)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']}, this crl reads format "
            f"{CHECKPOINT_FORMAT}; resume it with the crl version that wrote it"
        )
    return state


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: value}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Iterable[str] = ()) -> list[str]:
    """``key: saved -> current`` for every (nested, dotted) key whose value differs."""
    ignored = tuple(ignore)
    a, b = _flat(json.loads(json.dumps(saved, default=str))), _flat(
        json.loads(json.dumps(current, default=str)))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignored) if ignored else False:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} in the checkpoint, "
                         f"{b.get(key, '<absent>')!r} now")
    return diffs


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                     what: str = "configuration", ignore: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` listing every difference between two configurations."""
    diffs = config_differences(saved, current, ignore)
    if diffs:
        raise CheckpointError(
            f"the checkpoint was written with another {what}; resuming would mix two runs. "
            "Differences:\n  " + "\n  ".join(diffs)
            + "\nResume with the run's own options (drop the conflicting ones), or start a new "
            "run in another directory"
        )


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's global and torch's CPU (and CUDA) generator states, as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),)
                    + tuple(state["python"][2:]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(gen: np.random.Generator | torch.Generator) -> Any:
    """A NumPy Generator's bit-generator state (dict of ints) or a torch Generator's tensor."""
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    return gen.bit_generator.state


def set_generator_state(gen: np.random.Generator | torch.Generator, state: Any) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    else:
        gen.bit_generator.state = state
