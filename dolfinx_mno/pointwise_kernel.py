"""How a pointwise model is run: values, values with tangent, chunk size, compilation.

A closure evaluates its model on ``(n, num_inputs)`` chunks of points, for values alone or
for values and the per-point tangent ``∂output/∂input`` (Newton's method). This module
decides, once, *how*; :class:`~dolfinx_mno.torch_bridge.PointwiseEvaluator` owns the
buffers and runs the chunk loop.

Tangent modes (all give the same tangent up to round-off; :class:`PointwiseKernel`
measures them on a sample chunk when the tangent is first prepared and keeps the fastest,
see :meth:`PointwiseKernel.prepare_tangent`):

``"reverse"``
    One forward pass with autograd, then **one** backward pass batched over the output
    components (``torch.autograd.grad(..., is_grads_batched=True)``; a plain backward pass
    for a single output). For a pointwise model the gradient of the sum of output ``j``
    over the rows is row ``j`` of every point's Jacobian, so ``num_outputs`` cotangents
    give the whole tangent.
``"reverse-loop"``
    The same with one backward pass per output component (for models whose backward has
    no batching rule).
``"reverse-columns"``
    ``"reverse"`` with the chunk's inputs copied into a column-major buffer (the model gets
    a ``(n, num_inputs)`` view whose columns are contiguous). A formula that slices its
    input, ``u = x[:, :1]``, then runs every elementwise operation and its backward on
    contiguous columns instead of strided ones: for the benchmark's analytic flux
    ``(1 + u²)∇u + u/2`` the tangent took half the time, the transposing copy included.
    A model that needs a contiguous input (``x.view``) fails in this mode, which is then
    not chosen.
``"forward"``
    Forward mode batched over the input components: ``torch.func.vmap`` over
    ``torch.func.jvp`` with the ``num_inputs`` unit directions, values from the same pass.
    Cheaper than reverse mode only when a model has more outputs than inputs.
``"sequential"``
    For a plain MLP (``nn.Sequential`` of ``Linear`` and tanh/sigmoid): the fused pass of
    :mod:`dolfinx_mno.mlp_kernel`, without autograd, into buffers allocated once. Such a
    model's values also run through it when that measures faster than the model's own
    forward (:attr:`PointwiseKernel.values_path`), with torch's or NumPy's tanh and torch's
    or NumPy's BLAS, whichever pair measures fastest (:attr:`PointwiseKernel.tanh_kernel`,
    :attr:`PointwiseKernel.gemm_kernel`).

Without a sample large enough to time (fewer than :data:`MIN_TIMED_POINTS` points) the
rule is: ``"sequential"`` for a plain MLP, else ``"reverse"`` when
``num_outputs <= num_inputs``, else ``"forward"``.

Chunk size (CPU): the model is timed on random inputs at a few chunk sizes
(:data:`CHUNK_CANDIDATES`, and the number of points if smaller) and the size with the
lowest time for all the points is kept (the larger one when two are within 3 %), a
shorter last chunk counting as a full one (a compiled function runs it padded). A model
that is cheap per point (an analytic formula) is dominated by the fixed cost of each call
and runs in a few large chunks; an MLP's activations must stay in cache and it runs in
chunks of a few thousand points. For 10,086 points, say, one chunk of 10,086 is kept
unless two of 8,192 (the second padded) cost less. For a plain MLP, sizes whose buffers
would not fit in the last-level cache per core are not timed
(:meth:`PointwiseKernel.chunk_bound`): alone they can time as fast, but in an update they
run slower.

Compilation (``compile=True``): the value function and the tangent function are passed to
:func:`torch.compile` (inductor; CUDA graphs, ``mode="reduce-overhead"``, on a GPU), for
one fixed chunk shape (the last, shorter chunk is padded). They are compiled when they are
prepared, on a sample chunk, not in an update; the tangent is computed points-last
(:func:`_points_last`). On the CPU each compiled function is timed against the eager
choice on one chunk and kept only if it is no slower (inductor fuses an analytic
formula's values and tangent into one loop, 4-5x faster than eager; it loses to the
fused MLP pass, whose GEMMs are MKL's): :attr:`PointwiseKernel.compile_declined` records
a compiled function that was not kept, and why. If compilation is unavailable or fails
(no C++ compiler, an unsupported Python, an operation torch cannot trace), a
:class:`RuntimeWarning` says why and the model runs eagerly: the results are the same, only
slower. :attr:`PointwiseKernel.compile_error` keeps the reason.
"""

from __future__ import annotations

import functools
import typing
import warnings
from collections.abc import Callable

import torch

from dolfinx_mno._cache import cache_bytes_per_core
from dolfinx_mno._mpi import describe
from dolfinx_mno._timing import best_time, best_times
from dolfinx_mno.mlp_kernel import SequentialMLP

__all__ = [
    "CHUNK_CANDIDATES",
    "MIN_TIMED_POINTS",
    "TANGENT_MODES",
    "PointwiseKernel",
    "tangent_mode_rule",
]

#: Tangent modes, in the order they are tried ("sequential" only for a plain MLP).
TANGENT_MODES = ("reverse", "reverse-loop", "reverse-columns", "forward", "sequential")
#: Chunk sizes (points per model call) timed on the CPU.
CHUNK_CANDIDATES = (2048, 8192, 32768, 131072)
#: Below this many points per rank nothing is timed: one chunk, tangent mode by rule.
MIN_TIMED_POINTS = 4096
#: A candidate chunk whose call takes longer than this is the last one timed (seconds).
_SLOW_CALL = 0.05
#: Candidate chunks whose calls take less than this in all are timed in 3 more rounds.
_CHEAP_CALLS = 0.005
#: The ``torch.compile`` mode of ``compile=True`` on a GPU: ``"reduce-overhead"`` records
#: CUDA graphs; ``"default"`` does not (``benchmarks/gpu_checks.py`` times both).
CUDA_COMPILE_MODE = "reduce-overhead"

ValuesFunction = Callable[[torch.Tensor], torch.Tensor]
#: ``f(x, out) -> (values, has_graph)``: values ``(n, m)``; the tangent is written into
#: ``out``, ``(n, m, num_inputs)``, unless the output carries no autograd graph.
TangentFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, bool]]


def tangent_mode_rule(num_inputs: int, num_outputs: int) -> str:
    """The tangent mode used when nothing is timed: reverse unless outputs outnumber inputs.

    Reverse mode costs one forward and ``num_outputs`` (batched) backward passes, forward
    mode ``num_inputs`` tangent passes beside the forward pass.
    """
    return "reverse" if num_outputs <= num_inputs else "forward"


def _reverse(
    model: torch.nn.Module, num_outputs: int, batched: bool, columns: bool = False
) -> TangentFunction:
    """Values and tangent by reverse-mode autograd (see the module docstring).

    With ``columns`` the model gets its input as a column-major view (``"reverse-columns"``):
    the chunk is copied into a ``(num_inputs, capacity)`` buffer kept between calls.
    """
    buffers: list[torch.Tensor] = []

    def column_major(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        buffer = buffers[0] if buffers else None
        if buffer is None or buffer.shape[1] < n or buffer.dtype != x.dtype:
            with torch.inference_mode(False):
                buffer = torch.empty((x.shape[1], n), dtype=x.dtype, device=x.device)
            buffers[:] = [buffer]
        view = buffer[:, :n]
        view.copy_(x.t())
        return view.t()

    def values_and_tangent(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        n = x.shape[0]
        if columns:
            x = column_major(x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = model(x).reshape(n, num_outputs)
            if not y.requires_grad:
                return y.detach(), False
            options: dict[str, typing.Any] = {"allow_unused": True, "materialize_grads": True}
            if num_outputs == 1:
                (row,) = torch.autograd.grad(y, x, torch.ones_like(y), **options)
                out[:, 0].copy_(row)
            elif batched:
                # Cotangent j is the unit vector e_j at every point: (m, n, m).
                basis = torch.eye(num_outputs, dtype=y.dtype, device=y.device)
                basis = basis.unsqueeze(1).expand(num_outputs, n, num_outputs)
                (rows,) = torch.autograd.grad(y, x, basis, is_grads_batched=True, **options)
                out.copy_(rows.transpose(0, 1))
            else:
                for j in range(num_outputs):
                    (row,) = torch.autograd.grad(
                        y[:, j].sum(), x, retain_graph=j < num_outputs - 1, **options
                    )
                    out[:, j].copy_(row)
        return y.detach(), True

    return values_and_tangent


def _forward_pass(
    model: torch.nn.Module, num_inputs: int, num_outputs: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (values (n, m), tangent (n, m, num_inputs))`` by forward mode, batched."""

    def flat(x: torch.Tensor) -> torch.Tensor:
        return model(x).reshape(x.shape[0], num_outputs)

    def values_and_tangent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        basis = torch.eye(num_inputs, dtype=x.dtype, device=x.device)
        basis = basis.unsqueeze(1).expand(num_inputs, x.shape[0], num_inputs)

        def along(direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return typing.cast(
                tuple[torch.Tensor, torch.Tensor], torch.func.jvp(flat, (x,), (direction,))
            )

        out_dims = typing.cast(tuple[int, ...], (None, 0))  # the values are not batched
        y, columns = torch.func.vmap(along, out_dims=out_dims)(basis)  # (I, n, m)
        return y, columns.permute(1, 2, 0)

    return values_and_tangent


def _reverse_pass(
    model: torch.nn.Module, num_outputs: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (values, tangent)`` by ``torch.func.vjp`` batched over the outputs."""

    def flat(x: torch.Tensor) -> torch.Tensor:
        return model(x).reshape(x.shape[0], num_outputs)

    def values_and_tangent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, pull = torch.func.vjp(flat, x)[:2]
        basis = torch.eye(num_outputs, dtype=y.dtype, device=y.device)
        basis = basis.unsqueeze(1).expand(num_outputs, x.shape[0], num_outputs)
        (rows,) = torch.func.vmap(pull)(basis)
        return y, rows.transpose(0, 1)

    return values_and_tangent


def _writing(
    function: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    points_last: bool = False,
) -> TangentFunction:
    """Adapt ``x -> (values, tangent)`` to a :data:`TangentFunction`.

    With ``points_last`` the function returns its tangent as ``(m, num_inputs, n)`` (see
    :func:`_points_last`), which is written into ``out``, ``(n, m, num_inputs)``.
    """

    def values_and_tangent(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        with torch.no_grad():
            y, tangent = function(x)
        out.copy_(tangent.permute(2, 0, 1) if points_last else tangent)
        return y, True

    return values_and_tangent


def _points_last(
    function: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same function with its tangent laid out ``(m, num_inputs, n)``, points innermost.

    Inductor vectorises a fused kernel along the innermost dimension of its output. Laid
    out ``(n, m, num_inputs)`` that dimension has a handful of entries and the vectors are
    mostly masked; laid out points last it runs over the points: 3-4x faster for a cheap
    formula (measured on an analytic flux: 1.5 ms against 4.7 ms for 131,072 points, the
    transposing copy into the caller's buffer 0.7 ms more).
    """

    def values_and_tangent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, tangent = function(x)
        return y, tangent.permute(1, 2, 0).contiguous()

    return values_and_tangent


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _sample(num_points: int, num_inputs: int, dtype: torch.dtype, device: torch.device):
    """Inputs to time a model on: uniform in [0, 1) (safe for logarithms and roots)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand((num_points, num_inputs), generator=generator, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


class PointwiseKernel:
    """A pointwise model's value function and value-and-tangent function, chosen once.

    Args:
        model: Maps ``(n, num_inputs)`` to ``n`` rows of ``num_outputs`` values; each row
            may depend only on the same input row.
        num_inputs: Input components per point.
        num_outputs: Output components per point.
        device: Device the model runs on.
        dtype: dtype the model runs in (its inputs are cast to it).
        compile: Compile the functions with :func:`torch.compile` (see the module
            docstring for the fallback).

    Attributes:
        tangent_mode: The tangent mode in use (``None`` until :meth:`prepare_tangent`);
            ``"constant"`` for a model whose output carries no autograd graph.
        timings: Seconds measured to make the choices: ``"chunk <n>"`` (values of a chunk
            of ``n`` points), ``"tangent mode <mode>"`` (values and tangent of the sample)
            and ``"tangent chunk <n>"`` (values and tangent in the chosen mode).
        tangent_compiled: Whether the value-and-tangent function in use is compiled.
        compile_error: Why compilation was given up, or ``None``.
        compile_declined: For ``"values"`` and ``"tangent"``: why a compiled function that
            works was not kept (it measured slower than the eager one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_inputs: int,
        num_outputs: int,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
    ):
        self.model = model
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs
        self.device = device
        self.dtype = dtype
        self.compile_requested = bool(compile)
        self.tangent_compiled = False
        self.compile_error: str | None = None
        self.compile_declined: dict[str, str] = {}
        self.tangent_mode: str | None = None
        self.timings: dict[str, float] = {}
        self._values: ValuesFunction = model
        self._tangent: TangentFunction | None = None
        # A plain MLP's fused pass (with compile=True too: the faster of the two is kept).
        self._mlp = SequentialMLP.from_model(model, num_inputs, num_outputs)
        #: ``"model"``, ``"sequential"`` (the fused MLP pass) or ``"compiled"``: what
        #: computes the values.
        self.values_path = "model"

    @property
    def compiled(self) -> bool:
        """Whether the value function in use is compiled (``values_path == "compiled"``)."""
        return self.values_path == "compiled"

    # -- running --------------------------------------------------------------------

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output at ``x``, ``(n, ...)``; call under ``torch.inference_mode``."""
        return self._values(x)

    def differentiable_values(self, x: torch.Tensor) -> torch.Tensor:
        """The model at ``x`` with autograd's graph, for gradients through it.

        The model's own forward, except for a plain MLP whose chosen tanh kernel or GEMM
        kernel is NumPy's (:attr:`tanh_kernel`, :attr:`gemm_kernel`): the same layers with
        those kernels (:meth:`~dolfinx_mno.mlp_kernel.SequentialMLP.differentiable_values`),
        so that rollouts and their gradients run the kernels the updates measured faster.
        Without a graph (``torch.is_grad_enabled()`` false: forward rollouts, the first
        pass of a checkpointed segment) that MLP runs through the updates' buffers
        (:meth:`~dolfinx_mno.mlp_kernel.SequentialMLP.fresh_values`): only its output is
        allocated.
        """
        if self._mlp is not None and "numpy" in (self.tanh_kernel, self.gemm_kernel):
            if not torch.is_grad_enabled():
                return self._mlp.fresh_values(x)
            return self._mlp.differentiable_values(x)
        return self.model(x)

    def values_and_tangent(self, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Values ``(n, num_outputs)`` at ``x``; the tangent is written into ``out``.

        Args:
            x: ``(n, num_inputs)`` inputs in the model's dtype, on its device.
            out: ``(n, num_outputs, num_inputs)``, any dtype the tangent can be cast to.

        Returns:
            The values, and ``False`` if the model's output carries no autograd graph
            (``out`` is then not written: the caller must make sure that the model
            really ignores its inputs).
        """
        if self._tangent is None:
            raise RuntimeError("Call prepare_tangent() before values_and_tangent().")
        return self._tangent(x, out)

    # -- choices --------------------------------------------------------------------

    def choose_chunk_size(self, num_points: int) -> int:
        """Time the model at a few chunk sizes; return the fastest for ``num_points``.

        Only on the CPU and for more than :data:`MIN_TIMED_POINTS` points; otherwise one
        chunk of ``num_points`` (at least 1) on the CPU, 2¹⁸ points on a GPU.
        """

        def run(x: torch.Tensor) -> None:
            with torch.inference_mode():
                self._values(x)

        return self._fastest_chunk(num_points, run, "chunk", self.chunk_bound(False))

    @property
    def tanh_kernel(self) -> str | None:
        """The fused MLP pass's tanh kernel, or ``None`` without one.

        One of :data:`~dolfinx_mno.mlp_kernel.TANH_KERNELS`; ``None`` without a fused pass
        or a tanh layer.
        """
        if self._mlp is None or not self._mlp.has_tanh:
            return None
        return self._mlp.tanh_kernel

    @property
    def gemm_kernel(self) -> str | None:
        """Whose BLAS runs the fused MLP pass's matrix products, or ``None`` without one.

        One of :data:`~dolfinx_mno.mlp_kernel.GEMM_KERNELS`.
        """
        return None if self._mlp is None else self._mlp.gemm_kernel

    def choose_values_path(self, num_points: int) -> str:
        """Use the fused MLP pass for values if it agrees with the model and is not slower.

        Timed on ``min(num_points, 8192)`` random points (not timed below
        :data:`MIN_TIMED_POINTS`: the fused pass allocates nothing, so it is kept). On the
        CPU in float32 or float64 the fused pass is timed with each pair of a tanh kernel
        (:data:`~dolfinx_mno.mlp_kernel.TANH_KERNELS`, with a tanh layer) and a GEMM kernel
        (:data:`~dolfinx_mno.mlp_kernel.GEMM_KERNELS`), each pair checked against the
        model first, and keeps the fastest (:attr:`tanh_kernel`, :attr:`gemm_kernel`; the
        tangent's ``"sequential"`` mode uses them too); untimed, torch's.

        Returns:
            :attr:`values_path`.
        """
        if self._mlp is None or num_points == 0:
            return self.values_path
        mlp = self._mlp
        sample = _sample(min(num_points, 8192), self.num_inputs, self.dtype, self.device)

        def use(kernels: tuple[str, str]) -> None:
            mlp.use_tanh_kernel(kernels[0], self.dtype, self.device)
            mlp.use_gemm_kernel(kernels[1], self.dtype, self.device)

        def fused_with(kernels: tuple[str, str]) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                use(kernels)
                return mlp.values(sample)

            return call

        def name(kernels: tuple[str, str]) -> str:
            tanh, gemm = kernels
            return (
                "values sequential"
                + " numpy tanh" * (tanh == "numpy")
                + (" numpy gemm" * (gemm == "numpy"))
            )

        try:
            with torch.inference_mode():
                reference = self.model(sample).reshape(sample.shape[0], -1)
                scale = float(reference.abs().max()) or 1.0
                tolerance = 1e3 * _eps(self.dtype) * scale
                numpy_ok = mlp.numpy_supported(self.dtype, self.device)
                tanh_kernels = ["torch"] + ["numpy"] * (mlp.has_tanh and numpy_ok)
                gemm_kernels = ["torch"] + ["numpy"] * numpy_ok
                pairs = [(tanh, gemm) for tanh in tanh_kernels for gemm in gemm_kernels]
                agreeing = [
                    pair
                    for pair in pairs
                    if float((fused_with(pair)() - reference).abs().max()) <= tolerance
                ]
                use(("torch", "torch"))
                if ("torch", "torch") not in agreeing:
                    self._mlp = None
                    return self.values_path
                if sample.shape[0] >= MIN_TIMED_POINTS:
                    candidates = {name(pair): fused_with(pair) for pair in agreeing}
                    times = best_times(
                        {"values model": functools.partial(self.model, sample), **candidates},
                        repeats=3,
                    )
                    self.timings.update(times)
                    fastest = min(agreeing, key=lambda pair: times[name(pair)])
                    use(fastest)
                    if times[name(fastest)] > times["values model"]:
                        return self.values_path
        except Exception:  # the generic path then, which reports errors in the update
            self._mlp = None
            return self.values_path
        self._values = mlp.values
        self.values_path = "sequential"
        return self.values_path

    def reserve(self, points: int) -> None:
        """Fix the fused MLP's buffers to chunks of ``points`` points (after the choices)."""
        if self._mlp is not None:
            self._mlp.reserve(points, self.dtype, self.device)

    def choose_tangent_chunk_size(self, num_points: int, chunk: int) -> int:
        """The same for values and tangent in the chosen mode (after :meth:`prepare_tangent`).

        A tangent pass keeps more temporaries per point than a value pass (the autograd
        graph), so its best chunk is often smaller. Compiled functions keep ``chunk``, the
        shape they were compiled for.
        """
        if self._tangent is None or self.tangent_compiled:
            return chunk
        tangent_function = self._tangent
        shape = (self.num_outputs, self.num_inputs)

        def run(x: torch.Tensor) -> None:
            out = torch.empty((x.shape[0], *shape), dtype=self.dtype, device=self.device)
            with torch.no_grad():
                tangent_function(x, out)

        return self._fastest_chunk(num_points, run, "tangent chunk", self.chunk_bound(True))

    def chunk_bound(self, tangent: bool) -> int | None:
        """The most points a timed chunk may hold: a fused MLP's buffers within the cache.

        A plain MLP's activations (and, for the tangent, its cotangents) must fit in the
        last-level cache per core (:func:`~dolfinx_mno._cache.cache_bytes_per_core`);
        larger chunks can time as fast alone but run slower in an update, whose inputs and
        outputs share the cache (measured: a ``3 → 64 → 64 → 1`` float32 MLP at 10⁶ points,
        16 MiB per core, values and tangent 350 ms in chunks of 8,192 against 420 ms in
        chunks of 131,072 that had timed within 3 % per point). ``None`` (no bound) for
        other models or an unknown cache.
        """
        cache = cache_bytes_per_core()
        if self._mlp is None or cache is None:
            return None
        return max(1, cache // self._mlp.bytes_per_point(tangent, self.dtype))

    def _fastest_chunk(
        self,
        num_points: int,
        run: Callable[[torch.Tensor], None],
        label: str,
        bound: int | None = None,
    ) -> int:
        """The candidate chunk size with the lowest time of ``run`` over ``num_points``.

        ``ceil(num_points / size)`` calls of the timed chunk (a shorter last chunk counts as
        a full one: compiled functions pad it); the larger of two within 3 %. Candidates
        above ``bound`` points are not timed (the smallest always is). Each call is the best
        of two; where the candidates' calls take under ``_CHEAP_CALLS`` in all, the best of
        three more rounds, interleaved, too. Timings are recorded as ``"{label} {size}"``.
        """
        if self.device.type != "cpu":
            return 1 << 18
        if num_points <= MIN_TIMED_POINTS:
            return max(1, num_points)
        candidates = sorted({min(size, num_points) for size in CHUNK_CANDIDATES})
        if bound is not None:
            candidates = [size for size in candidates if size <= bound] or candidates[:1]
        seconds: dict[str, float] = {}  # a call, by candidate
        calls: dict[str, Callable[[], object]] = {}
        try:
            for size in candidates:
                x = _sample(size, self.num_inputs, self.dtype, self.device)
                calls[str(size)] = functools.partial(run, x)
                seconds[str(size)] = best_time(calls[str(size)])
                if seconds[str(size)] > _SLOW_CALL:
                    break  # an expensive model: larger chunks only cost cache misses
            if sum(seconds.values()) < _CHEAP_CALLS:
                # Cheap: a few more rounds, interleaved, so that one slow moment of a shared
                # machine does not decide (two calls of a large chunk span a few ms only).
                again = best_times(calls, repeats=3)
                seconds = {key: min(seconds[key], again[key]) for key in seconds}
        except Exception:  # the model fails on random inputs: the update will tell
            return min(num_points, 4096)
        total: dict[int, float] = {}
        for key, call in seconds.items():
            self.timings[f"{label} {key}"] = call
            total[int(key)] = -(-num_points // int(key)) * call
        best = min(total.values())
        return max(size for size, cost in total.items() if cost <= 1.03 * best)

    def prepare_values(self, chunk: int, num_points: int | None = None) -> None:
        """Compile the value function for chunks of ``chunk`` points, if requested.

        The compiled function is kept if it measures no slower than the eager one (the
        model, or the fused MLP pass) on a chunk of random points; not timed, and kept,
        when ``num_points`` (the points per update, default ``chunk``) is below
        :data:`MIN_TIMED_POINTS`. :attr:`compile_declined` says when it is not kept.
        """
        if not self.compile_requested or self.compiled or self.compile_error is not None:
            return
        sample = _sample(chunk, self.num_inputs, self.dtype, self.device)
        compiled = self._compile(self.model, sample, "values", inference=True)
        if compiled is None:
            return

        def seconds_of(function: ValuesFunction) -> float:
            with torch.inference_mode():
                return best_time(functools.partial(function, sample))

        points = chunk if num_points is None else num_points
        eager, seconds = self._values, seconds_of(compiled)
        if self._faster_compiled("values", seconds, seconds_of, eager, chunk, points):
            self._values = compiled
            self.values_path = "compiled"

    def _faster_compiled(
        self,
        what: str,
        compiled_seconds: float,
        seconds_of: Callable[[typing.Any], float],
        eager: typing.Any,
        chunk: int,
        num_points: int,
    ) -> bool:
        """Whether a compiled function is kept: not slower than ``eager`` (timings recorded)."""
        if self.device.type != "cpu" or num_points < MIN_TIMED_POINTS:
            return True  # CUDA graphs remove launch costs that a CPU timing cannot show
        eager_seconds = seconds_of(eager)
        self.timings[f"{what} compiled"] = compiled_seconds
        self.timings[f"{what} eager"] = eager_seconds
        if compiled_seconds <= eager_seconds:
            return True
        self.compile_declined[what] = (
            f"compiled {1e3 * compiled_seconds:.3g} ms, eager {1e3 * eager_seconds:.3g} ms "
            f"for {chunk} points: eager kept"
        )
        return False

    def prepare_tangent(
        self, chunk: int, mode: str | None = None, num_points: int | None = None
    ) -> str:
        """Choose (and compile, if requested) the tangent mode for chunks of ``chunk`` points.

        Every mode runs on the same sample of ``min(chunk, 8192)`` random points; the
        fastest one whose tangent agrees with reverse mode's is kept (below
        :data:`MIN_TIMED_POINTS` points, :func:`tangent_mode_rule`'s choice if it works).
        A model whose output carries no autograd graph gets the mode ``"constant"``.

        Args:
            chunk: Points per call.
            mode: One of :data:`TANGENT_MODES` to use that mode without timing.
            num_points: Points per update (default ``chunk``): below
                :data:`MIN_TIMED_POINTS` a compiled function is kept without timing.

        Returns:
            The tangent mode.
        """
        if mode is not None and mode not in TANGENT_MODES:
            raise ValueError(f"mode must be None or one of {TANGENT_MODES}, got {mode!r}.")
        if self.tangent_mode is not None and mode in (None, self.tangent_mode):
            return self.tangent_mode
        candidates: dict[str, TangentFunction] = {
            "reverse": _reverse(self.model, self.num_outputs, batched=True),
            "reverse-loop": _reverse(self.model, self.num_outputs, batched=False),
            "reverse-columns": _reverse(self.model, self.num_outputs, True, columns=True),
            "forward": _writing(_forward_pass(self.model, self.num_inputs, self.num_outputs)),
        }
        if self._mlp is not None:
            candidates["sequential"] = self._mlp.values_and_tangent
        elif mode == "sequential":
            raise ValueError("The tangent mode 'sequential' needs a plain MLP (nn.Sequential).")
        if self.num_outputs == 1:
            del candidates["reverse-loop"]  # the same single backward pass
        size = min(chunk, 8192)
        sample = _sample(size, self.num_inputs, self.dtype, self.device)
        reference_mode = "reverse-loop" if self.num_outputs > 1 else "reverse"
        shape = (size, self.num_outputs, self.num_inputs)
        tangent = torch.empty(shape, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            _, has_graph = candidates[reference_mode](sample, tangent)
        if not has_graph:
            self._tangent = candidates["reverse"]
            self.tangent_mode = "constant"
            return self.tangent_mode
        timed = candidates
        if mode is not None:
            timed = {mode: candidates[mode] if mode in candidates else candidates["reverse"]}
        elif size < MIN_TIMED_POINTS:  # too small to time: the rule, if it works
            rule = "sequential" if "sequential" in candidates else None
            rule = rule or tangent_mode_rule(self.num_inputs, self.num_outputs)
            timed = {rule: candidates[rule]}
        chosen = self._fastest_tangent(timed, sample, tangent)
        if mode is not None and chosen is None:
            raise ValueError(f"The tangent mode {mode!r} fails for this model.")
        mode = chosen or reference_mode
        self._tangent = candidates[mode] if mode in candidates else candidates["reverse"]
        self.tangent_mode = mode
        if self.compile_requested and self.compile_error is None:
            padded = _sample(chunk, self.num_inputs, self.dtype, self.device)
            function = _points_last(self._compilable_tangent())
            compiled = self._compile(function, padded, "values and tangent")
            if compiled is not None:
                candidate = _writing(compiled, points_last=True)
                out = torch.empty(
                    (chunk, self.num_outputs, self.num_inputs), dtype=self.dtype, device=self.device
                )

                def seconds_of(function: TangentFunction) -> float:
                    with torch.no_grad():
                        return best_time(functools.partial(function, padded, out))

                points = chunk if num_points is None else num_points
                eager, seconds = self._tangent, seconds_of(candidate)
                if self._faster_compiled("tangent", seconds, seconds_of, eager, chunk, points):
                    self._tangent = candidate
                    self.tangent_compiled = True
        return mode

    def _fastest_tangent(
        self,
        candidates: dict[str, TangentFunction],
        sample: torch.Tensor,
        reference: torch.Tensor,
    ) -> str | None:
        """The fastest candidate on ``sample`` whose tangent agrees with ``reference``.

        A candidate that raises, warns (a missing batching rule makes ``vmap`` fall back to
        a slow loop with a warning) or disagrees is skipped; ``None`` if all are.
        """
        scale = float(reference.abs().max()) or 1.0
        tolerance = 1e3 * torch.finfo(reference.dtype).eps * scale
        tangent = torch.empty_like(reference)
        best, shortest = None, float("inf")
        for mode, function in candidates.items():
            try:
                with warnings.catch_warnings():
                    # A missing batching rule falls back to a slow loop with a warning:
                    # treat it as a failure of this mode.
                    warnings.filterwarnings("error", message=".*batching rule")
                    with torch.no_grad():
                        _, has_graph = function(sample, tangent)
                    if not has_graph or float((tangent - reference).abs().max()) > tolerance:
                        continue
                    seconds = (
                        best_time(functools.partial(function, sample, tangent))
                        if len(candidates) > 1
                        else 0.0
                    )
            except Exception:
                continue
            if len(candidates) > 1:
                self.timings[f"tangent mode {mode}"] = seconds
            if seconds < shortest:
                best, shortest = mode, seconds
        return best

    def _compilable_tangent(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Values and tangent in ``torch.func`` form (traceable by ``torch.compile``)."""
        if self.tangent_mode == "forward":
            return _forward_pass(self.model, self.num_inputs, self.num_outputs)
        return _reverse_pass(self.model, self.num_outputs)

    def _compile(
        self,
        function: Callable[..., typing.Any],
        sample: torch.Tensor,
        what: str,
        inference: bool = False,
    ) -> typing.Any:
        """``torch.compile(function)`` after one run on ``sample``; ``None`` if that fails."""
        mode = CUDA_COMPILE_MODE if self.device.type == "cuda" else None
        try:
            compiled = torch.compile(function, dynamic=False, mode=mode)
            context = torch.inference_mode() if inference else torch.no_grad()
            # Past torch's limit of compilations per code object (closures of one model
            # class with other chunk shapes) it would run the function eagerly without a
            # word, and the plan would say "compiled": raise instead, and fall back below.
            with context, torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                compiled(sample)
        except Exception as err:
            self.compile_error = describe(err, first_line=True)
            warnings.warn(
                f"compile=True: torch.compile of the model's {what} failed "
                f"({self.compile_error}); the closure runs the model eagerly (same results, "
                "slower). Pass compile=False to silence this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return compiled
