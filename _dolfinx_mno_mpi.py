"""Import ``dolfinx_solver`` before DOLFINx, petsc4py or slepc4py, whatever the user imports.

The ``dolfinx-solver-real`` wheel (``pip install "dolfinx_mno[dolfinx]"``) ships DOLFINx,
petsc4py and slepc4py linked against an MPI library that only ``import dolfinx_solver``
loads; ``import dolfinx`` first fails with "libmpi.so.12: cannot open shared object
file". ``import dolfinx_mno`` imports ``dolfinx_solver``, but a FEniCS user writes
``import dolfinx`` first.

dolfinx_mno installs ``dolfinx_mno_mpi.pth`` in site-packages, and Python runs its one
line, ``import _dolfinx_mno_mpi; _dolfinx_mno_mpi.install()``, at start-up. :func:`install`
puts a finder at the front of :data:`sys.meta_path`. The first time ``dolfinx``,
``petsc4py`` or ``slepc4py`` is imported, the finder removes itself and imports
``dolfinx_solver`` (if it is installed; DOLFINx from conda, Spack or Docker needs
nothing), then lets the normal import go on. Until then, each import pays one set lookup;
this module imports nothing at start-up. If ``dolfinx_solver`` refuses the environment
(a foreign petsc4py, say), its own message is what ``import dolfinx`` raises.
"""

# Only `sys` (loaded before site runs) at module level: Python imports this module in
# every process of the environment, so it must cost nothing measurable.
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Sequence

__all__ = ["install", "uninstall"]

#: Top-level modules of the wheel that need its MPI library loaded first.
NEEDS_SOLVER_FIRST = frozenset({"dolfinx", "petsc4py", "slepc4py"})


class SolverFirstFinder:
    """A meta path finder that finds nothing: it imports ``dolfinx_solver`` first, once."""

    @staticmethod
    def find_spec(
        name: str, path: "Sequence[str] | None" = None, target: "types.ModuleType | None" = None
    ) -> None:
        """Import ``dolfinx_solver`` before ``name`` if ``name`` needs it; find nothing."""
        if name not in NEEDS_SOLVER_FIRST:
            return
        uninstall()  # first, so that dolfinx_solver's own imports do not come back here
        import importlib.util

        if importlib.util.find_spec("dolfinx_solver") is not None:
            import dolfinx_solver  # noqa: F401


def install() -> None:
    """Put the finder at the front of :data:`sys.meta_path` (once)."""
    if SolverFirstFinder not in sys.meta_path:
        sys.meta_path.insert(0, SolverFirstFinder)  # type: ignore[arg-type]


def uninstall() -> None:
    """Remove the finder from :data:`sys.meta_path`, if it is there."""
    if SolverFirstFinder in sys.meta_path:
        sys.meta_path.remove(SolverFirstFinder)  # type: ignore[arg-type]
