"""``import dolfinx`` before ``import dolfinx_mno``: the start-up hook and its packaging.

With the ``dolfinx-solver-real`` wheel, ``import dolfinx`` first failed with a bare
"libmpi.so.12: cannot open shared object file". ``dolfinx_mno_mpi.pth`` (installed in
site-packages by ``pip install`` and ``pip install -e``) runs ``_dolfinx_mno_mpi`` at
start-up, which imports ``dolfinx_solver`` just before the first ``dolfinx``,
``petsc4py`` or ``slepc4py`` import.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = "dolfinx_mno_mpi.pth"


def run(code, *, isolated=False, **kwargs):
    """Run ``code`` in a fresh interpreter of this environment, the worktree first.

    ``isolated`` starts it without site-packages (``python -S``), so that an installed
    ``.pth`` file has not already run the hook at start-up.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, *(["-S"] if isolated else []), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        **kwargs,
    )


# As site.py runs a .pth file of site-packages at start-up (its `import ...` lines).
IMPORT_DOLFINX_FIRST = f"""
import json, site, sys
site.addpackage({str(ROOT)!r}, {PTH!r}, set())
hooked = any("SolverFirstFinder" in repr(finder) for finder in sys.meta_path)
import dolfinx
import dolfinx.fem.petsc
print(json.dumps({{
    "hooked": hooked,
    "solver": "dolfinx_solver" in sys.modules,
    "left": any("SolverFirstFinder" in repr(finder) for finder in sys.meta_path),
    "version": dolfinx.__version__,
}}))
"""


def test_the_pth_line_makes_import_dolfinx_first_work():
    assert (ROOT / PTH).read_text() == "import _dolfinx_mno_mpi; _dolfinx_mno_mpi.install()\n"
    result = run(IMPORT_DOLFINX_FIRST)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"hooked": True, "solver": True, "left": False, "version": report["version"]}
    assert report["version"].startswith("0.11")


def test_the_hook_costs_one_module_and_waits_for_dolfinx():
    """At start-up the hook imports nothing; other imports do not trigger it."""
    code = """
import json, sys
before = set(sys.modules)
import _dolfinx_mno_mpi
_dolfinx_mno_mpi.install()
new = sorted(set(sys.modules) - before)
import fractions, decimal  # unrelated imports pass through
print(json.dumps({"new": new, "solver": "dolfinx_solver" in sys.modules,
                  "first": repr(sys.meta_path[0])}))
"""
    result = run(code, isolated=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["new"] == ["_dolfinx_mno_mpi"]
    assert not report["solver"]
    assert "SolverFirstFinder" in report["first"]


def _installed_pth():
    for directory in site.getsitepackages():
        if (Path(directory) / PTH).is_file():
            return Path(directory) / PTH
    return None


def test_import_dolfinx_first_in_this_environment():
    """Plain ``python -c "import dolfinx"`` where dolfinx_mno is installed."""
    if _installed_pth() is None:
        pytest.skip(f"{PTH} is not installed here yet: reinstall dolfinx_mno (make venv)")
    result = run("import dolfinx, dolfinx.fem.petsc; print(dolfinx.__version__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("0.11")


# One build per process, as pip does (setuptools keeps state between builds).
BUILD = """
import sys
from setuptools import build_meta
print("built", getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


def test_wheel_and_editable_install_both_ship_the_pth(tmp_path):
    """``pip install`` and ``pip install -e .`` put the .pth file at the top of site-packages."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", PTH):
        shutil.copy(ROOT / name, source / name)
    shutil.copy(ROOT / "_dolfinx_mno_mpi.py", source / "_dolfinx_mno_mpi.py")
    shutil.copytree(ROOT / "dolfinx_mno", source / "dolfinx_mno")
    dist = tmp_path / "dist"
    built = []
    for hook in ("build_wheel", "build_editable"):
        result = subprocess.run(
            [sys.executable, "-c", BUILD, hook, str(dist)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=source,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.splitlines()
        built += [line.split()[1] for line in lines if line.startswith("built ")]
    wheel, editable = built
    with zipfile.ZipFile(dist / wheel) as archive:
        assert archive.read(PTH) == (ROOT / PTH).read_bytes()
        assert archive.read("_dolfinx_mno_mpi.py") == (ROOT / "_dolfinx_mno_mpi.py").read_bytes()
    with zipfile.ZipFile(dist / editable) as archive:
        assert archive.read(PTH) == (ROOT / PTH).read_bytes()
        # site runs .pth files in name order: the editable finder's first, then ours,
        # which imports _dolfinx_mno_mpi through that finder.
        names = [n for n in archive.namelist() if n.endswith(".pth")]
        assert sorted(names) == [names[0], PTH] and names[0].startswith("__editable__")
        finder = next(n for n in archive.namelist() if n.endswith("_finder.py"))
        mapping = archive.read(finder).decode()
        assert f"'_dolfinx_mno_mpi': '{source / '_dolfinx_mno_mpi'}'" in mapping
