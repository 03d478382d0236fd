"""Safe model files: weights, architecture and operand description in one file.

A model file is written by :func:`save_model` with :func:`torch.save` and read by
:func:`load_model` with ``torch.load(path, weights_only=True)`` **only**: it holds tensors
and plain containers (dict, list, str, int, float), never pickled code, so opening a file
from someone else cannot run their code. The model is rebuilt from an *architecture*, a
registry name plus JSON constructor keyword arguments, and the weights are then loaded
into it.

File contents (format version :data:`FORMAT_VERSION`), one dict:

============== ==========================================================================
key            value
============== ==========================================================================
format         ``"dolfinx_mno.model"``
format_version ``1``
architecture   JSON string ``{"name": ..., "kwargs": {...}}`` (nested for wrappers)
metadata       JSON string, free form (units, training details...); under
               ``"closure_spec"`` the :class:`~dolfinx_mno.spec.ClosureSpec` given to
               :func:`save_model` (operands, value shape, quadrature degree, grid)
versions       JSON string: torch, numpy, dolfinx_mno, python (and neuraloperator if used)
state_dict     ``{name: tensor}``: parameters and persistent buffers (so the statistics
               of a :class:`~dolfinx_mno.NormalizedModel` too), on the CPU
sha256         hex SHA-256 over all of the above (names, dtypes, shapes and tensor bytes)
============== ==========================================================================

What protects what:

* The SHA-256 checksum detects *accidental* damage: a truncated copy, a flipped bit on a
  disk or in a download, an interrupted transfer. It is not a signature: anyone who edits
  a file can recompute it, so it proves neither who wrote the file nor that nobody
  changed it on purpose.
* Safety against a *malicious* file comes from how it is read: ``weights_only=True``
  (no pickled code is ever run), an architecture that must be registered (only
  registered factories are called, with JSON arguments), weights checked against the
  architecture on the ``meta`` device before any large allocation, and
  ``load_state_dict(strict=True)``. A malicious file can still hold wrong weights: load
  models from sources you trust, or compare :attr:`ModelFile.sha256` with a digest
  published by the author through a channel you trust.

Registered architectures: ``"mlp"`` (:class:`~dolfinx_mno.models.MLP`),
``"normalized_model"`` (:class:`~dolfinx_mno.NormalizedModel` around any registered
model), ``"bounded"`` (:class:`~dolfinx_mno.models.Bounded` around any registered model),
``"neuralop.FNO"`` and ``"neuralop.TFNO"`` (neuraloperator), and whatever
:func:`register_architecture` adds.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import pickle
import platform
import stat
import tempfile
import typing
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_mno._mpi import agree_on, describe, on_root
from dolfinx_mno.models import MLP, Bounded
from dolfinx_mno.normalization import AffineNormalization, NormalizedModel
from dolfinx_mno.spec import ClosureSpec, metadata_with_spec, spec_from_metadata

__all__ = [
    "FORMAT_VERSION",
    "ModelFile",
    "ModelFileError",
    "architecture_config",
    "build_model",
    "load_model",
    "read_model_file",
    "register_architecture",
    "registered_architectures",
    "save_model",
]

#: Identifies a dolfinx_mno model file.
FORMAT = "dolfinx_mno.model"
#: Version of the file layout written by :func:`save_model`; other versions are refused.
FORMAT_VERSION = 1

_Factory = Callable[..., torch.nn.Module]
_Describe = Callable[[torch.nn.Module], dict[str, Any]]


class ModelFileError(ValueError):
    """A model cannot be written to, or rebuilt from, a model file.

    Raised for files that are truncated or corrupted (unreadable, or failing the SHA-256
    check of accidental damage), of another format version, hold anything but tensors and
    plain containers, name an unknown architecture, or hold weights that do not fit their
    architecture (checked before the model is allocated); and for models that cannot be
    described by a registered architecture with JSON keyword arguments.
    """

    def __init__(self, message: str):
        """Carry ``message``: the file, what is wrong with it, and what to do."""
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class _Architecture:
    factory: _Factory
    describe: _Describe | None
    type_name: str | None  # "module.qualname" of the class the factory builds, if known


_REGISTRY: dict[str, _Architecture] = {}
#: Set while :func:`architecture_config` describes models by class only (tags ignored).
_BY_CLASS: contextvars.ContextVar[bool] = contextvars.ContextVar("_BY_CLASS", default=False)
_BUILTIN = ("mlp", "normalized_model", "bounded", "neuralop.FNO", "neuralop.TFNO")


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_architecture(
    name: str,
    factory: _Factory,
    *,
    describe: _Describe | None = None,
    overwrite: bool = False,
) -> None:
    """Make a model architecture known to :func:`save_model` and :func:`load_model`.

    Register on every rank (and in every script that loads the file) before use.

    Args:
        name: Registry name stored in the file.
        factory: ``factory(**kwargs)`` builds an untrained model; typically the class.
        describe: ``describe(model)`` returns the JSON-able ``kwargs`` that rebuild
            ``model``. When ``factory`` is a class, :func:`save_model` recognises models of
            exactly that class and calls ``describe`` (default: read ``model.config``).
            Models built by :func:`build_model` or :func:`load_model` are recognised
            whatever the factory; any other model can be saved with
            ``save_model(..., architecture=(name, kwargs))``.
        overwrite: Replace an existing entry (built-in names included).

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is false.

    Example:
        >>> class Cubic(torch.nn.Module):
        ...     def __init__(self, scale=1.0):
        ...         super().__init__()
        ...         self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        ...         self.config = {"scale": float(scale)}
        ...     def forward(self, x):
        ...         return self.scale * x**3
        >>> register_architecture("cubic", Cubic)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Architecture names must be non-empty strings, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"Architecture {name!r} is already registered; pass overwrite=True to replace it."
        )
    type_name = _type_name(factory) if isinstance(factory, type) else None
    _REGISTRY[name] = _Architecture(factory, describe, type_name)


def registered_architectures() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


# -- built-in architectures --------------------------------------------------------------


def _build_normalized(
    model: Mapping[str, Any],
    num_inputs: int,
    num_outputs: int,
    input_axis: int = -1,
    output_axis: int = -1,
) -> NormalizedModel:
    # The statistics are placeholders: the saved buffers replace them. Files written
    # before the axes existed have none: -1, the pointwise layout.
    return NormalizedModel(
        build_model(model),
        AffineNormalization(width=num_inputs, axis=input_axis),
        AffineNormalization(width=num_outputs, axis=output_axis),
    )


def _describe_normalized(model: torch.nn.Module) -> dict[str, Any]:
    assert isinstance(model, NormalizedModel)
    description = {
        "model": architecture_config(model.model),
        "num_inputs": int(model.input_normalization.shift.numel()),
        "num_outputs": int(model.output_normalization.shift.numel()),
    }
    # Only non-default axes are written: pointwise models keep the old description.
    for key, normalization in (
        ("input_axis", model.input_normalization),
        ("output_axis", model.output_normalization),
    ):
        if normalization.axis != -1:
            description[key] = normalization.axis
    return description


def _build_bounded(model: Mapping[str, Any], bound: float) -> Bounded:
    return Bounded(build_model(model), bound)


def _describe_bounded(model: torch.nn.Module) -> dict[str, Any]:
    assert isinstance(model, Bounded)
    return {"model": architecture_config(model.model), "bound": model.bound}


def _neuralop_class(name: str) -> type:
    try:
        import neuralop.models
    except ImportError as err:  # pragma: no cover - neuraloperator is installed in CI
        raise ModelFileError(
            f"Architecture 'neuralop.{name}' needs neuraloperator: pip install neuraloperator"
        ) from err
    return typing.cast(type, getattr(neuralop.models, name))


def _neuralop_factory(name: str) -> _Factory:
    def factory(**kwargs: Any) -> torch.nn.Module:
        # JSON turns tuples into lists; FNO keeps n_modes as given, so restore tuples.
        for key in ("n_modes", "max_n_modes"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return typing.cast(torch.nn.Module, _neuralop_class(name)(**kwargs))

    return factory


def _describe_neuralop(model: torch.nn.Module) -> dict[str, Any]:
    """The constructor kwargs of a neuraloperator model that differ from the defaults.

    neuraloperator's ``BaseModel.__new__`` records the arguments of every instance in
    ``model._init_kwargs`` (positional ones under ``"args"``, and for ``FNO`` every
    default too). Positional arguments are named with FNO's signature (``TFNO`` passes
    its arguments on to ``FNO``), defaults are dropped (some are functions and classes,
    which JSON cannot hold), and what is left must be JSON.
    """
    recorded: dict[str, Any] = dict(model.__dict__["_init_kwargs"])
    args = recorded.pop("args", ())
    for private in ("_version", "_name", "verbose"):
        recorded.pop(private, None)
    signature = inspect.signature(_neuralop_class("FNO"))
    bound = signature.bind_partial(*args).arguments
    defaults = {
        name: p.default
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    described: dict[str, Any] = {}
    for key, value in {**bound, **recorded}.items():
        try:
            json.dumps(value, allow_nan=False, default=_json_default)
        except (TypeError, ValueError):
            if key in defaults and value is defaults[key]:
                continue  # a default function or class (F.gelu, SpectralConv): rebuilt as is
            raise ModelFileError(
                f"The {type(model).__name__} argument {key}={value!r} is not JSON, so the "
                "model cannot be rebuilt from a file. Register a factory that builds it "
                "from JSON arguments with dolfinx_mno.io.register_architecture."
            ) from None
        # JSON values are kept even when they equal today's default: a file then rebuilds
        # the same model if neuraloperator changes its defaults.
        described[key] = list(value) if isinstance(value, tuple) else value
    return described


register_architecture("mlp", MLP)
register_architecture("normalized_model", _build_normalized, describe=_describe_normalized)
_REGISTRY["normalized_model"] = dataclasses.replace(
    _REGISTRY["normalized_model"], type_name=_type_name(NormalizedModel)
)
register_architecture("bounded", _build_bounded, describe=_describe_bounded)
_REGISTRY["bounded"] = dataclasses.replace(_REGISTRY["bounded"], type_name=_type_name(Bounded))
for _name in ("FNO", "TFNO"):
    _REGISTRY[f"neuralop.{_name}"] = _Architecture(
        _neuralop_factory(_name), _describe_neuralop, f"neuralop.models.fno.{_name}"
    )


# -- architecture configs ----------------------------------------------------------------


def _check_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip; refuses anything JSON cannot hold exactly."""
    try:
        text = json.dumps(value, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ModelFileError(
            f"{what} must be JSON (dicts with string keys, lists, str, int, float, bool, "
            f"None; NumPy scalars and arrays are converted): {err}."
        ) from err
    return json.loads(text)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Size):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def architecture_config(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture ``{"name": ..., "kwargs": {...}}`` that rebuilds ``model``.

    Models are recognised, in this order, by the architecture :func:`build_model` (and so
    :func:`load_model`) attached to them, or by the exact class of a registered factory
    (the latest registration first).

    Raises:
        ModelFileError: The model is of no registered architecture, or its keyword
            arguments are not JSON.
    """
    tagged = getattr(model, "_mno_architecture", None)
    by_class = _BY_CLASS.get()
    if not by_class and isinstance(tagged, Mapping) and tagged.get("name") in _REGISTRY:
        return typing.cast(dict[str, Any], _check_json(dict(tagged), "The architecture"))
    type_name = _type_name(type(model))
    # The latest registration wins, so users can override the built-in descriptions.
    for name, entry in reversed(_REGISTRY.items()):
        if entry.type_name != type_name:
            continue
        if entry.describe is not None:
            kwargs = entry.describe(model)
        elif isinstance(getattr(model, "config", None), Mapping):
            kwargs = dict(model.config)  # type: ignore[arg-type]
        else:
            raise ModelFileError(
                f"Architecture {name!r} matches a {type(model).__name__} but has no "
                "describe function and the model has no `config` dict; register it with "
                "describe=... or give save_model(..., architecture=(name, kwargs))."
            )
        config = {"name": name, "kwargs": kwargs}
        return typing.cast(
            dict[str, Any], _check_json(config, f"The kwargs of architecture {name!r}")
        )
    raise ModelFileError(
        f"No registered architecture describes a {type(model).__name__} "
        f"(registered: {registered_architectures()}). Register it with "
        "dolfinx_mno.io.register_architecture(name, factory) or give "
        "save_model(..., architecture=(name, kwargs))."
    )


def build_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """Build an untrained model from ``{"name": ..., "kwargs": {...}}``.

    The model remembers ``config``, so :func:`save_model` can save it whatever its class.

    Raises:
        ModelFileError: Malformed config, unknown name, or the factory failed.
    """
    if not isinstance(config, Mapping) or set(config) != {"name", "kwargs"}:
        raise ModelFileError(
            f"An architecture is a dict with keys 'name' and 'kwargs', got {config!r}."
        )
    name, kwargs = config["name"], config["kwargs"]
    if not isinstance(kwargs, Mapping):
        raise ModelFileError(f"The kwargs of architecture {name!r} must be a dict.")
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ModelFileError(
            f"Unknown architecture {name!r} (registered: {registered_architectures()}). "
            "Register it with dolfinx_mno.io.register_architecture before loading."
        )
    try:
        model = entry.factory(**kwargs)
    except ModelFileError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"Could not build architecture {name!r} with kwargs {dict(kwargs)}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(
            f"The factory of architecture {name!r} returned a {type(model).__name__}, "
            "not a torch.nn.Module."
        )
    model._mno_architecture = {"name": name, "kwargs": dict(kwargs)}  # type: ignore[assignment]
    return model


# -- file contents -----------------------------------------------------------------------


def _tensor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, detached, contiguous, on the CPU.

    Non-tensor entries (neuraloperator adds its init kwargs as ``"_metadata"``) are left
    out: the architecture already holds them, as JSON.
    """
    return {
        key: value.detach().cpu().contiguous()
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def _versions(architecture: Mapping[str, Any]) -> dict[str, str]:
    versions = {
        "dolfinx_mno": _package_version("dolfinx_mno"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if "neuralop." in json.dumps(architecture):
        versions["neuraloperator"] = _package_version("neuraloperator")
    return versions


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        return "unknown"


def _digest(header: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header strings and every tensor's name, dtype, shape and bytes."""
    sha = hashlib.sha256()
    sha.update(json.dumps(dict(header), sort_keys=True).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        sha.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor_bytes(tensor))
    return sha.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor, for a digest: any dtype, any stride a damaged file gives."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        # torch calls a one-element tensor contiguous whatever its stride, and a damaged
        # file can give it any stride; the uint8 view needs stride 1.
        flat = flat.clone(memory_format=torch.contiguous_format)
    # A uint8 view reads the bytes of any dtype (bfloat16 and complex included).
    return flat.view(torch.uint8).numpy().tobytes()


def verify_digest(
    path: str | os.PathLike[str], compute: Callable[[], str], expected: str, damage: str
) -> None:
    """Raise :class:`ModelFileError` unless ``compute()`` gives the stored ``expected``.

    ``damage``: what a mismatch means, after ``"SHA-256 mismatch in <path>: "``.
    """
    try:
        digest = compute()
    except Exception as err:  # tensors that torch loads but cannot read back
        raise ModelFileError(
            f"Could not verify {os.fspath(path)!r}: the file is corrupted "
            f"({describe(err, first_line=True)})."
        ) from err
    if digest != expected:
        raise ModelFileError(f"SHA-256 mismatch in {os.fspath(path)!r}: {damage}")


def _payload(
    model: torch.nn.Module,
    metadata: Mapping[str, Any] | None,
    architecture: tuple[str, Mapping[str, Any]] | None,
    spec: ClosureSpec | None,
) -> dict[str, Any]:
    """Everything :func:`save_model` writes; raises ModelFileError on bad input."""
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    if architecture is not None:
        name, kwargs = architecture
        if name not in _REGISTRY:
            raise ModelFileError(
                f"Unknown architecture {name!r} (registered: {registered_architectures()})."
            )
        config = _check_json({"name": name, "kwargs": dict(kwargs)}, "The architecture")
    else:
        config = architecture_config(model)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ModelFileError("metadata must be a dict.")
    try:
        with_spec = metadata_with_spec(metadata, spec)
    except (TypeError, ValueError) as err:
        raise ModelFileError(str(err)) from err
    meta = _check_json(with_spec, "metadata")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": json.dumps(config, sort_keys=True),
        "metadata": json.dumps(meta, sort_keys=True),
        "versions": json.dumps(_versions(config), sort_keys=True),
    }
    state = _tensor_state(model)
    if architecture is not None:
        _check_fit(config, state)
        _check_same_model(config, model)
    return {**header, "state_dict": state, "sha256": _digest(header, state)}


def _check_fit(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that the architecture given to :func:`save_model` cannot load.

    The architecture is built on the meta device (nothing allocated) and the weights are
    matched against it as :func:`load_model` will (names and shapes). A factory that
    cannot run on the meta device is not checked here.
    """
    skeleton = ModelFile(dict(config), {}, {}, dict(state), "")._skeleton()
    if skeleton is None:
        return
    try:
        skeleton.load_state_dict(dict(state), strict=True, assign=True)
    except (RuntimeError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()
        raise ModelFileError(
            f"The model's weights do not fit the architecture {config['name']!r} with "
            f"kwargs {config['kwargs']}, so the file could never be loaded: "
            f"{' '.join(line.strip() for line in reason)} Give the (name, kwargs) the "
            "model was built with, or leave architecture out for a registered model."
        ) from err


def _without_seeds(value: Any) -> Any:
    """A description without its ``seed``s: they set initial weights, which a file replaces."""
    if isinstance(value, Mapping):
        return {k: _without_seeds(v) for k, v in value.items() if k != "seed"}
    if isinstance(value, list):
        return [_without_seeds(v) for v in value]
    return value


def _check_same_model(config: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Refuse an architecture that builds another function than ``model`` with its weights.

    The weights fit (:func:`_check_fit`), but a hyperparameter that shapes cannot tell
    (an MLP's activation, a bound) may differ. Where both the model and the architecture
    built on the meta device are of registered classes, their descriptions by class (the
    registered ``describe``, defaults included; seeds left out) must agree. Otherwise
    (another class, or a factory that cannot run on the meta device) only the names and
    shapes are checked.
    """
    skeleton = ModelFile(dict(config), {}, {}, {}, "")._skeleton()
    if skeleton is None:
        return
    token = _BY_CLASS.set(True)
    try:
        declared = _without_seeds(architecture_config(skeleton))
        own = _without_seeds(architecture_config(model))
    except Exception:  # not of a registered class, or a describe that needs values
        return
    finally:
        _BY_CLASS.reset(token)
    if declared == own:
        return
    differ = [f"architecture {declared['name']!r} there, {own['name']!r} in the model"]
    if declared["name"] == own["name"]:
        there, here = declared["kwargs"], own["kwargs"]
        differ = [
            f"{key}={there.get(key)!r} there, {here.get(key)!r} in the model"
            for key in sorted(there.keys() | here.keys())
            if there.get(key) != here.get(key)
        ]
    raise ModelFileError(
        f"The architecture {config['name']!r} with kwargs {config['kwargs']} builds another "
        f"model than the one given ({'; '.join(differ)}): the file would load into a "
        "different function. Give the (name, kwargs) the model was built with, or leave "
        "architecture out for a registered model."
    )


def _umask() -> int:
    """The process's umask (from ``/proc`` on Linux, so that it is never changed)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask


def _file_mode(target: Path) -> int:
    """The mode of a file written at ``target``: the replaced file's, or ``open()``'s.

    ``open()`` gives a new file ``0o666`` less the umask.
    """
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_torch_save(payload: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(payload, path)`` through a temporary file and :func:`os.replace`.

    An interrupted save leaves any previous file at ``path`` intact and no temporary file.
    The file keeps the permission bits of the file it replaces; a new one gets those of a
    file made by ``open()`` (``0o666`` less the umask), not the temporary file's ``0o600``.
    """
    target = Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        os.fchmod(handle, _file_mode(target))
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    spec: ClosureSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    architecture: tuple[str, Mapping[str, Any]] | None = None,
    comm: MPI.Comm | None = None,
) -> str:
    """Write ``model`` (weights and architecture), its closure spec and metadata to one file.

    The file is written atomically (a temporary file in the same folder, then
    :func:`os.replace`), so an interrupted save never leaves a broken file in place of a
    good one.

    Args:
        path: Destination; its folder must exist. The suffix ``.pt`` is customary.
        model: A model of a registered architecture (see :func:`architecture_config`).
            Parameters and buffers of any dtype and device are saved (copied to the CPU).
        spec: The closure the model was trained for (``closure.spec``,
            ``sampler.spec`` or a :class:`~dolfinx_mno.spec.ClosureSpec`), stored in the
            metadata under ``"closure_spec"``. A closure built from the file
            (``Closure(path, operands)``) then takes its value shape and quadrature degree
            from it and refuses operands that differ.
        metadata: Free-form JSON dict stored with the model, e.g. ``{"units": {...}}``.
            NumPy scalars and arrays are converted to JSON numbers and lists.
        architecture: ``(name, kwargs)`` of a registered architecture, for a model
            :func:`architecture_config` does not recognise. The weights are checked
            against it (names and shapes, on the meta device) before anything is
            written, and so is what shapes cannot tell (another activation): where
            the model and the architecture are of registered classes, their
            descriptions (seeds aside) must agree.
        comm: Under MPI, the communicator of the ranks that hold the model (collective).
            Every rank checks its model, the ranks check that they hold the same weights,
            rank 0 writes, and every rank returns once the file is in place or raises
            the same error. ``None``: this process alone writes.

    Returns:
        The SHA-256 digest stored in the file.

    Raises:
        ModelFileError: The model cannot be described (on all ranks if any), its
            weights do not fit the ``architecture`` given, the spec is given twice
            (``spec`` and ``metadata["closure_spec"]``) or malformed, or the ranks hold
            different weights, specs or architectures.
        OSError: The file could not be written: under MPI, rank 0's error, the same type
            and text on every rank.
    """
    error: str | None = None
    cause: ModelFileError | None = None
    payload: dict[str, Any] | None = None
    try:
        payload = _payload(model, metadata, architecture, spec)
    except ModelFileError as err:
        error, cause = str(err), err
    if comm is None:
        if cause is not None:
            raise cause
        assert payload is not None
        atomic_torch_save(payload, path)
        return typing.cast(str, payload["sha256"])

    # Validate before the write: every rank learns about a failure on any rank.
    digests = agree_on(
        comm,
        None if payload is None else (payload["sha256"], payload["architecture"]),
        "save_model",
        ModelFileError,
        reason=error,
        cause=cause,
    )
    if len(set(digests)) != 1:
        raise ModelFileError(
            "The ranks hold different models (weights, metadata or architecture differ), "
            "but only rank 0 writes the file; synchronise the models before saving."
        )
    assert payload is not None
    on_root(comm, lambda: atomic_torch_save(payload, path), f"Writing {os.fspath(path)!r}")
    return typing.cast(str, payload["sha256"])


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """The verified contents of a model file (see the module docstring).

    Attributes:
        architecture: ``{"name": ..., "kwargs": {...}}``.
        metadata: The metadata dict given to :func:`save_model` (with the spec under
            ``"closure_spec"``, if any).
        versions: Library versions at save time.
        state_dict: ``{name: tensor}`` on the CPU.
        sha256: The verified digest: compare it with a digest published through a
            trusted channel to know that this is the author's file.
        spec: The closure spec given to :func:`save_model`; ``None`` for files without
            one (older files among them).
    """

    architecture: dict[str, Any]
    metadata: dict[str, Any]
    versions: dict[str, str]
    state_dict: dict[str, torch.Tensor]
    sha256: str
    spec: ClosureSpec | None = None

    def build(self, map_location: str | torch.device | None = None) -> torch.nn.Module:
        """Rebuild the model and load the weights (exactly: each tensor keeps its dtype).

        The architecture is first built on torch's ``meta`` device, which records shapes
        and allocates nothing, and the file's tensors are matched against it (names and
        shapes, as :meth:`torch.nn.Module.load_state_dict` checks them). Only weights
        that fit are then loaded into a model allocated on the CPU, so a small file
        naming a huge architecture is refused before any large allocation. A factory
        that cannot run on the meta device (it reads tensor values while building)
        skips the first stage; its weights are checked after the build.

        Args:
            map_location: Device to move the model to; ``None`` leaves it on the CPU.

        Raises:
            ModelFileError: Unknown architecture, or weights that do not fit it.
        """
        skeleton = self._skeleton()
        if skeleton is not None:
            self._load_into(skeleton)  # refuses a misfit before anything is allocated
        model = build_model(self.architecture)
        self._load_into(model)
        model.eval()
        if map_location is not None:
            model.to(map_location)
        return model

    def _skeleton(self) -> torch.nn.Module | None:
        """The architecture built on the meta device, or ``None`` if it cannot be."""
        if "neuralop." in json.dumps(self.architecture):
            _neuralop_class("FNO")  # import neuraloperator outside the meta context
        try:
            with torch.device("meta"):
                return build_model(self.architecture)
        except Exception:  # the CPU build reports genuine errors
            return None

    def _load_into(self, model: torch.nn.Module) -> None:
        """Load the file's tensors into ``model``; raises ModelFileError on a misfit."""
        try:
            # assign=True: parameters take the saved tensors, dtype included, exactly.
            model.load_state_dict(dict(self.state_dict), strict=True, assign=True)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ModelFileError(
                f"The weights in the file do not match architecture "
                f"{self.architecture['name']!r} with kwargs {self.architecture['kwargs']}: "
                f"{err}"
            ) from err


def read_torch_file(
    path: str | os.PathLike[str], kind: str, file_format: str, format_version: int
) -> dict[str, Any]:
    """Load a dolfinx_mno file written with :func:`torch.save` and check its format.

    Loads with ``torch.load(path, weights_only=True)``: no code in the file is run. Used
    for model files and training-state files.

    Args:
        path: The file.
        kind: What the file is, for the messages, e.g. ``"model file"``.
        file_format: The ``"format"`` entry the file must hold.
        format_version: The ``"format_version"`` entry the file must hold.

    Returns:
        The file's dict, its tensors on the CPU.

    Raises:
        FileNotFoundError: No file at ``path``.
        ModelFileError: The file is truncated, corrupted or not a torch file, holds
            objects other than tensors and plain containers, is not a dict with that
            format, or has another format version.
    """
    name = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"No {kind} at {name!r}.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch.save writes a zip archive; anything else (random bytes, a text file) fails
        # in the unpickler too, but holds no code to refuse.
        if not zipfile.is_zipfile(path):
            raise ModelFileError(
                f"Could not read {name!r}: it is not a torch file (torch.save writes a zip "
                "archive); the file is corrupted or of another kind."
            ) from err
        raise ModelFileError(
            f"Refusing {name!r}: it holds objects other than tensors and plain containers "
            "(loading it would run code from the file; dolfinx_mno loads with "
            f"weights_only=True). torch said: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:
        raise ModelFileError(
            f"Could not read {name!r}: the file is truncated, corrupted or not a torch file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from err
    if not isinstance(raw, dict) or raw.get("format") != file_format:
        raise ModelFileError(f"{name!r} is not a dolfinx_mno {kind}.")
    version = raw.get("format_version")
    if version != format_version:
        raise ModelFileError(
            f"{name!r} has format version {version!r}; this dolfinx_mno "
            f"({_package_version('dolfinx_mno')}) reads format version {format_version}."
        )
    return raw


def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read and verify a model file without building the model.

    Loads with ``torch.load(path, weights_only=True)``: no code in the file is run.

    Raises:
        FileNotFoundError: No file at ``path``.
        ModelFileError: The file is truncated, corrupted or not a torch file, holds
            objects other than tensors and plain containers, is not a dolfinx_mno model
            file, has another format version, or fails the SHA-256 check (which detects
            accidental damage, not deliberate edits: see the module docstring).
    """
    path = Path(path)
    raw = read_torch_file(path, "model file", FORMAT, FORMAT_VERSION)
    keys = ("architecture", "metadata", "versions", "sha256")
    if not all(isinstance(raw.get(k), str) for k in keys) or not isinstance(
        raw.get("state_dict"), dict
    ):
        raise ModelFileError(
            f"{os.fspath(path)!r} lacks entries of a model file ({', '.join(keys)}, state_dict)."
        )
    state = raw["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelFileError(f"The state_dict in {os.fspath(path)!r} holds non-tensors.")
    header = {k: raw[k] for k in ("format", "format_version", *keys[:3])}
    verify_digest(
        path,
        lambda: _digest(header, state),
        raw["sha256"],
        "the file is corrupted (a damaged copy, disk or download), or its weights or header "
        "were edited after saving.",
    )
    try:
        architecture = json.loads(raw["architecture"])
        metadata = json.loads(raw["metadata"])
        versions = json.loads(raw["versions"])
    except json.JSONDecodeError as err:  # pragma: no cover - guarded by the digest
        raise ModelFileError(f"Malformed JSON in {os.fspath(path)!r}: {err}") from err
    if not isinstance(architecture, dict) or "name" not in architecture:
        raise ModelFileError(f"{os.fspath(path)!r} names no architecture.")
    try:
        spec = spec_from_metadata(metadata) if isinstance(metadata, dict) else None
    except ValueError as err:
        raise ModelFileError(f"{os.fspath(path)!r} holds a malformed closure spec: {err}") from err
    return ModelFile(architecture, metadata, versions, state, raw["sha256"], spec)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device | None = None
) -> torch.nn.Module:
    """Rebuild the model saved in ``path`` by :func:`save_model`, in eval mode.

    Args:
        path: The model file.
        map_location: Device for the model; ``None`` keeps it on the CPU.

    Returns:
        The model, with every parameter and buffer equal (dtype included) to the saved
        one. The metadata is available from :func:`read_model_file`.

    Raises:
        FileNotFoundError: No file at ``path``.
        ModelFileError: See :func:`read_model_file` and :meth:`ModelFile.build`.
    """
    return read_model_file(path).build(map_location)
