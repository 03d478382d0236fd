"""Bad input gets a clear error and loses nothing — on every rank, without hangs."""

import copy
import pickle
import re
import time

from mpi4py import MPI

import basix.ufl
import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.data import GriddedSampler
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.torch_bridge import PointwiseEvaluator


@pytest.fixture
def setup():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] + 2 * x[1])
    return msh, V, u


def mlp(n_in, n_out):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_out)
    ).double()


def test_input_width_mismatch(setup):
    _, _, u = setup
    expected = r"input width mismatch.*takes 3 input.*provide 1 \(a \(2, 1\) probe"
    with pytest.raises(ValueError, match=expected):
        mno.Closure(mlp(3, 1), [u])


def test_output_width_mismatch(setup):
    _, _, u = setup
    with pytest.raises(ValueError, match=r"output width mismatch.*value_shape \(2,\).*\(3,\)"):
        mno.Closure(mlp(3, 3), [u, ufl.grad(u)], value_shape=(2,))


def test_operands_from_another_mesh(setup):
    msh, _, u = setup
    other = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    w = fem.Function(fem.functionspace(other, ("Lagrange", 1)))
    with pytest.raises(ValueError, match="live on exactly one mesh"):
        mno.Closure(mlp(2, 1), [u, w])
    with pytest.raises(ValueError, match="another mesh"):
        mno.Closure(mlp(1, 1), [w], mesh=msh)


def test_unsupported_dtype(setup):
    _, V, _ = setup
    z = fem.Function(V, dtype=np.complex128)
    with pytest.raises(TypeError, match="Unsupported dtype complex128"):
        mno.Closure(mlp(1, 1), [z])


def test_unsupported_model_dtype(setup):
    _, _, u = setup
    model = torch.nn.Linear(1, 1, dtype=torch.complex64)
    with pytest.raises(TypeError, match="Unsupported model dtype"):
        mno.Closure(model, [u])


def test_bad_arguments(setup):
    _, _, u = setup
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        mno.Closure(lambda x: x, [u])
    with pytest.raises(ValueError, match="at least one operand"):
        mno.Closure(mlp(1, 1), [])
    with pytest.raises(ValueError, match="quadrature_degree"):
        mno.Closure(mlp(1, 1), [u], quadrature_degree=-1)
    with pytest.raises(ValueError, match="value_shape"):
        mno.Closure(mlp(1, 1), [u], value_shape=(0,))


@pytest.mark.mpi
def test_mismatched_quadrature_degree(setup):
    _, V, u = setup
    closure = mno.Closure(mlp(1, 1), [u], quadrature_degree=2)
    v = ufl.TestFunction(V)
    du = ufl.TrialFunction(V)
    a = du * v * ufl.dx
    wrong = closure * v * ufl.dx(metadata={"quadrature_degree": 4})
    with pytest.raises(ValueError, match=r"Quadrature mismatch.*degree 4.*degree-2"):
        LinearProblem(a, wrong, petsc_options_prefix="bad_q_")
    with pytest.raises(ValueError, match="Quadrature mismatch"):
        mno.check_form(wrong)
    with pytest.raises(ValueError, match="Quadrature mismatch"):
        mno.form(wrong)
    assert mno.form(closure * v * closure.dx) is not None
    with pytest.raises(ValueError, match="cannot be integrated over 'exterior_facet'"):
        mno.check_form(closure * v * ufl.ds)
    other = mno.Closure(mlp(1, 1), [u], quadrature_degree=3, name="other")
    with pytest.raises(ValueError, match="mixes closures with different quadrature degrees"):
        mno.check_form((closure + other) * v * ufl.dx)
    # The matching measure is fine; a plain dx is not (see test_plain_measure_refused).
    mno.check_form(closure * v * closure.dx + closure * v * ufl.dx(degree=2))
    with pytest.raises(ValueError, match="plain measure"):
        mno.check_form(closure * v * closure.dx + closure * v * ufl.dx)
    with pytest.raises(ValueError, match="Quadrature mismatch"):
        NonlinearProblem(
            wrong + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx,
            u,
            petsc_options_prefix="bad_q_nl_",
        )


class NaNWhereLarge(torch.nn.Module):
    """Returns NaN where the operand exceeds a threshold (set between updates)."""

    def __init__(self):
        super().__init__()
        self.threshold = np.inf

    def forward(self, x):
        y = 2.0 * x[:, 0]
        return torch.where(x[:, 0] > self.threshold, torch.nan, y)


@pytest.mark.mpi
@pytest.mark.parametrize("tangent", [False, True])
def test_nan_output_keeps_previous_values(setup, tangent):
    msh, _, u = setup
    comm = msh.comm
    model = NaNWhereLarge()
    closure = mno.Closure(model, [u], quadrature_degree=2, tangent=tangent)
    closure.update()
    before = closure.x.array.copy()
    tangent_before = closure.tangent.x.array.copy() if tangent else None
    assert np.allclose(
        before[: closure._value_dofs.stop], 2 * np.repeat(closure._evaluator.inputs[:, 0], 1)
    )
    # u = x + 2y ∈ [0, 3]: u > 2.5 only in a corner, i.e. on some ranks only.
    model.threshold = 2.5
    u.x.array[:] += 0.0  # operands unchanged; only the model misbehaves
    with pytest.raises(mno.ClosureEvaluationError) as info:
        closure.update()
    # Every rank raises the same text: the failing ranks, their number, and the first
    # failing rank's count of bad points.
    local_bad = int(np.sum(closure._evaluator.inputs[:, 0] > 2.5))
    counts = comm.allgather((local_bad, closure._evaluator.num_points))
    failing = [r for r, (bad, _) in enumerate(counts) if bad]
    bad, total = counts[failing[0]]
    what = "values or tangents" if tangent else "values"
    ranks = "rank" if comm.size == 1 else "ranks"
    assert str(info.value) == (
        f"Update 2 of closure 'closure' failed on rank(s) {failing} ({len(failing)} of "
        f"{comm.size} {ranks}); on rank {failing[0]}: the model returned NaN/Inf {what} at "
        f"{bad} of {total} quadrature points. The previous closure values were kept."
    )
    np.testing.assert_array_equal(closure.x.array, before)
    if tangent:
        np.testing.assert_array_equal(closure.tangent.x.array, tangent_before)
    assert closure.update_count == 1
    # Once the model behaves again, updates go on.
    model.threshold = np.inf
    closure.update()
    assert closure.update_count == 2


class NonFiniteAtPoints(torch.nn.Module):
    """``2 u`` (``(2 u, u)`` if ``vector``), with NaN or Inf at chosen points of this rank
    (in the last component; set between updates)."""

    def __init__(self, vector: bool):
        super().__init__()
        self.vector = vector
        self.bad: dict[int, float] = {}
        self.seen = 0

    def forward(self, x):
        y = torch.stack([2.0 * x[:, 0], x[:, 0]], 1) if self.vector else 2.0 * x[:, 0]
        start, self.seen = self.seen, self.seen + x.shape[0]
        for point, value in self.bad.items():
            if start <= point < self.seen:
                y = y.clone()
                y[point - start, ...] = value
                if self.vector:
                    y[point - start, 0] = 1.0  # only the last component is bad
        return y


@pytest.mark.mpi
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("vector", [False, True])
def test_non_finite_value_in_any_chunk_is_caught(setup, value, vector):
    """One non-finite value in a middle or the last of many chunks fails the update.

    The finiteness test adds up the squares of each chunk's values as they are written; a
    single NaN/Inf in any chunk must make that sum non-finite (and an Inf and a -Inf in
    different chunks must not hide each other).
    """
    msh, _, u = setup
    comm = msh.comm
    model = NonFiniteAtPoints(vector)
    closure = mno.Closure(model, [u], (2,) if vector else (), quadrature_degree=2, batch_size=5)
    n = closure._evaluator.num_points
    counts = comm.allgather(n)
    owner = int(np.argmax(counts))  # the rank with the most points gets the bad values
    assert counts[owner] >= 3 * 5  # several chunks there
    model.seen = 0  # the construction's probe and timings called the model too
    closure.update()
    before = closure.x.array.copy()
    for bad in ({n - 1: value}, {n // 2: value}, {n // 3: np.inf, n - 2: -np.inf}):
        model.seen = 0
        model.bad = bad if comm.rank == owner else {}
        with pytest.raises(mno.ClosureEvaluationError) as info:
            closure.update()
        assert f"failed on rank(s) [{owner}]" in str(info.value)
        assert f"returned NaN/Inf values at {len(bad)} of {counts[owner]}" in str(info.value)
        np.testing.assert_array_equal(closure.x.array, before)
    model.seen, model.bad = 0, {}
    closure.update()
    np.testing.assert_array_equal(closure.x.array, before)
    assert closure.update_count == 2


class RaiseOnLastRank(torch.nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.rank = rank
        self.armed = False

    def forward(self, x):
        if self.armed and self.rank == MPI.COMM_WORLD.size - 1:
            raise RuntimeError("simulated failure")
        return x[:, 0] * 1.0


@pytest.mark.mpi
def test_error_on_one_rank_does_not_hang(setup):
    """A model that raises on the last rank only: every rank raises, none hangs."""
    msh, _, u = setup
    comm = msh.comm
    model = RaiseOnLastRank(comm.rank)
    closure = mno.Closure(model, [u], quadrature_degree=1)
    closure.update()
    before = closure.x.array.copy()
    model.armed = True
    last = comm.size - 1
    with pytest.raises(mno.ClosureEvaluationError) as info:
        closure.update()
    ranks = "rank" if comm.size == 1 else "ranks"
    assert str(info.value) == (
        f"Update 2 of closure 'closure' failed on rank(s) [{last}] (1 of {comm.size} {ranks}); "
        f"on rank {last}: the model raised RuntimeError: simulated failure. The previous "
        "closure values were kept."
    )
    # The failing rank chains the model's own exception (and its traceback).
    cause = info.value.__cause__
    if comm.rank == last:
        assert isinstance(cause, RuntimeError) and str(cause) == "simulated failure"
    else:
        assert cause is None
    np.testing.assert_array_equal(closure.x.array, before)
    comm.Barrier()  # every rank got here


@pytest.mark.mpi
def test_arguments_that_differ_between_ranks_are_refused_on_every_rank(tiny_square):
    """A quadrature degree or a grid shape computed from the rank (a user's typo) built a
    different quadrature space or grid on each rank without a word; what followed hung
    or mixed spaces. Refused on every rank, naming each rank's value (on 3 ranks the last
    rank owns no cells)."""
    comm = tiny_square.comm
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 1)))
    degrees = [2 + (r == comm.size - 1) for r in range(comm.size)]
    expected = (
        "Building closure 'closure': every rank must pass the same arguments, but they "
        f"differ (quadrature_degree: {degrees} on ranks 0..{comm.size - 1})."
    )
    if comm.size == 1:  # nothing to compare: it is built
        assert mno.Closure(mlp(1, 1), [u], (), degrees[comm.rank]).quadrature_degree == 3
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            mno.Closure(mlp(1, 1), [u], (), degrees[comm.rank])
    shapes = [(8, 8 + (r == comm.size - 1)) for r in range(comm.size)]
    expected = (
        "Building non-local closure 'nonlocal_closure': every rank must pass the same "
        f"arguments, but they differ (grid_shape: {shapes} on ranks 0..{comm.size - 1})."
    )
    if comm.size > 1:
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            mno.NonlocalClosure(
                torch.nn.Identity(), [u], (), 2, grid_shape=shapes[comm.rank], device="cpu"
            )
    comm.Barrier()  # every rank got here


@pytest.mark.mpi
def test_model_file_on_rank_zero_only_raises_on_every_rank(setup, tmp_path):
    """Rank 0 saved a model file that the other ranks do not see (yet): all raise, at once.

    Every rank raises the first failing rank's error type (here FileNotFoundError), with a
    message naming the failing ranks and quoting the first one's reason.
    """
    _, _, u = setup
    comm = u.function_space.mesh.comm
    path = tmp_path / "model.pt"  # each rank's own folder: only rank 0's holds the file
    if comm.rank == 0:
        mno.save_model(path, mno.MLP(1, 1, [4], seed=0))
    comm.Barrier()
    if comm.size == 1:
        closure = mno.Closure(path, [u], quadrature_degree=1)
        closure.update()
        assert closure.update_count == 1
        return
    paths = comm.allgather(str(path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        mno.Closure(path, [u], quadrature_degree=1, name="flux")
    elapsed = time.perf_counter() - start
    others = list(range(1, comm.size))
    assert str(info.value) == (
        f"Building closure 'flux' failed on rank(s) {others} ({comm.size - 1} of {comm.size} "
        f"ranks); on rank 1: FileNotFoundError: No model file at {paths[1]!r}."
    )
    assert isinstance(info.value.__cause__, FileNotFoundError) == (comm.rank != 0)
    assert comm.allreduce(elapsed, op=MPI.MAX) < 5.0
    # The ranks are in step: once every rank holds the file, the closure builds.
    model_bytes = comm.bcast(path.read_bytes() if comm.rank == 0 else None, root=0)
    path.write_bytes(model_bytes)
    closure = mno.Closure(path, [u], quadrature_degree=1)
    closure.update()
    assert closure.update_count == 1


class ProbeFailsOnLastRank(torch.nn.Module):
    """Cannot run on the last rank (say, a kernel missing on that rank's device)."""

    def forward(self, x):
        if MPI.COMM_WORLD.rank == MPI.COMM_WORLD.size - 1:
            raise RuntimeError("no kernel for this device")
        return x[:, 0]


@pytest.mark.mpi
def test_probe_failure_on_one_rank_raises_on_every_rank(setup):
    _, _, u = setup
    comm = u.function_space.mesh.comm
    last = comm.size - 1
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        mno.Closure(ProbeFailsOnLastRank(), [u], quadrature_degree=1)
    elapsed = time.perf_counter() - start
    probe = (
        "The model failed on a (2, 1) probe batch (the operands provide 1 components per "
        "point; is that the model's input width?): no kernel for this device"
    )
    if comm.size == 1:  # one process: the probe's own error, unchanged
        assert str(info.value) == probe
    else:
        assert str(info.value) == (
            f"Building closure 'closure' failed on rank(s) [{last}] (1 of {comm.size} ranks); "
            f"on rank {last}: ValueError: {probe}."
        )
    assert comm.allreduce(elapsed, op=MPI.MAX) < 5.0
    comm.Barrier()  # every rank got here


def test_tangent_requires_enable(setup):
    _, _, u = setup
    closure = mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), 2)
    with pytest.raises(RuntimeError, match="has no tangent"):
        closure.tangent  # noqa: B018


# -- plain arguments: nothing is coerced silently -----------------------------------------


def _closure(kind, u, num_outputs, **kwargs):
    """A local (kind 0) or non-local (kind 1) closure of ``u`` with a fitting model."""
    if kind == 0:
        return mno.Closure(mlp(1, num_outputs), [u], **kwargs)
    model = torch.nn.Conv2d(2, num_outputs, 1).double()  # operand and mask channels
    return mno.NonlocalClosure(model, [u], grid_shape=(4, 4), **kwargs)


@pytest.mark.parametrize("kind", [0, 1], ids=["Closure", "NonlocalClosure"])
def test_value_shape_must_be_a_tuple_of_positive_integers(setup, kind):
    _, _, u = setup
    with pytest.raises(TypeError) as info:
        _closure(kind, u, 2, value_shape=2)
    assert str(info.value) == (
        "value_shape must be a tuple of positive integers, got the integer 2; write "
        "value_shape=(2,) for a vector with 2 components, or () for a scalar."
    )
    with pytest.raises(TypeError) as info:
        _closure(kind, u, 2, value_shape=(2.5,))
    assert str(info.value) == (
        "value_shape must be a tuple of positive integers, got (2.5,): the entry 2.5 is a "
        "float, not an integer."
    )
    with pytest.raises(TypeError) as info:
        _closure(kind, u, 1, value_shape=(True,))
    assert str(info.value) == (
        "value_shape must be a tuple of positive integers, got (True,): the entry True is "
        "a bool, not an integer."
    )
    with pytest.raises(TypeError) as info:
        _closure(kind, u, 2, value_shape="2")
    assert str(info.value) == (
        "value_shape must be a tuple of positive integers such as () or (2,), got '2' (str)."
    )
    with pytest.raises(ValueError) as info:
        _closure(kind, u, 1, value_shape=(0,))
    assert str(info.value) == "value_shape must have positive entries, got (0,)."
    # Lists and NumPy integers are integers: accepted as they are.
    closure = _closure(kind, u, 2, value_shape=[np.int64(2)], quadrature_degree=1)
    assert closure.value_shape == (2,)


@pytest.mark.parametrize("kind", [0, 1], ids=["Closure", "NonlocalClosure"])
def test_quadrature_degree_must_be_a_non_negative_integer(setup, kind):
    _, _, u = setup
    for degree, error, text in [
        (True, TypeError, "got True (a bool)."),
        (2.5, TypeError, "got 2.5 (float)."),
        (2.0, TypeError, "got 2.0 (float)."),
        (-1, ValueError, "got -1."),
    ]:
        with pytest.raises(error) as info:
            _closure(kind, u, 1, quadrature_degree=degree)
        assert str(info.value) == f"quadrature_degree must be a non-negative integer, {text}"
    assert _closure(kind, u, 1, quadrature_degree=np.int32(1)).quadrature_degree == 1


@pytest.mark.parametrize("kind", [0, 1], ids=["Closure", "NonlocalClosure"])
def test_copying_or_pickling_a_closure_says_what_to_do(setup, kind):
    """DOLFINx said "cannot pickle 'dolfinx.cpp.fem.FunctionSpace_float64' object"."""
    _, _, u = setup
    closure = _closure(kind, u, 1, name="sgs")
    closure.update()
    cls = ("Closure", "NonlocalClosure")[kind]
    for copier, action in [
        (copy.deepcopy, "deep-copied (copy.deepcopy)"),
        (copy.copy, "copied (copy.copy)"),
        (pickle.dumps, "pickled"),
    ]:
        with pytest.raises(TypeError) as info:
            copier(closure)
        assert str(info.value) == (
            f"{cls} 'sgs' cannot be {action}: it holds DOLFINx objects (its function space "
            "and compiled operand expression), which cannot be copied or pickled. Build a "
            f"new {cls} from the same model and operands instead; to store the model, write "
            "it with dolfinx_mno.save_model(path, closure.model, spec=closure.spec) and "
            f"build {cls}(path, operands) from the file. closure.copy() returns a "
            "dolfinx.fem.Function holding a copy of the current values."
        )
    # The way out the message names: a plain function with a copy of the values.
    values = closure.copy()
    assert type(values) is fem.Function
    np.testing.assert_array_equal(values.x.array, closure.x.array)
    assert not np.shares_memory(values.x.array, closure.x.array)


def test_nonlocal_sizes_and_ranks_must_be_integers(setup):
    _, _, u = setup
    model = mlp(1, 1)
    with pytest.raises(TypeError) as info:
        mno.NonlocalClosure(model, [u], grid_shape=(16, 16.5))
    assert str(info.value) == "Each entry of grid_shape must be an integer ≥ 2, got 16.5 (float)."
    with pytest.raises(ValueError) as info:
        mno.NonlocalClosure(model, [u], grid_shape=16)
    assert str(info.value) == (
        "grid_shape must give at least 2 points in each of 2 directions, e.g. (16, 16), got 16."
    )
    with pytest.raises(TypeError) as info:
        mno.NonlocalClosure(model, [u], grid_shape=(8, 8), sampling_degree=True)
    assert str(info.value) == "sampling_degree must be a non-negative integer, got True (a bool)."
    with pytest.raises(TypeError) as info:
        mno.NonlocalClosure(model, [u], grid_shape=(8, 8), root=0.0)
    assert str(info.value) == "root must be a non-negative integer, got 0.0 (float)."
    grid = mno.Grid((0.0, 0.0), (1.0, 1.0), (4, 4))
    with pytest.raises(TypeError) as info:
        GriddedSampler([u], grid, sampling_degree=1.0)
    assert str(info.value) == "sampling_degree must be a non-negative integer, got 1.0 (float)."


def test_batch_size_must_be_a_positive_integer(setup, monkeypatch):
    _, _, u = setup
    for batch_size, error, text in [
        (0, ValueError, "got 0."),
        (True, TypeError, "got True (a bool)."),
        (2.5, TypeError, "got 2.5 (float)."),
    ]:
        with pytest.raises(error) as info:
            mno.Closure(mlp(1, 1), [u], batch_size=batch_size)
        assert str(info.value) == f"batch_size must be a positive integer, {text}"
        with pytest.raises(error) as info:
            PointwiseEvaluator(mlp(1, 1), 1, 1, 10, np.float64, torch.device("cpu"), batch_size)
        assert str(info.value) == f"batch_size must be a positive integer, {text}"
    evaluator = PointwiseEvaluator(mlp(1, 1), 1, 1, 10, np.float64, torch.device("cpu"), 3)
    assert evaluator.batch_size == 3
    monkeypatch.setenv("DOLFINX_MNO_BATCH_SIZE", "0")
    with pytest.raises(ValueError) as info:
        PointwiseEvaluator(mlp(1, 1), 1, 1, 10, np.float64, torch.device("cpu"))
    assert str(info.value) == (
        "The environment variable DOLFINX_MNO_BATCH_SIZE must be a positive integer (points "
        "per model call), got '0'; unset it for the default."
    )
    monkeypatch.setenv("DOLFINX_MNO_BATCH_SIZE", "7")
    assert PointwiseEvaluator(mlp(1, 1), 1, 1, 10, np.float64, torch.device("cpu")).batch_size == 7


class SqueezedFlux(torch.nn.Module):
    """``(u, 2 u)``, squeezed like many hand-written models: ``(2,)`` for one point.

    ``rows``: from now on return only the first ``rows`` rows of every batch (a model that
    goes wrong after construction).
    """

    def __init__(self):
        super().__init__()
        self.rows: int | None = None

    def forward(self, x):
        y = torch.cat([x, 2.0 * x], dim=1)
        return y.squeeze() if self.rows is None else y[: self.rows]


@pytest.mark.mpi
def test_a_model_that_drops_the_batch_dimension_is_refused(setup):
    """A ``(2,)`` output for a one-point chunk used to be broadcast over the components.

    The construction probe refuses such a model. One that returns the wrong number of rows
    later fails its update on every rank, with the values kept.
    """
    _, _, u = setup
    with pytest.raises(ValueError, match=r"^The model must keep the batch dimension: for a batch"):
        mno.Closure(SqueezedFlux(), [u], value_shape=(2,))
    model = SqueezedFlux()
    model.rows = 1_000_000
    closure = mno.Closure(model, [u], value_shape=(2,), quadrature_degree=1, batch_size=4)
    closure.update()
    before = closure.x.array.copy()
    inputs = closure._evaluator.inputs[:, 0]
    expected = np.stack([inputs, 2 * inputs], axis=1).reshape(-1)
    np.testing.assert_array_equal(before[: closure._value_dofs.stop], expected)
    model.rows = 1
    with pytest.raises(
        mno.ClosureEvaluationError, match=r"returned shape \(1, 2\) for a chunk of 4"
    ):
        closure.update()
    np.testing.assert_array_equal(closure.x.array, before)
    assert closure.update_count == 1


@pytest.mark.mpi
@pytest.mark.parametrize("distributed", [False, True], ids=["gathered", "distributed"])
def test_a_nonlocal_closure_refuses_a_moved_mesh(tiny_square, distributed):
    """Its grid sampling and quadrature points are the old geometry's: it used to return
    the old mesh's values silently. Moved on one rank only (the first that owns cells):
    the update raises on every rank, values kept; moved back, it updates again.
    """
    neuralop = pytest.importorskip("neuralop")
    from dolfinx_mno.torch_bridge import to_precision

    torch.manual_seed(0)
    fno = neuralop.models.FNO(
        n_modes=(2, 2), in_channels=1, out_channels=1, hidden_channels=4, n_layers=1
    )
    model = to_precision(fno, torch.float64).eval()
    x = ufl.SpatialCoordinate(tiny_square)
    closure = mno.NonlocalClosure(
        model, [x[0]], grid_shape=(4, 4), mask_channel=False, distributed=distributed,
        mesh=tiny_square,
    )  # fmt: skip
    closure.update()
    before = closure.x.array.copy()
    comm = tiny_square.comm
    cells = comm.allgather(tiny_square.topology.index_map(2).size_local)
    mover = next(rank for rank, n in enumerate(cells) if n > 0)
    geometry = tiny_square.geometry.x
    saved = geometry.copy()
    if comm.rank == mover:
        geometry[:, 0] = 0.5 * geometry[:, 0] ** 2 + 0.3
    expected = rf"failed on rank\(s\) \[{mover}\] .*the mesh geometry changed"
    with pytest.raises(RuntimeError, match=expected):
        closure.update()
    np.testing.assert_array_equal(closure.x.array, before)
    assert closure.update_count == 1
    geometry[:] = saved
    closure.update()
    np.testing.assert_array_equal(closure.x.array, before)


@pytest.mark.mpi
def test_non_finite_operands_are_named_as_the_cause(setup):
    """NaN in the state reaches the model through its operands: the error says so."""
    msh, _, u = setup
    closure = mno.Closure(mlp(1, 1), [u], quadrature_degree=1)
    closure.update()
    before = closure.x.array.copy()
    comm = msh.comm
    if comm.rank == 0 and u.x.index_map.size_local > 0:
        u.x.array[0] = np.nan
    u.x.scatter_forward()
    inputs = closure._evaluator.inputs
    with pytest.raises(mno.ClosureEvaluationError) as info:
        closure.update()
    bad = int(np.sum(~np.isfinite(inputs[:, 0])))  # refreshed by the failed update
    counts = comm.allgather(bad)
    first = next(rank for rank, n in enumerate(counts) if n)
    assert (
        f"on rank {first}: the model returned NaN/Inf values at {counts[first]} of "
        f"{comm.allgather(len(inputs))[first]} quadrature points, and its inputs, the operands, "
        f"were already NaN/Inf at {counts[first]} of them (the state the closure reads is not "
        "finite). The previous closure values were kept."
    ) in str(info.value)
    np.testing.assert_array_equal(closure.x.array, before)


@pytest.mark.mpi
def test_a_closure_of_a_closure_is_refused(setup):
    """One closure (or its tangent) as another's operand: the problems would not update the
    inner one and mno.derivative would miss the chain rule through it (found by an audit: a
    Newton solve "converged" 0.375 off the pure-UFL solution)."""
    _, _, u = setup
    first = mno.Closure(mlp(1, 1), [u], quadrature_degree=2, name="first")
    first.update()
    for operands, shown in (([first], "first"), ([2.0 * first, u], "2.0 * first")):
        with pytest.raises(TypeError) as info:
            mno.Closure(mlp(len(operands), 1), operands, quadrature_degree=2)
        assert str(info.value).startswith(
            f"Operand 0 ({shown}) reads the closure values ['first']: a closure of a closure "
            "is neither updated by the problems"
        )
    with pytest.raises(TypeError, match=r"reads the closure values \['first_tangent'\]"):
        mno.Closure(mlp(1, 1), [first.enable_tangent()[0]], quadrature_degree=2)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "operand,shown",
    [
        (lambda u: ufl.avg(u), "0.5 * (((f)(+)) + ((f)(-)))"),
        (lambda u: ufl.grad(u)("+"), "(grad(f))(+)"),
    ],
)
def test_operands_restricted_to_a_facet_side_are_refused(setup, operand, shown):
    """avg(u), jump(u), u('+'): no sides inside a cell (they were accepted, and avg(u)
    gave values up to 1.1 away from u's on a 4 × 4 square)."""
    _, _, u = setup
    with pytest.raises(ValueError) as info:
        mno.Closure(mlp(2 if shown.startswith("(grad") else 1, 1), [operand(u)])
    assert str(info.value) == (
        f"Operand 0 ({shown}) is restricted to a side of a facet (avg, jump, u('+')): a "
        "closure's operands are evaluated at points inside the cells, where a facet has no "
        "sides, so its values would be meaningless. Pass the unrestricted expression (e.g. "
        "u, ufl.grad(u))."
    )


@pytest.mark.mpi
def test_a_quadrature_function_of_another_rule_is_refused(setup):
    """A history variable in a degree-4 quadrature space read by a degree-2 closure: FFCx
    said only "Mismatch of tabulation points and element points". The same degree is read
    as it is (an identity model returns its values)."""
    msh, _, _ = setup
    element = basix.ufl.quadrature_element(msh.basix_cell(), value_shape=(), degree=4)
    history = fem.Function(fem.functionspace(msh, element), name="history")
    history.x.array[:] = np.arange(history.x.array.size) % 7
    history.x.scatter_forward()
    with pytest.raises(ValueError) as info:
        mno.Closure(torch.nn.Identity(), [history], quadrature_degree=2)
    assert str(info.value) == (
        "Operand history reads 'history', a function on a quadrature space whose values live "
        "at its own 6 points per cell (degree 4), not at the 3 points of the closure's "
        "degree-2 rule. Give the closure the same quadrature_degree, or interpolate the "
        "function into a space the closure can evaluate anywhere (Lagrange, DG)."
    )
    closure = mno.Closure(torch.nn.Identity(), [history], quadrature_degree=4)
    closure.update()
    np.testing.assert_array_equal(closure.x.array, history.x.array)


def test_a_model_on_the_meta_device_is_refused(setup):
    """Shapes without values: the probe passed on meta and every update failed."""
    _, _, u = setup
    with torch.device("meta"):
        model = mno.MLP(3, 2, [8])
    with pytest.raises(ValueError, match=r"are on the meta device: they have shapes but no"):
        mno.Closure(model, [u, ufl.grad(u)], (2,), 2, device=None)
    with pytest.raises(ValueError, match=r"are on the meta device"):
        mno.Closure(model, [u, ufl.grad(u)], (2,), 2)


class _Quartic(torch.nn.Module):
    """W(u) = u⁴."""

    def forward(self, x):
        return x[:, 0] ** 4


@pytest.mark.mpi
def test_a_second_derivative_of_a_closure_is_refused(setup):
    """A learned energy ``Π = ∫ W(u)``: its first derivative is exact (against pure UFL),
    its second would silently miss ``W''`` (an audit found Newton stalling 2.45 off the
    pure-UFL solution): refused by mno.derivative and hence by NonlinearProblem."""
    _, V, u = setup
    W = mno.Closure(_Quartic(), [u], quadrature_degree=4, name="W")
    F = mno.derivative(W * W.dx, u, ufl.TestFunction(V))
    W.update()
    residual = fem.assemble_vector(fem.form(F)).array
    expected = fem.assemble_vector(fem.form(ufl.derivative(u**4 * W.dx, u))).array
    assert np.abs(residual - expected).max(initial=0.0) <= 1e-13 * np.abs(expected).max()
    message = (
        "The form holds the tangent of closure 'W' (∂W/∂operands, e.g. from an earlier "
        "mno.derivative), which depends on 'state': its derivative is the closure's second "
        "derivative, which dolfinx_mno does not compute"
    )
    u.name = "state"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        mno.derivative(F, u)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        NonlinearProblem(F, u, petsc_options_prefix="second_derivative_")


@pytest.mark.mpi
def test_a_view_of_the_unknown_as_operand_is_refused_in_jacobians():
    """``u.sub(0)`` shares u's values but is another UFL coefficient: its tangent would be
    dropped from the Jacobian (an audit found Newton ending in NaN). mno.derivative refuses
    it, the problems' Jacobian check counts it, and ``u[0]`` gives the exact Jacobian."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: np.stack([x[0] + x[1], x[0] * x[1]]))
    v = ufl.TestFunction(V)
    view = mno.Closure(_Quartic(), [u.sub(0)], quadrature_degree=4, name="view")
    assert view.depends_on(u)
    assert view.views_of(u) == [u.sub(0).name]
    F = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + view * v[0] * view.dx
    with pytest.raises(ValueError, match=r"^Closure 'view' reads \['u_0'\], a view of 'u'"):
        mno.derivative(F, u)
    with pytest.raises(ValueError, match=r"J misses the tangent of closure\(s\) 'view', whose"):
        NonlinearProblem(F, u, J=ufl.derivative(F, u), petsc_options_prefix="view_")
    # The component itself: the exact Jacobian, against pure UFL.
    component = mno.Closure(_Quartic(), [u[0]], quadrature_degree=4, name="component")
    F = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + component * v[0] * component.dx
    J = mno.derivative(F, u)
    component.update(tangent=True)
    A = fem.assemble_matrix(fem.form(J)).to_dense()
    F_ufl = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + u[0] ** 4 * v[0] * component.dx
    B = fem.assemble_matrix(fem.form(ufl.derivative(F_ufl, u))).to_dense()
    assert np.abs(A - B).max(initial=0.0) <= 1e-12 * max(np.abs(B).max(initial=0.0), 1.0)


# -- models that change their input in place -------------------------------------------------


class _ScalesInput(torch.nn.Module):
    """Scales its input in place (``x.mul_``) or shifts a view of it (``x[:, 0] += 1``)."""

    def __init__(self, how: str, channels: bool = False):
        super().__init__()
        self.how, self.channels = how, channels
        self.weight = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        if self.how == "mul_":
            x.mul_(self.weight)
        elif self.how == "view":
            x[:, 0] += 1.0
        else:  # out of place: accepted
            x = x * self.weight
        return x[:, :1] if self.channels else x[:, :1] ** 2


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["mul_", "view"])
def test_a_model_that_changes_its_input_is_refused_at_construction(setup, how):
    """Before, its values were right but its tangent failed with torch's message about a
    "leaf Variable", and a fit could change its stored samples (audit, nineteenth session).
    Now the closures and fit refuse it on every rank, and the same model out of place
    works."""
    from dolfinx_mno.training import fit

    _, _, u = setup
    expected = r"changes its input in place .* x = x\.clone\(\)"
    with pytest.raises(ValueError, match=expected):
        mno.Closure(_ScalesInput(how), [u, ufl.grad(u)], (), 2)
    with pytest.raises(ValueError, match=expected):
        mno.NonlocalClosure(_ScalesInput(how, channels=True), [u], grid_shape=(4, 4))
    x = np.linspace(0.0, 1.0, 6).reshape(3, 2)
    with pytest.raises(ValueError, match=expected):
        fit(_ScalesInput(how), x, x[:, :1], epochs=1, normalize=False, progress=False)
    closure = mno.Closure(_ScalesInput("copy"), [u, ufl.grad(u)], (), 2)
    closure.update(tangent=True)
    values = closure.x.array.reshape(-1, 1)  # 4 u² at every point; its tangent 8 u, 0, 0
    tangent = closure.tangent.x.array.reshape(values.shape[0], 3)
    u_points = np.sqrt(values[:, 0] / 4.0) if values.size else values[:, 0]
    assert np.allclose(tangent[:, 0], 8.0 * u_points) and not tangent[:, 1:].any()
