"""The public API: names, version, device selection."""

import importlib.abc
import importlib.metadata
import inspect
import pathlib
import pydoc
import re
import sys
import typing

from mpi4py import MPI

import pytest
import torch

import dolfinx_mno
import dolfinx_mno.data
import dolfinx_mno.petsc
import dolfinx_mno.rollout
import dolfinx_mno.timestepping


def test_all_names_exist_and_are_unique():
    for name in dolfinx_mno.__all__:
        assert hasattr(dolfinx_mno, name), name
    # The order itself is ruff's RUF022 (isort-style: constants, classes, functions).
    assert len(set(dolfinx_mno.__all__)) == len(dolfinx_mno.__all__)


def test_version():
    assert dolfinx_mno.__version__ == importlib.metadata.version("dolfinx_mno")


def test_resolve_device():
    device = dolfinx_mno.resolve_device("auto", MPI.COMM_WORLD)
    if torch.cuda.is_available():
        assert device.type == "cuda"
        assert device.index < torch.cuda.device_count()
    else:
        assert device == torch.device("cpu")
    assert dolfinx_mno.resolve_device("cpu", MPI.COMM_WORLD) == torch.device("cpu")


def _public_classes():
    modules = [
        dolfinx_mno,
        dolfinx_mno.petsc,
        dolfinx_mno.rollout,
        dolfinx_mno.timestepping,
        dolfinx_mno.data,
    ]
    return [
        pytest.param(getattr(module, name), id=f"{module.__name__}.{name}")
        for module in modules
        for name in module.__all__
        if inspect.isclass(getattr(module, name))
    ]


@pytest.mark.parametrize("cls", _public_classes())
def test_help_shows_our_own_init_docstring(cls):
    """``help(Closure)`` once showed fem.Function's ``__init__`` text, MLP nn.Module's."""
    rendered = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    parents = [base for base in cls.__mro__[1:] if not base.__module__.startswith("dolfinx_mno")]
    for base in parents:
        inherited = inspect.getdoc(base.__init__)
        if inherited:
            assert inherited.splitlines()[0] not in rendered, base
    if typing.Protocol in cls.__mro__:
        return  # a protocol is not instantiated: typing's __init__, documented nowhere
    init = cls.__init__
    assert init.__module__.startswith("dolfinx_mno"), init
    assert init.__doc__, f"{cls.__name__}.__init__ has no docstring"
    assert inspect.getdoc(init).splitlines()[0] in rendered


def _readme_python_blocks():
    """The ```python blocks of README.md, in order."""
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    return re.findall(r"^```python\n(.*?)^```", readme.read_text(), flags=re.M | re.S)


@pytest.mark.mpi
def test_readme_quick_snippet_runs_and_matches_ufl():
    """README's first snippet, run as printed on a heat step: a linear closure
    ``c = w·(u_n, ∇u_n) + b`` gives the solution of the same step written in UFL."""
    import numpy as np
    import ufl
    from dolfinx import fem, mesh

    from dolfinx_mno.petsc import LinearProblem

    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 3)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, u_h = fem.Function(V), fem.Function(V)
    u_n.interpolate(lambda x: np.sin(3 * x[0]) * x[1] + x[0] ** 2)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    dt = 0.1
    a = u * v * ufl.dx + dt * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    L = u_n * v * ufl.dx
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight[:] = torch.tensor([[0.5, -2.0, 1.5]])
        model.bias[:] = 0.25
    namespace = {"model": model, "u_n": u_n, "u_h": u_h, "a": a, "L": L, "v": v, "dt": dt}
    namespace["ufl"] = ufl
    exec(_readme_python_blocks()[0], namespace)
    assert namespace["problem"].u is u_h

    closure_ufl = 0.5 * u_n - 2.0 * u_n.dx(0) + 1.5 * u_n.dx(1) + 0.25
    dx2 = ufl.dx(metadata={"quadrature_degree": 2})
    L_ufl = u_n * v * ufl.dx + dt * closure_ufl * v * dx2
    expected = LinearProblem(a, L_ufl, petsc_options_prefix="readme_ufl_").solve()
    difference = np.max(np.abs(u_h.x.array - expected.x.array), initial=0)
    difference = msh.comm.allreduce(difference, op=MPI.MAX)
    scale = msh.comm.allreduce(np.max(np.abs(expected.x.array), initial=0), op=MPI.MAX)
    assert scale > 0.1 and difference <= 1e-12 * scale


def _documented_arguments(doc):
    """The names of a Google-style docstring's ``Args:`` entries, in order."""
    lines = inspect.cleandoc(doc).splitlines()
    names, indent = [], None
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            indent = len(line) - len(line.lstrip())
            continue
        if indent is None or not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= indent:
            indent = None
        elif depth == indent + 4 and (entry := re.match(r"\*{0,2}(\w+)( \(.*\))?:", stripped)):
            names.append(entry.group(1))
    return names


def _public_callables():
    modules = [
        dolfinx_mno,
        dolfinx_mno.data,
        dolfinx_mno.petsc,
        dolfinx_mno.rollout,
        dolfinx_mno.timestepping,
        dolfinx_mno.training,
    ]
    for module in modules:
        for name in module.__all__:
            item = getattr(module, name)
            if inspect.isfunction(item):
                yield f"{module.__name__}.{name}", item, item.__doc__
            elif inspect.isclass(item):
                for attribute, member in vars(item).items():
                    function = getattr(member, "__func__", member)
                    if not inspect.isfunction(function):
                        continue
                    if attribute == "__init__":
                        doc = f"{item.__doc__ or ''}\n{function.__doc__ or ''}"
                    elif attribute.startswith("_"):
                        continue
                    else:
                        doc = function.__doc__
                    yield f"{module.__name__}.{name}.{attribute}", function, doc


def test_documented_arguments_are_the_signatures():
    """Every ``Args:`` entry of the public API names a parameter of the signature, and
    every parameter of a function that has an ``Args:`` section is documented there
    (``**kwargs`` may be documented by their names)."""
    mismatches = []
    for name, function, doc in _public_callables():
        documented = _documented_arguments(doc or "")
        if not documented:
            continue
        parameters = inspect.signature(function).parameters
        variadic = {
            p.name for p in parameters.values() if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        names = set(parameters) - {"self", "cls"}
        unknown = [] if variadic else sorted(set(documented) - names)
        missing = sorted(names - set(documented) - variadic)
        repeated = sorted({n for n in documented if documented.count(n) > 1})
        if unknown or missing or repeated:
            mismatches.append((name, unknown, missing, repeated))
    assert not mismatches


class _NoPETSc(importlib.abc.MetaPathFinder):
    """The imports of a DOLFINx built without petsc4py."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("petsc4py", "slepc4py") or name == "dolfinx.fem.petsc":
            raise ImportError(f"No module named {name!r} (a DOLFINx without PETSc)")
        return None


def test_import_needs_no_petsc4py(monkeypatch):
    """docs/architecture.md: the PETSc modules are imported explicitly, as
    ``dolfinx.fem.petsc`` is, and the guard does nothing without petsc4py; but
    ``import dolfinx_mno`` imported them (``training`` → ``fit_rollout`` → ``rollout``
    → ``petsc``) and failed on a DOLFINx without petsc4py. Re-imported here with petsc4py
    hidden, then the original modules are put back."""
    import dolfinx
    import dolfinx.fem
    import numpy as np

    ours = [name for name in sys.modules if name.split(".")[0] == "dolfinx_mno"]
    hidden = [name for name in sys.modules if name.split(".")[0] in ("petsc4py", "slepc4py")]
    for name in [*ours, *hidden, "dolfinx.fem.petsc"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(dolfinx.fem, "petsc", raising=False)
    monkeypatch.setattr(dolfinx, "has_petsc4py", False)
    monkeypatch.setattr(sys, "meta_path", [_NoPETSc(), *sys.meta_path])
    try:
        mno = importlib.import_module("dolfinx_mno")
        assert not [name for name in sys.modules if name.split(".")[0] == "petsc4py"]
        assert "dolfinx_mno.petsc" not in sys.modules
        model = mno.MLP(1, 1, [2], seed=0)
        result = mno.fit(model, np.zeros((8, 1)), np.ones(8), epochs=1, progress=False)
        assert result.history.best_epoch == 0
        with pytest.raises(ImportError, match="No module named 'petsc4py'"):
            importlib.import_module("dolfinx_mno.petsc")
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "dolfinx_mno"]:
            del sys.modules[name]
