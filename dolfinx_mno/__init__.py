"""dolfinx_mno: learned closures and multiscale neural operators for DOLFINx.

A learned closure is a PyTorch model evaluated at the quadrature points of a form; it
enters UFL like any coefficient::

    import dolfinx_mno as mno
    closure = mno.Closure(model, [u, ufl.grad(u)], quadrature_degree=4)
    F -= ufl.inner(closure, v) * closure.dx

Importing this package makes DOLFINx's own ``dolfinx.fem.petsc`` problems refuse forms
that contain closures, which they would never update; solve with
:mod:`dolfinx_mno.petsc`'s subclasses (see :mod:`dolfinx_mno.guard`).

The ``dolfinx-solver-real`` wheel's DOLFINx needs ``import dolfinx_solver`` before
``import dolfinx`` (which otherwise fails with "libmpi.so.12: cannot open shared object
file"). Installing dolfinx_mno (``pip install``, or ``pip install -e .``) adds a start-up
hook that does this on the first ``import dolfinx``, ``petsc4py`` or ``slepc4py``
(``_dolfinx_mno_mpi.py``), so scripts may import them in any order; importing this package
does it too, for a source tree on ``PYTHONPATH`` without the hook.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

# The dolfinx-solver wheels load their bundled MPI library on import; DOLFINx cannot find
# libmpi otherwise. Other DOLFINx installations (conda, Spack, Docker) need nothing.
if importlib.util.find_spec("dolfinx_solver") is not None:
    import dolfinx_solver  # noqa: F401

from dolfinx_mno.base import ClosureBase
from dolfinx_mno.closure import (
    Closure,
    ClosureEvaluationError,
    derivative,
    extract_closures,
)
from dolfinx_mno.diagnostics import (
    Correlation,
    Spectra,
    box_spectra,
    correlation,
    decorrelation_time,
    sample_on_box_grid,
)
from dolfinx_mno.distributed_operator import DistributedFNO
from dolfinx_mno.grid import Grid
from dolfinx_mno.guard import install_problem_guard
from dolfinx_mno.io import ModelFileError, load_model, register_architecture, save_model
from dolfinx_mno.models import MLP, Bounded
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.normalization import AffineNormalization, NormalizedModel
from dolfinx_mno.operands import Operands
from dolfinx_mno.output import ClosureWriter, QuadratureAverage, cell_average
from dolfinx_mno.quadrature import check_form, form, measure, quadrature_space
from dolfinx_mno.slab_alignment import redistribute_to_slabs, slab_partitioner
from dolfinx_mno.spec import ClosureSpec
from dolfinx_mno.torch_bridge import resolve_device, to_precision
from dolfinx_mno.training import fit

# DOLFINx's own PETSc problems never update closures: refuse them on forms with closures.
install_problem_guard()

try:
    __version__ = importlib.metadata.version("dolfinx_mno")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
    __version__ = "0.0.0"

__all__ = [
    "MLP",
    "AffineNormalization",
    "Bounded",
    "Closure",
    "ClosureBase",
    "ClosureEvaluationError",
    "ClosureSpec",
    "ClosureWriter",
    "Correlation",
    "DistributedFNO",
    "Grid",
    "ModelFileError",
    "NonlocalClosure",
    "NormalizedModel",
    "Operands",
    "QuadratureAverage",
    "Spectra",
    "__version__",
    "box_spectra",
    "cell_average",
    "check_form",
    "correlation",
    "decorrelation_time",
    "derivative",
    "extract_closures",
    "fit",
    "form",
    "load_model",
    "measure",
    "quadrature_space",
    "redistribute_to_slabs",
    "register_architecture",
    "resolve_device",
    "sample_on_box_grid",
    "save_model",
    "slab_partitioner",
    "to_precision",
]
