"""Gymnasium side of crl: task specs, task sequences with switch points, and the registry.

``import envs`` registers every built-in sequence as ``crl/<Name>-v0`` with Gymnasium.
"""

from envs.continual import ContinualEnv, TaskIdWrapper, make_task_env
from envs.errors import EnvConfigError, MissingExtraError, SpaceMismatchError
from envs.registry import (
    SEQUENCES,
    describe_sequences,
    get_sequence,
    make,
    register_sequences,
    sequence_names,
    sequence_rows,
)
from envs.sequence import TaskSequence
from envs.spaces import unify_spaces
from envs.spec import TaskSpec, WrapperSpec
from envs.yaml_io import load_sequence, sequence_from_dict

register_sequences()

__all__ = [
    "SEQUENCES",
    "ContinualEnv",
    "EnvConfigError",
    "MissingExtraError",
    "SpaceMismatchError",
    "TaskIdWrapper",
    "TaskSequence",
    "TaskSpec",
    "WrapperSpec",
    "describe_sequences",
    "get_sequence",
    "load_sequence",
    "make",
    "make_task_env",
    "register_sequences",
    "sequence_from_dict",
    "sequence_names",
    "sequence_rows",
    "unify_spaces",
]
