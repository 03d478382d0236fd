"""Affine normalisation stored with the model: values, tangents and state_dict."""

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno


def test_affine_normalization_from_data():
    torch.manual_seed(0)
    data = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 3.0
    norm = mno.AffineNormalization.from_data(data)
    z = norm(data)
    np.testing.assert_allclose(z.mean(dim=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(dim=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(norm.inverse(z), data, rtol=1e-12)
    constant = mno.AffineNormalization.from_data(torch.ones(10, 1))
    assert constant.scale.item() == 1.0
    with pytest.raises(ValueError, match="non-zero"):
        mno.AffineNormalization(scale=[1.0, 0.0], width=2)
    with pytest.raises(ValueError, match="Expected 2 normalisation values"):
        mno.AffineNormalization(shift=[1.0, 2.0, 3.0], width=2)


def test_constant_components_get_scale_one_whatever_the_width():
    """A constant column of 1e7/3 alone got its round-off, 4.66e-10, as scale (1.0 if wider)."""
    torch.manual_seed(0)
    value = 1e7 / 3
    constant = torch.full((1000, 1), value, dtype=torch.float64)
    assert constant.std(dim=0).item() > 1e-10  # torch's round-off, the old scale
    alone = mno.AffineNormalization.from_data(constant)
    assert alone.scale.item() == 1.0 and alone.shift.item() == value
    assert torch.all(alone(constant) == 0.0)
    # In a wider array, next to a normal column, a real spread of 1e-6 and 1 ulp of 1e7/3.
    ulp = np.spacing(value)
    columns = [
        constant[:, 0],
        torch.randn(1000, dtype=torch.float64) * 5.0 + 3.0,
        1e-6 * torch.randn(1000, dtype=torch.float64),
        value + ulp * (torch.arange(1000, dtype=torch.float64) % 2),
        1e-13 * torch.randn(1000, dtype=torch.float64),  # below eps: documented scale 1
    ]
    data = torch.stack(columns, dim=1)
    wide = mno.AffineNormalization.from_data(data)
    std = data.std(dim=0)
    assert 9e-7 < std[2] < 1.1e-6 and 0 < std[3] < 1e-9
    assert wide.scale.tolist() == [1.0, std[1].item(), std[2].item(), 1.0, 1.0]
    assert wide.shift[0].item() == value
    torch.testing.assert_close(wide.shift[1:], data[:, 1:].mean(dim=0), rtol=0, atol=0)
    # Per channel of fields (axis=1), pooled over the grid: the same rule.
    fields = torch.stack([constant[:, 0].reshape(10, 100), columns[1].reshape(10, 100)], 1)
    channels = mno.AffineNormalization.from_data(fields, axis=1)
    assert channels.scale.tolist() == [1.0, std[1].item()]
    # eps=0: an exactly constant component still gets scale 1, not 0 or its round-off.
    assert mno.AffineNormalization.from_data(constant, eps=0.0).scale.item() == 1.0


def test_per_channel_statistics_equal_numpy():
    """axis=1: one mean and (unbiased) standard deviation per channel, pooled over the rest."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 3, 4, 5)) * np.array([1.0, 5.0, 0.1])[:, None, None] + 2.0
    norm = mno.AffineNormalization.from_data(torch.from_numpy(data), axis=1)
    assert norm.axis == 1 and norm.shift.shape == (3,)
    np.testing.assert_allclose(norm.shift, data.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(norm.scale, data.std(axis=(0, 2, 3), ddof=1), rtol=1e-14)
    z = norm(torch.from_numpy(data))
    np.testing.assert_allclose(z.mean(dim=(0, 2, 3)), 0.0, atol=1e-14)
    np.testing.assert_allclose(z.std(dim=(0, 2, 3)), 1.0, rtol=1e-13)
    np.testing.assert_allclose(norm.inverse(z), data, rtol=1e-14)
    # Any grid: the statistics broadcast over the axes after the channel axis.
    other = torch.ones(2, 3, 6)
    expected = (1.0 - norm.shift[None, :, None]) / norm.scale[None, :, None]
    torch.testing.assert_close(norm(other), expected.expand(2, 3, 6), rtol=0, atol=0)
    # The last axis, pooled over samples and leading axes.
    last = mno.AffineNormalization.from_data(torch.from_numpy(data[:, :, 0, :]), axis=-1)
    np.testing.assert_allclose(last.scale, data[:, :, 0, :].std(axis=(0, 1), ddof=1))
    with pytest.raises(ValueError, match="axis must be -1 or positive"):
        mno.AffineNormalization(width=1, axis=0)
    with pytest.raises(ValueError, match=r"axis must be -1 or in \[1, 4\)"):
        mno.AffineNormalization.from_data(torch.from_numpy(data), axis=4)
    with pytest.raises(ValueError, match="acts on axis 1, but the tensor has 1 axes"):
        norm(torch.ones(3))


def test_normalized_grid_model_per_channel():
    """A NormalizedModel of fields applies the statistics per channel, on any grid."""
    conv = torch.nn.Conv1d(2, 1, 3, padding=1, padding_mode="circular").double()
    model = mno.NormalizedModel(
        conv,
        mno.AffineNormalization([1.0, -2.0], [2.0, 0.5], width=2, axis=1),
        mno.AffineNormalization(3.0, 4.0, width=1, axis=1),
    )
    for size in (8, 13):
        x = torch.randn(4, 2, size, dtype=torch.float64)
        z = (x - torch.tensor([1.0, -2.0])[:, None]) / torch.tensor([2.0, 0.5])[:, None]
        torch.testing.assert_close(model(x), 4.0 * conv(z) + 3.0, rtol=1e-15, atol=1e-14)


@pytest.mark.mpi
def test_normalized_closure_and_tangent_match_ufl():
    """y = so + σo·W((x - s)/σ): the closure and its Jacobian equal the UFL expression."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: 1 + x[0] ** 2 + x[1])
    linear = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        linear.weight.fill_(3.0)
    model = mno.NormalizedModel(
        torch.nn.Sequential(linear, torch.nn.Softplus()),
        mno.AffineNormalization(shift=2.0, scale=0.5, width=1),
        mno.AffineNormalization(shift=-1.0, scale=4.0, width=1),
    )
    assert {"input_normalization.shift", "output_normalization.scale"} <= set(model.state_dict())
    closure = mno.Closure(model, [u], quadrature_degree=2, tangent=True)
    closure.update()
    z = 3.0 * (u - 2.0) / 0.5
    reference = 4.0 * ufl.ln(1 + ufl.exp(z)) - 1.0
    v = ufl.TestFunction(V)
    dx = ufl.dx(metadata={"quadrature_degree": 2})
    F_closure = closure * v * closure.dx + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    F_ufl = reference * v * dx + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    from dolfinx.fem.petsc import assemble_matrix, assemble_vector

    b1, b2 = assemble_vector(fem.form(F_closure)), assemble_vector(fem.form(F_ufl))
    b1.axpy(-1.0, b2)
    assert b1.norm() <= 1e-13 * b2.norm()
    A1 = assemble_matrix(fem.form(mno.derivative(F_closure, u)))
    A1.assemble()
    A2 = assemble_matrix(fem.form(ufl.derivative(F_ufl, u)))
    A2.assemble()
    A1.axpy(-1.0, A2)
    assert A1.norm() <= 1e-13 * A2.norm()
    for obj in (b1, b2, A1, A2):
        obj.destroy()


def test_float32_model_gets_float32_statistics():
    model = mno.NormalizedModel(
        torch.nn.Linear(2, 1),
        mno.AffineNormalization(width=2),
        mno.AffineNormalization(width=1),
    )
    assert model.input_normalization.shift.dtype == torch.float32
    assert model(torch.zeros(4, 2)).dtype == torch.float32


def test_statistics_that_cannot_work_are_refused_and_the_callers_are_kept():
    """NaN data or shifts, no samples, statistics that overflow a float16 model (every
    input then normalised to 0: a constant closure, silently); the caller's normalisation
    object is not cast in place."""
    with pytest.raises(ValueError, match=r"^Normalisation shifts must be finite\.$"):
        mno.AffineNormalization(shift=[np.nan], scale=[1.0])
    data = torch.tensor([[1.0, 2.0], [np.nan, 0.0], [3.0, 1.0]])
    with pytest.raises(ValueError, match=r"^The data hold NaN or Inf in 1 of 3 samples"):
        mno.AffineNormalization.from_data(data)
    with pytest.raises(ValueError, match=r"^No samples to take statistics of \(data of shape"):
        mno.AffineNormalization.from_data(torch.zeros((0, 2)))
    wide = mno.AffineNormalization(shift=[0.0], scale=[1e5])
    half = torch.nn.Linear(1, 1).to(torch.float16)
    with pytest.raises(ValueError, match=r"^The input statistics do not fit the model's dtype"):
        mno.NormalizedModel(half, wide, mno.AffineNormalization())
    assert wide.scale.dtype == torch.float64 and wide.scale.item() == 1e5
    single = torch.nn.Linear(1, 1)
    wrapped = mno.NormalizedModel(single, wide, mno.AffineNormalization())
    assert wrapped.input_normalization.scale.dtype == torch.float32
    assert wide.scale.dtype == torch.float64  # the caller's object, unchanged
    x = torch.tensor([[2e5]])
    expected = single(torch.tensor([[2.0]]))
    torch.testing.assert_close(wrapped(x), expected)
