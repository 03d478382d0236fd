"""The checkerboard's fine discretisation: the two cell-problem tables of ``docs/results.md``.

The checkerboard's corners make the fine solution singular, and the discrete effective
conductivity converges slowly. These tables chose the contrast and the fine elements of the
multiscale diffusion demos: the relative excess of the discrete effective conductivity
(``problem.cell_conductivity``) over the exact sqrt(b1 b2),

1. on the period cell, Q_1 and Q_2 quadrilaterals, contrasts 2, 3, 5 and 10, 4 to 64 cells
   per period;
2. on a block of 8 x 8 periods meshed like the plate with holes (``microstructure_mesh``:
   triangles that conform to the squares), P_1 and P_2, contrast 3, cells of size ε/2 to
   ε/12; and on a single period cell meshed the same way (P_2, ε/4), whose faces cut
   squares.

Every problem is small and serial. Run from the repository root::

    python experiments/checkerboard_cell_problems.py    # ~30 s

Writes ``experiments/output/checkerboard_cell_problems.json``.
"""

import argparse
import json
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
from dolfinx import mesh

# The problem and the demos' helpers live beside the demos; an experiment imports them.
DEMOS = Path(__file__).resolve().parents[1] / "demos"
sys.path[:0] = [str(DEMOS / "multiscale_diffusion"), str(DEMOS)]
from microstructure import microstructure_mesh
from problem import cell_conductivity, checkerboard
from utilities import output_folder

argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
comm = MPI.COMM_SELF  # every problem is serial: run this script on one rank
epsilon = 1.0 / 64  # the excess does not depend on ε (the problems scale with it)

print("period cell: excess over sqrt(b1 b2) at 4, 8, 16, 32, 64 cells per period")
period_cell = {}
for contrast in (2.0, 3.0, 5.0, 10.0):
    law = checkerboard(epsilon, contrast).law
    for degree in (1, 2):
        excess = []
        for n in (4, 8, 16, 32, 64):
            cell = mesh.create_rectangle(
                comm, [[0.0, 0.0], [epsilon, epsilon]], [n, n], mesh.CellType.quadrilateral
            )
            excess.append(cell_conductivity(cell, law, degree) / np.sqrt(contrast) - 1.0)
        period_cell[f"contrast {contrast:g}, Q{degree}"] = excess
        print(f"  contrast {contrast:>2g}, Q{degree}: " + ", ".join(f"{e:.2%}" for e in excess))

print("\ncontrast 3, triangles conforming to the squares: 8 x 8-period block")
law = checkerboard(epsilon).law
block = {}
for cells_per_period in (2, 4, 6, 8, 12):
    cell_size = epsilon / cells_per_period
    msh = microstructure_mesh(comm, 8 * epsilon, [], epsilon, cell_size, (0, 1))
    triangles = msh.topology.index_map(2).size_local / 64
    excess = [cell_conductivity(msh, law, degree) / np.sqrt(3.0) - 1.0 for degree in (1, 2)]
    block[f"eps/{cells_per_period}"] = dict(
        triangles_per_period=triangles, P1=excess[0], P2=excess[1]
    )
    print(
        f"  cell size eps/{cells_per_period:<2}: {triangles:5.0f} triangles per period, "
        f"P1 {excess[0]:.2%}, P2 {excess[1]:.2%} (conductivity {np.sqrt(3) * (1 + excess[1]):.4f})"
    )
single = microstructure_mesh(comm, epsilon, [], epsilon, epsilon / 4, (0, 1))
single_excess = cell_conductivity(single, law, 2) / np.sqrt(3.0) - 1.0
print(f"  one period cell, P2, eps/4: {single_excess:.2%}")

output = output_folder("output", comm, root=Path(__file__).resolve().parent)
summary = {"period_cell": period_cell, "block_8x8": block, "period_cell_P2_eps/4": single_excess}
(output / "checkerboard_cell_problems.json").write_text(json.dumps(summary, indent=2))
