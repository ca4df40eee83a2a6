"""DINO projection head (shared by the DINO CLS loss and the iBOT patch loss in RedDino).

Parameter names follow DINOv2 / DinoBloom / RedDino teacher checkpoints exactly
(``mlp.{0,2,4}.{weight,bias}``, ``last_layer.weight_g``, ``last_layer.weight_v``) so those heads load
with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Substring that identifies the weight-normalised prototype layer in parameter names. The optimiser
#: code uses it to freeze this layer during the first ``freeze_last_layer_epochs``.
LAST_LAYER_NAME = "last_layer"


def is_last_layer_param(name: str) -> bool:
    """True for parameters of the prototype layer (names as produced by ``named_parameters``)."""
    return LAST_LAYER_NAME in name


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation over output rows: W = g * v / ||v||_row.

    Written out instead of ``torch.nn.utils.weight_norm`` (deprecated) or the parametrisation API
    (different state-dict keys) so checkpoints keep the ``weight_g`` / ``weight_v`` names.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # Same init as the nn.Linear the reference wraps (its head init runs before the layer exists).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight; each row has L2 norm ``weight_g`` (no epsilon, as torch's weight_norm)."""
        row_norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_v * (self.weight_g / row_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """Linear-GELU stack; nlayers=1 is a bare Linear so its keys are ``mlp.weight`` as upstream."""
    if nlayers < 1:
        raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototypes (logits over ``out_dim`` prototypes).

    ``weight_g`` stays trainable: DINOv2/RedDino do not freeze the norm of the prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> None:
        super().__init__()
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (``weight_g`` and ``weight_v``)."""
        return list(self.last_layer.parameters())

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features the prototypes score (the chunked head's input)."""
        x = self.mlp(x)
        # 1e-12 underflows in half precision, hence the larger epsilon there.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def prototypes(self) -> torch.Tensor:
        """The effective prototype matrix [K, bottleneck_dim]: logits = bottleneck(x) @ prototypes().T."""
        return self.last_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
