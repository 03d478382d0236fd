"""Make the gmsh meshes kept in this folder: ``python meshes/make_meshes.py``.

* ``unit_square_unstructured.msh``: the unit square, unstructured triangles, h = 1/24.
* ``plate_with_holes.msh``: the unit square with two circular holes, h = 1/40.
"""

from pathlib import Path

import gmsh

HERE = Path(__file__).resolve().parent


def unit_square(path: Path, h: float) -> None:
    """Write the unstructured unit square with maximal cell size ``h``."""
    gmsh.model.add("unit_square")
    surface = gmsh.model.occ.addRectangle(0, 0, 0, 1, 1)
    gmsh.model.occ.synchronize()
    gmsh.model.addPhysicalGroup(2, [surface], 1, name="domain")
    boundary = [b[1] for b in gmsh.model.getBoundary([(2, surface)], oriented=False)]
    gmsh.model.addPhysicalGroup(1, boundary, 1, name="boundary")
    gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
    gmsh.model.mesh.generate(2)
    gmsh.write(str(path))
    gmsh.model.remove()


def plate_with_holes(path: Path, h: float) -> None:
    """Write the unit plate with two holes with maximal cell size ``h``."""
    gmsh.model.add("plate_with_holes")
    plate = gmsh.model.occ.addRectangle(0, 0, 0, 1, 1)
    holes = [
        gmsh.model.occ.addDisk(0.3, 0.35, 0, 0.12, 0.12),
        gmsh.model.occ.addDisk(0.68, 0.62, 0, 0.15, 0.15),
    ]
    domain, _ = gmsh.model.occ.cut([(2, plate)], [(2, hole) for hole in holes])
    gmsh.model.occ.synchronize()
    gmsh.model.addPhysicalGroup(2, [domain[0][1]], 1, name="domain")
    boundary = [b[1] for b in gmsh.model.getBoundary(domain, oriented=False)]
    gmsh.model.addPhysicalGroup(1, boundary, 1, name="boundary")
    gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
    gmsh.model.mesh.generate(2)
    gmsh.write(str(path))
    gmsh.model.remove()


if __name__ == "__main__":
    gmsh.initialize()
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.option.setNumber("Mesh.RandomSeed", 1.0)
    unit_square(HERE / "unit_square_unstructured.msh", 1 / 24)
    plate_with_holes(HERE / "plate_with_holes.msh", 1 / 40)
    gmsh.finalize()
