"""Closure fields for ParaView: exact cell averages, XDMF read back with h5py, VTX files.

The closures are known polynomials of the coordinates, so their exact cell averages are
known independently of DOLFINx: on a triangle, the mean of a quadratic is the mean of its
values at the three edge midpoints. Files are read back (XDMF/HDF5 with h5py) and their
numbers compared with these averages, computed from the mesh stored in the file itself.
"""

import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.output import QuadratureAverage, cell_average

COMM = MPI.COMM_WORLD


def _components(x0, x1):
    """Four quadratics of the coordinates (NumPy arrays, torch tensors or UFL)."""
    return [
        1 + 2 * x0 - 3 * x1**2 + x0 * x1,
        x0**2 - x1 + 0.5,
        2 - x0 * x1,
        x0 + x1**2,
    ]


def _gradients(x0, x1):
    """∂(component)/∂(x0, x1) of :func:`_components` (NumPy), each ``(..., 2)``."""
    one = np.ones_like(x0)
    return [
        np.stack([2 + x1, -6 * x1 + x0], axis=-1),
        np.stack([2 * x0, -one], axis=-1),
        np.stack([-x1, -x0], axis=-1),
        np.stack([one, 2 * x1], axis=-1),
    ]


class PolynomialModel(torch.nn.Module):
    """``(batch, 2)`` coordinates → ``(batch, *value_shape)`` quadratics, times ``scale``."""

    def __init__(self, value_shape):
        super().__init__()
        self.value_shape = tuple(value_shape)
        self.scale = 1.0

    def forward(self, x):
        size = int(np.prod(self.value_shape, dtype=int))
        values = torch.stack(_components(x[:, 0], x[:, 1])[:size], dim=-1)
        return self.scale * values.reshape(-1, *self.value_shape)


def _sample_points(vertices):
    """Points whose plain mean of a quadratic is its exact mean over the cell.

    Triangles ``(num_cells, 3, 2)``: the edge midpoints. Axis-aligned rectangles
    ``(num_cells, 4, 2)``: the 2 × 2 Gauss points (exact up to degree 3 per direction).
    """
    if vertices.shape[1] == 3:
        return (vertices + np.roll(vertices, -1, axis=1)) / 2
    low, high = vertices.min(axis=1), vertices.max(axis=1)
    centre, half = (low + high) / 2, (high - low) / 2
    signs = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) / np.sqrt(3)
    return centre[:, None, :] + signs[None, :, :] * half[:, None, :]


def _exact(vertices, value_shape, scale=1.0):
    """Exact cell averages of the closure and its tangent.

    Args:
        vertices: ``(num_cells, 3, 2)`` (triangles) or ``(num_cells, 4, 2)`` (rectangles).

    Returns:
        ``(num_cells, *value_shape)`` and ``(num_cells, *value_shape, 2)``.
    """
    points = _sample_points(vertices)
    x0, x1 = points[..., 0], points[..., 1]
    size = int(np.prod(value_shape, dtype=int))
    values = np.stack([c.mean(axis=1) for c in _components(x0, x1)[:size]], axis=-1)
    tangents = np.stack([g.mean(axis=1) for g in _gradients(x0, x1)[:size]], axis=1)
    num_cells = vertices.shape[0]
    return (
        scale * values.reshape(num_cells, *value_shape),
        scale * tangents.reshape(num_cells, *value_shape, 2),
    )


class ClosureFields:
    """A closure of the coordinates (the quadratics times ``scale``) and its tangent."""

    def __init__(self, msh, value_shape):
        dtype = np.dtype(msh.geometry.x.dtype)
        x = ufl.SpatialCoordinate(msh)
        self.model = PolynomialModel(value_shape).to(mno.torch_bridge.NUMPY_TO_TORCH[dtype])
        self.closure = mno.Closure(self.model, [x], value_shape, 2, mesh=msh)
        self.tangent = self.closure.enable_tangent()  # also on a rank without cells
        self.set_scale(1.0)

    def set_scale(self, scale):
        """Scale the closure, update it and its tangent (collective)."""
        self.model.scale = scale
        self.closure.update()


def _num_cells(msh, ghosts):
    index_map = msh.topology.index_map(msh.topology.dim)
    return index_map.size_local + (index_map.num_ghosts if ghosts else 0)


def _cell_vertices(msh, ghosts=False):
    """Vertex coordinates ``(num_cells, num_vertices, 2)`` of the owned (and ghost) cells."""
    nodes = msh.geometry.dofmaps[0][: _num_cells(msh, ghosts)]
    return msh.geometry.x[nodes][:, :, :2].astype(np.float64)


def _cell_values(function, ghosts=False):
    """Values ``(num_cells, *value_shape)`` of a DG0 function on the owned (and ghost) cells."""
    space = function.function_space
    num_cells = _num_cells(space.mesh, ghosts)
    shape = tuple(space.value_shape)
    values = function.x.array.reshape(-1, int(np.prod(shape, dtype=int)))
    return values[space.dofmap.list[:num_cells, 0]].reshape(num_cells, *shape)


@pytest.fixture
def shared_dir():
    """A folder every rank sees, rank 0's, removed after the test.

    Not pytest's ``tmp_path``: each rank has its own, and a rank's clean-up of old ones
    may remove another's.
    """
    path = COMM.bcast(tempfile.mkdtemp(prefix="mno-output-") if COMM.rank == 0 else None)
    yield Path(path)
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path)


def _on_root(check):
    """Run ``check()`` on rank 0 and raise its assertion on every rank (no rank waits)."""
    error = None
    if COMM.rank == 0:
        try:
            check()
        except AssertionError as err:
            error = str(err)
    error = COMM.bcast(error, root=0)
    if error is not None:
        raise AssertionError(error)


def _tolerance(dtype, magnitude=5.0):
    """Round-off allowed on averages of values of about ``magnitude``."""
    return 10 * np.finfo(dtype).eps * magnitude


SHAPES = [(), (2,), (2, 2)]
MESHES = {"3x2": (3, 2), "1x1": (1, 1)}  # 1x1 on 3 ranks: a rank owns no cell
CELL_TYPES = [mesh.CellType.triangle, mesh.CellType.quadrilateral]


@pytest.mark.mpi
@pytest.mark.parametrize("cell_type", CELL_TYPES, ids=lambda c: c.name)
@pytest.mark.parametrize("cells", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("value_shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cell_averages_are_exact(dtype, value_shape, cells, cell_type):
    """Closure and tangent averages equal the exact means; ∑ |K| avg_K = ∫ c closure.dx."""
    msh = mesh.create_unit_square(COMM, *cells, cell_type=cell_type, dtype=dtype)
    fields = ClosureFields(msh, value_shape)
    closure = fields.closure
    average = QuadratureAverage(closure)
    tangent = cell_average(fields.tangent)
    output = average.update()
    assert output.name == "closure" and tangent.name == "closure_tangent"
    assert output.dtype == dtype and tangent.dtype == dtype
    assert tuple(output.function_space.value_shape) == value_shape
    assert tuple(tangent.function_space.value_shape) == (*value_shape, 2)
    assert output.function_space.ufl_element().embedded_superdegree == 0
    # Owned and ghost cells: ghosts hold their owners' averages.
    exact_values, exact_tangents = _exact(_cell_vertices(msh, ghosts=True), value_shape)
    for function, exact in ((output, exact_values), (tangent, exact_tangents)):
        error = np.max(np.abs(_cell_values(function, ghosts=True) - exact), initial=0.0)
        assert COMM.allreduce(error, op=MPI.MAX) < _tolerance(dtype)

    # The averages carry the closure's integral: ∑_K |K| avg_K = ∫ c dx (closure's rule).
    component = closure if value_shape == () else closure[(0,) * len(value_shape)]
    integral = COMM.allreduce(
        fem.assemble_scalar(fem.form(component * closure.dx, dtype=dtype)), op=MPI.SUM
    )
    size = int(np.prod(value_shape, dtype=int))
    first = _cell_values(output).reshape(_num_cells(msh, False), size)[:, 0]
    cell_volume = 1.0 / msh.topology.index_map(2).size_global
    total = COMM.allreduce(float(cell_volume * np.sum(first, dtype=np.float64)), op=MPI.SUM)
    assert abs(total - integral) < _tolerance(dtype)


@pytest.mark.mpi
def test_update_follows_the_closure():
    """A second update averages the new values, in the same output function."""
    msh = mesh.create_unit_square(COMM, 3, 2)
    fields = ClosureFields(msh, (2,))
    average = QuadratureAverage(fields.closure, name="flux")
    first = average.update()
    assert first.name == "flux"
    fields.set_scale(-2.5)
    assert average.update() is first
    exact, _ = _exact(_cell_vertices(msh), (2,), scale=-2.5)
    error = np.max(np.abs(_cell_values(first) - exact), initial=0.0)
    assert COMM.allreduce(error, op=MPI.MAX) < _tolerance(np.float64)


def _read_xdmf(path):
    """Rank 0: the attributes of an XDMF file, {name: [(time, dataset path, centre)]}."""
    attributes = {}
    for grid in ET.parse(path).getroot().iter("Grid"):
        time = grid.find("Time")
        attribute = grid.find("Attribute")
        if time is None or attribute is None:
            continue
        dataset = attribute.find("DataItem").text.split(":")[1]
        entry = (float(time.get("Value")), dataset, attribute.get("Center"))
        attributes.setdefault(attribute.get("Name"), []).append(entry)
    return attributes


@pytest.mark.mpi
@pytest.mark.parametrize("cells", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("value_shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_xdmf_file_holds_the_exact_averages(shared_dir, dtype, value_shape, cells):
    """Two time steps written to XDMF, read back with h5py, equal the exact averages."""
    msh = mesh.create_unit_square(COMM, *cells, dtype=dtype)
    fields = ClosureFields(msh, value_shape)
    path = shared_dir / "closure.xdmf"
    scales = {0.5: 1.0, 1.0: -3.0}
    # XDMF holds ranks ≤ 2: the tangent of a tensor closure goes to VTX (test below).
    functions = {"closure": value_shape, "closure_tangent": (*value_shape, 2)}
    if len(value_shape) == 2:
        del functions["closure_tangent"]
    written = [fields.closure, fields.tangent][: len(functions)]
    with mno.ClosureWriter(COMM, path, written) as writer:
        assert writer.filename == path
        for t, scale in scales.items():
            fields.set_scale(scale)
            writer.write(t)
    num_cells_global = 2 * int(np.prod(cells))

    def check():
        attributes = _read_xdmf(path)
        assert sorted(attributes) == sorted(functions)
        with h5py.File(path.with_suffix(".h5"), "r") as h5:
            topology = h5["Mesh/mesh/topology"][...]
            geometry = h5["Mesh/mesh/geometry"][...]
            assert topology.shape == (num_cells_global, 3)
            for name, shape in functions.items():
                assert [t for t, _, _ in attributes[name]] == list(scales)
                for (t, dataset, centre), scale in zip(
                    attributes[name], scales.values(), strict=True
                ):
                    assert centre == "Cell"
                    data = h5[dataset][...]
                    assert data.shape[0] == num_cells_global
                    size = int(np.prod(shape, dtype=int))
                    assert np.all(data[:, size:] == 0)  # DOLFINx pads to 3 or 9 components
                    stored = data[:, :size].reshape(num_cells_global, *shape)
                    exact = _exact(geometry[topology][:, :, :2], value_shape, scale)
                    expected = exact[0] if name == "closure" else exact[1]
                    error = np.max(np.abs(stored - expected))
                    assert error < _tolerance(dtype, 5 * abs(scale)), (name, t, error)

    _on_root(check)


def _vtx_components(shape):
    """Components per value in a VTX file: padded to 3**rank, as DOLFINx does."""
    size = int(np.prod(shape, dtype=int))
    return max(size, 3 ** len(shape))


@pytest.mark.mpi
@pytest.mark.parametrize("cells", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vtx_file_holds_the_averages_next_to_the_solution(shared_dir, dtype, cells):
    """A .bp file: cell data named after the closures, point data for u, the values stored.

    The ``adios2`` module is not available to read the file, so the test checks its VTK
    schema and that the bytes of every rank's averages (equal to the exact ones), padded
    as VTX pads, are in it at each step.
    """
    msh = mesh.create_unit_square(COMM, *cells, dtype=dtype)
    fields = ClosureFields(msh, (2, 2))
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u", dtype=dtype)
    u.interpolate(lambda x: x[0] + 2 * x[1])
    path = shared_dir / "closure.bp"
    blocks = []
    with mno.ClosureWriter(COMM, path, [fields.closure, fields.tangent, u]) as writer:
        assert [f.name for f in writer.outputs] == ["closure", "closure_tangent", "u"]
        assert writer.outputs[2] is u
        for scale in (1.0, 2.0):
            fields.set_scale(scale)
            writer.write(scale)
            exact = _exact(_cell_vertices(msh), (2, 2), scale)
            for function, expected in zip(writer.outputs[:2], exact, strict=True):
                values = _cell_values(function)
                error = np.max(np.abs(values - expected), initial=0.0)
                assert COMM.allreduce(error, op=MPI.MAX) < _tolerance(dtype, 5 * scale)
                num_cells, shape = values.shape[0], values.shape[1:]
                size = int(np.prod(shape, dtype=int))
                padded = np.zeros((num_cells, _vtx_components(shape)), dtype=dtype)
                padded[:, :size] = values.reshape(num_cells, size)
                blocks.append(padded.tobytes())
    blocks = [b for rank_blocks in COMM.gather(blocks, root=0) or [] for b in rank_blocks]

    def check():
        assert (path / "md.idx").is_file() and (path / "data.0").is_file()
        schema = (path / "md.0").read_bytes()
        start = schema.index(b"<VTKFile")
        root = ET.fromstring(schema[start : schema.index(b"</VTKFile>", start) + 10])
        cell_data = [a.get("Name") for a in root.iter("CellData") for a in a]
        point_data = [a.get("Name") for a in root.iter("PointData") for a in a]
        assert cell_data == ["closure", "closure_tangent"]
        assert "u" in point_data
        data = b"".join(p.read_bytes() for p in sorted(path.glob("data.*")))
        missing = [i for i, block in enumerate(blocks) if block and block not in data]
        assert not missing, f"blocks {missing} of the averages are not in the file"

    _on_root(check)


# -- errors: found before any collective, the same on every rank -------------------------


@pytest.mark.mpi
def test_errors(shared_dir):
    msh = mesh.create_unit_square(COMM, 2, 2)
    fields = ClosureFields(msh, (2, 2))
    closure = fields.closure
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="u")
    path = shared_dir / "closure.bp"
    with pytest.raises(ValueError, match="Function 'u' is not on a quadrature space"):
        QuadratureAverage(u)
    with pytest.raises(TypeError, match=r"Expected a dolfinx\.fem\.Function, got Sum"):
        cell_average(closure + closure)
    with pytest.raises(ValueError, match=r"use the suffix \.bp \(VTX, recommended\) or \.xdmf"):
        mno.ClosureWriter(COMM, path.with_suffix(".vtu"), [closure])
    with pytest.raises(ValueError, match=r"but \['closure'\] repeat; give each function"):
        mno.ClosureWriter(COMM, path, [closure, closure])
    with pytest.raises(ValueError, match="Give at least one function"):
        mno.ClosureWriter(COMM, path, [])
    with pytest.raises(TypeError, match=r"Expected dolfinx\.fem\.Function objects, got Sum"):
        mno.ClosureWriter(COMM, path, [closure, closure + closure])
    other = fem.Function(fem.functionspace(mesh.create_unit_square(COMM, 2, 2), ("DG", 0)))
    with pytest.raises(ValueError, match="must live on the same mesh"):
        mno.ClosureWriter(COMM, path, [closure, other])
    message = (
        r"XDMF holds value shapes of rank at most 2, but the value shapes are "
        r"\{'closure_tangent': \(2, 2, 2\)\}; write to a .bp file \(VTX\) instead."
    )
    with pytest.raises(ValueError, match=message):
        mno.ClosureWriter(COMM, path.with_suffix(".xdmf"), [closure, fields.tangent])
    # XDMF takes the mesh's Lagrange element or cellwise constants; a P2 velocity used to
    # be refused by DOLFINx only in write(), after the closure's step was written, and a
    # DG1 one with "Function and Mesh dof layouts do not match".
    p2 = fem.Function(fem.functionspace(msh, ("Lagrange", 2, (2,))), name="velocity")
    dg1 = fem.Function(fem.functionspace(msh, ("DG", 1)), name="dg1")
    message = (
        r"XDMF writes functions of the mesh's element \(continuous Lagrange of degree 1\) or "
        r"cellwise constant ones, but \{'velocity': 'P2', 'dg1': 'DG1'\} are not; "
        r"interpolate them into such a space, or write to a .bp file \(VTX\)"
    )
    xdmf = shared_dir / "elements.xdmf"
    with pytest.raises(ValueError, match=message):
        mno.ClosureWriter(COMM, xdmf, [closure, p2, u, dg1])
    assert not xdmf.exists()
    # Another communicator than the mesh's: before, each rank's COMM_SELF mesh written
    # through COMM_WORLD left only rank 0's file (an audit), or files with 18 values on
    # 6 cells the other way round. Refused on every rank, for both formats.
    own = fem.Function(fem.functionspace(mesh.create_unit_square(MPI.COMM_SELF, 2, 2), ("DG", 0)))
    for comm, functions in ((MPI.COMM_SELF, [closure]), (COMM, [own])):
        for suffix in (".bp", ".xdmf"):
            if comm.size == COMM.size == 1:
                continue  # the same communicator on one process
            with pytest.raises(ValueError, match=r"is not the functions' mesh communicator"):
                mno.ClosureWriter(comm, path.with_suffix(suffix), functions)
    writer = mno.ClosureWriter(COMM, path, [closure])
    writer.close()
    writer.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="is closed; open a new one"):
        writer.write(0.0)


@pytest.mark.mpi
def test_xdmf_refuses_a_time_that_does_not_increase(shared_dir):
    """XDMF keeps one data set per time: a second write at t = 0 used to overwrite the
    first's data silently. Refused on every rank (also one without cells), file intact."""
    msh = mesh.create_unit_square(COMM, 1, 1)  # 3 ranks: one owns no cell
    fields = ClosureFields(msh, ())
    path = shared_dir / "same_time.xdmf"
    with mno.ClosureWriter(COMM, path, [fields.closure]) as writer:
        fields.set_scale(1.0)
        writer.write(0.0)
        fields.set_scale(-3.0)
        for t in (0.0, -1.0):
            with pytest.raises(ValueError, match=r"the time .* is not later than the last"):
                writer.write(t)
        with pytest.raises(ValueError, match=r"the time must be finite, got nan"):
            writer.write(float("nan"))
        writer.write(0.5)

    def check():
        attributes = _read_xdmf(path)
        assert [t for t, _, _ in attributes["closure"]] == [0.0, 0.5]
        with h5py.File(path.with_suffix(".h5"), "r") as h5:
            first = h5[attributes["closure"][0][1]][...]
            second = h5[attributes["closure"][1][1]][...]
        np.testing.assert_allclose(second, -3.0 * first, rtol=1e-12)
        assert np.abs(first).max() > 0

    _on_root(check)
