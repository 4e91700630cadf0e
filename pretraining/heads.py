"""Heads on the nnU-Net encoder for the embedding methods (SimCLR, PCL, DINO), and the embedding they read.

The paper's ``EncoderMLP2d``/``MultiCropWrapper`` global-average-pool the deepest encoder feature map. That works
with its BatchNorm U-Net, but nnU-Net's networks normalise per instance (InstanceNorm): every channel of every
feature map has zero mean and unit variance within each image, so a global average after the nonlinearity hardly
depends on the image, and linear layers on top cannot undo that. Contrastive losses on it stall at their chance
value (measured in tests/test_ssp_methods.py). The embedding is therefore the deepest map average-pooled to a
``grid`` x ``grid`` grid (default 2) and flattened; ``grid=1`` is the paper's global average pooling.
"""

import torch
from torch import nn
from torch.nn import functional as F


def encoder_embedding(network: nn.Module, x: torch.Tensor, grid: int = 2) -> torch.Tensor:
    """(B, C_deepest * grid^2): the deepest encoder feature map of an nnU-Net network, average-pooled to a grid."""
    features = network.encoder(x)
    deepest = features[-1] if isinstance(features, (list, tuple)) else features
    pool = F.adaptive_avg_pool2d if deepest.dim() == 4 else F.adaptive_avg_pool3d
    return pool(deepest, grid).flatten(1)


def encoder_width(network: nn.Module) -> int:
    """Channels of the deepest encoder stage (512 for the paper's 256-px U-Net)."""
    return int(network.encoder.output_channels[-1])


class ProjectionMLP(nn.Module):
    """SimCLR/PCL projection (de Mooij et al. 2024): Linear-ReLU-Linear-ReLU-Linear, no normalisation layers.

    The paper's 512-512-512 head on a 512-channel encoder; here every width equals the encoder's deepest width."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class NormalizedLinear(nn.Module):
    """A bias-free linear layer whose weight rows are L2-normalised: weight normalisation with the gain fixed at 1
    (DINO's ``norm_last_layer=True``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021) as the paper uses it with a CNN: Linear-BN-GELU-Linear-BN-GELU-Linear
    to a bottleneck, L2 normalisation, then a weight-normalised linear layer to ``out_features`` prototypes."""

    def __init__(self, in_features: int, hidden: int = 2048, bottleneck: int = 256, out_features: int = 8192):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = NormalizedLinear(bottleneck, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class EncoderWithHead(nn.Module):
    """The plans' network (``.network``; only its encoder runs) followed by ``head`` on the grid-pooled deepest
    features."""

    def __init__(self, network: nn.Module, head: nn.Module, grid: int):
        super().__init__()
        self.network, self.head, self.grid = network, head, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encoder_embedding(self.network, x, self.grid))
