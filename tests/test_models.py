"""The MLP closure model (JSON config, seeding, dtypes, shapes) and the Bounded wrapper."""

import json

import pytest
import torch

from dolfinx_mno.models import ACTIVATIONS, MLP, Bounded


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
    # A string is a sequence too: "64" used to build layers of widths 6 and 4.
    for hidden in ("64", 64):
        with pytest.raises(TypeError, match=r"^hidden_features must be a sequence of layer"):
            MLP(2, 1, hidden)
    with pytest.raises(TypeError, match=r"^MLP layer widths must be integers, got \[4.5\]"):
        MLP(2, 1, [4.5])
    assert MLP(2, 1, (w for w in (3, 5)), seed=0).config["hidden_features"] == [3, 5]
    assert sorted(ACTIVATIONS) == ["elu", "gelu", "relu", "sigmoid", "silu", "softplus", "tanh"]


def test_bounded_values_and_gradient():
    """``b tanh(m / b)``: bounded for any input, the chain rule's gradient, m's dtype."""
    model = MLP(3, 2, hidden_features=[8], seed=0)
    bounded = Bounded(model, bound=0.7)
    x = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    y = bounded(x)
    raw = model(x)
    torch.testing.assert_close(y, 0.7 * torch.tanh(raw / 0.7), rtol=0, atol=0)
    assert y.dtype == torch.float64 and y.shape == (50, 2)
    assert bounded(1e8 * torch.ones(3, 3, dtype=torch.float64)).abs().max() <= 0.7
    (grad,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad((raw * (1 - torch.tanh(raw / 0.7) ** 2).detach()).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-14, atol=1e-15)
    # Well inside the bound the output is nearly the model's: |y| < b/2 loses < 8 %.
    small = torch.linspace(-0.35, 0.35, 11, dtype=torch.float64)
    assert (0.7 * torch.tanh(small / 0.7) / small.where(small != 0, 1.0))[small != 0].min() > 0.92
    assert list(bounded.parameters()) == list(model.parameters())
    assert "bound=0.7" in repr(bounded)


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_bounded_refuses_bad_bounds(bound):
    with pytest.raises(ValueError, match="Bounded needs a finite bound > 0"):
        Bounded(MLP(2, 1, [4]), bound)
