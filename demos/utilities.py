"""Small helpers shared by the demos (as dolfinx-external-operator's ``demo/utilities.py``).

Only what several demos would otherwise copy lives here: global norms, boundary dofs,
timing across ranks, rank-0 printing and the output folder. Anything a user would reuse in
their own simulation belongs in the package instead.
"""

from __future__ import annotations


def assemble_global(form):
    """The value of a compiled scalar form over the whole mesh (collective).

    Each rank assembles over the cells it owns and ``allreduce`` sums, so the value is the
    same on every rank and for any number of ranks.

    Args:
        form: A compiled scalar form (``dolfinx.fem.form(...)``).
    """
    from mpi4py import MPI

    from dolfinx import fem

    return form.mesh.comm.allreduce(fem.assemble_scalar(form), op=MPI.SUM)
