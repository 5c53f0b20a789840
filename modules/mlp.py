"""Multi-layer perceptrons with the activations used by DIN-style CTR models."""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch
from torch import nn


class Activation(str, enum.Enum):
    """Hidden-layer activation of an :class:`MLP` (a YAML value: ``relu``, ``prelu`` or ``dice``)."""

    relu = "relu"
    prelu = "prelu"  # one learnable slope per unit (He et al. 2015)
    dice = "dice"  # data-adaptive PReLU (Zhou et al. 2018, DIN, Eq. 9)


class PReLU(nn.Module):
    """Parametric ReLU with one learnable slope per unit of the LAST dim (``nn.PReLU`` uses dim 1)."""

    def __init__(self, num_features: int, init: float = 0.25, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.init = init
        self.alpha = nn.Parameter(torch.empty(num_features, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialises the slopes (called by DMP after materialising a ``meta`` model)."""
        nn.init.constant_(self.alpha, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies PReLU to ``[..., D]``."""
        return torch.where(x >= 0, x, self.alpha * x)


class Dice(nn.Module):
    """Dice activation (Zhou et al. 2018, Deep Interest Network, Sec. 4.3, Eq. 9).

    ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``;
    ``E`` and ``Var`` are batch statistics in training and running averages in evaluation (a BatchNorm
    without affine parameters). The statistics run over every row passed in, padding rows included.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, eps=eps, affine=False, device=device)
        self.alpha = nn.Parameter(torch.empty(num_features, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialises alpha and the running statistics (DMP zero-fills buffers of a ``meta`` model)."""
        nn.init.zeros_(self.alpha)
        self.norm.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies Dice to ``[..., D]`` (any number of leading dims)."""
        flat = x.reshape(-1, x.size(-1))  # [*, D]
        p = torch.sigmoid(self.norm(flat)).reshape(x.shape)  # [..., D]
        return p * x + (1.0 - p) * self.alpha * x


def _activation(kind: Activation, width: int, device: Optional[torch.device]) -> nn.Module:
    factories = {
        Activation.relu: lambda: nn.ReLU(),
        Activation.prelu: lambda: PReLU(width, device=device),
        Activation.dice: lambda: Dice(width, device=device),
    }
    return factories[Activation(kind)]()


class MLP(nn.Module):
    """A stack of ``Linear -> activation -> dropout`` hidden layers, optionally followed by a plain Linear.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers (may be empty).
        out_features: width of a final Linear without activation or dropout (None: no such layer).
        activation: hidden-layer activation.
        dropout: dropout probability after each hidden activation (0 disables it).
        device: where the parameters are created (``meta`` allowed).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: Optional[int] = None,
        activation: Activation = Activation.relu,
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, device=device))
            layers.append(_activation(activation, h, device))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_features is not None:
            layers.append(nn.Linear(width, out_features, device=device))
            width = out_features
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[..., in_features]`` to ``[..., out_features]``."""
        return self.layers(x)

    def first_blocks(self, widths: Sequence[int]) -> list[torch.Tensor]:
        """The first Linear's weight split by input columns: one ``[out, w]`` block per width, in order.

        For a caller that computes the first layer as a sum of products instead of over a concatenation,
        ``W [x_1, ..., x_k] + b = sum_j W_j x_j + b`` (then :meth:`after_first`).
        """
        first = self.layers[0]
        if not isinstance(first, nn.Linear) or sum(widths) != first.in_features:
            raise ValueError(f"widths {list(widths)} do not split the first layer {first}")
        return list(torch.split(first.weight, list(widths), dim=1))

    def after_first(self, h: torch.Tensor) -> torch.Tensor:
        """The layers after the first Linear, applied to its output ``h`` (bias included). A ReLU right after
        it runs in place on ``h`` (which then must not be read again; autograd allows it: the product before
        does not keep its output)."""
        rest = self.layers[1:]
        if len(rest) and isinstance(rest[0], nn.ReLU):
            return rest[1:](torch.relu_(h))
        return rest(h)
