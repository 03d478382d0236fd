"""dtypes: float32 and float64 DOLFINx, float32 models with float64 DOLFINx."""

import copy

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, flux_ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno


def _setup(dtype):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 7, 6, dtype=dtype)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(V, dtype=dtype)
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[1] ** 2)
    return msh, V, u


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_closure_matches_ufl_in_dtype(dtype):
    """A model in the DOLFINx dtype assembles the UFL vector to a few eps of that dtype."""
    msh, V, u = _setup(dtype)
    torch_dtype = mno.torch_bridge.NUMPY_TO_TORCH[np.dtype(dtype)]
    closure = mno.Closure(FluxModel().to(torch_dtype), [u, ufl.grad(u)], (2,), 4)
    closure.update()
    assert closure.x.array.dtype == dtype
    v = ufl.TestFunction(V)
    b_closure = fem.assemble_vector(
        fem.form(ufl.inner(closure, ufl.grad(v)) * closure.dx, dtype=dtype)
    )
    dx = ufl.dx(metadata={"quadrature_degree": 4})
    b_ufl = fem.assemble_vector(fem.form(ufl.inner(flux_ufl(u), ufl.grad(v)) * dx, dtype=dtype))
    diff = msh.comm.allreduce(np.max(np.abs(b_closure.array - b_ufl.array)), op=MPI.MAX)
    scale = msh.comm.allreduce(np.max(np.abs(b_ufl.array)), op=MPI.MAX)
    assert diff <= 100 * np.finfo(dtype).eps * scale


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.mpi
def test_float32_model_with_float64_dolfinx():
    """A float32 model is cast at the boundary: values and tangents to float32 accuracy.

    Documented accuracy: relative to the largest value, the float32 closure differs from
    the float64 evaluation of the same weights by at most ~10 float32 eps (observed ~2).
    """
    msh, _, u = _setup(np.float64)
    model32 = Mlp().float()
    model64 = Mlp().double()  # same seed, same weights, rounded to float32 then widened
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    c32 = mno.Closure(model32, [u, ufl.grad(u)], (2,), 3, tangent=True)
    c64 = mno.Closure(model64, [u, ufl.grad(u)], (2,), 3, tangent=True)
    assert c32.model_dtype == torch.float32 and c32.x.array.dtype == np.float64
    c32.update()
    c64.update()
    comm = msh.comm
    eps32 = np.finfo(np.float32).eps
    for a, b in ((c32.x.array, c64.x.array), (c32.tangent.x.array, c64.tangent.x.array)):
        diff = comm.allreduce(np.max(np.abs(a - b)), op=MPI.MAX)
        scale = comm.allreduce(np.max(np.abs(b)), op=MPI.MAX)
        assert diff > 0  # really computed in float32
        assert diff <= 10 * eps32 * scale


def test_mixed_dtype_model_gets_a_message_naming_the_dtypes(tiny_square):
    """A model cast in part (one layer ``.double()``) fails in torch with "mat1 and mat2
    must have the same dtype"; the closure's message blamed the input width. Now it names
    the dtypes and the fix; a model whose buffer only differs keeps working."""
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 1)))
    mixed = Mlp().float()
    mixed.net[0].double()
    message = r"mix dtypes \(torch\.float32, torch\.float64\) and it is given torch\.float64 inputs"
    with pytest.raises(ValueError, match=message + "; cast the whole model to one dtype"):
        mno.Closure(mixed, [u, ufl.grad(u)], (2,), 1)
    model = Mlp().double()
    model.register_buffer("unused", torch.zeros(1, dtype=torch.float16))
    closure = mno.Closure(model, [u, ufl.grad(u)], (2,), 1)
    closure.update()
    assert closure.model_dtype == torch.float64
    expected = model(torch.zeros(1, 3, dtype=torch.float64)).detach().numpy()  # u = 0
    assert np.allclose(closure.x.array.reshape(-1, 2), expected, rtol=1e-14)
    # The grid evaluator of non-local closures says the same.
    grid_model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 1, 1))
    grid_model[1].double()
    evaluator = mno.torch_bridge.GridEvaluator(grid_model, 1, 1, (4, 4), np.float64, None)
    with pytest.raises(ValueError, match=r"grid \(the model's parameters and buffers mix dtypes"):
        evaluator.probe()


class _Spectral(torch.nn.Module):
    """A real and a complex parameter, as an FNO has."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.5, -1.25]))
        self.spectral = torch.nn.Parameter(torch.tensor([1.5 - 0.5j]))


@pytest.mark.parametrize(
    ("dtype", "complex_dtype"),
    [(torch.float64, torch.complex128), (torch.float32, torch.complex64)],
)
def test_to_precision_casts_real_and_complex_tensors(dtype, complex_dtype):
    """Real tensors to ``dtype``, complex ones to the matching complex dtype."""
    model = mno.to_precision(_Spectral(), dtype)
    assert model.weight.dtype == dtype and model.spectral.dtype == complex_dtype
    assert model.weight.tolist() == [0.5, -1.25]
    assert complex(model.spectral.detach()[0]) == 1.5 - 0.5j


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_precision_half_precisions_and_refusals(dtype):
    """``mno.to_precision(model, dtype)``, the cast docs/pitfalls.md names for a model of
    one dtype, takes the half precisions closures run in (it raised a bare
    ``KeyError: torch.float16``). Complex tensors have no supported half counterpart, and
    a non-float dtype is no precision: both are refused by name, the model left as it was.
    """
    linear = mno.to_precision(torch.nn.Linear(2, 1), dtype)
    assert {p.dtype for p in linear.parameters()} == {dtype}
    model = _Spectral()
    with pytest.raises(ValueError) as error:
        mno.to_precision(model, dtype)
    assert str(error.value) == (
        f"The model has complex tensors, which have no {dtype} counterpart (torch has no "
        "complex bfloat16, and its complex32 is experimental): cast it to torch.float32 or "
        "torch.float64."
    )
    assert model.weight.dtype == torch.float32 and model.spectral.dtype == torch.complex64
    with pytest.raises(TypeError) as error:
        mno.to_precision(model, torch.int32)
    assert str(error.value) == (
        "dtype must be a floating-point torch dtype (torch.float64, torch.float32, "
        "torch.float16 or torch.bfloat16), got torch.int32."
    )


@pytest.mark.mpi
def test_float16_model_cast_by_to_precision_runs_in_half_precision(tiny_square):
    """A float16 closure (docs/pitfalls.md): values to about float16's eps of the float64
    evaluation of the same weights, relative to the largest value, widened to float64."""
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] + 2 * x[1])
    torch.manual_seed(3)
    model64 = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model64 = mno.to_precision(model64, torch.float64)
    model16 = copy.deepcopy(model64)
    mno.to_precision(model16, torch.float16)
    closures = [mno.Closure(model, [u]) for model in (model16, model64)]
    for closure in closures:
        closure.update()
    assert closures[0].model_dtype == torch.float16 and closures[0].x.array.dtype == np.float64
    comm = tiny_square.comm
    diff = np.max(np.abs(closures[0].x.array - closures[1].x.array), initial=0)
    diff = comm.allreduce(diff, op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(closures[1].x.array), initial=0), op=MPI.MAX)
    assert 0 < diff <= 4 * torch.finfo(torch.float16).eps * scale
