"""Small example models with random weights (no downloads): a CNN, a transformer encoder, an MLP."""

from __future__ import annotations

import torch
from torch import nn

from aitune.specs import Sample


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class SmallEncoder(nn.Module):
    """Token ids -> pooled features, through a few ``TransformerEncoderLayer``s."""

    def __init__(self, vocab: int = 1000, dim: int = 128, heads: int = 4, layers: int = 2, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.norm(self.encoder(x)).mean(dim=1)


class MLP(nn.Module):
    def __init__(self, width: int = 512, depth: int = 12) -> None:
        super().__init__()
        blocks = []
        for _ in range(depth):
            blocks += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def small_cnn(channels: int = 32, classes: int = 10, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(channels, classes).eval()


def small_encoder(vocab: int = 1000, dim: int = 128, heads: int = 4, layers: int = 2, seed: int = 0) -> SmallEncoder:
    torch.manual_seed(seed)
    return SmallEncoder(vocab, dim, heads, layers).eval()


def mlp(width: int = 512, depth: int = 12, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(width, depth).eval()


def image_sample(batch: int, size: int = 32, seed: int = 0) -> Sample:
    return Sample.of(torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def token_sample(batch: int, length: int = 64, vocab: int = 1000, seed: int = 0) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    return Sample.of(torch.randint(0, vocab, (batch, length), generator=gen))
