"""Operands: names, widths, mesh and dtype inference, exact errors, the fused expression."""

import re

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno import quadrature
from dolfinx_mno.operands import (
    Operands,
    describe,
    flatten_operands,
    operand_comm,
    operand_components,
)


def setup(comm=MPI.COMM_WORLD, dtype=np.float64, cell=mesh.CellType.triangle, n=3):
    msh = mesh.create_unit_square(comm, n, n, cell_type=cell, dtype=dtype)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)), name="u", dtype=dtype)
    u.interpolate(lambda x: np.sin(2 * x[0]) + x[0] * x[1] ** 2)
    S = fem.functionspace(msh, ("Discontinuous Lagrange", 1, (2, 2)))
    sigma = fem.Function(S, name="s", dtype=dtype)
    sigma.interpolate(lambda x: np.stack([x[0], x[1], x[0] * x[1] - 1, 2 + x[1]]))
    return msh, u, sigma


def same_comm(a, b):
    return MPI.Comm.Compare(a, b) == MPI.IDENT


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_names_widths_mesh_and_dtype_are_inferred(dtype):
    msh, u, sigma = setup(MPI.COMM_SELF, dtype)
    x = ufl.SpatialCoordinate(msh)
    operands = Operands([u, ufl.grad(u), x, sigma, 2.0 * u])
    assert operands.names == ("u", "grad(u)", "x", "s", "2.0 * u")
    assert operands.shapes == ((), (2,), (2,), (2, 2), ())
    assert operands.widths == (1, 2, 2, 4, 1)
    assert operands.num_inputs == 10
    assert operands.component_names == [
        "u",
        "grad(u)[0]",
        "grad(u)[1]",
        "x[0]",
        "x[1]",
        "s[0,0]",
        "s[0,1]",
        "s[1,0]",
        "s[1,1]",
        "2.0 * u",
    ]
    assert operands.mesh is msh
    assert same_comm(operands.comm, msh.comm)
    assert operands.dtype == np.dtype(dtype)
    # Without coefficients the dtype is the mesh geometry's, and the mesh must be given.
    assert Operands([x], mesh=msh).dtype == np.dtype(dtype)


def test_names_from_a_dict_from_names_and_from_other_operands():
    _, u, _ = setup(MPI.COMM_SELF)
    named = Operands({"u": u, "grad_u": ufl.grad(u)})
    assert named.names == ("u", "grad_u")
    assert named.component_names == ["u", "grad_u[0]", "grad_u[1]"]
    assert repr(named) == "Operands(u: 1, grad_u: 2)"
    listed = Operands([u, ufl.grad(u)], names=["a", "b"])
    assert listed.names == ("a", "b")
    assert Operands(listed).names == ("a", "b")  # an Operands keeps its names...
    assert Operands(listed, names=["c", "d"]).names == ("c", "d")  # ...unless renamed
    assert Operands(u).names == ("u",)  # a single expression
    # A sequence of the UFL expressions, as the list it replaces.
    assert len(named) == 2
    assert named[0] is u
    assert list(named) == [named[0], named[1]]
    assert named[:1] == (u,)
    assert named.expressions == (named[0], named[1])


def test_default_names_do_not_depend_on_the_session():
    """Free indices are renumbered: the same script gives the same names every run."""
    _, u, _ = setup(MPI.COMM_SELF)
    first, second = ufl.indices(2)
    assert describe(ufl.grad(u)[first] * ufl.grad(u)[first]) == describe(
        ufl.grad(u)[second] * ufl.grad(u)[second]
    )
    assert Operands([ufl.grad(u)[first] * ufl.grad(u)[first]]).names == (
        "sum_{i_0} (grad(u))[i_0] * (grad(u))[i_0] ",
    )


def test_errors_name_the_fix():
    msh, u, _ = setup(MPI.COMM_SELF)
    other = mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    w = fem.Function(fem.functionspace(other, ("Lagrange", 1)), name="w")
    V = u.function_space
    cases = [
        ([], {}, ValueError, "A closure needs at least one operand."),
        (
            "u",
            {},
            TypeError,
            "operands must be UFL expressions (a list, a dict {name: expression} or "
            "dolfinx_mno.Operands), got str.",
        ),
        (
            [u, "grad(u)"],
            {},
            TypeError,
            "Operand 1 must be a UFL expression or a fem.Function, got str.",
        ),
        (
            {"u": u},
            {"names": ["u"]},
            TypeError,
            "Give operand names either as the keys of a dict or as names=, not both.",
        ),
        (
            [u, ufl.grad(u)],
            {"names": ["u"]},
            ValueError,
            "1 operand name(s) ['u'] were given for 2 operand(s).",
        ),
        (
            [u, ufl.grad(u)],
            {"names": ["a", "a"]},
            ValueError,
            "Operand names must be unique, but ['a'] repeat.",
        ),
        ([u], {"names": [""]}, TypeError, "Operand names must be non-empty strings, got ''."),
        ({1: u}, {}, TypeError, "Operand names must be non-empty strings, got 1."),
        (
            [u],
            {"names": "u"},
            TypeError,
            "names must be a list of strings, one per operand, got 'u'.",
        ),
        (
            [u, w],
            {},
            ValueError,
            "Operands must live on exactly one mesh, but they live on 2; pass mesh= to say "
            "which, or rebuild the operands on one mesh.",
        ),
        (
            [u, w],
            {"mesh": msh},
            ValueError,
            "Operands must live on the mesh they are used on, but operand(s) ['w'] belong to "
            "another mesh; build them from functions on that mesh.",
        ),
        (
            [ufl.SpatialCoordinate(msh)],
            {},
            ValueError,
            "Could not find the DOLFINx mesh of the operands (none of them contains a "
            "fem.Function); pass mesh= explicitly.",
        ),
        (
            [fem.Function(V, dtype=np.complex128)],
            {},
            TypeError,
            "Unsupported dtype complex128: closures support real float32 and float64 DOLFINx "
            "problems.",
        ),
        (
            [u * fem.Constant(msh, np.float32(2.0))],
            {},
            TypeError,
            "Operands mix scalar types ['float32', 'float64']; build their functions and "
            "constants in one scalar type.",
        ),
    ]
    for operands, kwargs, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            Operands(operands, **kwargs)


def test_operand_comm_never_raises():
    msh, u, _ = setup(MPI.COMM_SELF)
    assert same_comm(operand_comm([u], None), msh.comm)
    assert same_comm(operand_comm({"u": u}, None), msh.comm)
    assert same_comm(operand_comm(Operands([u]), None), msh.comm)
    assert same_comm(operand_comm(u, None), msh.comm)
    world = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    assert same_comm(operand_comm([u], world), world.comm)  # the mesh given wins
    for bad in ([], "u", [object()], [ufl.SpatialCoordinate(msh)]):
        assert operand_comm(bad, None) is MPI.COMM_SELF


def test_flattening_functions_stay_importable_from_quadrature():
    """Demos and tests import them from dolfinx_mno.quadrature."""
    _, u, sigma = setup(MPI.COMM_SELF)
    assert quadrature.flatten_operands is flatten_operands
    assert quadrature.operand_components is operand_components
    components, widths = operand_components([u, sigma])
    assert widths == [1, 4]
    assert components[0] is u
    assert [c.ufl_shape for c in components] == [()] * 5
    vector, widths = flatten_operands([u, sigma])
    assert vector.ufl_shape == (5,)
    assert widths == [1, 4]
    # Zero variations live on no mesh: these helpers split them without any check.
    assert operand_components([ufl.zero(2)])[1] == [2]


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", [mesh.CellType.triangle, mesh.CellType.quadrilateral])
def test_fused_expression_equals_each_operand_evaluated_alone(dtype, cell):
    msh, u, sigma = setup(MPI.COMM_WORLD, dtype, cell)
    x = ufl.SpatialCoordinate(msh)
    operands = Operands({"u": u, "grad_u": ufl.grad(u), "x": x, "s": sigma, "u2": u**2})
    _check_fused_expression(operands, quadrature_degree=3)


@pytest.mark.mpi
def test_fused_expression_on_a_rank_without_cells(tiny_square):
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: 1 + x[0] - 2 * x[1])
    _check_fused_expression(Operands([u, ufl.grad(u)]), quadrature_degree=2)


def _check_fused_expression(operands, quadrature_degree):
    """The fused expression gives each operand's values in its columns, on the owned cells."""
    msh = operands.mesh
    points = quadrature.quadrature_points(msh, quadrature_degree)
    cells = np.arange(msh.topology.index_map(msh.topology.dim).size_local, dtype=np.int32)
    fused = operands.expression(points).eval(msh, cells)
    assert fused.dtype == operands.dtype
    assert fused.shape == (len(cells), len(points), operands.num_inputs)
    eps = np.finfo(operands.dtype).eps
    start = 0
    for expression, width in zip(operands, operands.widths, strict=True):
        alone = fem.Expression(expression, points, dtype=operands.dtype).eval(msh, cells)
        alone = alone.reshape(len(cells), len(points), width)
        part = fused[:, :, start : start + width]
        scale = max(1.0, float(np.abs(alone).max(initial=0.0)))
        np.testing.assert_allclose(part, alone, rtol=0, atol=8 * eps * scale)
        start += width
    assert start == operands.num_inputs
    # Some rank evaluated something: the comparison is not vacuous.
    assert msh.comm.allreduce(fused.size) > 0


def test_closures_and_samplers_accept_operands():
    """The same Operands object is what a closure holds; names travel into its spec."""
    _, u, _ = setup(MPI.COMM_SELF)
    operands = Operands({"u": u, "grad_u": ufl.grad(u)})
    model = mno.MLP(3, 1, [4], seed=0, dtype="float64")
    from_operands = mno.Closure(model, operands)
    from_list = mno.Closure(model, [u, ufl.grad(u)])
    assert isinstance(from_list.operands, Operands)
    assert from_operands.operands.names == ("u", "grad_u")
    assert from_list.operands.names == ("u", "grad(u)")
    assert from_operands.operand_widths == [1, 2]
    assert from_operands.spec == mno.ClosureSpec(("u", "grad_u"), (1, 2), (), 2)
    from_operands.update()
    from_list.update()
    np.testing.assert_array_equal(from_operands.x.array, from_list.x.array)


@pytest.mark.mpi
@pytest.mark.parametrize("which", ["trial", "grad(test)", "u + trial"])
def test_form_arguments_are_refused_on_every_rank(tiny_square, which):
    """A TrialFunction where ``u_n`` was meant: a clear error at construction, not an update.

    ``fem.Expression`` tabulates an argument as a basis (one value per basis function), so
    the update used to overrun the operand buffer and corrupt memory. The check is
    rank-local and the same on every rank, also on a rank that owns no cells.
    """
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u_n = fem.Function(V, name="u_n")
    trial, test = ufl.TrialFunction(V), ufl.TestFunction(V)
    operand, kind = {
        "trial": (trial, "a TrialFunction"),
        "grad(test)": (ufl.grad(test), "a TestFunction"),
        "u + trial": (u_n + trial, "a TrialFunction"),
    }[which]
    message = re.escape(f"Operand 1 ({operand}) contains {kind}: a closure reads coefficients")
    with pytest.raises(TypeError, match=f"^{message}"):
        Operands([u_n, operand])
    width = 1 + int(np.prod(operand.ufl_shape, dtype=int))
    model = torch.nn.Linear(width, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"^{message}"):
        mno.Closure(model, [u_n, operand])
    with pytest.raises(TypeError, match=f"^{message}"):
        mno.NonlocalClosure(torch.nn.Conv2d(width, 1, 1), [u_n, operand], grid_shape=(4, 4))
