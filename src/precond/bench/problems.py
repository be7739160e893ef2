"""Benchmark problems: a model, the shape of one input, and the number of classes.

Inputs are synthetic (standard normal images or vectors, uniform labels): timing and memory
depend on shapes only, and nothing is downloaded. The full-size problems are those of the ASDL
study (MLPs on MNIST, ResNet-18 / WRN-28-10 / ViT-Tiny / MLP-Mixer on CIFAR-10); each has a
``*_small`` variant that a CPU runs in seconds.

Your own model: name it as ``MODULE:ATTRIBUTE`` (an importable module) or
``FILE.py:ATTRIBUTE`` wherever a problem name is accepted (``precond bench --models``). The
attribute is a :class:`Problem` or a function without arguments that returns one; every worker
process loads it again from the same name (relative file paths and modules resolve against the
working directory, which the workers share).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..validation import invalid

__all__ = ["PROBLEMS", "Problem", "describe", "get_problem", "load_problem", "make_batch"]


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
        inputs: Builds ``batch_size`` inputs from a seeded CPU generator, for inputs that are
            not standard normal floats of ``input_shape`` (token ids, say); ``None`` for those.
            The model's output must be ``[B, num_classes]`` logits (cross-entropy loss).
    """

    name: str
    model_fn: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    inputs: Callable[[int, torch.Generator], Tensor] | None = None

    def __post_init__(self) -> None:
        if not callable(self.model_fn):
            raise invalid("model_fn", self.model_fn, "Use a function without arguments")
        shape = tuple(self.input_shape)
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise invalid("input_shape", self.input_shape, "Use a tuple of positive integers")
        object.__setattr__(self, "input_shape", shape)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise invalid("num_classes", self.num_classes, "Use an integer of at least 2")
        if self.num_classes < 2:
            raise invalid("num_classes", self.num_classes, "Use an integer of at least 2")
        if self.inputs is not None and not callable(self.inputs):
            raise invalid("inputs", self.inputs, "Use a function (batch_size, generator) or None")

    def batch(
        self, batch_size: int, device: torch.device | str = "cpu", seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A synthetic batch ``(x, t)`` of this problem.

        Args:
            batch_size: Examples.
            device: Device of the tensors.
            seed: Seed of the generator.

        Returns:
            Inputs ``[B, *input_shape]`` (or what :attr:`inputs` builds) and integer labels
            ``[B]``.
        """
        if self.inputs is None:
            return make_batch(self.input_shape, self.num_classes, batch_size, device, seed)
        g = torch.Generator().manual_seed(seed)
        x = self.inputs(batch_size, g)
        if not isinstance(x, Tensor) or x.shape[:1] != (batch_size,):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise invalid(
                "inputs", got, f"Problem {self.name!r}: return a tensor of {batch_size} examples"
            )
        t = torch.randint(0, self.num_classes, (batch_size,), generator=g)
        return x.to(device), t.to(device)


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
    problem = PROBLEMS.get(name)
    if problem is not None:
        return problem
    if ":" not in name:
        raise invalid("model", name, f"Known: {tuple(PROBLEMS)}, or {_OWN}")
    return load_problem(name)


_OWN = "your own as MODULE:ATTRIBUTE or FILE.py:ATTRIBUTE (a Problem or a function returning one)"

#: Problems loaded by :func:`load_problem`, by name.
_LOADED: dict[str, Problem] = {}


def load_problem(name: str) -> Problem:
    """The problem named ``MODULE:ATTRIBUTE`` or ``FILE.py:ATTRIBUTE`` (loaded once).

    Args:
        name: An importable module (``my_pkg.bench``) or a Python file (``bench/models.py``,
            relative to the working directory), a colon, and the attribute (dotted paths
            allowed): a :class:`Problem`, or a function without arguments returning one.

    Returns:
        The problem.

    Raises:
        ValueError: When the module or file cannot be loaded, the attribute does not exist, or
            it is not (and does not return) a :class:`Problem`.
    """
    cached = _LOADED.get(name)
    if cached is not None:
        return cached
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise invalid("model", name, f"Known: {tuple(PROBLEMS)}, or {_OWN}")
    module = _load_file(name, where) if where.endswith(".py") else _import(name, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise invalid("model", name, f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Problem):
        if not callable(obj):
            raise invalid(
                "model", name, f"{attr} is a {type(obj).__name__}: use a Problem or a function"
            )
        try:
            obj = obj()
        except Exception as exc:  # the user's code: say where it failed
            raise invalid("model", name, f"{attr}() failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(obj, Problem):
            raise invalid(
                "model",
                name,
                f"{attr}() returned a {type(obj).__name__}, not a precond.bench.Problem",
            )
    _LOADED[name] = obj
    return obj


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise invalid("model", name, f"Cannot import {module!r}: {exc}") from exc
    except Exception as exc:  # the user's code: say where it failed
        raise invalid(
            "model", name, f"Importing {module!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _load_file(name: str, where: str) -> ModuleType:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise invalid("model", name, f"No such file: {path}")
    module_name = "_precond_problem_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise invalid("model", name, f"Cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: say where it failed
        del sys.modules[module_name]
        raise invalid("model", name, f"Loading {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def describe(name: str) -> str:
    """One line for tables and figures: the problem's description, else ``name`` itself.

    A problem of your own that cannot be loaded any more (results rendered elsewhere) is
    shown by its name.
    """
    try:
        return get_problem(name).description
    except ValueError:
        return name
