"""Benchmark problems: a model, the shape of one input, and the number of classes.

Inputs are synthetic (standard normal images or vectors, uniform labels): timing and memory
depend on shapes only, and nothing is downloaded. The full-size problems are those of the ASDL
study (MLPs on MNIST, ResNet-18 / WRN-28-10 / ViT-Tiny / MLP-Mixer on CIFAR-10); each has a
``*_small`` variant that a CPU runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..validation import invalid

__all__ = ["PROBLEMS", "Problem", "get_problem", "make_batch"]


@dataclass(frozen=True)
class Problem:
    """A model and the shape of its data.

    Attributes:
        name: Registry name (``"mlp512"``).
        model_fn: Builds the model (seeded by the caller).
        input_shape: Shape of one example.
        num_classes: Classes of the cross-entropy loss.
        description: One line for tables and figures.
        options: Method options this model needs (merged under the user's options).
    """

    name: str
    model_fn: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    options: dict[str, Any] = field(default_factory=dict)

    def batch(
        self, batch_size: int, device: torch.device | str = "cpu", seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A synthetic batch ``(x, t)`` of this problem.

        Args:
            batch_size: Examples.
            device: Device of the tensors.
            seed: Seed of the generator.

        Returns:
            Inputs ``[B, *input_shape]`` and integer labels ``[B]``.
        """
        return make_batch(self.input_shape, self.num_classes, batch_size, device, seed)


def make_batch(
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Standard normal inputs and uniform labels.

    Args:
        input_shape: Shape of one example.
        num_classes: Label range.
        batch_size: Examples.
        device: Device.
        seed: Seed.

    Returns:
        ``(x, t)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=g)
    t = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), t.to(device)


_CIFAR = (3, 32, 32)

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            "mlp_tiny",
            lambda: models.MLP(64, [32], 10),
            (64,),
            10,
            "MLP 64-32-10 (smoke tests)",
        ),
        Problem(
            "mlp_small",
            lambda: models.MLP(64, [32, 32], 10),
            (64,),
            10,
            "MLP 64-32-32-10 (3.5k parameters: dense-curvature methods)",
        ),
        Problem(
            "mlp128", lambda: models.MLP(784, [128, 128], 10), (784,), 10, "MLP 784-128-128-10"
        ),
        Problem(
            "mlp512", lambda: models.MLP(784, [512, 512], 10), (784,), 10, "MLP 784-512-512-10"
        ),
        Problem(
            "mlp2048", lambda: models.MLP(784, [2048, 2048], 10), (784,), 10, "MLP 784-2048-2048-10"
        ),
        Problem(
            "cnn_small",
            lambda: models.SmallCNN(3, 10, 16, 32),
            _CIFAR,
            10,
            "small CNN (conv 16, conv 32, linear) on 32×32",
        ),
        Problem("resnet18", lambda: models.resnet18(64), _CIFAR, 10, "ResNet-18 (CIFAR) 32×32"),
        Problem(
            "resnet18_small",
            lambda: models.resnet18(16),
            _CIFAR,
            10,
            "ResNet-18 width 16 on 32×32",
        ),
        Problem(
            "wrn28_10", lambda: models.wide_resnet(28, 10), _CIFAR, 10, "WideResNet-28-10 on 32×32"
        ),
        Problem(
            "wrn16_2_small",
            lambda: models.wide_resnet(16, 2),
            _CIFAR,
            10,
            "WideResNet-16-2 on 32×32",
        ),
        Problem(
            "vit_tiny",
            lambda: models.ViT(32, 4, 192, 12, 3, 768),
            _CIFAR,
            10,
            "ViT-Tiny (patch 4, dim 192, depth 12) on 32×32",
        ),
        Problem(
            "vit_small",
            lambda: models.ViT(32, 8, 64, 4, 2, 128),
            _CIFAR,
            10,
            "ViT (patch 8, dim 64, depth 4) on 32×32",
        ),
        Problem(
            "mixer",
            lambda: models.MLPMixer(32, 4, 256, 8, 128, 1024),
            _CIFAR,
            10,
            "MLP-Mixer (patch 4, dim 256, depth 8) on 32×32",
        ),
        Problem(
            "mixer_small",
            lambda: models.MLPMixer(32, 8, 64, 4, 32, 128),
            _CIFAR,
            10,
            "MLP-Mixer (patch 8, dim 64, depth 4) on 32×32",
        ),
    ]
}


def get_problem(name: str) -> Problem:
    """The problem registered as ``name``.

    Args:
        name: A key of :data:`PROBLEMS`.

    Returns:
        The problem.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in PROBLEMS:
        raise invalid("model", name, f"Known: {tuple(PROBLEMS)}")
    return PROBLEMS[name]
