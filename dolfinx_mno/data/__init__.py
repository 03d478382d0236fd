"""Closure training data from fine simulations.

The workflow (see ``docs/data.md``): a fine simulation → restriction (filtering) of its
fields to the coarse space → closure targets as the commutator of filter and coarse
operator, with the matching closure inputs → an HDF5 file, written append-only and
crash-safely, read back as NumPy arrays or torch tensors::

    from dolfinx_mno.data import ClosureDataWriter, ClosureSampler, L2Projection, Tendency

    sampler = ClosureSampler(L2Projection(V_c), u_c, [u_c, ufl.grad(u_c)], u_c**2,
                             quadrature_degree=2, fine_tendency=Tendency(u_f**2, W_f))
    with ClosureDataWriter.from_sampler("data.h5", sampler, fine_mesh=fine, time_step=dt) as w:
        for t in times:
            ...  # advance the fine simulation
            w.append(sampler.sample(u_f), time=t)

Modules: :mod:`~dolfinx_mno.data.restriction` (filters: ``Interpolation``,
``L2Projection``, ``CellAverage``), :mod:`~dolfinx_mno.data.commutator`
(tendencies, targets), :mod:`~dolfinx_mno.data.sample` (samples, rank-independent order),
:mod:`~dolfinx_mno.data.storage` (HDF5: ``ClosureDataWriter``/``ClosureDataReader`` for
points, ``GriddedDataWriter``/``GriddedDataReader`` for fields); ``GriddedSampler`` (fields
on a grid, for neural operators) comes from :mod:`dolfinx_mno.grid_gather`.
"""

from dolfinx_mno.data.commutator import ClosureSampler, Tendency
from dolfinx_mno.data.restriction import (
    MASS_SOLVER_OPTIONS,
    CellAverage,
    Interpolation,
    L2Projection,
    MassSolver,
    Restriction,
    make_restriction,
    restrict,
)
from dolfinx_mno.data.sample import ClosureSample, mesh_summary
from dolfinx_mno.data.storage import (
    ClosureDataReader,
    ClosureDataWriter,
    GriddedDataReader,
    GriddedDataWriter,
)
from dolfinx_mno.grid_gather import GriddedSampler  # training data for grid models

__all__ = [
    "MASS_SOLVER_OPTIONS",
    "CellAverage",
    "ClosureDataReader",
    "ClosureDataWriter",
    "ClosureSample",
    "ClosureSampler",
    "GriddedDataReader",
    "GriddedDataWriter",
    "GriddedSampler",
    "Interpolation",
    "L2Projection",
    "MassSolver",
    "Restriction",
    "Tendency",
    "make_restriction",
    "mesh_summary",
    "restrict",
]
