"""Affine input/output normalisation stored with the model.

Closure models are trained on normalised data; the statistics belong to the model, not to
the script that runs it. :class:`NormalizedModel` keeps them as buffers, so they travel in
the model's ``state_dict``, move with ``.to(device)``, and are differentiated through when
the closure tangent is computed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from dolfinx_mno.torch_bridge import model_dtype

__all__ = ["AffineNormalization", "NormalizedModel"]


def _as_vector(value: float | Sequence[float] | torch.Tensor, width: int) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if tensor.numel() == 1:
        tensor = tensor.expand(width).clone()
    if tensor.numel() != width:
        raise ValueError(f"Expected {width} normalisation values, got {tensor.numel()}.")
    return tensor


class AffineNormalization(torch.nn.Module):
    """The map ``x ↦ (x - shift) / scale`` along one axis (by default the last).

    Component ``i`` of the statistics acts on the slice ``i`` of ``x`` along ``axis``:
    with ``axis=-1`` on ``x[..., i]`` (pointwise samples, shape ``(batch, width)``), with
    ``axis=1`` on ``x[:, i, ...]`` (the channels of fields, shape
    ``(batch, width, *grid)``: the neural-operator layout). The axis is a setting, not a
    buffer: :func:`dolfinx_mno.io.save_model` stores it with the architecture of a
    :class:`NormalizedModel`.

    Args:
        shift: Per-component shift, shape ``(width,)`` or a scalar.
        scale: Per-component scale, shape ``(width,)`` or a scalar; must be non-zero.
        width: Number of components (the length of ``x`` along ``axis``).
        axis: The axis of the components; -1 (the last, the default) or a positive
            axis (``1`` for channels). Axis 0 is the batch axis and is refused.

    Example:
        >>> norm = AffineNormalization(shift=[1.0, 2.0], scale=[2.0, 4.0], width=2)
        >>> norm(torch.tensor([[3.0, 6.0]], dtype=torch.float64))
        tensor([[1., 1.]], dtype=torch.float64)
        >>> fields = torch.tensor([[[3.0, 5.0], [6.0, 10.0]]], dtype=torch.float64)
        >>> AffineNormalization([1.0, 2.0], [2.0, 4.0], width=2, axis=1)(fields)
        tensor([[[1., 2.],
                 [1., 2.]]], dtype=torch.float64)
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        shift: float | Sequence[float] | torch.Tensor = 0.0,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        width: int = 1,
        axis: int = -1,
    ):
        """Store the statistics as buffers; see the class docstring for the arguments."""
        super().__init__()
        if axis != -1 and axis < 1:
            raise ValueError(f"axis must be -1 or positive (0 is the batch axis), got {axis}.")
        shift_vector = _as_vector(shift, width)
        scale_vector = _as_vector(scale, width)
        # A model built on the meta device (to check a file's sizes before allocating,
        # dolfinx_mno.io) has no values to check; the file's statistics replace these.
        if not scale_vector.is_meta and (
            not torch.all(torch.isfinite(scale_vector)) or torch.any(scale_vector == 0)
        ):
            raise ValueError("Normalisation scales must be finite and non-zero.")
        if not shift_vector.is_meta and not torch.all(torch.isfinite(shift_vector)):
            raise ValueError("Normalisation shifts must be finite.")
        self.axis = int(axis)
        self.register_buffer("shift", shift_vector)
        self.register_buffer("scale", scale_vector)

    @classmethod
    def from_data(
        cls, data: torch.Tensor, eps: float = 1e-12, axis: int | None = None
    ) -> AffineNormalization:
        """Mean/standard-deviation normalisation of ``data``.

        Args:
            data: Samples, shape ``(num_samples, ...)``.
            eps: Components whose standard deviation is at most
                ``eps * max(1, max|x|)`` (``max|x|``: the component's largest magnitude)
                get scale 1: a spread below ``eps`` for data of magnitude up to 1, and
                below ``eps`` relative to the magnitude for larger data, is round-off, not
                information to scale up. Components with a single value (``max == min``)
                always get scale 1 and that value as their shift, exactly.
            axis: ``None`` (the default): one mean and standard deviation per component
                of the flattened samples, shape ``(num_samples, width)``, acting on the
                last axis. An axis ``>= 1`` (or -1): one per index along ``axis``, pooled
                over all other axes (samples and grid points), acting on that axis; for
                fields ``(num_samples, channels, *grid)``, ``axis=1`` gives per-channel
                statistics that do not depend on the grid size.

        The standard deviation is the unbiased one (``torch.std``, ``ddof=1``). Its
        round-off grows with the magnitude of the data, not with its spread: the mean of a
        column of ``1e7 / 3`` is off by an ulp, and ``torch.std`` of that column gives
        4.7e-10 (or 0, depending on the number of samples and the width of the array), a
        scale that would blow its round-off up to order one. Hence the rule relative to
        the magnitude, the same for any number of samples and components.
        """
        data = torch.as_tensor(data, dtype=torch.float64)
        if data.ndim == 0 or data.shape[0] == 0:
            shape = tuple(data.shape)
            raise ValueError(f"No samples to take statistics of (data of shape {shape}).")
        if not torch.all(torch.isfinite(data)):
            count = int((~torch.isfinite(data.reshape(data.shape[0], -1))).any(dim=1).sum())
            raise ValueError(
                f"The data hold NaN or Inf in {count} of {data.shape[0]} samples: their mean "
                "and standard deviation would be too."
            )
        if axis is None:
            data = data.reshape(data.shape[0], -1)
            axis = -1
        else:
            if data.ndim < 2 or not (axis == -1 or 1 <= axis < data.ndim):
                raise ValueError(
                    f"axis must be -1 or in [1, {data.ndim}) for data of shape "
                    f"{tuple(data.shape)}, got {axis}."
                )
            data = data.movedim(axis, -1).reshape(-1, data.shape[axis])
        mean, std = data.mean(dim=0), data.std(dim=0)
        lowest, highest = data.min(dim=0).values, data.max(dim=0).values
        single = lowest == highest  # one sample, or a constant component
        magnitude = torch.maximum(lowest.abs(), highest.abs()).clamp(min=1.0)
        constant = single | ~(std > eps * magnitude)
        std = torch.where(constant, torch.ones_like(std), std)
        mean = torch.where(single, lowest, mean)
        return cls(shift=mean, scale=std, width=data.shape[1], axis=axis)

    def _along_axis(self, value: torch.Tensor, ndim: int) -> torch.Tensor:
        """``value``, shape ``(width,)``, shaped to broadcast along ``axis`` of ``ndim`` axes."""
        if self.axis == -1:
            return value
        if ndim <= self.axis:
            raise ValueError(
                f"The normalisation acts on axis {self.axis}, but the tensor has {ndim} axes."
            )
        return value.reshape(-1, *([1] * (ndim - self.axis - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``: shape ``(..., width)``, or ``width`` long along ``axis``."""
        return (x - self._along_axis(self.shift, x.ndim)) / self._along_axis(self.scale, x.ndim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``y`` (the shapes of :meth:`forward`)."""
        return y * self._along_axis(self.scale, y.ndim) + self._along_axis(self.shift, y.ndim)

    def extra_repr(self) -> str:
        """Width and axis, for ``print(model)``."""
        return f"width={self.shift.numel()}, axis={self.axis}"


class NormalizedModel(torch.nn.Module):
    """Wrap a model trained on normalised data: ``y = out⁻¹(model(in(x)))``.

    Two layouts, set by the normalisations' ``axis``:

    * pointwise (``axis=-1``, the default): ``model`` maps ``(batch, num_inputs)`` to
      ``(batch, num_outputs)`` or ``(batch, *value_shape)``; the output statistics act on
      the flattened output, width ``num_outputs``;
    * fields (``axis=1``): ``model`` maps ``(batch, in_channels, *grid)`` to
      ``(batch, out_channels, *grid)`` (a neural operator), and the statistics are per
      channel, so the model runs on any grid.

    Args:
        model: Maps normalised inputs to normalised outputs.
        input_normalization: Normalisation of the inputs (width ``num_inputs`` or
            ``in_channels``).
        output_normalization: Normalisation of the outputs (width ``num_outputs`` or
            ``out_channels``); its inverse is applied to the model's output.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_normalization: AffineNormalization,
        output_normalization: AffineNormalization,
    ):
        """Wrap ``model``; see the class docstring for the arguments."""
        super().__init__()
        # The statistics follow the wrapped model's dtype, so that a float32 model is not
        # handed float64 activations by float64 statistics.
        dtype = model_dtype(model, torch.float64)
        self.model = model
        # Copies: Module.to() casts in place, and the caller's statistics stay theirs.
        self.input_normalization = copy.deepcopy(input_normalization).to(dtype)
        self.output_normalization = copy.deepcopy(output_normalization).to(dtype)
        for which, given, cast in (
            ("input", input_normalization, self.input_normalization),
            ("output", output_normalization, self.output_normalization),
        ):
            kept = [cast.shift, cast.scale]
            if any(t.is_meta for t in kept):
                continue
            if not all(bool(torch.all(torch.isfinite(t))) for t in kept) or bool(
                torch.any(cast.scale == 0)
            ):
                raise ValueError(
                    f"The {which} statistics do not fit the model's dtype {dtype} (shift "
                    f"{given.shift.tolist()}, scale {given.scale.tolist()}: they overflow or "
                    "underflow it). Use a model of a wider dtype, or rescale the data."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate on physical inputs (either layout); returns physical outputs."""
        y = self.model(self.input_normalization(x))
        if self.output_normalization.axis != -1:
            return self.output_normalization.inverse(y)
        # An explicit width: reshape(0, -1) fails on an empty batch (a rank without points).
        flat = y.reshape(y.shape[0], math.prod(y.shape[1:]))
        return self.output_normalization.inverse(flat).reshape(y.shape)
