"""The operand stage: packed kernel, constant dof→operand matrix, fallbacks."""

import types

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno._timing import best_times
from dolfinx_mno.operand_map import OperandEvaluator, is_affine_in_coefficients
from dolfinx_mno.quadrature import flatten_operands, quadrature_points


def _setup(msh, operands_of, degree=2):
    """The fused expression of ``operands_of(u, w, x)``, a buffer and Expression.eval's values."""
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
    u.interpolate(lambda x: np.sin(3 * x[0]) + x[1] ** 2)
    w = fem.Function(fem.functionspace(msh, ("Lagrange", 1, (2,))))
    w.interpolate(lambda x: np.stack([x[0] * x[1], np.cos(x[1])]))
    x = ufl.SpatialCoordinate(msh)
    vector, widths = flatten_operands(operands_of(u, w, x))
    expression = fem.Expression(vector, quadrature_points(msh, degree))
    num_cells = msh.topology.index_map(msh.topology.dim).size_local
    buffer = np.zeros((num_cells, expression.X().shape[0], sum(widths)))
    return u, w, expression, num_cells, buffer


def _expected(expression, msh, num_cells):
    return expression.eval(msh, np.arange(num_cells, dtype=np.int32))


AFFINE = {
    "u_grad_u": lambda u, w, x: [u, ufl.grad(u)],
    "vector": lambda u, w, x: [w, ufl.grad(w), u],
    "with_x": lambda u, w, x: [2 * u + x[0], x],
}
NONLINEAR = {
    "square": lambda u, w, x: [u**2, ufl.grad(u)],
    "product": lambda u, w, x: [u * w[0]],
}


def _eager_compile(monkeypatch):
    """Stand torch.compile in by the identity: the compiled mode's loop runs eagerly."""
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(5, 4), (1, 1)])
@pytest.mark.parametrize("name", sorted(AFFINE))
@pytest.mark.parametrize("mode", [None, "packed", "matrix", "compiled", "expression"])
def test_every_mode_gives_expression_eval(cells, name, mode, monkeypatch):
    """On (1, 1) cells and 3 ranks one rank owns no cells."""
    _eager_compile(monkeypatch)
    msh = mesh.create_unit_square(MPI.COMM_WORLD, *cells)
    u, w, expression, num_cells, buffer = _setup(msh, AFFINE[name])
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer, mode=mode)
    assert evaluator.affine
    assert evaluator.mode in (("packed", "matrix") if mode is None else (mode,))
    assert evaluator.plan["mode"] == evaluator.mode
    for _step in range(2):  # after a change of the coefficients too
        evaluator.evaluate()
        expected = _expected(expression, msh, num_cells)
        np.testing.assert_allclose(buffer, expected, rtol=1e-13, atol=1e-12)
        u.x.array[:] *= 1.5
        w.x.array[:] -= 0.25


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(AFFINE))
def test_operand_matrix_maps_the_dofs_to_the_operands(name):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 3)
    _u, _w, expression, num_cells, buffer = _setup(msh, AFFINE[name])
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer)
    operator = evaluator.matrix()
    dofs = np.concatenate([c.x.array for c in operator.coefficients])
    assert operator.column_offsets[-1] == dofs.size
    assert operator.matrix.shape == (buffer.size, dofs.size)
    values = operator.matrix @ torch.from_numpy(dofs) + torch.from_numpy(operator.offset).ravel()
    expected = _expected(expression, msh, num_cells).reshape(-1)
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-13, atol=1e-12)
    assert np.any(operator.offset) == (name == "with_x")
    # The transpose pulls quadrature-point sensitivities back to the dofs: <A d, s> = <d, Aᵀ s>.
    sensitivity = torch.from_numpy(np.random.default_rng(1).random(buffer.size))
    pulled = operator.matrix.t() @ sensitivity
    lhs = float(sensitivity @ (operator.matrix @ torch.from_numpy(dofs)))
    assert np.isclose(lhs, float(pulled @ torch.from_numpy(dofs)), rtol=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(NONLINEAR))
def test_nonlinear_operands_have_no_matrix(name):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    _u, _w, expression, num_cells, buffer = _setup(msh, NONLINEAR[name])
    assert not is_affine_in_coefficients(expression.ufl_expression)
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer)
    assert evaluator.mode == "packed" and "not affine" in evaluator.plan["matrix"]
    evaluator.evaluate()
    np.testing.assert_allclose(buffer, _expected(expression, msh, num_cells), rtol=1e-14)
    with pytest.raises(ValueError, match="not affine in the coefficients"):
        evaluator.matrix()
    with pytest.raises(ValueError, match="needs operands affine"):
        OperandEvaluator(expression, msh, num_cells, buffer, mode="matrix")


def test_constants_are_packed_and_not_affine():
    """A fem.Constant may change between updates: packed every update, never in a matrix."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    c = fem.Constant(msh, np.array([2.0, -1.0]))
    _u, _w, expression, num_cells, buffer = _setup(msh, lambda u, w, x: [c[0] * u + c[1]])
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer)
    assert not evaluator.affine and evaluator.mode == "packed"
    for value in ([2.0, -1.0], [0.5, 3.0]):
        c.value[:] = value
        evaluator.evaluate()
        np.testing.assert_allclose(buffer, _expected(expression, msh, num_cells), rtol=1e-14)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["matrix", "compiled"])
def test_a_moving_mesh_drops_the_matrix_for_good(mode, monkeypatch):
    _eager_compile(monkeypatch)
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    _u, _w, expression, num_cells, buffer = _setup(msh, AFFINE["u_grad_u"])
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer, mode=mode)
    msh.geometry.x[:, 0] *= 1.5  # stretch: the gradients change
    evaluator.evaluate()
    if num_cells > 0:
        assert evaluator.mode == "packed"
        assert evaluator.plan[mode] == "dropped: the mesh geometry changed"
    np.testing.assert_allclose(buffer, _expected(expression, msh, num_cells), rtol=1e-13)


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(AFFINE))
def test_compile_adds_the_compiled_mode_and_keeps_the_fastest(name, monkeypatch):
    """compile=True times the compiled map beside packed and matrix and keeps the fastest."""
    _eager_compile(monkeypatch)
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 7)
    u, _w, expression, num_cells, buffer = _setup(msh, AFFINE[name])
    plain = OperandEvaluator(expression, msh, num_cells, buffer.copy())
    assert "compiled" not in plain.plan.get("seconds", {})
    # Blocks of P2 u and vector w: 6-12x the operands, over the default limit (4x).
    limit = 2**30
    evaluator = OperandEvaluator(
        expression, msh, num_cells, buffer, max_matrix_bytes=limit, compile=True
    )
    seconds = evaluator.plan["seconds"]
    assert sorted(seconds) == ["compiled", "matrix", "packed"]
    assert evaluator.mode == min(seconds, key=seconds.__getitem__)
    for other in {"matrix", "compiled"} - {evaluator.mode}:
        assert evaluator.plan[other] == f"built, slower than {evaluator.mode}"
    for _step in range(2):
        evaluator.evaluate()
        np.testing.assert_allclose(
            buffer, _expected(expression, msh, num_cells), rtol=1e-13, atol=1e-12
        )
        u.x.array[:] += 0.5


def test_a_failed_compilation_keeps_the_other_modes(monkeypatch):
    def broken(function, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler\nsecond line")

        return fails

    monkeypatch.setattr(torch, "compile", broken)
    msh = mesh.create_unit_square(MPI.COMM_SELF, 4, 4)
    _u, _w, expression, num_cells, buffer = _setup(msh, AFFINE["u_grad_u"])
    evaluator = OperandEvaluator(
        expression, msh, num_cells, buffer, max_matrix_bytes=2**30, compile=True
    )
    assert evaluator.plan["compiled"] == "failed: RuntimeError: no C++ compiler"
    assert evaluator.mode in ("packed", "matrix")
    assert sorted(evaluator.plan["seconds"]) == ["matrix", "packed"]
    evaluator.evaluate()
    np.testing.assert_allclose(buffer, _expected(expression, msh, num_cells), rtol=1e-13)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        OperandEvaluator(expression, msh, num_cells, buffer, mode="compiled")


def test_operands_without_coefficients_skip_the_compiled_mode(monkeypatch):
    """Operands x alone: compile=True used to try the compiled map, whose torch.cat of no
    coefficient arrays failed (with torch's traceback logged) before falling back."""
    _eager_compile(monkeypatch)
    msh = mesh.create_unit_square(MPI.COMM_SELF, 4, 3)
    _u, _w, expression, num_cells, buffer = _setup(msh, lambda u, w, x: [x, 2 * x[0]])
    evaluator = OperandEvaluator(
        expression, msh, num_cells, buffer, max_matrix_bytes=2**30, compile=True
    )
    assert evaluator.plan["compiled"] == "not tried: the operands read no coefficient"
    forced = OperandEvaluator(expression, msh, num_cells, buffer.copy(), mode="compiled")
    for each in (evaluator, forced):
        each.evaluate()
    expected = _expected(expression, msh, num_cells)
    np.testing.assert_allclose(buffer, expected, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(forced._values, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.slow
@pytest.mark.mpi
def test_the_compiled_map_writes_the_operands_in_place_with_inductor():
    """The real torch.compile: Expression.eval's values, written straight into the buffer.

    Two coefficients and an offset (``x``); on (1, 1) cells and 3 ranks one rank owns no
    cells. No allocation the size of the operands in an update (the loop writes every
    value once, into the caller's buffer).
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)
    operands = lambda u, w, x: [w, ufl.grad(u), 2 * u + x[0]]  # noqa: E731
    u, w, expression, num_cells, buffer = _setup(msh, operands)
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer, mode="compiled")
    assert evaluator.mode == "compiled"
    for _step in range(2):
        evaluator.evaluate()
        np.testing.assert_allclose(
            buffer, _expected(expression, msh, num_cells), rtol=1e-13, atol=1e-12
        )
        u.x.array[:] *= -2.0
        w.x.array[:] += 1.0
    if num_cells == 0:
        return
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        evaluator.evaluate()
    allocated = [e.cpu_memory_usage for e in profile.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < buffer.nbytes


def test_elements_with_dof_transformations_use_expression_eval():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    sigma = fem.Function(fem.functionspace(msh, ("N1curl", 2)))
    sigma.interpolate(lambda x: np.stack([x[1] ** 2, np.sin(x[0])]))
    vector, _ = flatten_operands([sigma])
    expression = fem.Expression(vector, quadrature_points(msh, 2))
    num_cells = msh.topology.index_map(2).size_local
    buffer = np.zeros((num_cells, expression.X().shape[0], 2))
    evaluator = OperandEvaluator(expression, msh, num_cells, buffer)
    assert evaluator.mode == "expression"
    assert evaluator.plan["fallback"] == "an element needs dof transformations"
    evaluator.evaluate()
    np.testing.assert_allclose(buffer, _expected(expression, msh, num_cells), rtol=1e-14)
    with pytest.raises(ValueError, match="does not apply"):
        OperandEvaluator(expression, msh, num_cells, buffer, mode="packed")


@pytest.mark.mpi
def test_closure_exposes_its_operand_matrix_and_plan():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 5)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: x[0] ** 2 + np.sin(x[1]))
    closure = mno.Closure(torch.nn.Identity(), [u, ufl.grad(u)], (3,), device="cpu")
    closure.update()
    plan = closure.evaluation_plan
    assert plan["operands"]["mode"] in ("packed", "matrix")
    assert "compiled" not in plan["operands"]["seconds"]  # only with compile=True
    operator = closure.operand_matrix()
    values = operator.matrix @ torch.from_numpy(u.x.array)
    np.testing.assert_allclose(
        values.numpy(), closure._evaluator.inputs.reshape(-1), rtol=1e-13, atol=1e-12
    )


def test_the_modes_are_timed_in_turn(monkeypatch):
    """best_times interleaves its candidates (a slow moment falls on all) and keeps minima.

    On a clock that only the candidates advance: real sleeps of a millisecond took two
    under the load of the test suite itself, and the test failed.
    """
    from dolfinx_mno import _timing

    clock = [0.0]
    monkeypatch.setattr(_timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    durations = {"a": iter([0, 0.003, 0.001, 0.002]), "b": iter([0, 0.0, 0.004, 0.002])}

    def candidate(name):
        def run():
            calls.append(name)
            clock[0] += next(durations[name])

        return run

    seconds = best_times({"a": candidate("a"), "b": candidate("b")}, repeats=3)
    assert calls == ["a", "b"] * 4
    assert seconds == {"a": 0.001, "b": 0.0}
