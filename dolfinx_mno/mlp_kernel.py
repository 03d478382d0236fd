"""A fused value-and-tangent pass for plain MLPs (``nn.Sequential`` of linear layers and tanh).

Most closure models are small MLPs, ``Linear → tanh → … → Linear``. Their tangent is a
product of matrices, ``∂y/∂x = W_L D_{L-1} W_{L-1} ⋯ D_1 W_1`` with ``D_k = diag(1 - t_k²)``
for the tanh outputs ``t_k``, which this module evaluates without autograd: one forward pass
that keeps the activations in buffers allocated once, then the product accumulated from
the output side for all ``num_outputs`` rows at once (one matrix product per linear layer,
one fused in-place pass per activation: autograd's own ``tanh_backward`` /
``sigmoid_backward`` kernels, ``G ∘ (1 - t²)`` from the stored output ``t``). Autograd
does the same arithmetic but records a graph, allocates every intermediate, and runs one
backward pass per output component (or a batched one through ``vmap``).

The values alone use the same buffers: linear layers write with ``out=`` and activations
work in place, so a chunk allocates nothing. What each kernel call takes (the buffers'
views, NumPy's views of them, each weight transposed) is bound once per chunk size, in a
plan that is rebuilt when a parameter is replaced or given new memory (tested by identity
at every call): rebuilding it at every chunk cost 15-20 µs a chunk, more than the kernels
of a small one. The results are those of the model (the same
``addmm`` kernels; the tangent agrees with autograd to round-off);
:class:`~dolfinx_mno.pointwise_kernel.PointwiseKernel` checks this on a sample and keeps
the fused pass only where it measures faster.

The tanh kernel is one of :data:`TANH_KERNELS`: torch's (SLEEF's 1-ulp ``tanh``) or, for
float32 and float64 buffers on the CPU, NumPy's in place on the same memory (its own SIMD
``tanh``; the two differ by an ulp at most). Which is faster depends on the CPU: on one
core of an AVX-512 AMD EPYC, torch's took 3.1–3.6 ns a float32 value and NumPy's 0.4 (6.6
against 2.1 ns in float64), and the fused pass of a ``3 → 64 → 64 → 1`` float32 MLP ran
3.2× faster with NumPy's (``docs/benchmarks.md``); an earlier machine had measured torch's
at 0.25 ns. :class:`~dolfinx_mno.pointwise_kernel.PointwiseKernel` therefore times both
and keeps the faster (torch's also runs on several threads where NumPy's runs on one),
after the same agreement check.

The matrix products run by one of :data:`GEMM_KERNELS`: torch's BLAS (MKL in torch's x86
wheels) or NumPy's (OpenBLAS in NumPy's wheels) on the same memory, at torch's thread
count (:mod:`dolfinx_mno._blas`). MKL is tuned for Intel CPUs: on one core of an AMD EPYC
it took 1.2–2.2× OpenBLAS's time for the narrow products of a float64 ``3 → 32 → 32 → 1``
MLP, and a rollout's model ran 1.3× faster with OpenBLAS; for a float32 ``3 → 64 → 64 → 1``
they were even (NumPy's ``matmul`` has no bias term, so its bias costs a pass).
:class:`~dolfinx_mno.pointwise_kernel.PointwiseKernel` times each pair of kernels and keeps
the fastest.

Recognised: a :class:`torch.nn.Sequential` whose members are exactly
:class:`torch.nn.Linear`, :class:`torch.nn.Tanh`, :class:`torch.nn.Sigmoid`,
:class:`torch.nn.GELU` (exact or ``approximate="tanh"``; its output goes to a buffer of its
own, its input stays for the derivative) or :class:`torch.nn.Identity`, with no hooks,
ending in a linear layer; :class:`dolfinx_mno.MLP` with such activations (its ``layers``);
and either wrapped in a pointwise
:class:`~dolfinx_mno.normalization.NormalizedModel` (``axis=-1``, what
:func:`~dolfinx_mno.training.fit` returns), whose affine
normalisations are folded into the first and last linear layers at every call
(``W₁ diag(1/σ)``, ``diag(σ_out) W_L``; a few small matrices, so that training the model or
its statistics later is seen). Anything else (a subclass, a custom activation) runs through
the generic modes.

Rollouts differentiate the model (:mod:`dolfinx_mno.rollout`): for them
:meth:`SequentialMLP.differentiable_values` runs the layers as one autograd function,
:class:`MLPFunction`, with the chosen tanh and a hand-written backward (the normalisations
of a ``NormalizedModel`` around it, unfolded, under autograd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing

import numpy as np
import torch

from dolfinx_mno._blas import torch_threads

__all__ = ["GEMM_KERNELS", "TANH_KERNELS", "MLPFunction", "SequentialMLP"]

#: How the fused pass applies tanh: ``"torch"`` (``torch.tanh``) or ``"numpy"`` (``np.tanh``
#: in place on the buffer's memory; float32/float64 on the CPU only).
TANH_KERNELS = ("torch", "numpy")
#: Which BLAS runs the fused pass's matrix products: ``"torch"``'s (``torch.addmm``, MKL
#: in torch's x86 wheels) or ``"numpy"``'s (``np.matmul`` on the same memory, OpenBLAS in
#: NumPy's wheels, at torch's thread count; float32/float64 on the CPU only).
GEMM_KERNELS = ("torch", "numpy")

_ACTIVATIONS = {torch.nn.Tanh: "tanh", torch.nn.Sigmoid: "sigmoid", torch.nn.GELU: "gelu"}
#: ``G ∘ f'`` from the activation's output ``t`` (``1 - t²``, ``t - t²``), in one pass.
_BACKWARD = {
    "tanh": torch.ops.aten.tanh_backward.grad_input,
    "sigmoid": torch.ops.aten.sigmoid_backward.grad_input,
}


@dataclasses.dataclass
class _Layer:
    kind: str  # "linear", "tanh" or "sigmoid"
    module: torch.nn.Module
    width: int  # output width


def _backward(layer: _Layer, source: torch.Tensor, saved: torch.Tensor, out: torch.Tensor) -> None:
    """``out = source ∘ f'`` for activation ``layer``, in one pass (``out`` may be ``source``).

    ``saved`` is what the forward kept: the output ``t`` of tanh and the sigmoid, the input
    ``z`` of GELU (whose derivative ``Φ(z) + z φ(z)`` is not a function of its output).
    """
    if layer.kind == "gelu":
        approximate = typing.cast(str, layer.module.approximate)
        torch.ops.aten.gelu_backward.grad_input(
            source, saved, approximate=approximate, grad_input=out
        )
    else:
        _BACKWARD[layer.kind](source, saved, grad_input=out)


def _gelu(z: torch.Tensor, layer: _Layer, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU of ``z`` (the layer's approximation) into ``out``, or a new tensor."""
    approximate = typing.cast(str, layer.module.approximate)
    if out is None:
        return torch.ops.aten.gelu(z, approximate=approximate)
    return torch.ops.aten.gelu.out(z, approximate=approximate, out=out)


def _activation_kind(kind: str, numpy_tanh: bool) -> str:
    """``"numpy"`` for a tanh that NumPy's kernel applies, else ``kind``."""
    return "numpy" if kind == "tanh" and numpy_tanh else kind


def _activate(h: torch.Tensor, array: typing.Any, kind: str) -> None:
    """Apply the activation ``kind`` to ``h`` in place (contiguous, its own memory).

    ``kind`` as :func:`_activation_kind` gives it; for ``"numpy"``, ``array`` is NumPy's
    view of ``h``.
    """
    if kind == "numpy":
        np.tanh(array, out=array)
    elif kind == "tanh":
        torch.tanh(h, out=h)
    else:
        torch.sigmoid(h, out=h)


def _array(tensor: torch.Tensor) -> np.ndarray:
    """NumPy's view of a CPU tensor's memory (no copy; autograd's flag is ignored)."""
    return tensor.detach().numpy()


def _operand(weight: torch.Tensor, numpy_gemm: bool) -> typing.Any:
    """A linear layer's weight as :func:`_linear` takes it: ``Wᵀ``, NumPy's with ``numpy_gemm``."""
    return _array(weight).T if numpy_gemm else weight.t()


def _linear(
    h: torch.Tensor,
    h_array: typing.Any,
    operand: typing.Any,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    out_array: np.ndarray | None,
) -> None:
    """``out = h Wᵀ + b``, ``operand`` being :func:`_operand`'s ``Wᵀ``.

    By NumPy's BLAS where NumPy's views ``h_array`` and ``out_array`` are given, else by
    torch's. NumPy's ``matmul`` has no accumulating form, so the bias is added in a second
    pass over ``out`` (in cache: ``out`` was just written), by torch: NumPy's broadcast
    in-place add allocated a temporary the size of ``out`` and took 2.4× as long (NumPy
    2.5).
    """
    if out_array is not None:
        np.matmul(h_array, operand, out=out_array)
        if bias is not None:
            out.add_(bias)
    elif bias is not None:
        torch.addmm(bias, h, operand, out=out)
    else:
        torch.mm(h, operand, out=out)


def _checked(
    what: str,
    function: str,
    kernel: str,
    kernels: tuple[str, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> str:
    """``kernel`` if it is one of ``kernels`` and can run on such buffers, else ValueError."""
    if kernel not in kernels:
        raise ValueError(f"Unknown {what} kernel {kernel!r}; use one of {kernels}.")
    if kernel == "numpy" and not SequentialMLP.numpy_supported(dtype, device):
        raise ValueError(
            f"NumPy's {function} works on float32 or float64 buffers on the CPU, not {dtype} "
            f"on {device}."
        )
    return kernel


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_backward_hooks", None)
        or getattr(module, "_backward_pre_hooks", None)
    )


class SequentialMLP:
    """Values, and values with tangent, of a recognised MLP into preallocated buffers.

    Build with :meth:`from_model`. Not thread-safe (the buffers are shared by calls).

    Args:
        layers: The recognised layers (see :meth:`from_model`).
        num_inputs: Input width.
        num_outputs: Output width (that of the last linear layer).
    """

    def __init__(
        self,
        layers: list[_Layer],
        num_inputs: int,
        num_outputs: int,
        model: torch.nn.Sequential | None = None,
    ):
        self.layers = layers
        self._model = model
        self._members = tuple(model) if model is not None else ()
        # A dolfinx_mno.MLP whose ``layers`` this is (checked at every call), else None.
        self._container: torch.nn.Module | None = None
        # A NormalizedModel's statistics, folded into the first and last linear layers.
        self._wrapper: torch.nn.Module | None = None
        self._input_norm: torch.nn.Module | None = None
        self._output_norm: torch.nn.Module | None = None
        self._folded: dict[tuple[int, str], torch.Tensor] = {}
        self._num_linear = sum(layer.kind == "linear" for layer in layers)
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs
        self._capacity = 0
        self._activations: list[torch.Tensor] = []
        self._cotangents: list[torch.Tensor] = []
        self._post: dict[int, torch.Tensor] = {}
        self._widths: list[int] = []
        # Bumped whenever a buffer the plans hold views of is reallocated.
        self._generation = 0
        # Values plans by (points, numpy tanh, numpy GEMM, generation): see _values_plan.
        self._plans: dict[tuple[int, bool, bool, int], _Plan] = {}
        #: One of :data:`TANH_KERNELS` (see :meth:`use_tanh_kernel`).
        self.tanh_kernel = "torch"
        #: One of :data:`GEMM_KERNELS` (see :meth:`use_gemm_kernel`).
        self.gemm_kernel = "torch"

    @property
    def has_tanh(self) -> bool:
        """Whether a layer is a tanh (whose kernel :meth:`use_tanh_kernel` chooses)."""
        return any(layer.kind == "tanh" for layer in self.layers)

    @staticmethod
    def numpy_supported(dtype: torch.dtype, device: torch.device) -> bool:
        """Whether NumPy's kernels (tanh, matmul) work on buffers of this dtype and device."""
        return device.type == "cpu" and dtype in (torch.float32, torch.float64)

    def use_tanh_kernel(self, kernel: str, dtype: torch.dtype, device: torch.device) -> None:
        """Apply tanh with ``kernel`` (one of :data:`TANH_KERNELS`) from the next call on."""
        self.tanh_kernel = _checked("tanh", "tanh", kernel, TANH_KERNELS, dtype, device)

    def _numpy_tanh_for(self, x: torch.Tensor) -> bool:
        """Whether tanh runs by NumPy's kernel on tensors like ``x``."""
        return self.tanh_kernel == "numpy" and self.numpy_supported(x.dtype, x.device)

    def use_gemm_kernel(self, kernel: str, dtype: torch.dtype, device: torch.device) -> None:
        """Run the matrix products with ``kernel``'s BLAS (:data:`GEMM_KERNELS`) from now on."""
        self.gemm_kernel = _checked("GEMM", "matmul", kernel, GEMM_KERNELS, dtype, device)

    def _numpy_gemm_for(self, x: torch.Tensor) -> bool:
        """Whether the matrix products run by NumPy's BLAS on tensors like ``x``."""
        return self.gemm_kernel == "numpy" and self.numpy_supported(x.dtype, x.device)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, num_inputs: int, num_outputs: int
    ) -> SequentialMLP | None:
        """The fused MLP for ``model``, or ``None`` if ``model`` is not a plain MLP."""
        from dolfinx_mno.models import MLP
        from dolfinx_mno.normalization import AffineNormalization, NormalizedModel

        if type(model) is MLP and not _has_hooks(model):  # the package's own: its layers
            inner = cls.from_model(model.layers, num_inputs, num_outputs)
            if inner is not None:
                inner._container = model
            return inner
        if type(model) is NormalizedModel and not _has_hooks(model):
            norms = (model.input_normalization, model.output_normalization)
            if not all(
                type(norm) is AffineNormalization and norm.axis == -1 and not _has_hooks(norm)
                for norm in norms
            ):
                return None
            inner = cls.from_model(model.model, num_inputs, num_outputs)
            if inner is None or inner._wrapper is not None:
                return None
            if any(
                norm.shift.numel() not in (1, width)
                for norm, width in zip(norms, (num_inputs, num_outputs), strict=True)
            ):
                return None
            inner._wrapper = model
            inner._input_norm, inner._output_norm = norms
            return inner
        if type(model) is not torch.nn.Sequential or _has_hooks(model):
            return None
        layers: list[_Layer] = []
        width = num_inputs
        for module in model:
            if _has_hooks(module):
                return None
            if type(module) is torch.nn.Identity:
                continue
            if type(module) is torch.nn.Linear:
                if module.in_features != width:
                    return None
                width = module.out_features
                layers.append(_Layer("linear", module, width))
            elif type(module) in _ACTIVATIONS:
                # In place on the previous linear layer's output, whose derivative needs it.
                if not layers or layers[-1].kind != "linear":
                    return None
                layers.append(_Layer(_ACTIVATIONS[type(module)], module, width))
            else:
                return None
        if not layers or layers[-1].kind != "linear" or width != num_outputs:
            return None
        return cls(layers, num_inputs, num_outputs, model)

    def bytes_per_point(self, tangent: bool, dtype: torch.dtype) -> int:
        """The buffers' bytes per point: activations, and the cotangents with ``tangent``."""
        linear_widths = [layer.width for layer in self.layers if layer.kind == "linear"]
        gelu_widths = [layer.width for layer in self.layers if layer.kind == "gelu"]
        floats = sum(linear_widths) + sum(gelu_widths)
        if tangent:
            floats += self.num_outputs * (self.num_inputs + sum(linear_widths[:-1]))
        return floats * torch.empty((), dtype=dtype).element_size()

    def reserve(self, points: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the buffers for chunks of up to ``points`` points (exactly that many)."""
        if points == self._capacity and self._activations:
            return
        # Normal tensors even if called under inference mode: the tangent pass writes them
        # outside it.
        with torch.inference_mode(False):
            self._allocate(points, dtype, device)

    def _allocate(self, points: int, dtype: torch.dtype, device: torch.device) -> None:
        m = self.num_outputs  # the cotangents hold one row per output component
        self._activations = [
            torch.empty((points, layer.width), dtype=dtype, device=device)
            for layer in self.layers
            if layer.kind == "linear"
        ]
        # Cotangents (m, points, width) before each linear layer's input side.
        linear_widths = [layer.width for layer in self.layers if layer.kind == "linear"]
        widths = [self.num_inputs, *linear_widths[:-1]]
        self._widths = widths
        # Flat: the first (m, n, width) entries are a contiguous view for any n <= points.
        self._cotangents = [torch.empty(m * points * w, dtype=dtype, device=device) for w in widths]
        # GELU's outputs, keyed by the linear layer before it: its input z stays in that
        # layer's buffer for the derivative.
        self._post = {}
        linear = -1
        for layer in self.layers:
            linear += layer.kind == "linear"
            if layer.kind == "gelu":
                self._post[linear] = torch.empty((points, layer.width), dtype=dtype, device=device)
        self._capacity = points
        self._generation += 1

    def _cotangent(self, index: int, n: int) -> torch.Tensor:
        """The contiguous ``(num_outputs, n, width)`` cotangent before linear layer ``index``."""
        width = self._widths[index]
        return self._cotangents[index][: self.num_outputs * n * width].view(-1, n, width)

    def _ensure(self, x: torch.Tensor) -> None:
        if (
            not self._activations
            or x.shape[0] > self._capacity
            or self._activations[0].dtype != x.dtype
        ):
            self.reserve(x.shape[0], x.dtype, x.device)

    def _fold(self) -> None:
        """Fold the normalisations into the first and last linear layers.

        The folded tensors are written in place, so nothing is allocated after the first call.
        """
        if self._wrapper is None:
            return
        assert self._input_norm is not None and self._output_norm is not None
        linears = [layer.module for layer in self.layers if layer.kind == "linear"]
        with torch.no_grad():
            # First layer: W (x - s)/c + b = (W/c) x + (b - (W/c) s).
            first = linears[0]
            weight = _tensor(first.weight)
            shift, scale = _tensor(self._input_norm.shift), _tensor(self._input_norm.scale)
            w = self._buffer((0, "weight"), weight)
            torch.div(weight, scale, out=w)
            b = self._buffer((0, "bias"), weight[:, 0])
            torch.mv(w, shift.expand(w.shape[1]), out=b)
            if first.bias is not None:
                torch.sub(_tensor(first.bias), b, out=b)
            else:
                b.neg_()
            # Last layer: c_out (W h + b) + s_out.
            last_index = self._num_linear - 1
            last = linears[-1]
            shift, scale = _tensor(self._output_norm.shift), _tensor(self._output_norm.scale)
            source_w = w if last_index == 0 else _tensor(last.weight)
            source_b = (
                b if last_index == 0 else _tensor(last.bias) if last.bias is not None else None
            )
            w_last = self._buffer((last_index, "weight_out"), source_w)
            torch.mul(source_w, scale.expand(w_last.shape[0]).unsqueeze(1), out=w_last)
            b_last = self._buffer((last_index, "bias_out"), source_w[:, 0])
            if source_b is not None:
                torch.mul(source_b, scale.expand(b_last.shape[0]), out=b_last)
                b_last.add_(shift.expand(b_last.shape[0]))
            else:
                b_last.copy_(shift.expand(b_last.shape[0]))

    def _buffer(self, key: tuple[int, str], like: torch.Tensor) -> torch.Tensor:
        buffer = self._folded.get(key)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            with torch.inference_mode(False):
                buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._folded[key] = buffer
            self._generation += 1
        return buffer

    def _weight_and_bias(
        self, index: int, module: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of linear layer ``index``, with the statistics folded in."""
        if self._wrapper is not None:
            if index == self._num_linear - 1:
                return self._folded[(index, "weight_out")], self._folded[(index, "bias_out")]
            if index == 0:
                return self._folded[(0, "weight")], self._folded[(0, "bias")]
        bias = module.bias
        return _tensor(module.weight), (None if bias is None else _tensor(bias))

    def _check_unchanged(self) -> None:
        """Refuse a model whose layers were replaced since (the buffers follow the old ones)."""
        wrapper, container = self._wrapper, self._container
        if container is not None and container.layers is not self._model:
            raise RuntimeError(
                "the MLP's layers were replaced after the closure was built (its fused MLP "
                "pass follows the layers it was built with); build a new closure for the "
                "new model"
            )
        inner = self._model if container is None else container
        if wrapper is not None and (
            wrapper.model is not inner
            or wrapper.input_normalization is not self._input_norm
            or wrapper.output_normalization is not self._output_norm
        ):
            raise RuntimeError(
                "the model's layers or normalisations were replaced after the closure was "
                "built (its fused MLP pass follows the ones it was built with); build a new "
                "closure for the new model"
            )
        # Modules compare by identity: one tuple comparison of the current members.
        if self._model is not None and tuple(self._model._modules.values()) != self._members:
            raise RuntimeError(
                "the model's layers were replaced after the closure was built (its fused MLP "
                "pass follows the layers it was built with); build a new closure for the "
                "new model"
            )

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` for ``(n, num_inputs)``; a view of a buffer, ``(n, num_outputs)``.

        Runs the chunk's :class:`_Plan` (its views and weights bound once, see
        :meth:`_values_plan`): per layer one kernel call and nothing else.
        """
        self._check_unchanged()
        self._ensure(x)
        self._fold()
        numpy_tanh = self._numpy_tanh_for(x)  # once a chunk, not once a layer
        numpy_gemm = self._numpy_gemm_for(x)
        plan = self._values_plan(x.shape[0], numpy_tanh, numpy_gemm)
        if not numpy_gemm and not torch.is_grad_enabled():  # inference mode: nothing to enter
            return _run(plan, x, False)
        with torch.no_grad(), torch_threads() if numpy_gemm else contextlib.nullcontext():
            return _run(plan, x, numpy_gemm)

    def _values_plan(self, n: int, numpy_tanh: bool, numpy_gemm: bool) -> _Plan:
        """The values pass for chunks of ``n`` points with these kernels, built once.

        A plan holds views of the buffers (and NumPy's views of them) and each linear
        layer's weight as the kernel takes it (``W.t()``, or NumPy's ``Wᵀ``): building
        them at every chunk cost more than the kernels of a small chunk. It is rebuilt when
        what it holds may have changed: a buffer reallocated (:attr:`_generation`), a
        parameter replaced (``layer.weight = nn.Parameter(...)``,
        ``load_state_dict(..., assign=True)``) or given new memory (``weight.data = ...``),
        which :meth:`_Plan.current` tests by identity at every call.
        """
        key = (n, numpy_tanh, numpy_gemm, self._generation)
        plan = self._plans.get(key)
        if plan is not None and plan.current():
            return plan
        if len(self._plans) >= 8:  # stale generations, or many chunk sizes (rollouts)
            self._plans.clear()
        # Normal views (usable in and out of inference mode), without autograd's history.
        with torch.inference_mode(False), torch.no_grad():
            plan = self._build_plan(n, numpy_tanh, numpy_gemm)
        self._plans[key] = plan
        return plan

    def _build_plan(self, n: int, numpy_tanh: bool, numpy_gemm: bool) -> _Plan:
        """A new :class:`_Plan` for chunks of ``n`` points (see :meth:`_values_plan`)."""
        steps: list[tuple[typing.Any, ...]] = []
        sources: list[tuple[dict, torch.Tensor | None, torch.Tensor | None, int]] = []
        linear = 0
        for layer in self.layers:
            if layer.kind == "linear":
                module = layer.module
                weight_source, bias_source = _tensor(module.weight), module.bias
                if bias_source is not None:
                    bias_source = _tensor(bias_source)
                sources.append(
                    (module._parameters, weight_source, bias_source, weight_source.data_ptr())
                )
                out = self._activations[linear][:n]
                weight, bias = self._weight_and_bias(linear, module)
                operand = _operand(weight, numpy_gemm)
                steps.append((_LINEAR, out, _array(out) if numpy_gemm else None, operand, bias))
                linear += 1
            elif layer.kind == "gelu":  # out of place: z stays for the derivative
                post = self._post[linear - 1][:n]
                steps.append((_GELU, post, _array(post) if numpy_gemm else None, layer, None))
            else:  # in place on the previous linear layer's output
                out = self._activations[linear - 1][:n]
                kind = _activation_kind(layer.kind, numpy_tanh)
                array = _array(out) if kind == "numpy" else None
                steps.append((_ACTIVATE, out, array, kind, None))
        return _Plan(tuple(steps), tuple(sources))

    def fresh_values(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` into a new ``(n, num_outputs)`` tensor, without a graph.

        Runs :meth:`values` chunk by chunk (chunks of the reserved buffers' size) and copies
        each chunk's output out: only the output is allocated, not the activations. For
        rollouts without a graph (forward rollouts, the first pass of a checkpointed
        segment), which would otherwise allocate every layer's output at every step.
        """
        n = x.shape[0]
        out = torch.empty((n, self.num_outputs), dtype=x.dtype, device=x.device)
        chunk = self._capacity if self._activations else min(n, 8192)
        for start in range(0, n, max(chunk, 1)):
            stop = min(start + chunk, n)
            out[start:stop].copy_(self.values(x[start:stop]))
        return out

    def differentiable_values(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` with autograd's graph, for gradients through the model (rollouts).

        The layers run as one autograd function, :class:`MLPFunction`, with tanh by
        :attr:`tanh_kernel` and a hand-written backward; a
        :class:`~dolfinx_mno.normalization.NormalizedModel`'s normalisations run around
        it as torch operations (trainable statistics get their gradients from autograd).
        Allocates like the model's forward: the activations are kept for the backward.
        """
        self._check_unchanged()
        h = x if self._input_norm is None else self._input_norm(x)
        tensors: list[torch.Tensor | None] = []
        for layer in self.layers:
            if layer.kind == "linear":
                bias = layer.module.bias
                tensors += [_tensor(layer.module.weight), None if bias is None else _tensor(bias)]
        h = MLPFunction.apply(
            self.layers, self._numpy_tanh_for(x), self._numpy_gemm_for(x), h, *tensors
        )
        if self._output_norm is not None:
            inverse: typing.Callable[[torch.Tensor], torch.Tensor] = self._output_norm.inverse  # type: ignore[assignment]
            h = inverse(h)
        return h

    def values_and_tangent(self, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Values ``(n, num_outputs)`` and the tangent written into ``out``.

        The activations of the forward pass stay in their buffers; the cotangents
        ``G = ∂y/∂h`` of shape ``(num_outputs, n, width)`` start as the identity and go
        through the layers backwards: ``G ← G W`` for a linear layer, ``G ← G ∘ f'`` for
        an activation (``1 - t²`` for tanh, ``s - s²`` for the sigmoid).
        """
        n, m = x.shape[0], self.num_outputs
        numpy_gemm = self._numpy_gemm_for(x)
        # NumPy's thread count set once for both passes (values' own setting then finds it).
        threads = torch_threads() if numpy_gemm else contextlib.nullcontext()
        with torch.no_grad(), threads:
            y = self.values(x)
            g: torch.Tensor | None = None  # None: the identity, before the last layer
            rows: torch.Tensor | None = None  # the last layer's weight, applied lazily
            linear = len(self._activations) - 1
            for layer in reversed(self.layers):
                if layer.kind == "linear":
                    weight, _ = self._weight_and_bias(linear, layer.module)  # (width, input)
                    if g is None and rows is None:
                        rows = weight  # applied with the next derivative, in one pass
                        linear -= 1
                        continue
                    if g is None:  # two linear layers in a row: G = W_last first
                        assert rows is not None
                        g = self._cotangent(linear + 1, n)
                        g.copy_(rows.unsqueeze(1).expand(g.shape))
                    target = self._cotangent(linear, n)
                    if numpy_gemm:
                        np.matmul(
                            _array(g).reshape(m * n, -1),
                            _array(weight),
                            out=_array(target).reshape(m * n, -1),
                        )
                    else:
                        # The weight column-major: MKL's GEMM runs 1.1-1.2x faster with it
                        # for a square layer and 2-4x for the narrow first one (3 inputs).
                        columns = self._buffer((linear, "weight_t"), weight.t())
                        columns.copy_(weight.t())
                        torch.matmul(g.view(m * n, -1), columns.t(), out=target.view(m * n, -1))
                    g = target
                    linear -= 1
                else:
                    # This layer's output (tanh, sigmoid) or input (GELU).
                    activation = self._activations[linear][:n]
                    if g is None:  # G = W_last ∘ f', in one pass
                        assert rows is not None
                        g = self._cotangent(linear + 1, n)
                        source = rows.unsqueeze(1).expand(g.shape)
                    else:
                        source = g
                    # G ∘ f' in one fused pass, autograd's own backward kernels.
                    _backward(layer, source, activation.unsqueeze(0).expand(g.shape), g)
            if g is None:  # a single linear layer: G = W at every point
                assert rows is not None
                g = self._cotangent(0, n)
                g.copy_(rows.unsqueeze(1).expand(g.shape))
            out.copy_(g.transpose(0, 1))
        return y, True


_LINEAR, _GELU, _ACTIVATE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A values pass for one chunk size, its operands bound (:meth:`SequentialMLP._values_plan`).

    ``steps``: per layer ``(_LINEAR, out, out_array, weight operand, bias)``,
    ``(_GELU, out, out_array, layer, None)`` or ``(_ACTIVATE, buffer, its array or None,
    kind, None)`` with ``kind`` ``"numpy"`` (NumPy's tanh), ``"tanh"`` or ``"sigmoid"``.
    ``sources``: per linear layer its ``_parameters``, the weight and bias there at build
    time and the weight's data pointer.
    """

    steps: tuple[tuple[typing.Any, ...], ...]
    sources: tuple[tuple[dict, torch.Tensor | None, torch.Tensor | None, int], ...]

    def current(self) -> bool:
        """Whether every linear layer still has the weight and bias the plan was built with."""
        for parameters, weight, bias, pointer in self.sources:
            if (
                parameters.get("weight") is not weight
                or parameters.get("bias") is not bias
                or weight is None
                or weight.data_ptr() != pointer
            ):
                return False
        return True


def _run(plan: _Plan, x: torch.Tensor, numpy_gemm: bool) -> torch.Tensor:
    """Run ``plan`` on ``x``; the output is a view of the last linear layer's buffer."""
    h, h_array = x, typing.cast(typing.Any, _array(x) if numpy_gemm else None)
    for kind, out, out_array, operand, bias in plan.steps:
        if kind == _LINEAR:
            _linear(h, h_array, operand, bias, out, out_array)
            h, h_array = out, out_array
        elif kind == _ACTIVATE:  # in place on h, the previous linear layer's output
            _activate(out, out_array, operand)
        else:
            h, h_array = _gelu(h, operand, out), out_array
    return h


class MLPFunction(torch.autograd.Function):
    """A recognised MLP's layers as one autograd function with a hand-written backward.

    ``MLPFunction.apply(layers, numpy_tanh, numpy_gemm, x, *tensors)``: ``layers`` are
    :class:`SequentialMLP`'s, ``tensors`` each linear layer's weight and bias (``None``
    without one), in order; ``numpy_tanh`` applies tanh with NumPy's kernel in place (float32 or
    float64 on the CPU), otherwise torch's; ``numpy_gemm`` runs the matrix products, forward
    and backward, with NumPy's BLAS at torch's thread count, otherwise torch's. The forward
    keeps each linear layer's input and each activation's output, as autograd would; the
    backward is the chain rule, layer by layer from the output: ``∂W = Gᵀ a``,
    ``∂b = Σ G``, ``G ← G W`` (a broadcast product for a one-row ``W``), ``G ← G ∘ f'(t)``
    by autograd's own ``tanh_backward`` / ``sigmoid_backward`` kernels in place; gradients
    nobody needs are not computed.

    The same products as autograd's (the results agree to round-off, and bit for bit on
    the MLPs tested); it saves autograd's per-operation nodes and the outer product of a
    one-output layer. A second derivative is refused: the backward raises under
    ``create_graph=True``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        layers: list[_Layer],
        numpy_tanh: bool,
        numpy_gemm: bool,
        x: torch.Tensor,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        """The layers at ``x``; keeps what the backward needs."""
        inputs: list[torch.Tensor] = []  # of each linear layer
        outputs: list[torch.Tensor] = []  # of each activation
        h = x
        with torch_threads() if numpy_gemm else contextlib.nullcontext():
            for layer in layers:
                if layer.kind == "linear":
                    weight, bias = tensors[2 * len(inputs)], tensors[2 * len(inputs) + 1]
                    assert weight is not None
                    inputs.append(h)
                    out = torch.empty((h.shape[0], layer.width), dtype=h.dtype, device=h.device)
                    arrays = (_array(h), _array(out)) if numpy_gemm else (None, None)
                    _linear(h, arrays[0], _operand(weight, numpy_gemm), bias, out, arrays[1])
                    h = out
                elif layer.kind == "gelu":  # keeps its input z for the derivative
                    outputs.append(h)
                    h = _gelu(h, layer)
                else:
                    # h is the previous linear layer's fresh output (from_model's rule): its
                    # own contiguous memory, which the activation overwrites.
                    kind = _activation_kind(layer.kind, numpy_tanh)
                    _activate(h, _array(h) if kind == "numpy" else None, kind)
                    outputs.append(h)
        # Saved as autograd saves its own: freed after the backward (unless the graph is
        # retained), refused in a second backward, and checked against later in-place
        # changes of the inputs and weights.
        ctx.layers, ctx.numpy_gemm = layers, numpy_gemm
        ctx.num_tensors, ctx.num_inputs = len(tensors), len(inputs)
        ctx.save_for_backward(*tensors, *inputs, *outputs)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """The chain rule through the layers (see the class docstring)."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "Second derivatives through a closure's fused MLP (MLPFunction) are not "
                "supported: its backward is hand-written. Differentiate the model itself "
                "(closure.model) for higher derivatives."
            )
        saved = ctx.saved_tensors
        tensors = saved[: ctx.num_tensors]
        inputs = saved[ctx.num_tensors : ctx.num_tensors + ctx.num_inputs]
        outputs = saved[ctx.num_tensors + ctx.num_inputs :]
        needs = ctx.needs_input_grad[4:]
        needs_x = ctx.needs_input_grad[3]
        gradients: list[torch.Tensor | None] = [None] * len(tensors)
        mm = _numpy_mm if ctx.numpy_gemm else torch.mm
        g = grad
        linear, activation = len(inputs) - 1, len(outputs) - 1
        with torch_threads() if ctx.numpy_gemm else contextlib.nullcontext():
            for layer in reversed(ctx.layers):
                if layer.kind == "linear":
                    if needs[2 * linear]:  # the weight's
                        gradients[2 * linear] = mm(g.t(), inputs[linear])
                    if needs[2 * linear + 1]:  # the bias's (False without one)
                        gradients[2 * linear + 1] = g.sum(0)
                    if linear == 0 and not needs_x:
                        break
                    weight = tensors[2 * linear]
                    g = g * weight if weight.shape[0] == 1 else mm(g, weight)
                    linear -= 1
                else:  # g is this function's own (a linear layer's product): overwritten
                    _backward(layer, g, outputs[activation], g)
                    activation -= 1
        grad_x = g if needs_x else None
        return (None, None, None, grad_x, *gradients)


def _numpy_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by NumPy's BLAS, into a new tensor (CPU, float32/float64)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    np.matmul(_array(a), _array(b), out=_array(out))
    return out


def _tensor(tensor: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    """A module attribute known to be a tensor (for the type checker)."""
    assert isinstance(tensor, torch.Tensor)
    return tensor
