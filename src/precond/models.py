"""Models used by the demo, the tests and the benchmark harness.

The architectures of the ASDL study (Osawa et al. 2023) for 32×32 images and MNIST-sized
vectors, each built only from layers that precond's capture adapters support (``Linear``,
``Conv2d``, ``BatchNorm``, ``LayerNorm``, ``Embedding``), so every Fisher-type method runs on
them without ``unsupported=`` options:

* :class:`MLP`: fully connected (MNIST: ``784 → w → w → 10``).
* :class:`SmallCNN`: two conv blocks and a linear head (the CPU benchmark's CNN).
* :class:`ResNet`: CIFAR-style ResNet-18 (3×3 stem, no max-pool), :func:`resnet18`.
* :class:`WideResNet`: pre-activation WRN-d-k (Zagoruyko & Komodakis 2016), :func:`wide_resnet`.
* :class:`ViT`: vision transformer with ``nn.Linear`` attention (no ``nn.MultiheadAttention``,
  whose packed ``in_proj_weight`` has no adapter), learned position embeddings as an
  ``nn.Embedding`` over patch indices and mean pooling instead of a class token, so no raw
  ``nn.Parameter`` is left outside a module with an adapter.
* :class:`MLPMixer`: MLP-Mixer (Tolstikhin et al. 2021); token mixing is an ``nn.Linear``
  applied to the transposed patch matrix (the channels are weight-sharing positions).

Every constructor takes a width so the benchmark problems can build small CPU variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MLPMixer",
    "ResNet",
    "SmallCNN",
    "ViT",
    "WideResNet",
    "resnet18",
    "wide_resnet",
]


class MLP(nn.Sequential):
    """Fully connected network ``in → widths... → out`` with ReLU between layers.

    Args:
        in_features: Input width (inputs are flattened).
        widths: Hidden widths.
        out_features: Output width.
        activation: Activation module class.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        out_features: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, w), activation()]
            prev = w
        layers.append(nn.Linear(prev, out_features))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head (the "small CNN" of the CPU benchmarks).

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        width: Channels of the first conv layer (the second has twice as many).
        image_size: Input height/width.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width: int = 16, image_size: int = 32
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.features(x).flatten(1))


# ---- ResNet ---------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with basic blocks (3×3 stem, no max-pool).

    Args:
        blocks: Blocks per stage (``(2, 2, 2, 2)`` is ResNet-18).
        width: Channels of the first stage (64 for ResNet-18; stages double it).
        num_classes: Output classes.
        in_channels: Input channels.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def resnet18(width: int = 64, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18 (``width=64``; smaller widths for CPU runs).

    Args:
        width: Channels of the first stage.
        num_classes: Output classes.

    Returns:
        The model.
    """
    return ResNet((2, 2, 2, 2), width, num_classes)


# ---- WideResNet -----------------------------------------------------------------------------
class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return out + skip


class WideResNet(nn.Module):
    """Pre-activation WideResNet WRN-``depth``-``widen``.

    Args:
        depth: Total depth, ``6n + 4`` (28 gives 4 blocks per stage).
        widen: Widening factor ``k`` (stage widths ``16k, 32k, 64k``).
        num_classes: Output classes.
        base: Channels of the stem (16 in the paper).
        in_channels: Input channels.

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 4``.
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        num_classes: int = 10,
        base: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Invalid depth: {depth}. Must be 6n + 4 with n >= 1 (10, 16, 28).")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = base
        for i in range(3):
            cout = base * widen * 2**i
            for j in range(n):
                blocks.append(_WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(out.mean(dim=(2, 3)))


def wide_resnet(
    depth: int = 28, widen: int = 10, num_classes: int = 10, base: int = 16
) -> WideResNet:
    """WRN-``depth``-``widen`` for 32×32 images.

    Args:
        depth: ``6n + 4``.
        widen: Widening factor.
        num_classes: Output classes.
        base: Stem channels.

    Returns:
        The model.
    """
    return WideResNet(depth, widen, num_classes, base)


# ---- ViT ------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Invalid heads: {heads}. Must divide dim={dim}.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class _PatchEmbed(nn.Module):
    """Patches by a strided convolution plus learned position embeddings (an ``Embedding``)."""

    def __init__(self, in_channels: int, dim: int, patch: int, image_size: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"Invalid patch: {patch}. Must divide image_size={image_size}.")
        self.num_patches = (image_size // patch) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Embedding(self.num_patches, dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        idx = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)
        return tokens + self.pos(idx)


class ViT(nn.Module):
    """Vision transformer for small images (ViT-Tiny: ``dim=192, depth=12, heads=3``).

    Args:
        image_size: Input height/width.
        patch: Patch size.
        dim: Token width.
        depth: Transformer blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of each block's MLP.
        num_classes: Output classes.
        in_channels: Input channels.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_dim: int = 768,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.embed = _PatchEmbed(in_channels, dim, patch, image_size)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


# ---- MLP-Mixer ------------------------------------------------------------------------------
class _MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_dim: int, channel_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_dim)
        self.token_fc2 = nn.Linear(token_dim, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_dim)
        self.channel_fc2 = nn.Linear(channel_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x).transpose(1, 2)  # [B, dim, tokens]: mixes across tokens
        x = x + self.token_fc2(nn.functional.gelu(self.token_fc1(y))).transpose(1, 2)
        return x + self.channel_fc2(nn.functional.gelu(self.channel_fc1(self.norm2(x))))


class MLPMixer(nn.Module):
    """MLP-Mixer for small images.

    Args:
        image_size: Input height/width.
        patch: Patch size.
        dim: Channels per token.
        depth: Mixer blocks.
        token_dim: Hidden width of the token-mixing MLP.
        channel_dim: Hidden width of the channel-mixing MLP.
        num_classes: Output classes.
        in_channels: Input channels.

    Raises:
        ValueError: If ``patch`` does not divide ``image_size``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 256,
        depth: int = 8,
        token_dim: int = 128,
        channel_dim: int = 1024,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"Invalid patch: {patch}. Must divide image_size={image_size}.")
        tokens = (image_size // patch) ** 2
        self.stem = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[_MixerBlock(tokens, dim, token_dim, channel_dim) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))
