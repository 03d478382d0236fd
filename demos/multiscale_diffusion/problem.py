"""The multiscale diffusion problem of the two demos in this folder, without any closure.

What is solved: the microstructures and their conductivity laws, the steady loadings and
the transient scenarios, and the plain DOLFINx models (fine ones that resolve the
microstructure, coarse ones with a constant conductivity). The demos import it, and so do
the experiments that run the whole comparison (``experiments/multiscale_diffusion_results.py``
and ``experiments/transient_diffusion_results.py``) without running a demo. Everything that
involves a closure (sampling, fitting, coupling) is written out in the demos, which teach
it, and in the experiments for every microstructure and domain.
"""

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import LinearProblem as DolfinxLinearProblem
from dolfinx.io import gmsh as gmshio
from microstructure import PLATE_HOLES, microstructure_mesh

from dolfinx_mno.petsc import LinearProblem
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

# utilities.py, one folder up, holds the helpers all demos share.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utilities import boundary_dofs, timed

REPOSITORY = Path(__file__).resolve().parents[2]
DIRECT_SOLVER = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


# ## Microstructures


@dataclass(frozen=True)
class Microstructure:
    """A periodic two-phase microstructure and the fine models that resolve it.

    The conductivity is ``conductivities[1]`` where an odd number of the phases
    ``x_i / ε - floor(x_i / ε)``, i in `directions`, lie in [1/4, 3/4), and
    ``conductivities[0]`` elsewhere: stripes normal to x_1 for ``directions=(0,)``, a
    checkerboard for ``(0, 1)``.

    Attributes:
        name: A name for files and tables.
        epsilon: The period ε.
        conductivities: The two phases' conductivities (low, high).
        directions: The axes across which the phases alternate (and along which
            ``microstructure_mesh`` cuts).
        A_hom: The homogenised tensor, shape (2, 2).
        degree: The fine models' Lagrange degree.
        cells_per_period: Fine cells per period on the unit square.
        plate_cells_per_period: ε over the fine plate mesh's cell size.
    """

    name: str
    epsilon: float
    conductivities: tuple[float, float]
    directions: tuple[int, ...]
    A_hom: np.ndarray
    degree: int
    cells_per_period: int
    plate_cells_per_period: int

    @property
    def mean(self) -> float:
        """The arithmetic mean of the two conductivities: the coarse model's known part."""
        return 0.5 * sum(self.conductivities)

    def law(self, x: np.ndarray) -> np.ndarray:
        """The conductivity a(x / ε) at points x, shape (3, num_points) -> (num_points,)."""
        phases = [np.mod(x[i] / self.epsilon, 1.0) for i in self.directions]
        inside = [(phase >= 0.25) & (phase < 0.75) for phase in phases]
        low, high = self.conductivities
        return np.where(np.logical_xor.reduce(inside), high, low)


def laminate(
    epsilon: float, cells_per_period: int = 8, plate_cells_per_period: int = 8
) -> Microstructure:
    """Stripes normal to x_1, a = 10 in the middle half of each period and 1 elsewhere.

    A_hom = diag(harmonic mean, arithmetic mean) = diag(1.818..., 5.5); fine Q_1 / P_1.
    """
    a1, a2 = 1.0, 10.0
    A_hom = np.diag([1.0 / (0.5 / a1 + 0.5 / a2), 0.5 * (a1 + a2)])
    return Microstructure(
        "laminate", epsilon, (a1, a2), (0,), A_hom, 1, cells_per_period, plate_cells_per_period
    )


def checkerboard(epsilon: float, contrast: float = 3.0) -> Microstructure:
    """A checkerboard of squares of side ε/2, b = contrast and 1: A_hom = sqrt(contrast) I.

    (Keller 1964, Dykhne 1971.) Its corners make the fine solution singular: at contrast 3,
    fine Q_2 with 4 cells per period (0.90 % above sqrt(3)) and P_2 on triangles of size
    ε/4 (1.18 %), see ``docs/results.md``.
    """
    b1, b2 = 1.0, contrast
    A_hom = np.sqrt(b1 * b2) * np.eye(2)
    return Microstructure("checkerboard", epsilon, (b1, b2), (0, 1), A_hom, 2, 4, 4)


def resolved_conductivity(msh, law: Callable, name: str = "a") -> fem.Function:
    """The law, piecewise constant on a mesh whose cells do not cut the phases (DG_0)."""
    a = fem.Function(fem.functionspace(msh, ("DG", 0)), name=name)
    a.interpolate(law)  # the value at each cell midpoint: exact on a conforming mesh
    return a


def cell_conductivity(cell, law: Callable, degree: int) -> float:
    """The discrete effective conductivity of a mesh of whole periods, [0, w]^2 (serial).

    Unit potential difference across the faces x_1 = 0 and w, no flux through the others:
    for a period cell symmetric about its midlines, the periodic cell problem. Returns the
    energy per unit area at unit mean gradient, w^-2 ∫ a |∇u|² dx * w^2.
    """
    width = cell.geometry.x[:, 0].max()
    a = resolved_conductivity(cell, law)
    V = fem.functionspace(cell, ("Lagrange", degree))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    g = fem.Function(V)
    g.interpolate(lambda x: x[0] / width)  # unit mean gradient across the block
    faces = mesh.locate_entities_boundary(
        cell, 1, lambda x: np.isclose(x[0], 0.0) | np.isclose(x[0], width)
    )
    problem = DolfinxLinearProblem(
        ufl.inner(a * ufl.grad(u), ufl.grad(v)) * ufl.dx,
        fem.Constant(cell, 0.0) * v * ufl.dx,
        bcs=[fem.dirichletbc(g, fem.locate_dofs_topological(V, 1, faces))],
        petsc_options_prefix="cell_",
        petsc_options=DIRECT_SOLVER,
    )
    u_h = problem.solve()
    return fem.assemble_scalar(fem.form(a * ufl.inner(ufl.grad(u_h), ufl.grad(u_h)) * ufl.dx))


def read_plate(comm: MPI.Comm):
    """The coarse plate with two holes, ``meshes/plate_with_holes.msh`` (triangles, h = 1/40)."""
    path = REPOSITORY / "meshes" / "plate_with_holes.msh"
    return gmshio.read_from_msh(path, comm, 0, gdim=2).mesh


def fine_plate(comm: MPI.Comm, microstructure: Microstructure):
    """A triangle mesh of the plate that conforms to the microstructure (gmsh)."""
    ms = microstructure
    cell_size = ms.epsilon / ms.plate_cells_per_period
    return microstructure_mesh(comm, 1.0, PLATE_HOLES, ms.epsilon, cell_size, ms.directions)


# ## The steady problem: -div(a grad u) = f, u = g on the boundary


def _zero(x):
    return 0.0 * x[0]


#: Six loadings (f, g) whose filtered gradients point in all directions and vary in size.
TRAINING_LOADINGS = {
    "f = 1": (lambda x: 1.0 + 0.0 * x[0], _zero),
    "g = x1": (_zero, lambda x: x[0]),
    "g = x2": (_zero, lambda x: x[1]),
    "g = x1 x2": (_zero, lambda x: x[0] * x[1]),
    "f = 20 sin(2 pi x1) sin(pi x2)": (
        lambda x: 20.0 * np.sin(2 * np.pi * x[0]) * np.sin(np.pi * x[1]),
        _zero,
    ),
    "f = Gaussian at (0.3, 0.6)": (
        lambda x: 100.0 * np.exp(-40.0 * ((x[0] - 0.3) ** 2 + (x[1] - 0.6) ** 2)),
        _zero,
    ),
}


def test_loading(x):
    """The test loading, not among the training ones: (f, g) as UFL expressions of x."""
    f = 50.0 * ufl.exp(-30.0 * ((x[0] - 0.65) ** 2 + (x[1] - 0.35) ** 2))
    g = 0.5 * x[0] * (1.0 - x[1])
    return f, g


class FineProblem:
    """The steady fine problem for many loadings: factorised once, then only right-hand sides.

    `solve(f, g)` interpolates the source and the boundary data (NumPy callables) into
    the space and solves; the solution is `self.u`. (The training data need consistent fine
    solutions, not a particular f.)
    """

    def __init__(self, V: fem.FunctionSpace, conductivity):
        self.u, self.f, self.g = (fem.Function(V, name=n) for n in ("u_fine", "f", "g"))
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        self.problem = LinearProblem(
            ufl.inner(conductivity * ufl.grad(u), ufl.grad(v)) * ufl.dx,
            self.f * v * ufl.dx,
            bcs=[fem.dirichletbc(self.g, boundary_dofs(V))],
            u=self.u,
            petsc_options_prefix=f"fine_{V.element.basix_element.degree}_",
            petsc_options=DIRECT_SOLVER,
            reuse_matrix=True,
        )

    def solve(self, f: Callable, g: Callable) -> fem.Function:
        """Solve with source f and boundary data g; returns the solution."""
        self.f.interpolate(f)
        self.g.interpolate(g)
        return self.problem.solve()


def solve_plain(V, conductivity, loading, name, repeats=1):
    """Solve -div(A grad u) = f, u = g in V with a direct solver (MUMPS), without closure.

    Args:
        V: A Lagrange space.
        conductivity: A UFL coefficient on V's mesh: a constant, a constant tensor or a
            piecewise constant that resolves the microstructure.
        loading: (f, g) as UFL expressions of the spatial coordinate, as `test_loading`.
        name: Name of the solution (and its PETSc options prefix).
        repeats: The solve is timed `repeats` times.

    Returns:
        The solution and the solve time: the slowest rank's time of `problem.solve()`
        (assembly, factorisation, solve; not the form compilation), the best of `repeats`.
    """
    u_h = fem.Function(V, name=name)
    f, g = loading(ufl.SpatialCoordinate(V.mesh))
    g_h = fem.Function(V)
    g_h.interpolate(fem.Expression(g, V.element.interpolation_points))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = DolfinxLinearProblem(
        ufl.inner(conductivity * ufl.grad(u), ufl.grad(v)) * ufl.dx,
        f * v * ufl.dx,
        bcs=[fem.dirichletbc(g_h, boundary_dofs(V))],
        u=u_h,
        petsc_options_prefix=f"{name}_",
        petsc_options=DIRECT_SOLVER,
    )
    return u_h, timed(problem.solve, V.mesh.comm, repeats)


# ## The transient problem: u_t = div(a grad u) + f, u = g on the boundary, u(0) = u_0

HORIZON = 0.1

#: A scenario is a source f(x, t), boundary data g and an initial state u_0 = g on the
#: boundary. The sources are one family: a Gaussian circling a centre c(t) plus a standing
#: wave whose amplitude oscillates, f = A exp(-30 |x - c(t)|²) + B sin(2π x_1) sin(π x_2)
#: cos(ωt), c(t) = c_0 + r (cos(ωt + φ), sin(ωt + φ)). Four train, the fifth tests.
SCENARIOS = {
    "train: circling source": dict(
        A=50.0,
        c0=(0.5, 0.5),
        r=0.25,
        omega=2 * np.pi / HORIZON,
        phi=0.0,
        B=0.0,
        g=lambda x: 0.0 * x[0],
        u0=lambda x: 0.0 * x[0],
    ),
    "train: relaxing, g = x1": dict(
        A=0.0,
        c0=(0.5, 0.5),
        r=0.0,
        omega=2 * np.pi / HORIZON,
        phi=0.0,
        B=20.0,
        g=lambda x: x[0],
        u0=lambda x: x[0] + np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]),
    ),
    "train: fast source, g = x2": dict(
        A=100.0,
        c0=(0.3, 0.6),
        r=0.1,
        omega=-4 * np.pi / HORIZON,
        phi=1.0,
        B=0.0,
        g=lambda x: x[1],
        u0=lambda x: x[1],
    ),
    "train: standing wave, g = x1 x2": dict(
        A=0.0,
        c0=(0.5, 0.5),
        r=0.0,
        omega=4 * np.pi / HORIZON,
        phi=0.0,
        B=-30.0,
        g=lambda x: x[0] * x[1],
        u0=lambda x: x[0] * x[1] + np.sin(2 * np.pi * x[0]) * np.sin(np.pi * x[1]),
    ),
    "test": dict(
        A=60.0,
        c0=(0.6, 0.4),
        r=0.15,
        omega=3 * np.pi / HORIZON,
        phi=2.0,
        B=10.0,
        g=lambda x: 0.5 * x[0] * (1.0 - x[1]),
        u0=lambda x: 0.5 * x[0] * (1.0 - x[1]),
    ),
}
TRAINING_SCENARIOS = [name for name in SCENARIOS if name.startswith("train")]


class Heat:
    """The pieces of a backward Euler heat model on one space, for any scenario.

    Holds the time constant, the source's parameters as `fem.Constant`s (so that every
    scenario uses the same compiled forms), the source `f`, the boundary data `g`, the
    previous state `u_n` and the unknown `u`; `start(scenario)` sets them all.
    """

    def __init__(self, V: fem.FunctionSpace):
        msh = V.mesh
        self.V = V
        self.time = fem.Constant(msh, 0.0)
        self.parameters = {
            key: fem.Constant(msh, np.zeros(2) if key == "c0" else 0.0)
            for key in ("A", "c0", "r", "omega", "phi", "B")
        }
        p, x, t = self.parameters, ufl.SpatialCoordinate(msh), self.time
        angle = p["omega"] * t + p["phi"]
        centre = p["c0"] + p["r"] * ufl.as_vector([ufl.cos(angle), ufl.sin(angle)])
        gaussian = ufl.exp(-30.0 * ufl.dot(x - centre, x - centre))
        wave = ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1]) * ufl.cos(p["omega"] * t)
        self.f = p["A"] * gaussian + p["B"] * wave
        self.g = fem.Function(V, name="g")
        self.u_n = fem.Function(V, name="u_n")
        self.u = fem.Function(V, name="u")
        self.bcs = [fem.dirichletbc(self.g, boundary_dofs(V))]

    def start(self, scenario: dict) -> None:
        """Set the source parameters, g, u_0 and t = 0 for `scenario`."""
        for key, constant in self.parameters.items():
            constant.value = scenario[key]
        self.time.value = 0.0
        self.g.interpolate(scenario["g"])
        self.u_n.interpolate(scenario["u0"])
        self.u.x.array[:] = self.u_n.x.array


@dataclass
class TimeModel:
    """A time-dependent model: its heat pieces and the stepper that advances them."""

    heat: Heat
    stepper: IMEXStepper | ImplicitStepper


def plain_model(V: fem.FunctionSpace, conductivity, dt: float, name: str) -> TimeModel:
    """Backward Euler without closure, (u, v) + dt (A grad u, grad v) = (u_n + dt f, v).

    The matrix never changes: `LinearProblem(reuse_matrix=True)` factorises it once, and
    `IMEXStepper` (without closures, plain backward Euler) is the time loop.
    """
    heat = Heat(V)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        (u * v + dt * ufl.inner(conductivity * ufl.grad(u), ufl.grad(v))) * ufl.dx,
        (heat.u_n + dt * heat.f) * v * ufl.dx,
        u=heat.u,
        bcs=heat.bcs,
        petsc_options_prefix=f"{name}_",
        petsc_options=DIRECT_SOLVER,
        reuse_matrix=True,
    )
    return TimeModel(heat, IMEXStepper(problem, heat.u, heat.u_n, dt, time=heat.time))


def run(
    model: TimeModel,
    scenario: dict,
    record: Callable[[Heat, float], None],
    num_steps: int,
    record_every: int,
) -> float:
    """Run `model` through `scenario`, calling `record(heat, t)` every `record_every` steps.

    Returns the stepping time: the slowest rank's wall time of the steps only, not of the
    records. Python's cyclic garbage collector is paused while the steps are timed, as
    `timeit` does: a full collection walks every object of the script and would land on
    whichever run is timed then (it once added 0.14 s to a 0.03 s run).
    """
    heat, stepper = model.heat, model.stepper
    comm = heat.V.mesh.comm
    heat.start(scenario)
    stepper.t, seconds = 0.0, 0.0
    record(heat, 0.0)
    for _ in range(num_steps // record_every):
        comm.Barrier()
        gc.disable()
        tic = time.perf_counter()
        try:
            stepper.run(record_every, progress=False)
        finally:
            toc = time.perf_counter()
            gc.enable()
        seconds += comm.allreduce(toc - tic, op=MPI.MAX)
        record(heat, stepper.t)
    return seconds
