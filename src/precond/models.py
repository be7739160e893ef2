"""Models used by the demo, the tests and the benchmark harness."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP", "SmallCNN"]


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
