"""A small, complete training loop around any registered gradient maker.

Used by ``precond demo`` (and the coming ``precond train`` study command): it shows the
training-loop interface in use and records what a comparison table needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset
from .registry import make_gradient_maker

__all__ = ["RunResult", "train_classifier", "evaluate_accuracy"]


@dataclass
class RunResult:
    """The outcome of one training run.

    Attributes:
        method: Registry name.
        train_loss: Mean training loss of each epoch.
        test_accuracy: Test accuracy after each epoch.
        seconds: Wall-clock training time (excluding evaluation).
        steps: Optimizer steps taken.
        diverged: Whether the loss became non-finite (training stopped).
    """

    method: str
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    diverged: bool = False

    @property
    def ms_per_step(self) -> float:
        """Mean wall-clock milliseconds per step."""
        return 1000.0 * self.seconds / max(self.steps, 1)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``.

    Args:
        model: The model.
        x: Inputs.
        y: Integer labels.
        batch_size: Evaluation batch size.

    Returns:
        Accuracy in [0, 1].
    """
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def train_classifier(
    method: str,
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train ``model`` with SGD on gradients produced by the gradient maker ``method``.

    Args:
        method: Registry name (``"plain"``, ``"kfac"``, ...).
        model: The model (trained in place).
        data: Dataset with integer labels.
        epochs: Passes over the training set.
        batch_size: Mini-batch size.
        lr: SGD learning rate.
        momentum: SGD momentum.
        options: Config options of the method.
        seed: Seed of the batch order.
        on_step: Called after each step with ``(step, loss)``.

    Returns:
        The :class:`RunResult`.
    """
    gm = make_gradient_maker(method, model, **(options or {}))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    result = RunResult(method)
    n = len(data.y_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        losses: list[Tensor] = []
        start = time.perf_counter()
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            x, t = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            _, loss = gm.forward_and_backward()
            opt.step()
            losses.append(loss.detach())
            result.steps += 1
            if on_step is not None:
                on_step(result.steps, float(loss.detach()))
        result.seconds += time.perf_counter() - start
        epoch_loss = float(torch.stack(losses).mean())
        result.train_loss.append(epoch_loss)
        result.test_accuracy.append(evaluate_accuracy(model, data.x_test, data.y_test))
        if not torch.isfinite(torch.tensor(epoch_loss)):
            result.diverged = True
            break
    return result
