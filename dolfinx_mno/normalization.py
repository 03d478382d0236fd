"""Affine input/output normalisation stored with the model.

Closure models are trained on normalised data; the statistics belong to the model, not to
the script that runs it. :class:`NormalizedModel` keeps them as buffers, so they travel in
the model's ``state_dict``, move with ``.to(device)``, and are differentiated through when
the closure tangent is computed.
"""

from __future__ import annotations

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
    """The map ``x ↦ (x - shift) / scale`` over the last dimension.

    Args:
        shift: Per-component shift, shape ``(width,)`` or a scalar.
        scale: Per-component scale, shape ``(width,)`` or a scalar; must be non-zero.
        width: Number of components of the last dimension.

    Example:
        >>> norm = AffineNormalization(shift=[1.0, 2.0], scale=[2.0, 4.0], width=2)
        >>> norm(torch.tensor([[3.0, 6.0]], dtype=torch.float64))
        tensor([[1., 1.]], dtype=torch.float64)
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        shift: float | Sequence[float] | torch.Tensor = 0.0,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        width: int = 1,
    ):
        super().__init__()
        shift_vector = _as_vector(shift, width)
        scale_vector = _as_vector(scale, width)
        if not torch.all(torch.isfinite(scale_vector)) or torch.any(scale_vector == 0):
            raise ValueError("Normalisation scales must be finite and non-zero.")
        self.register_buffer("shift", shift_vector)
        self.register_buffer("scale", scale_vector)

    @classmethod
    def from_data(cls, data: torch.Tensor, eps: float = 1e-12) -> AffineNormalization:
        """Mean/standard-deviation normalisation of ``data``, shape ``(num_samples, width)``.

        Components with a standard deviation below ``eps`` get scale 1.
        """
        data = torch.as_tensor(data, dtype=torch.float64).reshape(data.shape[0], -1)
        std = data.std(dim=0)
        std = torch.where(std > eps, std, torch.ones_like(std))
        return cls(shift=data.mean(dim=0), scale=std, width=data.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``, shape ``(..., width)``."""
        return (x - self.shift) / self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``y``, shape ``(..., width)``."""
        return y * self.scale + self.shift


class NormalizedModel(torch.nn.Module):
    """Wrap a model trained on normalised data: ``y = out⁻¹(model(in(x)))``.

    Args:
        model: Maps normalised ``(batch, num_inputs)`` inputs to normalised
            ``(batch, num_outputs)`` outputs.
        input_normalization: Normalisation of the inputs (width ``num_inputs``).
        output_normalization: Normalisation of the outputs (width ``num_outputs``); its
            inverse is applied to the model's output.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_normalization: AffineNormalization,
        output_normalization: AffineNormalization,
    ):
        super().__init__()
        # The statistics follow the wrapped model's dtype, so that a float32 model is not
        # handed float64 activations by float64 statistics.
        dtype = model_dtype(model, torch.float64)
        self.model = model
        self.input_normalization = input_normalization.to(dtype)
        self.output_normalization = output_normalization.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate on ``(batch, num_inputs)`` physical inputs; returns physical outputs."""
        y = self.model(self.input_normalization(x))
        return self.output_normalization.inverse(y.reshape(y.shape[0], -1)).reshape(y.shape)
