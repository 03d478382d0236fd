"""The MLP closure model: JSON config, seeding, dtypes, shapes."""

import json

import pytest
import torch

from dolfinx_mno.models import ACTIVATIONS, MLP


def test_config_rebuilds_the_same_network():
    model = MLP(3, 2, hidden_features=(16, 8), activation="softplus", dtype=torch.float32, seed=4)
    config = json.loads(json.dumps(model.config))
    assert config == {
        "in_features": 3,
        "out_features": 2,
        "hidden_features": [16, 8],
        "activation": "softplus",
        "dtype": "float32",
        "seed": 4,
    }
    twin = MLP(**config)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    x = torch.randn(7, 3)
    assert model(x).shape == (7, 2)
    assert [type(m) for m in model.layers] == [
        torch.nn.Linear, torch.nn.Softplus, torch.nn.Linear, torch.nn.Softplus, torch.nn.Linear
    ]  # fmt: skip


def test_seed_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    a = MLP(2, 1, [4], seed=1)
    assert torch.equal(torch.rand(2), expected)
    b = MLP(2, 1, [4], seed=1)
    c = MLP(2, 1, [4], seed=2)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    assert MLP(2, 1, []).layers[0].weight.dtype == torch.float64  # default dtype


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Unknown activation 'swish'; choose one of \['elu'"):
        MLP(2, 1, activation="swish")
    with pytest.raises(ValueError, match=r"widths must be positive, got \[2, 0, 1\]"):
        MLP(2, 1, [0])
    with pytest.raises(ValueError, match="dtype must be one of"):
        MLP(2, 1, dtype="int32")
    assert sorted(ACTIVATIONS) == ["elu", "gelu", "relu", "sigmoid", "silu", "softplus", "tanh"]
