"""neuraloperator's own forward in float64 throughout: the reference of the distributed tests."""

from __future__ import annotations

import contextlib
import typing

import torch


@contextlib.contextmanager
def widened_spectral_buffer() -> typing.Iterator[None]:
    """neuraloperator's own forward, its complex64 spectral buffer in complex128.

    neuraloperator 2.0's ``SpectralConv.forward`` allocates its output modes with
    ``torch.zeros(..., dtype=torch.cfloat)`` whatever the input dtype; widening that one
    allocation gives its forward in float64 throughout, the reference at 1e-12.
    """
    zeros = torch.zeros

    def wide_zeros(*args: typing.Any, **kwargs: typing.Any) -> torch.Tensor:
        if kwargs.get("dtype") is torch.cfloat:
            kwargs["dtype"] = torch.cdouble
        return zeros(*args, **kwargs)

    torch.zeros = wide_zeros  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.zeros = zeros  # type: ignore[assignment]
