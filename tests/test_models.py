"""MLP classifier: head selection, protected parameters, vmap compatibility."""

import pytest
import torch

from crl.supervised.models import MLPClassifier


def test_multi_head_gathers_the_task_head() -> None:
    torch.manual_seed(0)
    model = MLPClassifier(in_features=6, hidden=(5,), n_heads=3, head_outputs=2)
    x = torch.randn(4, 6)
    task = torch.tensor([0, 2, 1, 2])
    out = model(x, task)
    z = model.trunk(x)
    for i, t in enumerate(task.tolist()):
        assert torch.allclose(out[i], model.heads[t](z[i]))


def test_only_the_task_head_gets_a_gradient() -> None:
    model = MLPClassifier(in_features=6, hidden=(5,), n_heads=3, head_outputs=2)
    model(torch.randn(8, 6), torch.full((8,), 1)).sum().backward()
    assert model.heads[1].weight.grad.abs().sum() > 0
    assert model.heads[0].weight.grad.abs().sum() == 0
    assert model.heads[2].weight.grad.abs().sum() == 0


def test_protected_parameters_exclude_task_heads_only_when_multi_head() -> None:
    multi = MLPClassifier(in_features=6, hidden=(5, 4), n_heads=3, head_outputs=2)
    single = MLPClassifier(in_features=6, hidden=(5, 4), n_heads=1, head_outputs=10)
    assert set(multi.protected_parameters()) == {
        "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"
    }
    assert set(single.protected_parameters()) == {
        "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias",
        "heads.0.weight", "heads.0.bias",
    }


def test_forward_runs_per_sample_under_vmap() -> None:
    model = MLPClassifier(in_features=6, hidden=(5,), n_heads=3, head_outputs=2)
    x, task = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    per_sample = torch.func.vmap(lambda xi, ti: model(xi[None], ti[None])[0])(x, task)
    assert torch.allclose(per_sample, model(x, task))


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="hidden widths"):
        MLPClassifier(hidden=(0,))
    with pytest.raises(ValueError, match="activation"):
        MLPClassifier(activation="swish")
    with pytest.raises(ValueError, match="task id"):
        MLPClassifier(n_heads=2)(torch.randn(1, 784))
