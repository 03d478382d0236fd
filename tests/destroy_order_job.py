"""Job run under ``mpirun -n 2`` and ``-n 3`` by ``test_petsc.py``.

Creates linear and nonlinear problems with MUMPS, solves them, and drops them in a
rank-dependent order (the garbage collector may do this at exit or when it collects a
reference cycle). Destroying a MUMPS solver is collective, so explicit destroys in
``__del__`` deadlock here; prints ``done`` on every rank when they do not. Prints PETSc's
queue of objects awaiting destruction after the drops and after constructing one more
problem, which must empty it.
"""

import gc

from mpi4py import MPI
from petsc4py import PETSc

import ufl
from dolfinx import fem, mesh

from dolfinx_mno.petsc import LinearProblem, NonlinearProblem

comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, 16, 16)
V = fem.functionspace(msh, ("Lagrange", 1))
u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
options = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
problems: list = []
for i in range(3):
    problems.append(
        LinearProblem(
            u * v * ufl.dx, v * ufl.dx, petsc_options_prefix=f"lin{i}_", petsc_options=options
        )
    )
    w = fem.Function(V)
    F = (w**3 + w - 1.0) * v * ufl.dx
    problems.append(
        NonlinearProblem(F, w, petsc_options_prefix=f"nonlin{i}_", petsc_options=options)
    )
for problem in problems:
    problem.solve()
order = range(len(problems)) if comm.rank % 2 == 0 else reversed(range(len(problems)))
for i in order:
    problems[i] = None  # the last reference: __del__ runs now, in a rank-dependent order
gc.collect()  # in case a reference cycle holds a problem: the GC order is rank-dependent
PETSc.garbage_view(msh.comm)  # "Total entries: N" per rank: the queued objects
# Constructing a problem (collective) destroys what was queued, on every rank.
last = LinearProblem(u * v * ufl.dx, v * ufl.dx, petsc_options_prefix="l_", petsc_options=options)
PETSc.garbage_view(msh.comm)
comm.Barrier()
print("done", flush=True)
