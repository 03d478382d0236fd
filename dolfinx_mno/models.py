"""Small closure models whose constructor arguments are plain JSON.

A model saved with :func:`dolfinx_mno.io.save_model` is rebuilt from a registry name and
its constructor keyword arguments, so those arguments must survive a JSON round trip.
:class:`MLP` takes only ints, strings and lists and reports them in :attr:`MLP.config`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["ACTIVATIONS", "MLP", "Bounded"]

#: Activation names accepted by :class:`MLP`, with their torch modules. Smooth activations
#: (everything but ``"relu"``) give continuous closure tangents, which Newton's method needs.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "elu": torch.nn.ELU,
    "gelu": torch.nn.GELU,
    "relu": torch.nn.ReLU,
    "sigmoid": torch.nn.Sigmoid,
    "silu": torch.nn.SiLU,
    "softplus": torch.nn.Softplus,
    "tanh": torch.nn.Tanh,
}

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _dtype_name(dtype: str | torch.dtype) -> str:
    """The name of a floating-point dtype (``torch.float64`` → ``"float64"``), checked."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return name


class MLP(torch.nn.Module):
    """A fully connected network for pointwise closures.

    ``x ↦ W_L σ(… σ(W_1 x + b_1) …) + b_L``: linear layers of the given widths with the
    activation ``σ`` between them and none after the last.

    Args:
        in_features: Number of inputs per point (the closure's ``num_inputs``).
        out_features: Number of outputs per point (``prod(value_shape)``).
        hidden_features: Widths of the hidden layers, default ``(64, 64)``; empty for a
            single linear map.
        activation: One of :data:`ACTIVATIONS`, default ``"tanh"``.
        dtype: Dtype of the weights, ``"float32"``, ``"float64"`` (default: closures feed
            float64 solvers and their tangents drive Newton), ``"float16"`` or
            ``"bfloat16"``; a :class:`torch.dtype` is accepted too.
        seed: If given, the weights are initialised from ``torch.manual_seed(seed)``
            without touching the global random state, so the same seed gives the same
            network on every rank; otherwise from the global random state.

    Shapes:
        ``(batch, in_features)`` → ``(batch, out_features)``, in :attr:`dtype`.

    Example:
        >>> model = MLP(3, 2, hidden_features=[16], activation="softplus", seed=0)
        >>> model(torch.zeros(5, 3, dtype=torch.float64)).shape
        torch.Size([5, 2])
        >>> MLP(**model.config).config == model.config
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: Sequence[int] = (64, 64),
        activation: str = "tanh",
        dtype: str | torch.dtype = "float64",
        seed: int | None = None,
    ):
        """Build the network; the arguments are described in the class docstring."""
        super().__init__()
        if isinstance(hidden_features, str | bytes) or not isinstance(hidden_features, Iterable):
            raise TypeError(
                "hidden_features must be a sequence of layer widths, e.g. [64, 64] (or [] "
                f"for none), got {hidden_features!r}."
            )
        hidden = list(hidden_features)
        if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in hidden):
            raise TypeError(f"MLP layer widths must be integers, got {hidden}.")
        widths = [int(in_features), *(int(w) for w in hidden), int(out_features)]
        if any(w < 1 for w in widths):
            raise ValueError(f"MLP layer widths must be positive, got {widths}.")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}."
            )
        dtype_name = _dtype_name(dtype)
        self._config: dict[str, Any] = {
            "in_features": widths[0],
            "out_features": widths[-1],
            "hidden_features": widths[1:-1],
            "activation": activation,
            "dtype": dtype_name,
            "seed": None if seed is None else int(seed),
        }
        layers: list[torch.nn.Module] = []
        # fork_rng restores the caller's random state: seeding here has no side effect.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
                if i > 0:
                    layers.append(ACTIVATIONS[activation]())
                layers.append(torch.nn.Linear(n_in, n_out, dtype=_DTYPES[dtype_name]))
        self.layers = torch.nn.Sequential(*layers)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able): ``MLP(**config)`` rebuilds the net."""
        return {**self._config, "hidden_features": list(self._config["hidden_features"])}

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights at construction."""
        return _DTYPES[self._config["dtype"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate on ``(batch, in_features)`` inputs; returns ``(batch, out_features)``."""
        return self.layers(x)

    def extra_repr(self) -> str:
        """Summarise the configuration in ``repr(model)``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class Bounded(torch.nn.Module):
    """Bound a model's output smoothly: ``y = b tanh(model(x) / b)``, so ``|y| < b``.

    A learned source or flux then cannot take arbitrary values on states outside its
    training data. Outputs well inside the bound are nearly unchanged (``|y|`` below
    ``b / 2`` loses less than 8 %), and the tanh is smooth, so tangents and gradients stay
    continuous. A bound on the values does not bound the solution of an explicit scheme:
    a sustained bounded source can still drive it past its stability limit.

    Wrapped by :func:`dolfinx_mno.training.fit` with ``normalize_targets=True``, the bound
    acts on the *normalised* output: ``bound=5`` keeps every prediction within five
    standard deviations of the training targets' mean.

    Args:
        model: Any model (pointwise or a neural operator); its output is bounded
            elementwise.
        bound: The bound ``b > 0`` (finite).

    Shapes:
        Those of ``model``.

    Example:
        >>> model = Bounded(MLP(2, 1, hidden_features=[8], seed=0), bound=3.0)
        >>> bool(model(1e6 * torch.ones(4, 2, dtype=torch.float64)).abs().max() < 3.0)
        True
    """

    def __init__(self, model: torch.nn.Module, bound: float):
        """Wrap ``model``; see the class docstring for the arguments."""
        super().__init__()
        bound = float(bound)
        if not (math.isfinite(bound) and bound > 0.0):
            raise ValueError(f"Bounded needs a finite bound > 0, got {bound!r}.")
        self.model = model
        self.bound = bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the model and bound its output."""
        return self.bound * torch.tanh(self.model(x) / self.bound)

    def extra_repr(self) -> str:
        """Show the bound in ``repr(model)``."""
        return f"bound={self.bound!r}"
