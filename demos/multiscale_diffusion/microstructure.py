"""Meshes that conform to a periodic microstructure, shared by the multiscale diffusion demos.

``microstructure_mesh`` cuts a square (optionally with circular holes) along the phase
interfaces of a laminate or a checkerboard of period ε with gmsh, and meshes every piece
with triangles, so that no cell straddles two phases: the value of the conductivity at
each cell midpoint is then exact. ``problem.py`` (the problem of both demos in this folder)
and the experiments import it (``from microstructure import microstructure_mesh``: Python
puts a script's folder on the module path; the experiments put this folder there).
"""

import gmsh
import numpy as np
from dolfinx.io import gmsh as gmshio

#: The holes of ``meshes/plate_with_holes.msh``, (x, y, radius), as in ``make_meshes.py``.
PLATE_HOLES = [(0.3, 0.35, 0.12), (0.68, 0.62, 0.15)]


def microstructure_mesh(comm, width, holes, epsilon, cell_size, directions):
    """Triangles of [0, width]^2 minus circular holes, conforming to the microstructure.

    gmsh cuts the domain along the phase interfaces x_i = (k + 1/4) ε and (k + 3/4) ε for
    each i in `directions`, (0,) for a laminate's stripes and (0, 1) for a checkerboard's
    squares, and meshes every piece with cells of size `cell_size` (on rank 0 of `comm`).

    The cuts are lines (`occ.fragment` with lines is twice as fast as with rectangles, and
    leaves no pieces inside the holes). The line pieces inside the holes bound no surface:
    their nodes are dropped. DOLFINx then gets all triangles as one gmsh surface, since
    reading thousands of surfaces one by one takes seconds.
    """
    gmsh.initialize()
    gmsh.option.setNumber("General.Terminal", 0)
    if comm.rank == 0:
        occ = gmsh.model.occ
        domain = [(2, occ.addRectangle(0, 0, 0, width, width))]
        if holes:
            domain, _ = occ.cut(domain, [(2, occ.addDisk(x, y, 0, r, r)) for x, y, r in holes])
        offsets = epsilon * (np.arange(round(width / epsilon))[:, None] + [0.25, 0.75]).ravel()
        interfaces = []
        for i in directions:
            for c in offsets:
                ends = [(c, 0), (c, width)] if i == 0 else [(0, c), (width, c)]
                points = [occ.addPoint(x, y, 0) for x, y in ends]
                interfaces.append((1, occ.addLine(*points)))
        occ.fragment(domain, interfaces)
        occ.synchronize()
        gmsh.option.setNumber("Mesh.CharacteristicLengthMin", cell_size)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", cell_size)
        gmsh.model.mesh.generate(2)
        # The pieces of the lines inside the holes bound no surface: drop their nodes.
        curves = gmsh.model.getBoundary(gmsh.model.getEntities(2), False, False)
        points = gmsh.model.getBoundary(curves, False, False)
        for dim, kept in ((1, set(curves)), (0, set(points))):
            stray = [e for e in gmsh.model.getEntities(dim) if e not in kept]
            if stray:  # (an empty list would clear the whole mesh)
                gmsh.model.mesh.clear(stray)
        gmsh.model.mesh.renumberNodes()
        # Move all triangles to one surface: DOLFINx then reads one entity, not thousands.
        _, triangles = gmsh.model.mesh.getElementsByType(2)
        for _, piece in gmsh.model.getEntities(2):
            gmsh.model.mesh.removeElements(2, piece)
        surface = gmsh.model.addDiscreteEntity(2)
        gmsh.model.mesh.addElementsByType(surface, 2, [], triangles)
        gmsh.model.addPhysicalGroup(2, [surface], 1)
    msh = gmshio.model_to_mesh(gmsh.model, comm, 0, gdim=2).mesh
    gmsh.finalize()
    return msh
