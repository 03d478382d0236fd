"""The bridge between NumPy arrays owned by DOLFINx and PyTorch models.

Everything that crosses the NumPy/torch boundary goes through this module:
the dtype map, the device choice, and the two evaluators, one per kind of model:

* :class:`PointwiseEvaluator` (local closures) feeds a model with
  ``(num_points, num_inputs)`` batches from preallocated buffers and writes
  ``(num_points, num_outputs)`` values (and optionally the
  ``(num_points, num_outputs, num_inputs)`` tangent) back to host memory;
* :class:`GridEvaluator` (non-local closures, on their root rank) feeds a neural
  operator with one ``(1, in_channels, *grid_shape)`` field and writes its
  ``(out_channels, num_grid_points)`` output back to host memory.

dtype and device rules:
    * The model runs in its own dtype (that of its first floating-point
      parameter or buffer; the DOLFINx dtype for a parameter-free model) and
      on its own device. Inputs are cast at the boundary, once per chunk (or per
      grid field), into a buffer allocated at construction.
    * Host-side buffers are pinned when the model is on a CUDA device, so that
      host↔device copies are fast (and, for pointwise models, asynchronous).
    * Both evaluators refuse a model in training mode (:func:`training_mode_error`).
"""

from __future__ import annotations

import itertools
import math
import os
import typing

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch

from dolfinx_mno.pointwise_kernel import PointwiseKernel
from dolfinx_mno.validation import check_integer

__all__ = [
    "NUMPY_TO_TORCH",
    "TORCH_TO_NUMPY",
    "GridEvaluator",
    "ModelStateError",
    "Placement",
    "PointwiseEvaluator",
    "default_batch_size",
    "device_of_local_rank",
    "mixed_precision_hint",
    "model_dtype",
    "node_local_rank",
    "resolve_device",
    "resolves_collectively",
    "to_precision",
    "training_mode_error",
]

#: The NumPy dtypes DOLFINx supports for real-valued problems, with their torch twins.
NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {v: k for k, v in NUMPY_TO_TORCH.items()}

#: Model dtypes the evaluator accepts. Half precisions are computed in the model's dtype
#: and cast to the DOLFINx dtype at the boundary.
SUPPORTED_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_device(device: str | torch.device | None, comm: MPI.Comm) -> torch.device:
    """Return the torch device a rank should use.

    Args:
        device: ``"auto"`` (or ``None``) picks ``cuda:(local rank % number of GPUs)`` when
            CUDA is available and the CPU otherwise; anything else is passed to
            :class:`torch.device`.
        comm: Communicator of the mesh. The node-local rank is computed with
            ``MPI.COMM_TYPE_SHARED``, so ranks on one node are spread over its GPUs.
            Collective for ``"auto"`` only.

    Returns:
        The device.

    Raises:
        RuntimeError: A CUDA device that this process cannot use (no CUDA device, or an
            index beyond the devices there are): no silent fallback to the CPU.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return device_of_local_rank(node_local_rank(comm), torch.cuda.device_count())
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        # torch's own message ("Found no NVIDIA driver") comes later, from deep inside
        # model.to(), and does not say what to pass instead.
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            found = "no CUDA device" if count == 0 else f"{count} CUDA device(s)"
            raise RuntimeError(
                f"device={str(device)!r} was requested, but torch finds {found} on this "
                "machine (torch.cuda.is_available() is "
                f"{torch.cuda.is_available()}). Pass device='auto' (a GPU when there is "
                "one, the CPU otherwise) or device='cpu'."
            )
    return resolved


def resolves_collectively(device: str | torch.device | None) -> bool:
    """Whether :func:`resolve_device` is collective for ``device``: ``"auto"`` and ``None``.

    A named device is resolved (and refused) rank by rank, so that callers resolve it
    inside their per-rank error agreement, and ``"auto"`` before it.
    """
    return device is None or (isinstance(device, str) and device == "auto")


def node_local_rank(comm: MPI.Comm) -> int:
    """This process's rank among ``comm``'s ranks on its node (collective).

    The ranks of ``comm.Split_type(MPI.COMM_TYPE_SHARED)``, the processes that share
    memory with this one.
    """
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = int(local.rank)
    local.Free()
    return rank


def device_of_local_rank(local_rank: int, num_gpus: int) -> torch.device:
    """The device of the rank ``local_rank`` on a node with ``num_gpus`` GPUs.

    Args:
        local_rank: The rank on the node (:func:`node_local_rank`).
        num_gpus: The node's CUDA devices; 0 means the CPU.

    Returns:
        ``cuda:(local_rank % num_gpus)``, or the CPU if ``num_gpus == 0``: ranks on one
        node are spread round-robin over its GPUs, several ranks sharing one if need be.
    """
    if num_gpus < 1:
        return torch.device("cpu")
    return torch.device("cuda", int(local_rank) % int(num_gpus))


def model_dtype(model: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    """Return the dtype of the first floating-point or complex parameter/buffer of ``model``.

    Args:
        model: The model.
        default: Returned when the model has no such parameters or buffers.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point() or tensor.is_complex():
            return tensor.dtype
    return default


def mixed_precision_hint(model: torch.nn.Module, given: torch.dtype) -> str | None:
    """What to do about a model whose tensors mix real dtypes, or ``None``.

    The closures feed a model inputs in one dtype, that of its first floating-point
    tensor (:func:`model_dtype`); a model half cast (``model[0].double()``), or one whose
    buffers promote the input to another dtype, then fails in torch with a bare "mat1 and
    mat2 must have the same dtype". Only called once the model has failed: mixed dtypes
    are not refused.

    Args:
        model: The model that failed.
        given: The dtype of the inputs it was given.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(dtypes) < 2:
        return None
    names = ", ".join(sorted(str(dtype) for dtype in dtypes))
    return (
        f"the model's parameters and buffers mix dtypes ({names}) and it is given "
        f"{given} inputs; cast the whole model to one dtype, "
        "e.g. model.double(), or dolfinx_mno.to_precision(model, dtype)"
    )


#: The complex dtype that goes with each real one (none for the half precisions: torch has
#: no complex bfloat16, and calls its complex32 experimental, unsupported by most operators).
_COMPLEX_OF_REAL = {torch.float64: torch.complex128, torch.float32: torch.complex64}


def to_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model's real tensors to ``dtype`` and its complex ones to the matching complex.

    ``model.double()`` leaves complex parameters (the spectral weights of a Fourier neural
    operator) in ``complex64``, and ``model.to(torch.float64)`` drops their imaginary part;
    this casts both kinds consistently, in place.

    Args:
        model: The model.
        dtype: ``torch.float64`` or ``torch.float32`` (complex tensors to ``complex128``
            or ``complex64``), or ``torch.float16`` or ``torch.bfloat16`` for a model
            without complex tensors.

    Returns:
        The same model.

    Raises:
        TypeError: ``dtype`` is not a floating-point torch dtype.
        ValueError: A half precision for a model with complex tensors. Nothing is cast
            then.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            "dtype must be a floating-point torch dtype (torch.float64, torch.float32, "
            f"torch.float16 or torch.bfloat16), got {dtype!r}."
        )
    tensors = (*model.parameters(), *model.buffers())
    complex_dtype = _COMPLEX_OF_REAL.get(dtype)
    if complex_dtype is None and any(tensor.is_complex() for tensor in tensors):
        raise ValueError(
            f"The model has complex tensors, which have no {dtype} counterpart (torch has "
            "no complex bfloat16, and its complex32 is experimental): cast it to "
            "torch.float32 or torch.float64."
        )
    for tensor in tensors:
        if tensor.is_complex():
            tensor.data = tensor.data.to(complex_dtype)
        elif tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return model


def model_device(model: torch.nn.Module) -> torch.device | None:
    """Return the device of the first parameter or buffer of ``model``, or ``None``."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def training_mode_error(model: torch.nn.Module) -> str | None:
    """Why ``model`` must not be evaluated for a closure now, or ``None``.

    Closures evaluate models for inference. A module left in training mode
    (``model.train()``) would apply dropout (values that change from one update to the
    next) and update batch-norm statistics from each rank's own points (results that
    depend on the number of ranks). The closures put their model in evaluation mode at
    construction; this catches a model put back in training mode since.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if not training:
        return None
    shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
    return (
        f"the model is in training mode ({shown}): dropout and batch norm would make the "
        "closure values random and dependent on the number of ranks; call model.eval() "
        "(closure.model.eval()) before updating the closure"
    )


class InputModifiedError(ValueError):
    """The model changes its input in place (see :func:`call_watching_input`)."""


def call_watching_input(model: torch.nn.Module, x: torch.Tensor) -> typing.Any:
    """``model(x)``; :class:`InputModifiedError` if the model changed ``x`` in place.

    The evaluators hand a model views of their operand buffers, and the tangents and the
    gradients through the model (rollouts, training) need its input as it was given: a
    model that scales or shifts its input in place (``x.mul_(w)``, ``x[:, 0] += 1``,
    ``ReLU(inplace=True)`` as its first layer) fails there with torch's messages about
    leaf variables, or changes stored samples from one call to the next. torch counts the
    in-place writes to a tensor and its views (its version counter), so one probe call
    tells. For the probes at construction, never on the hot path.
    """
    version = x._version
    y = model(x)
    if x._version != version:
        raise InputModifiedError(
            "The model changes its input in place (an in-place operation on its argument "
            "or a view of it, e.g. x.mul_(w), x[:, 0] += 1, or ReLU(inplace=True) as its "
            "first layer). Closures and training pass the model their own buffers, and "
            "tangents and gradients need the input unchanged: start the forward with "
            "x = x.clone(), or use out-of-place operations (x = x * w)."
        )
    return y


class ModelStateError(RuntimeError):
    """The model is not in a state a closure can evaluate (training mode, recast, moved).

    Raised by the evaluators before the model runs; the closures report its message as
    the reason, not as an error the model raised.
    """


class Placement:
    """The dtype and device of a model's first real floating-point tensor at construction.

    A closure's input buffers, casts and compiled kernels are those of the model's dtype
    and device at construction; after ``model.float()`` or ``model.to(device)`` they would
    feed the model tensors it cannot take, or (a model that casts internally) mix
    precisions silently. ``model.float()`` and ``.to()`` convert the parameters in place,
    so watching the one tensor is enough, and cheap at every update (a parameter replaced
    by another object, ``load_state_dict(assign=True)``, is not watched).

    Args:
        model: The model.
    """

    def __init__(self, model: torch.nn.Module):
        self._tensor = next(
            (
                t
                for t in itertools.chain(model.parameters(), model.buffers())
                if t.is_floating_point()
            ),
            None,
        )
        self._built = None if self._tensor is None else (self._tensor.dtype, self._tensor.device)

    def error(self) -> str | None:
        """Why the model must not be evaluated by the closure now, or ``None``."""
        if self._tensor is None or self._built is None:
            return None
        dtype, device = self._tensor.dtype, self._tensor.device
        if (dtype, device) == self._built:
            return None
        return (
            f"the model's tensors changed from {self._built[0]} on {self._built[1]} to "
            f"{dtype} on {device} since the closure was built (model.float(), "
            "model.to(...)); a closure keeps the buffers and kernels of the model's "
            "precision and device at construction: build a new closure for the model"
        )


def _host_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """``dtype`` as a NumPy dtype, if it is a DOLFINx dtype the evaluators support."""
    host_dtype = np.dtype(dtype)
    if host_dtype not in NUMPY_TO_TORCH:
        raise TypeError(
            f"Unsupported DOLFINx dtype {host_dtype}; dolfinx_mno supports "
            f"{sorted(str(d) for d in NUMPY_TO_TORCH)} (real-valued problems)."
        )
    return host_dtype


def _environment_batch_size() -> int | None:
    """``DOLFINX_MNO_BATCH_SIZE`` as a positive integer, or ``None`` if it is not set.

    Raises:
        ValueError: ``DOLFINX_MNO_BATCH_SIZE`` is set but not a positive integer.
    """
    if (env := os.environ.get("DOLFINX_MNO_BATCH_SIZE")) is None:
        return None
    if not env.strip().isdigit() or int(env) < 1:
        raise ValueError(
            "The environment variable DOLFINX_MNO_BATCH_SIZE must be a positive integer "
            f"(points per model call), got {env!r}; unset it for the default."
        )
    return int(env)


def default_batch_size(device: torch.device) -> int:
    """Points per model call when nothing is measured (a fixed size for the device).

    :class:`PointwiseEvaluator` measures the chunk size for the model when it is not given
    (:meth:`~dolfinx_mno.pointwise_kernel.PointwiseKernel.choose_chunk_size`); this is the
    size of the older fixed rule, kept for scripts that time a fixed chunk: 4096 on the CPU
    (the activations of a small MLP stay in cache), 2¹⁸ on a GPU. The environment variable
    ``DOLFINX_MNO_BATCH_SIZE`` overrides both.

    Raises:
        ValueError: ``DOLFINX_MNO_BATCH_SIZE`` is set but not a positive integer.
    """
    if (env := _environment_batch_size()) is not None:
        return env
    return 4096 if device.type == "cpu" else 1 << 18


class PointwiseEvaluator:
    """Evaluate a pointwise model on ``(num_points, num_inputs)`` arrays in chunks.

    All buffers are allocated once, for a fixed number of points, and reused by every call
    to :meth:`evaluate`: an update allocates nothing whose size grows with the number of
    points (the model's own activations are those of one chunk). How the model is run is
    decided once, by :class:`~dolfinx_mno.pointwise_kernel.PointwiseKernel`: the chunk
    size (measured on the CPU unless given), the tangent mode (measured when the tangent
    is first prepared) and, on request, compilation. :attr:`plan` records the choices.

    Args:
        model: Maps ``(batch, num_inputs)`` to ``(batch, num_outputs)`` or
            ``(batch, *value_shape)``; each row must depend only on the same input row
            (the tangent is computed per point).
        num_inputs: Number of input components per point.
        num_outputs: Number of output components per point.
        num_points: Number of points evaluated by each call.
        host_dtype: NumPy dtype of the host arrays (the DOLFINx scalar type).
        device: Device the model lives on.
        batch_size: Points per model call, a positive integer, for values and tangents;
            ``None`` measures it on the CPU, separately for values and for values with
            tangent (unless ``DOLFINX_MNO_BATCH_SIZE`` is set), and uses 2¹⁸ on a GPU.
        compile: Compile the model's functions with :func:`torch.compile` (falls back to
            eager execution, with a :class:`RuntimeWarning`, where that fails).

    Raises:
        TypeError: Unsupported dtypes, or a ``batch_size`` that is not an integer
            (``2.5``, ``True``).
        ValueError: A ``batch_size`` below 1 (``0`` is not "the default": pass ``None``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_inputs: int,
        num_outputs: int,
        num_points: int,
        host_dtype: npt.DTypeLike,
        device: torch.device,
        batch_size: int | None = None,
        compile: bool = False,
    ):
        host_dtype = _host_dtype(host_dtype)
        self.model = model
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs
        self.num_points = num_points
        self.device = device
        self.host_dtype = host_dtype
        self.dtype = model_dtype(model, NUMPY_TO_TORCH[host_dtype])
        self._placement = Placement(model)
        if self.dtype not in SUPPORTED_MODEL_DTYPES:
            raise TypeError(
                f"Unsupported model dtype {self.dtype}; use one of {SUPPORTED_MODEL_DTYPES}."
            )
        self.kernel = PointwiseKernel(
            model, num_inputs, num_outputs, device, self.dtype, compile=compile
        )
        if batch_size is not None:
            self.batch_size = check_integer(batch_size, "batch_size", minimum=1)
            source = "argument"
        elif (env := _environment_batch_size()) is not None:
            self.batch_size, source = env, "DOLFINX_MNO_BATCH_SIZE"
        else:
            source = "measured"
        self.kernel.choose_values_path(num_points)
        if source == "measured":
            self.batch_size = self.kernel.choose_chunk_size(num_points)
        self._batch_size_source = source
        self.kernel.reserve(max(1, min(self.batch_size, num_points)))
        pin = device.type == "cuda"
        torch_host = NUMPY_TO_TORCH[host_dtype]
        chunk = max(1, min(self.batch_size, num_points))
        self._chunk = chunk
        self._tangent_chunk = chunk  # measured when the tangent is prepared

        # Host buffers, (num_points, num_inputs) and (num_points, num_outputs): DOLFINx
        # writes operands into the first and reads closure values from the second.
        self._inputs = torch.empty((num_points, num_inputs), dtype=torch_host, pin_memory=pin)
        self._outputs = torch.empty((num_points, num_outputs), dtype=torch_host, pin_memory=pin)
        # NumPy's views, made once (``.numpy()`` costs a microsecond at every call).
        self._inputs_array = self._inputs.numpy()
        self._outputs_array = self._outputs.numpy()
        self._tangents: torch.Tensor | None = None
        self._chunk_tangents: torch.Tensor | None = None
        self._tangent_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._value_squares = 0.0
        # Device-side input buffer in the model's dtype (the cast happens on copy).
        self._chunk_inputs = torch.zeros((chunk, num_inputs), dtype=self.dtype, device=device)
        self._non_blocking = pin
        # The chunks of the values pass (False) and the tangent pass (True), their views
        # made once, with what they were made from (_chunk_plan).
        self._plans: dict[bool, tuple[tuple, list[tuple[typing.Any, ...]]]] = {}
        # On the CPU with matching dtypes the host buffer can be fed to the model directly.
        self._zero_copy = device.type == "cpu" and self.dtype == torch_host
        # Compiled functions take one chunk shape: a shorter last chunk is padded.
        if compile and num_points > 0:
            self.kernel.prepare_values(chunk, num_points)

    @property
    def inputs(self) -> npt.NDArray[np.floating]:
        """Host input buffer, shape ``(num_points, num_inputs)``, written by the caller."""
        return self._inputs_array

    @property
    def outputs(self) -> npt.NDArray[np.floating]:
        """Host output buffer, shape ``(num_points, num_outputs)``."""
        return self._outputs_array

    @property
    def tangents(self) -> npt.NDArray[np.floating]:
        """Host tangent buffer, shape ``(num_points, num_outputs, num_inputs)``."""
        if self._tangents is None:
            raise RuntimeError("No tangent has been computed yet.")
        return self._tangents.numpy()

    @property
    def tangent_sum(self) -> float:
        """Sum of every tangent entry of the last evaluation with ``tangent=True``.

        Accumulated chunk by chunk while the values are in cache: it is finite when every
        entry is (a NaN or Inf makes it non-finite; a sum that overflows, without any
        non-finite entry, is the only false alarm, for the caller to rule out).
        """
        return float(self._tangent_sum)

    @property
    def value_squares(self) -> float:
        """Sum of the squares of every output value of the last evaluation.

        Finite when every value is: a NaN gives NaN and an Inf of either sign gives +Inf
        (squares cannot cancel); only values above ~1e154 overflow it without being
        non-finite, a false alarm for the caller to rule out. On the CPU it is
        accumulated chunk by chunk right after each chunk's values are written, with
        torch's dot product (faster than a sum on this repository's machine; torch's, not
        NumPy's, whose BLAS threads would oversubscribe the cores of ranks sharing a node).
        """
        return self._value_squares

    @property
    def tangent_mode(self) -> str | None:
        """How the tangent is computed (see :mod:`dolfinx_mno.pointwise_kernel`), or ``None``."""
        return self.kernel.tangent_mode

    @property
    def plan(self) -> dict[str, typing.Any]:
        """The choices made for this model, and the seconds measured to make them."""
        return {
            "batch_size": self.batch_size,
            "batch_size_source": self._batch_size_source,
            "tangent_batch_size": None if self._chunk_tangents is None else self._tangent_chunk,
            "values_path": self.kernel.values_path,
            "tanh_kernel": self.kernel.tanh_kernel,
            "gemm_kernel": self.kernel.gemm_kernel,
            "tangent_mode": self.kernel.tangent_mode,
            "compile": self.kernel.compile_requested,
            "compiled": self.kernel.compiled,
            "tangent_compiled": self.kernel.tangent_compiled,
            "compile_error": self.kernel.compile_error,
            "compile_declined": dict(self.kernel.compile_declined),
            "timings": dict(self.kernel.timings),
        }

    def prepare_tangent(self, mode: str | None = None) -> str | None:
        """Allocate the tangent buffer and choose the tangent mode (once; rank-local).

        An error while choosing (a model that fails under autograd) is not raised here: the
        mode stays unchosen and the next :meth:`evaluate` with ``tangent=True`` raises it,
        inside the closure's collective error handling.

        Args:
            mode: Force one of :data:`~dolfinx_mno.pointwise_kernel.TANGENT_MODES` (a
                ``ValueError`` if it fails for the model) instead of measuring.

        Returns:
            The tangent mode, or ``None`` if it could not be chosen.
        """
        if self._tangents is None:
            shape = (self.num_points, self.num_outputs, self.num_inputs)
            self._tangents = torch.empty(
                shape, dtype=self._outputs.dtype, pin_memory=self._non_blocking
            )
        if mode is not None:
            self.kernel.prepare_tangent(max(self._chunk, 1), mode, self.num_points)
        elif self.kernel.tangent_mode is None and self.num_points > 0:
            try:
                self.kernel.prepare_tangent(self._chunk, num_points=self.num_points)
            except Exception:
                return None
        if self.kernel.tangent_mode is not None and self._chunk_tangents is None:
            chunk = self._chunk  # a size given by the caller bounds the tangent's chunks too
            if self._batch_size_source == "measured":
                chunk = self.kernel.choose_tangent_chunk_size(self.num_points, self._chunk)
            self._tangent_chunk = chunk = max(1, min(chunk, self.num_points))
            if chunk > self._chunk_inputs.shape[0]:
                self._chunk_inputs = torch.zeros(
                    (chunk, self.num_inputs), dtype=self.dtype, device=self.device
                )
            self._chunk_tangents = torch.empty(
                (chunk, self.num_outputs, self.num_inputs), dtype=self.dtype, device=self.device
            )
            self.kernel.reserve(max(self._chunk, chunk))
        return self.kernel.tangent_mode

    def _check_input_independent(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Make sure a model whose output has no autograd graph really ignores ``x``.

        Such an output has a zero tangent only if the model is constant in its inputs. A
        model that computes under ``torch.no_grad()``, detaches, or leaves torch (NumPy)
        also returns outputs without a graph: its tangent would silently be zero and
        Newton's method would lose its quadratic convergence. Evaluating at shifted inputs
        tells the two apart.
        """
        with torch.no_grad():
            shifted = self.model(x * 1.5 + 1.0).reshape(y.shape)
        if not torch.equal(shifted, y):
            raise RuntimeError(
                "the model's output depends on its inputs but carries no autograd graph "
                "(it computes under torch.no_grad(), detaches, or leaves torch), so its "
                "tangent cannot be computed; remove the no_grad/detach from the model's "
                "forward (the closure already evaluates values without autograd)"
            )

    def state_error(self) -> str | None:
        """Why the model must not run now (training mode, recast or moved), or ``None``."""
        return training_mode_error(self.model) or self._placement.error()

    def evaluate(self, tangent: bool = False) -> None:
        """Evaluate the model on :attr:`inputs`, writing :attr:`outputs` (and :attr:`tangents`).

        Args:
            tangent: Also compute ``∂output/∂input`` per point, in the same pass as the
                values (the mode is :attr:`tangent_mode`).
        """
        reason = self.state_error()
        if reason is not None:
            raise ModelStateError(reason)
        if not tangent:
            self._value_squares = self._evaluate_values()
            return
        if self._chunk_tangents is None:
            self.prepare_tangent()
            if self.num_points > 0 and self.kernel.tangent_mode is None:
                self.kernel.prepare_tangent(self._chunk, num_points=self.num_points)  # raises
        assert self._tangents is not None
        nb = self._non_blocking
        values_and_tangent = self.kernel.values_and_tangent
        self._tangent_sum.zero_()
        squares = 0.0
        plan = self._chunk_plan(tangent=True)
        # Autograd needs tensors that inference mode forbids; the tangent enables grad itself.
        with torch.no_grad():
            for source, destination, x, target, flat, n, out, computed, tangents in plan:
                if destination is not None:
                    destination.copy_(source, non_blocking=nb)
                y, has_graph = values_and_tangent(x, out)
                if not has_graph:
                    self._check_input_independent(x, y)
                    tangents.zero_()
                else:
                    # Summed while in cache: the finiteness test needs no second pass.
                    self._tangent_sum += computed.sum()
                    if computed is not tangents:  # written into a chunk buffer
                        tangents.copy_(computed, non_blocking=nb)
                squares += self._store(y, x, target, flat, n)
        self._value_squares = self._squares(squares)

    def _chunk_values(self, y: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        """The model's output ``y`` for a chunk of ``rows`` points, as ``(n, num_outputs)``.

        ``n <= rows``: the points that are not padding. ValueError for an output of another
        shape.
        """
        width = self.num_outputs
        # For y.shape[0] == rows >= n >= 1 this is y[:n].numel() == n * width.
        if y.ndim == 0 or y.shape[0] != rows or y.numel() != rows * width:
            # A model ending in squeeze() returns (2,) for a chunk of one point:
            # broadcasting it would give every component the first one's value.
            raise ValueError(
                f"The model returned shape {tuple(y.shape)} for a chunk of "
                f"{rows} point(s); expected ({rows}, ...) with {width} "
                "value(s) per point (does it drop the batch dimension of a single "
                "point, e.g. by squeeze()?)"
            )
        return y[:n].reshape(n, width)

    def _chunk_plan(self, tangent: bool) -> list[tuple[typing.Any, ...]]:
        """The chunks of a values (or values and tangent) pass, their views made once.

        Per chunk ``(source, destination, x, target, values, n, out, computed, tangents)``:
        copy ``source`` (host inputs) into ``destination`` (``None``: the model reads the
        host buffer itself), run the model on ``x`` (padded to the chunk size for a
        compiled function), write the first ``n`` rows of its output into ``target``;
        ``values`` is ``target`` flat, for the finiteness sum. With ``tangent``, the kernel
        writes the tangent into ``out``, whose first ``n`` rows, ``computed``, are copied
        into ``tangents`` (the host buffer's rows) unless they are the same tensor (the
        kernel wrote there); without, those three are ``None``. Rebuilt if a chunk buffer is
        replaced (:meth:`prepare_tangent`) or a function gets compiled (its chunks are
        padded).
        """
        pad = self.kernel.tangent_compiled if tangent else self.kernel.compiled
        key = (tangent, pad, self._chunk_inputs, self._chunk_tangents)
        cached = self._plans.get(tangent)
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        chunk = self._tangent_chunk if tangent else self._chunk
        width = self.num_outputs
        plan = []
        with torch.inference_mode(False):  # normal views, whoever calls
            outputs = self._outputs.view(-1)  # the buffer is contiguous
            for start in range(0, self.num_points, chunk):
                stop = min(start + chunk, self.num_points)
                n = stop - start
                direct = self._zero_copy and not (pad and n < chunk)
                if direct:
                    source, destination, x = None, None, self._inputs[start:stop]
                else:
                    source, destination = self._inputs[start:stop], self._chunk_inputs[:n]
                    x = self._chunk_inputs[:chunk] if pad else destination
                values = outputs[start * width : stop * width]
                out = computed = tangents = None
                if tangent:
                    assert self._tangents is not None and self._chunk_tangents is not None
                    tangents = self._tangents[start:stop]
                    if direct:
                        out = computed = tangents
                    else:
                        out = self._chunk_tangents[: chunk if pad else n]
                        computed = out[:n]
                target = self._outputs[start:stop]
                plan.append((source, destination, x, target, values, n, out, computed, tangents))
        self._plans[tangent] = (key, plan)
        return plan

    def _evaluate_values(self) -> float:
        """The values pass (see :meth:`evaluate`); returns the sum of the values' squares.

        Its per-chunk views come from :meth:`_chunk_plan`, built once: at 10⁴ points an
        update is one chunk, and slicing, reshaping and zeroing cost more than the model.
        """
        nb = self._non_blocking
        values = self.kernel.values
        squares = 0.0
        plan = self._chunk_plan(tangent=False)
        with torch.inference_mode():
            for source, destination, x, target, flat, n, *_ in plan:
                if destination is not None:
                    destination.copy_(source, non_blocking=nb)
                squares += self._store(values(x), x, target, flat, n)
        return self._squares(squares)

    def _store(
        self, y: torch.Tensor, x: torch.Tensor, target: torch.Tensor, flat: torch.Tensor, n: int
    ) -> float:
        """Write a chunk's output ``y`` into ``target``; the sum of its squares.

        The usual ``(n, num_outputs)`` output is taken as it is, anything else checked and
        reshaped (:meth:`_chunk_values`). The squares are summed while in cache (the
        finiteness test needs no second pass); 0 for a non-blocking copy, which
        :meth:`_squares` sums after synchronising instead.
        """
        shape = y.shape
        if len(shape) != 2 or shape[0] != n or shape[1] != self.num_outputs or x.shape[0] != n:
            y = self._chunk_values(y, x.shape[0], n)
        target.copy_(y, non_blocking=self._non_blocking)
        return 0.0 if self._non_blocking else float(torch.dot(flat, flat))

    def _squares(self, chunked: float) -> float:
        """The sum of the values' squares: ``chunked``, or over all values after a sync."""
        if not self._non_blocking:
            return chunked
        torch.cuda.synchronize(self.device)
        outputs = self._outputs.view(-1)
        return float(torch.dot(outputs, outputs))

    def probe(self) -> tuple[int, ...]:
        """Run the model on two zero points and return its output shape without the batch.

        Raises:
            ValueError: If the model cannot take ``(batch, num_inputs)`` inputs.
        """
        x = torch.zeros((2, self.num_inputs), dtype=self.dtype, device=self.device)
        try:
            with torch.inference_mode():
                y = call_watching_input(self.model, x)
        except RuntimeError as err:
            expected = _expected_input_width(self.model)
            if expected is not None and expected != self.num_inputs:
                raise ValueError(
                    f"Model input width mismatch: the model takes {expected} input components "
                    f"per point, but the operands provide {self.num_inputs} (a "
                    f"(2, {self.num_inputs}) probe batch raised: {err})"
                ) from err
            hint = mixed_precision_hint(self.model, self.dtype) or (
                f"the operands provide {self.num_inputs} components per point; is that the "
                "model's input width?"
            )
            raise ValueError(
                f"The model failed on a (2, {self.num_inputs}) probe batch ({hint}): {err}"
            ) from err
        if not isinstance(y, torch.Tensor) or y.ndim < 1 or y.shape[0] != 2:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"The model must return a tensor of shape (batch, ...); for a batch of 2 "
                f"points it returned {shape}."
            )
        # A last chunk may hold one point: a model that drops the batch dimension there
        # (squeeze()) would have its output broadcast over the components.
        with torch.inference_mode():
            single = self.model(x[:1])
        if not isinstance(single, torch.Tensor) or tuple(single.shape) != (1, *y.shape[1:]):
            shape = (
                tuple(single.shape) if isinstance(single, torch.Tensor) else type(single).__name__
            )
            raise ValueError(
                f"The model must keep the batch dimension: for a batch of 2 points it returned "
                f"{tuple(y.shape)}, for 1 point {shape} instead of {(1, *y.shape[1:])} (does "
                "it squeeze() its output?)."
            )
        return tuple(y.shape[1:])


class GridEvaluator:
    """Evaluate a grid model (a neural operator) on one grid field from preallocated buffers.

    The torch boundary of a :class:`~dolfinx_mno.NonlocalClosure`, on its root rank. The
    model maps ``(1, in_channels, *grid_shape)`` to ``(1, out_channels, *grid_shape)``;
    the caller writes the field into :attr:`inputs` and reads the result from
    :attr:`outputs`, host arrays of shapes ``(in_channels, num_points)`` and
    ``(out_channels, num_points)`` (grid points in row-major order), allocated once and
    reused by every call to :meth:`evaluate`.

    dtype and device rules: the host buffers are float64, whatever the DOLFINx dtype
    (float32 samples widen exactly). The model runs in its own dtype (that of its first
    real floating-point parameter or buffer; ``host_dtype``'s twin for a model without
    any) on its own device. A float64 model on the CPU reads :attr:`inputs` itself;
    otherwise each call copies (and casts) it into one tensor on the model's device,
    allocated here. Host buffers are pinned when the model is on a CUDA device.

    Args:
        model: Maps ``(1, in_channels, *grid_shape)`` to ``(1, out_channels, *grid_shape)``,
            e.g. ``neuralop.models.FNO``; in evaluation mode (``model.eval()``).
        in_channels: Input channels.
        out_channels: Output channels.
        grid_shape: Points per direction.
        host_dtype: The DOLFINx scalar type (``float32`` or ``float64``), which gives the
            dtype of a model without floating-point tensors.
        device: Device the model is moved to; ``None`` leaves it where it is (the CPU for a
            model without tensors).

    Raises:
        TypeError: Another ``host_dtype``.

    Example:
        >>> evaluator = GridEvaluator(fno, 4, 2, (64, 64), np.float64, torch.device("cpu"))
        >>> evaluator.probe()  # ValueError if the model does not fit
        >>> evaluator.inputs[:] = field.reshape(4, -1)
        >>> evaluator.evaluate()
        >>> evaluator.check_finite()  # None, or why not
        >>> evaluator.outputs.shape
        (2, 4096)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        in_channels: int,
        out_channels: int,
        grid_shape: tuple[int, ...],
        host_dtype: npt.DTypeLike,
        device: torch.device | None,
    ):
        host_dtype = _host_dtype(host_dtype)
        if device is not None:
            model.to(device)
        self.model = model
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.grid_shape = tuple(int(n) for n in grid_shape)
        self.num_points = math.prod(self.grid_shape)
        self.device = model_device(model) or device or torch.device("cpu")
        # The first *real* tensor: a Fourier layer's complex weights do not say the dtype
        # of the grid fields.
        self.dtype = next(
            (t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
            NUMPY_TO_TORCH[host_dtype],
        )
        self._placement = Placement(model)
        pin = self.device.type == "cuda"
        self._inputs = torch.empty(
            (self.in_channels, self.num_points), dtype=torch.float64, pin_memory=pin
        )
        self._outputs = torch.empty(
            (self.out_channels, self.num_points), dtype=torch.float64, pin_memory=pin
        )
        self._inputs_array = self._inputs.numpy()
        self._outputs_array = self._outputs.numpy()
        # The model input: the host buffer itself where dtype and device agree, else a
        # tensor on the model's device that every call copies (and casts) into.
        self._input_field = self._inputs.view(1, self.in_channels, *self.grid_shape)
        if self.dtype == torch.float64 and self.device.type == "cpu":
            self._model_input = self._input_field
        else:
            self._model_input = torch.empty(
                self._input_field.shape, dtype=self.dtype, device=self.device
            )
        # Workspaces of the NaN/Inf check.
        self._finite = np.empty((self.out_channels, self.num_points), dtype=bool)
        self._finite_points = np.empty(self.num_points, dtype=bool)

    @property
    def inputs(self) -> npt.NDArray[np.float64]:
        """Host input buffer, shape ``(in_channels, num_points)``, written by the caller."""
        return self._inputs_array

    @property
    def outputs(self) -> npt.NDArray[np.float64]:
        """Host output buffer, shape ``(out_channels, num_points)``."""
        return self._outputs_array

    def _call(self, probe: bool = False) -> typing.Any:
        """The model's output for the current :attr:`inputs` (without autograd).

        ``probe``: also check that the model leaves its input as it was given.
        """
        if self._model_input is not self._input_field:
            self._model_input.copy_(self._input_field)
        with torch.inference_mode():
            if probe:
                return call_watching_input(self.model, self._model_input)
            return self.model(self._model_input)

    def state_error(self) -> str | None:
        """Why the model must not run now (training mode, recast or moved), or ``None``."""
        return training_mode_error(self.model) or self._placement.error()

    def evaluate(self) -> None:
        """Run the model on :attr:`inputs` and write :attr:`outputs`.

        Raises:
            RuntimeError: The model is in training mode (:func:`training_mode_error`), or
                its dtype or device changed since construction (:class:`Placement`).
            Exception: Whatever the model raises, or a ``RuntimeError`` if its output
                cannot be viewed as ``(out_channels, num_points)``; :attr:`outputs` is then
                incomplete.
        """
        reason = self.state_error()
        if reason is not None:
            raise ModelStateError(reason)
        output = self._call()
        # To the host, in float64.
        self._outputs.copy_(output[0].reshape(self.out_channels, self.num_points))

    def check_finite(self) -> str | None:
        """Why :attr:`outputs` is not all finite, or ``None`` (no allocation).

        Returns:
            ``"the model returned NaN/Inf at {k} of {num_points} grid points"``, a grid
            point counting once however many of its channels are not finite; or ``None``.
        """
        np.isfinite(self._outputs_array, out=self._finite)
        np.logical_and.reduce(self._finite, axis=0, out=self._finite_points)
        bad = self.num_points - int(np.count_nonzero(self._finite_points))
        if not bad:
            return None
        return f"the model returned NaN/Inf at {bad} of {self.num_points} grid points"

    def probe(self, inputs: str | None = None, outputs: str | None = None) -> None:
        """Run the model once on the current :attr:`inputs` and check its output's shape.

        Args:
            inputs: What the input channels are, for the messages, e.g. ``"4 input
                channels (3 operand components + 1 mask)"``; default ``"{in_channels} input
                channels"``.
            outputs: What the output channels are, e.g. ``"value_shape (2,)"``; default
                ``"{out_channels} output channels"``.

        Raises:
            ValueError: The model raised (``"Channel mismatch: ..."`` where its
                ``in_channels`` attribute differs from ``in_channels``), returned no
                tensor, changed the grid shape or returned another number of channels.
        """
        channels = self.in_channels
        inputs = inputs or f"{channels} input channel{'s' * (channels != 1)}"
        outputs = outputs or f"{self.out_channels} output channel{'s' * (self.out_channels != 1)}"
        given = f"(1, {channels}, *{self.grid_shape})"
        try:
            y = self._call(probe=True)
        except InputModifiedError:
            raise
        except Exception as err:
            expected = getattr(self.model, "in_channels", None)
            if expected is not None and expected != channels:
                raise ValueError(
                    f"Channel mismatch: the model has in_channels={expected}, but it is "
                    f"given {inputs}."
                ) from err
            hint = mixed_precision_hint(self.model, self.dtype)
            raise ValueError(
                f"The model failed on a probe input of {inputs} on the {self.grid_shape} "
                f"grid{f' ({hint})' if hint else ''}: {type(err).__name__}: {err}"
            ) from err
        expected_shape = (1, self.out_channels, *self.grid_shape)
        if not isinstance(y, torch.Tensor):
            raise ValueError(
                f"The model must return a tensor: for input {given} it returned a "
                f"{type(y).__name__}, expected shape {expected_shape} ({outputs})."
            )
        if tuple(y.shape) != expected_shape:
            if tuple(y.shape[2:]) != self.grid_shape:
                what = "changes the grid shape"
            else:
                what = "returns the wrong number of output channels"
            raise ValueError(
                f"The model {what}: for input {given} it returned {tuple(y.shape)}, "
                f"expected {expected_shape} ({outputs})."
            )


def _expected_input_width(model: torch.nn.Module) -> int | None:
    """Input width of the first linear layer of ``model``, when it is easy to tell."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            return typing.cast(int, module.in_features)
    return None
