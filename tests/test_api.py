"""The public API: names, version, device selection."""

import importlib.metadata
import inspect
import pydoc
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
