"""Install ``dolfinx_mno_mpi.pth`` beside the package; everything else is in pyproject.toml.

The ``.pth`` file makes ``import dolfinx`` work before ``import dolfinx_mno`` with the
``dolfinx-solver-real`` wheel (see ``_dolfinx_mno_mpi.py``). A ``.pth`` file must sit at
the top of site-packages, where package data cannot go, so ``build_py`` copies it there:
into ``build_lib`` for a wheel, and for an editable install (``pip install -e .``) into
the folder setuptools makes the editable wheel from.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "dolfinx_mno_mpi.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also installs :data:`PTH` at the top of site-packages."""

    def run(self) -> None:
        """Build the modules, then copy the ``.pth`` file."""
        super().run()
        if self.editable_mode:
            # Editable wheels hold what `install` writes to its install_lib, not build_lib.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(PTH, os.path.join(target, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """The modules' outputs and, for a wheel, the ``.pth`` file."""
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
