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


class OutlierMLP(nn.Module):
    """Two linear layers where one hidden feature is a hundred times larger than the others and the
    output does not use it: per-token int8 activation scales then round every other feature to zero,
    so int8 dynamic quantization destroys it while weight-only int8 does not (a model for accuracy gates)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        with torch.no_grad():
            self.fc1.weight[0].fill_(100.0)
            self.fc2.weight[:, 0].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def outlier_mlp(width: int = 64, seed: int = 0) -> OutlierMLP:
    torch.manual_seed(seed)
    return OutlierMLP(width).eval()


class TokenTagger(nn.Module):
    """Called with keywords as a Hugging Face model is (``input_ids=..., attention_mask=...``), and
    answers a dict (``logits`` per token, ``pooled`` per row): a model for serving named inputs."""

    def __init__(self, vocab: int = 100, dim: int = 16, tags: int = 5) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, tags)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = hidden.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
        return {"logits": self.head(hidden), "pooled": pooled}


def token_tagger(vocab: int = 100, dim: int = 16, tags: int = 5, seed: int = 0) -> TokenTagger:
    torch.manual_seed(seed)
    return TokenTagger(vocab, dim, tags).eval()


class BatchCentred(nn.Module):
    """Subtracts the mean over the batch axis: each row's output depends on the other rows, so its
    requests must never be batched together (a model the deploy's row check refuses)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y - y.mean(0, keepdim=True)


def batch_centred(width: int = 16, seed: int = 0) -> BatchCentred:
    torch.manual_seed(seed)
    return BatchCentred(width).eval()


class HalfLinear(nn.Module):
    """Takes and gives float16 (computed in float32): a model for serving half-precision tensors."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.float()).half()


def half_linear(width: int = 16, seed: int = 0) -> HalfLinear:
    torch.manual_seed(seed)
    return HalfLinear(width).eval()


def image_sample(batch: int, size: int = 32, seed: int = 0) -> Sample:
    return Sample.of(torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def token_sample(batch: int, length: int = 64, vocab: int = 1000, seed: int = 0) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    return Sample.of(torch.randint(0, vocab, (batch, length), generator=gen))


class Bottleneck(nn.Module):
    """A ResNet bottleneck block: 1x1 down, 3x3, 1x1 up, with a projection when shapes change."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet50Like(nn.Module):
    """The ResNet-50 layout (3, 4, 6, 3 bottlenecks; 25.6 M parameters) with random weights."""

    def __init__(self, classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for stage, count in enumerate(layers):
            width = 64 * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class BertLike(nn.Module):
    """The BERT-base layout (12 post-norm layers, 768 wide, 12 heads, GELU) returning hidden states."""

    def __init__(self, vocab: int = 30522, dim: int = 768, heads: int = 12, layers: int = 12, max_len: int = 512) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.encoder(self.norm(self.tokens(input_ids) + self.positions(positions)))


def resnet50(seed: int = 0) -> ResNet50Like:
    torch.manual_seed(seed)
    return ResNet50Like().eval()


def bert_base(seed: int = 0) -> BertLike:
    torch.manual_seed(seed)
    return BertLike().eval()


def vector_batches(model: str, batch_size: int, width: int = 64, count: int = 4) -> list[torch.Tensor]:
    """Evaluation batches for a task gate (``accuracy.task.samples``): ``count`` seeded batches of
    ``width``-wide vectors, the same for every model that takes them."""
    gen = torch.Generator().manual_seed(1234 + batch_size)
    return [torch.randn(batch_size, width, generator=gen) for _ in range(count)]
