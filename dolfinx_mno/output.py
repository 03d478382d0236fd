"""Closure fields for ParaView: cell averages of quadrature functions, written to files.

A closure (and its tangent) is a :class:`dolfinx.fem.Function` on a quadrature space: its
values live at the points of a cell quadrature rule and it has no Basix element, so
:class:`dolfinx.io.VTXWriter` ("Missing a Basix element"), :class:`dolfinx.io.XDMFFile`
("dof layouts do not match") and interpolation into another space ("Mismatch of
tabulation points") all refuse it. Its natural picture is one value per cell, the average
over the cell computed with the closure's own quadrature rule::

    c̄_K = Σ_q w_q |det J_K(X_q)| c(x_q) / Σ_q w_q |det J_K(X_q)| = (1/|K|) ∫_K c dx

(``X_q``, ``w_q``: the rule's reference points and weights; ``x_q`` the mapped points),
which is also the L² projection of ``c`` onto the piecewise constants (DG0) for that rule;
``|K| c̄_K`` is exactly what ``c`` contributes to ``∫ inner(c, v) * closure.dx`` for
``v = 1`` on ``K``. :class:`QuadratureAverage` computes it into a DG0 function
(one compiled form, assembled once per update); :class:`ClosureWriter` writes such
averages, next to any ordinary functions, with DOLFINx's writers::

    with ClosureWriter(comm, "closure.bp", [closure, closure.tangent]) as writer:
        for step in range(num_steps):
            ...  # solve; the closures are updated
            writer.write(t)

Open ``closure.bp`` in ParaView (reader "ADIOS2VTXReader"); the fields are cell data
named after the functions (``closure``, ``closure_tangent``).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from pathlib import Path

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem, io

from dolfinx_mno._mpi import agree
from dolfinx_mno.quadrature import operand_components

__all__ = ["ClosureWriter", "QuadratureAverage", "cell_average", "is_quadrature_space"]

#: File suffixes: ``.bp`` selects VTX (ADIOS2), ``.xdmf`` XDMF (HDF5).
SUFFIXES = (".bp", ".xdmf")


def is_quadrature_space(space: fem.FunctionSpace) -> bool:
    """Whether ``space`` is a quadrature space (values at the points of a cell rule)."""
    return bool(getattr(space.ufl_element(), "has_custom_quadrature", False))


class QuadratureAverage:
    """The cell averages of a quadrature-space function, as a DG0 function.

    For each cell ``K``, ``(R c)_K = ∫_K c dx / |K|``, both integrals computed with the
    quadrature rule of ``c``'s own space (FFCx integrates any form containing a quadrature
    coefficient with that element's points and weights). This is exact for the values
    ``c`` holds: no interpolation, no other rule. The form
    ``∫ (c, 1) · w dx`` over the DG0 test functions ``w`` of value shape
    ``(num_components + 1,)`` is compiled once; each :meth:`update` assembles it on the
    owned cells and divides, so a moving mesh is handled too.

    Args:
        source: Function on a quadrature space (e.g. a :class:`dolfinx_mno.Closure` or its
            :attr:`~dolfinx_mno.Closure.tangent`), of any value shape and dtype.
        name: Name of :attr:`output`; by default the name of ``source``.

    Shapes:
        * ``source.x.array``: ``(num_cells, num_points, *value_shape)`` values.
        * ``output.x.array``: ``(num_cells, *value_shape)`` averages, in ``source``'s
          dtype (owned cells computed here, ghost cells from their owners).

    Raises:
        TypeError: ``source`` is not a :class:`dolfinx.fem.Function`.
        ValueError: ``source`` is not on a quadrature space.

    Example:
        >>> average = QuadratureAverage(closure)  # collective: compiles a form
        >>> closure.update()
        >>> dg0 = average.update()  # a DG0 fem.Function named "closure"
    """

    def __init__(self, source: fem.Function, name: str | None = None):
        """Compile the averaging form (collective); see the class docstring."""
        _check_quadrature_function(source)
        space = source.function_space
        mesh = space.mesh
        value_shape = tuple(int(n) for n in space.value_shape)
        dtype = np.dtype(source.dtype)
        self._source = source
        self._width = int(np.prod(value_shape, dtype=int))
        tdim = mesh.topology.dim
        num_cells = mesh.topology.index_map(tdim).size_local

        # Collective from here on (function spaces, JIT compilation).
        output_space = fem.functionspace(mesh, ("DG", 0, value_shape))
        self._output = fem.Function(
            output_space, name=source.name if name is None else name, dtype=dtype
        )
        moment_space = fem.functionspace(mesh, ("DG", 0, (self._width + 1,)))
        components, _ = operand_components([source])
        # The constant 1 gives |K| with the same rule as ∫_K c dx, in the same assembly.
        moments = ufl.as_vector([*components, 1.0])
        test = ufl.TestFunction(moment_space)
        self._form = fem.form(ufl.inner(moments, test) * ufl.dx(domain=mesh), dtype=dtype)
        index_map = moment_space.dofmap.index_map
        size = (index_map.size_local + index_map.num_ghosts) * (self._width + 1)
        self._buffer = np.zeros(size, dtype=dtype)
        self._moment_dofs = moment_space.dofmap.list[:num_cells, 0]
        self._output_dofs = output_space.dofmap.list[:num_cells, 0]

    @property
    def source(self) -> fem.Function:
        """The quadrature-space function that is averaged."""
        return self._source

    @property
    def output(self) -> fem.Function:
        """The DG0 function of cell averages (as of the last :meth:`update`)."""
        return self._output

    def update(self) -> fem.Function:
        """Average the current values of :attr:`source` into :attr:`output` (collective).

        Returns:
            :attr:`output`, ghosts updated.
        """
        self._buffer[:] = 0.0
        fem.assemble_vector(self._buffer, self._form)  # type: ignore[arg-type]
        moments = self._buffer.reshape(-1, self._width + 1)[self._moment_dofs]
        values = self._output.x.array.reshape(-1, self._width)
        values[self._output_dofs] = moments[:, : self._width] / moments[:, self._width :]
        self._output.x.scatter_forward()
        return self._output


def cell_average(source: fem.Function, name: str | None = None) -> fem.Function:
    """The cell averages of a quadrature-space function, once (collective).

    ``cell_average(closure)`` is a DG0 :class:`dolfinx.fem.Function` that any DOLFINx
    writer, interpolation or plot takes. To average the same function repeatedly (in a
    time loop), build a :class:`QuadratureAverage` once and call its ``update``, or use
    :class:`ClosureWriter`.

    Args:
        source: Function on a quadrature space.
        name: Name of the result; by default the name of ``source``.

    Returns:
        A new DG0 function of ``source``'s value shape and dtype.
    """
    return QuadratureAverage(source, name).update()


def _check_quadrature_function(source: typing.Any) -> None:
    if not isinstance(source, fem.Function):
        raise TypeError(f"Expected a dolfinx.fem.Function, got {type(source).__name__}.")
    if not is_quadrature_space(source.function_space):
        raise ValueError(
            f"Function '{source.name}' is not on a quadrature space, so it has no cell "
            "averages to compute; write it with dolfinx.io.VTXWriter or XDMFFile directly."
        )


class ClosureWriter:
    """Write closures (as cell averages) and ordinary functions for ParaView, over time.

    Every function on a quadrature space (closures, their tangents, any quadrature
    function) is written as its cell averages (:class:`QuadratureAverage`), a DG0 field
    of the same value shape and name; other functions are written as they are. Each
    :meth:`write` recomputes the averages from the current values, then writes one time
    step. The format follows the file suffix:

    * ``.bp``: :class:`dolfinx.io.VTXWriter` (ADIOS2; ParaView's "ADIOS2VTXReader").
      Averages become cell data. Other functions must share one (discontinuous)
      Lagrange element, as VTX requires, e.g. the solution ``u``.
    * ``.xdmf``: :class:`dolfinx.io.XDMFFile` with an HDF5 file beside it (ParaView's
      "XDMF Reader"). The mesh is written once, at construction. Value shapes of rank
      at most 2; other functions continuous Lagrange of the mesh's degree, or cellwise
      constant.

    As in DOLFINx, vectors with fewer than 3 components are padded with zeros to 3, and
    tensors to 9 components (the entries first, in row-major order, then zeros; a
    ``(2, 2)`` tensor is *not* embedded in a 3×3 one). A tangent of value shape
    ``(*value_shape, num_inputs)`` is written likewise, its entries in row-major order:
    entry ``(i, j)`` of a flux tangent is ``∂q_i/∂(input j)``.

    Args:
        comm: The mesh's communicator.
        filename: Output path ending in ``.bp`` or ``.xdmf``.
        functions: The functions to write, all on one mesh, with distinct names.
        engine: ADIOS2 engine of a ``.bp`` file (see :class:`dolfinx.io.VTXWriter`).

    Raises:
        TypeError: An entry of ``functions`` that is not a :class:`dolfinx.fem.Function`.
        ValueError: No functions, functions on several meshes, a ``comm`` other than the
            mesh's, repeated names, an unknown suffix, or a value shape or element the
            format cannot hold.

        These are found before any collective call, identically on every rank.

    Example:
        >>> writer = ClosureWriter(comm, "closure.bp", [closure, closure.tangent])
        >>> for step in range(num_steps):
        ...     problem.solve()
        ...     writer.write(t)
        >>> writer.close()
    """

    def __init__(
        self,
        comm: MPI.Comm,
        filename: str | os.PathLike[str],
        functions: Sequence[fem.Function],
        *,
        engine: str = "BPFile",
    ):
        """Open the file (collective); see the class docstring for the arguments."""
        path = Path(filename)
        functions = _check_functions(functions)
        mesh_comm = functions[0].function_space.mesh.comm
        if MPI.Comm.Compare(comm, mesh_comm) not in (MPI.IDENT, MPI.CONGRUENT):
            # (A local check: every rank of either communicator finds the mismatch.)
            raise ValueError(
                f"comm (size {comm.size}) is not the functions' mesh communicator (size "
                f"{mesh_comm.size}): the writer would put one rank's mesh in another rank's "
                "file, or leave files half-written. Pass the mesh's, "
                "functions[0].function_space.mesh.comm."
            )
        if path.suffix not in SUFFIXES:
            raise ValueError(
                f"Cannot tell the format of '{path}': use the suffix .bp (VTX, "
                "recommended) or .xdmf (XDMF)."
            )
        quadrature = [is_quadrature_space(f.function_space) for f in functions]
        if path.suffix == ".xdmf":
            too_deep = {
                f.name: tuple(f.function_space.value_shape)
                for f in functions
                if len(f.function_space.value_shape) > 2
            }
            if too_deep:
                raise ValueError(
                    f"XDMF holds value shapes of rank at most 2, but the value shapes are "
                    f"{too_deep}; write to a .bp file (VTX) instead."
                )
            # XDMFFile.write_function takes cellwise constants and the continuous Lagrange
            # element of the mesh's degree, and refuses others only when writing (the
            # closures' averages of that step written, the rest not).
            mesh_degree = functions[0].function_space.mesh.geometry.cmaps[0].degree
            elements = {
                f.name: _element_name(f)
                for f, is_q in zip(functions, quadrature, strict=True)
                if not is_q and not _is_xdmf_element(f, mesh_degree)
            }
            if elements:
                raise ValueError(
                    f"XDMF writes functions of the mesh's element (continuous Lagrange of "
                    f"degree {mesh_degree}) or cellwise constant ones, but {elements} are "
                    "not; interpolate them into such a space, or write to a .bp file (VTX), "
                    "which takes any (discontinuous) Lagrange element."
                )
        elif not hasattr(io, "VTXWriter"):
            raise ValueError(
                "This DOLFINx was built without ADIOS2, so it cannot write .bp files; write "
                "to a .xdmf file instead."
            )

        # Collective from here on.
        self._averages = [
            QuadratureAverage(f) for f, is_q in zip(functions, quadrature, strict=True) if is_q
        ]
        averaged = iter(self._averages)
        self._outputs = [
            next(averaged).output if is_q else f
            for f, is_q in zip(functions, quadrature, strict=True)
        ]
        self._path = path
        self._closed = False
        self._comm = comm
        self._last_time: float | None = None
        self._vtx: typing.Any = None
        self._xdmf: io.XDMFFile | None = None
        if path.suffix == ".bp":
            # VTX takes the mesh from the first function: an ordinary one, if any.
            ordered = sorted(self._outputs, key=_is_cellwise_constant)
            self._vtx = io.VTXWriter(comm, path, ordered, engine)
        else:
            self._xdmf = io.XDMFFile(comm, path, "w")
            self._xdmf.write_mesh(functions[0].function_space.mesh)

    @property
    def filename(self) -> Path:
        """The output path."""
        return self._path

    @property
    def outputs(self) -> list[fem.Function]:
        """The functions written: DG0 cell averages in place of quadrature functions."""
        return list(self._outputs)

    def write(self, t: float) -> None:
        """Average the quadrature functions' current values and write them at time ``t``.

        Collective.

        Raises:
            RuntimeError: If the writer was closed.
            ValueError: If ``t`` is not finite, or, for XDMF, not later than the last
                written time (XDMF keeps one data set per time value: a second write at
                the same time would overwrite the first's data). On every rank, before
                anything is written.
        """
        if self._closed:
            raise RuntimeError(f"The writer of '{self._path}' is closed; open a new one.")
        time = float(t)
        reason = None
        if not np.isfinite(time):
            reason = f"the time must be finite, got {t!r}"
        elif self._xdmf is not None and self._last_time is not None and time <= self._last_time:
            reason = (
                f"the time {time:g} is not later than the last written time "
                f"{self._last_time:g}; XDMF keeps one data set per time value, so this write "
                "would overwrite the earlier one's data"
            )
        agree(self._comm, reason, f"Writing '{self._path.name}'", ValueError)
        self._last_time = time
        for average in self._averages:
            average.update()
        if self._vtx is not None:
            self._vtx.write(time)
        else:
            assert self._xdmf is not None
            for function in self._outputs:
                self._xdmf.write_function(function, time)

    def close(self) -> None:
        """Close the file (collective); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._vtx is not None:
            self._vtx.close()
        if self._xdmf is not None:
            self._xdmf.close()

    def __enter__(self) -> ClosureWriter:
        """Enter the context: the writer itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the file."""
        self.close()


def _is_cellwise_constant(function: fem.Function) -> bool:
    return int(function.function_space.ufl_element().embedded_superdegree) == 0


def _is_xdmf_element(function: fem.Function, mesh_degree: int) -> bool:
    """Whether ``XDMFFile.write_function`` takes ``function``'s element."""
    element = typing.cast(typing.Any, function.function_space.ufl_element())
    if _is_cellwise_constant(function):
        return True
    return bool(
        element.family_name == "P"
        and not element.discontinuous
        and int(element.embedded_superdegree) == mesh_degree
    )


def _element_name(function: fem.Function) -> str:
    element = typing.cast(typing.Any, function.function_space.ufl_element())
    kind = "DG" if element.discontinuous else element.family_name
    return f"{kind}{int(element.embedded_superdegree)}"


def _check_functions(functions: typing.Any) -> list[fem.Function]:
    """Local checks of a writer's functions (no communication)."""
    if isinstance(functions, fem.Function):
        functions = [functions]
    functions = list(functions)
    if not functions:
        raise ValueError("Give at least one function to write.")
    for function in functions:
        if not isinstance(function, fem.Function):
            raise TypeError(
                f"Expected dolfinx.fem.Function objects, got {type(function).__name__}."
            )
    mesh = functions[0].function_space.mesh
    if any(f.function_space.mesh is not mesh for f in functions):
        raise ValueError("All functions written to one file must live on the same mesh.")
    names = [f.name for f in functions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"Function names must be distinct in one file, but {repeated} repeat; give "
            "each function its own name= (a closure's tangent is named '<name>_tangent')."
        )
    return functions
