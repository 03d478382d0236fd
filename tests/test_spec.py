"""Closure specs: layout, checks with exact messages, and how they reach model files."""

import re

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno import io
from dolfinx_mno.data import ClosureSampler, GriddedSampler, Interpolation
from dolfinx_mno.spec import (
    SPEC_KEY,
    ClosureSpec,
    metadata_with_spec,
    spec_from_metadata,
)
from dolfinx_mno.training import fit

GRID = mno.Grid((0.0, 0.0), (1.0, 2.0), (5, 9))
LOCAL = ClosureSpec(("u", "grad(u)"), (1, 2), (2,), 3)
NONLOCAL = ClosureSpec(("u",), (1,), (), 2, grid=GRID, mask_channel=True)


def exactly(message):
    return f"^{re.escape(message)}$"


def test_layout_and_round_trip():
    assert LOCAL.to_dict() == {
        "version": 1,
        "operands": ["u", "grad(u)"],
        "operand_widths": [1, 2],
        "value_shape": [2],
        "quadrature_degree": 3,
    }
    assert NONLOCAL.to_dict() == {
        "version": 1,
        "operands": ["u"],
        "operand_widths": [1],
        "value_shape": [],
        "quadrature_degree": 2,
        "grid": {"lower": [0.0, 0.0], "upper": [1.0, 2.0], "shape": [5, 9]},
        "mask_channel": True,
    }
    for spec in (LOCAL, NONLOCAL):
        assert ClosureSpec.from_dict(spec.to_dict()) == spec
    assert LOCAL.num_inputs == 3 and not LOCAL.is_nonlocal
    assert NONLOCAL.num_inputs == 1 and NONLOCAL.is_nonlocal
    # Lists and NumPy integers are stored as tuples of int.
    spec = ClosureSpec(["u"], [np.int64(1)], [np.int64(2)], np.int64(1))
    assert spec == ClosureSpec(("u",), (1,), (2,), 1)
    assert type(spec.operand_widths[0]) is int and type(spec.quadrature_degree) is int


def test_bad_fields_are_refused():
    cases = [
        (((), ()), {}, ValueError, "A closure spec needs at least one operand."),
        (
            (("u", "v"), (1,)),
            {},
            ValueError,
            "A closure spec needs one width per operand: 2 name(s) ['u', 'v'], 1 width(s) [1].",
        ),
        ((("u",), (0,)), {}, ValueError, "Each operand width must be a positive integer, got 0."),
        (("u", (1,)), {}, TypeError, "operand_names must be a sequence of strings, got 'u'."),
        (((1,), (1,)), {}, TypeError, "Operand names must be non-empty strings, got 1."),
        (
            (("u",), (1,)),
            {"value_shape": 2},
            TypeError,
            "value_shape must be a tuple of positive integers, got the integer 2; write "
            "value_shape=(2,) for a vector with 2 components, or () for a scalar.",
        ),
        (
            (("u",), (1,)),
            {"quadrature_degree": 2.0},
            TypeError,
            "quadrature_degree must be a non-negative integer, got 2.0 (float).",
        ),
        (
            (("u",), (1,)),
            {"grid": GRID},
            ValueError,
            "A non-local closure spec needs both a grid and mask_channel, a local one "
            f"neither; got grid={GRID!r}, mask_channel=None.",
        ),
        (
            (("u",), (1,)),
            {"grid": (5, 9), "mask_channel": True},
            TypeError,
            "grid must be a dolfinx_mno.Grid, got tuple.",
        ),
        (
            (("u",), (1,)),
            {"grid": GRID, "mask_channel": 1},
            TypeError,
            "mask_channel must be a bool, got 1.",
        ),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=exactly(message)):
            ClosureSpec(*args, **kwargs)


def test_malformed_dicts_are_refused():
    good = NONLOCAL.to_dict()
    with pytest.raises(ValueError, match=exactly("A closure spec is a dict, got list.")):
        ClosureSpec.from_dict([])
    keys = (
        "A closure spec has the keys ['version', 'operands', 'operand_widths', 'value_shape', "
        "'quadrature_degree'] (and ['grid', 'mask_channel'] for a non-local closure); "
    )
    missing = {k: v for k, v in good.items() if k != "operand_widths"}
    with pytest.raises(ValueError, match=exactly(keys + "missing ['operand_widths'], unknown [].")):
        ClosureSpec.from_dict(missing)
    with pytest.raises(ValueError, match=exactly(keys + "missing [], unknown ['units'].")):
        ClosureSpec.from_dict({**good, "units": "m"})
    message = "Closure spec version 2: this dolfinx_mno reads version 1."
    with pytest.raises(ValueError, match=exactly(message)):
        ClosureSpec.from_dict({**good, "version": 2})
    bad_grid = {**good, "grid": {"lower": [0, 0], "upper": [1, 1]}}
    with pytest.raises(ValueError, match=r"^Malformed closure spec .*The grid of a closure spec"):
        ClosureSpec.from_dict(bad_grid)
    with pytest.raises(ValueError, match=r"^Malformed closure spec .*got 1\.$"):
        ClosureSpec.from_dict({**good, "mask_channel": 1})


def test_check_lists_every_difference_and_the_fix():
    msh = mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u")
    v = fem.Function(u.function_space, name="v")
    LOCAL.check(mno.Operands([u, ufl.grad(u)]), value_shape=(2,), quadrature_degree=3)
    LOCAL.check(mno.Operands([v, ufl.grad(v)], names=["u", "grad(u)"]))
    with pytest.raises(ValueError) as caught:
        LOCAL.check(
            mno.Operands([v, ufl.grad(v)]), value_shape=(), quadrature_degree=3, source="'m.pt'"
        )
    assert str(caught.value) == (
        "The model in 'm.pt' was trained with the operands ['u' (1 component), 'grad(u)' "
        "(2 components)], not ['v' (1 component), 'grad(v)' (2 components)]; "
        "value_shape=(2,), not (). Pass the operands it was trained on, in that order and "
        "under those names (e.g. dolfinx_mno.Operands({'u': ..., 'grad(u)': ...})). Leave "
        "out value_shape to take them from the file."
    )
    with pytest.raises(ValueError) as caught:
        LOCAL.check(mno.Operands([ufl.grad(u), u]), quadrature_degree=2)
    assert str(caught.value) == (
        "The model in the model file was trained with the operands ['u' (1 component), "
        "'grad(u)' (2 components)], not ['grad(u)' (2 components), 'u' (1 component)]; "
        "quadrature_degree=3, not 2. Pass the operands it was trained on, in that order and "
        "under those names (e.g. dolfinx_mno.Operands({'u': ..., 'grad(u)': ...})). Leave "
        "out quadrature_degree to take them from the file."
    )
    operands = mno.Operands([u])
    NONLOCAL.check(operands, nonlocal_closure=True, grid_shape=(5, 9), mask_channel=True)
    NONLOCAL.check(operands, nonlocal_closure=True, grid_shape=2.5)  # left to the closure
    with pytest.raises(ValueError) as caught:
        NONLOCAL.check(operands, nonlocal_closure=True, grid_shape=[9, 5], mask_channel=False)
    assert str(caught.value) == (
        "The model in the model file was trained with grid_shape=(5, 9), not (9, 5); "
        "mask_channel=True, not False. Leave out grid_shape, mask_channel to take them from "
        "the file."
    )
    message = (
        "The model in 'g.pt' is a non-local (grid) model, trained on a (5, 9) grid: build a "
        "dolfinx_mno.NonlocalClosure from it, not a Closure."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        NONLOCAL.check(operands, source="'g.pt'")
    message = (
        "The model in 'l.pt' is a local (pointwise) model: build a dolfinx_mno.Closure from "
        "it, not a NonlocalClosure."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        LOCAL.check(operands, nonlocal_closure=True, source="'l.pt'")


def test_check_grid_refuses_another_spacing_and_names_the_box_to_pass():
    """GRID: (5, 9) points over [0, 1] x [0, 2], spacing (0.25, 0.25)."""
    unit = (np.zeros(2), np.array([1.0, 2.0]))
    NONLOCAL.check_grid(GRID, unit)
    NONLOCAL.check_grid(mno.Grid((3.0, -1.0), (4.0, 1.0), (5, 9)), unit)  # moved, same spacing
    NONLOCAL.check_grid(mno.Grid((0.0, 0.0), (1.0 + 1e-12, 2.0), (5, 9)), unit)  # round-off
    LOCAL.check_grid(mno.Grid((0.0, 0.0), (7.0, 7.0), (3, 3)), unit)  # a local spec: no grid
    trained = (
        "The model in 'g.pt' was trained on a (5, 9) grid of spacing (0.25, 0.25) over the "
        "extent (1.0, 2.0); "
    )
    load_model = (
        " To run the model on another grid all the same, pass the model itself, "
        "dolfinx_mno.load_model(path), which is not checked against the file's spec."
    )
    cases = [
        # A smaller mesh inside the trained box: its own box stretches the grid's points.
        (
            mno.Grid((0.0, 0.0), (0.5, 2.0), (5, 9)),
            (np.zeros(2), np.array([0.5, 2.0])),
            False,
            "on this mesh's bounding box [(0.0, 0.0), (0.5, 2.0)] it would run with spacing "
            "(0.125, 0.25) over the extent (0.5, 2.0), which it was not trained for. Pass "
            "bounding_box=((0.0, 0.0), (1.0, 2.0)), the trained grid's box, which contains "
            "the mesh.",
        ),
        # A smaller mesh elsewhere: a box of the trained extent at the mesh's lower corner.
        (
            mno.Grid((5.0, 1.0), (5.5, 2.0), (5, 9)),
            (np.array([5.0, 1.0]), np.array([5.5, 2.0])),
            False,
            "on this mesh's bounding box [(5.0, 1.0), (5.5, 2.0)] it would run with spacing "
            "(0.125, 0.125) over the extent (0.5, 1.0), which it was not trained for. Pass "
            "bounding_box=((5.0, 1.0), (6.0, 3.0)), a box of the trained extent that contains "
            "the mesh.",
        ),
        # A box given that changes the spacing; a mesh wider than the trained extent.
        (
            mno.Grid((0.0, 0.0), (4.0, 4.0), (5, 9)),
            (np.zeros(2), np.array([2.0, 3.0])),
            True,
            "on the bounding_box given [(0.0, 0.0), (4.0, 4.0)] it would run with spacing "
            "(1.0, 0.5) over the extent (4.0, 4.0), which it was not trained for. No grid of "
            "the trained extent contains this mesh: it is wider along axes 0, 1.",
        ),
    ]
    for grid, mesh_box, given, message in cases:
        with pytest.raises(ValueError) as caught:
            NONLOCAL.check_grid(grid, mesh_box, bounding_box_given=given, source="'g.pt'")
        assert str(caught.value) == trained + message + load_model


def test_metadata_holds_the_spec_once():
    assert metadata_with_spec(None, None) == {}
    assert metadata_with_spec({"units": "m"}, LOCAL) == {"units": "m", SPEC_KEY: LOCAL.to_dict()}
    stored = metadata_with_spec(None, NONLOCAL)
    assert spec_from_metadata(stored) == NONLOCAL
    assert spec_from_metadata({"operands": ["u"]}) is None  # a hand-written description
    assert metadata_with_spec(stored, None) == stored  # copied from another file
    message = "Give the closure spec once: as spec= or as metadata['closure_spec'], not both."
    with pytest.raises(ValueError, match=exactly(message)):
        metadata_with_spec(stored, LOCAL)
    with pytest.raises(
        TypeError, match=exactly("spec must be a dolfinx_mno.ClosureSpec, got dict.")
    ):
        metadata_with_spec(None, LOCAL.to_dict())
    with pytest.raises(ValueError, match=r"^Malformed closure spec"):
        metadata_with_spec({SPEC_KEY: {**LOCAL.to_dict(), "operand_widths": [1]}}, None)


def test_samplers_give_the_spec_of_the_closure_they_train():
    msh = mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V, name="u")
    operands = mno.Operands({"u": u, "grad_u": ufl.grad(u)})
    sampler = ClosureSampler(Interpolation(V), u, operands, u**2, quadrature_degree=3)
    assert sampler.spec == ClosureSpec(("u", "grad_u"), (1, 2), (), 3)
    assert sampler.input_names == ["u", "grad_u[0]", "grad_u[1]"]
    assert sampler.metadata()["operands"] == ["u", "grad_u"]
    # A closure of the same operands has the same spec: a model trained on the samples fits.
    closure = mno.Closure(mno.MLP(3, 1, [4], dtype="float64"), operands, quadrature_degree=3)
    assert closure.spec == sampler.spec
    gridded = GriddedSampler(operands, mno.Grid((0.0, 0.0), (1.0, 1.0), (3, 3)))
    assert gridded.operands.names == ("u", "grad_u")
    assert gridded.num_channels == 3


@pytest.mark.mpi
def test_fit_stores_the_spec_in_its_checkpoints(tmp_path_factory):
    comm = MPI.COMM_WORLD
    directory = comm.bcast(str(tmp_path_factory.mktemp("fit")) if comm.rank == 0 else None)
    x = np.random.default_rng(0).uniform(size=(40, 3))
    result = fit(
        mno.MLP(3, 2, [4], seed=0),
        x,
        x[:, :2] ** 2,
        comm=comm,
        epochs=2,
        checkpoint_dir=directory,
        checkpoint_every=1,
        metadata={"units": "m"},
        spec=LOCAL,
        progress=False,
    )
    assert result.history.epochs == 2
    contents = io.read_model_file(f"{directory}/checkpoint-000002.model.pt")
    assert contents.spec == LOCAL
    assert contents.metadata["units"] == "m"
    with pytest.raises(ValueError, match="Give the closure spec once"):
        fit(mno.MLP(3, 2, [4]), x, x[:, :2], comm=comm, spec=LOCAL, metadata=contents.metadata)
