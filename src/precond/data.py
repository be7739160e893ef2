"""Built-in datasets: generated or shipped inside packages, never downloaded.

* :func:`mnist1d`: MNIST-1D generated locally from its published recipe (``mnist1d`` package,
  ``make_dataset``; no network). Needs the ``data`` extra.
* :func:`digits`: scikit-learn's handwritten digits (8×8), shipped with scikit-learn.
* :func:`ill_conditioned_regression`: regression whose input scales spread over orders of
  magnitude (the test problem on which preconditioning must beat SGD).
* :func:`synthetic_classification`: random inputs of any shape for timing.
* :func:`load_mnist` / :func:`load_cifar10`: read a local copy in torchvision's file layout;
  their absence is a clear error, never a download.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .validation import check_int, invalid

__all__ = [
    "Dataset",
    "digits",
    "ill_conditioned_regression",
    "load_cifar10",
    "load_mnist",
    "mnist1d",
    "synthetic_classification",
]


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    Attributes:
        x_train: Training inputs.
        y_train: Training targets.
        x_test: Test inputs.
        y_test: Test targets.
        num_classes: Number of classes (0 for regression).
        name: Human-readable name.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x_train.shape[1:])


def _missing_extra(package: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"This dataset needs the optional package {package!r}; install precond with the 'data' "
        f"extra (pip install 'precond[data]'). ({exc})"
    )


@lru_cache(maxsize=4)
def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D generated locally (Greydanus 2020), 40 features, 10 classes, 80/20 split.

    Args:
        num_samples: Examples generated in total.
        seed: Seed of the generating recipe.

    Returns:
        The dataset (float32 inputs, int64 labels).

    Raises:
        ImportError: Without the ``mnist1d`` package.
    """
    check_int("num_samples", num_samples, minimum=10)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing_extra("mnist1d", exc) from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    return Dataset(
        torch.as_tensor(d["x"], dtype=torch.float32),
        torch.as_tensor(d["y"], dtype=torch.int64),
        torch.as_tensor(d["x_test"], dtype=torch.float32),
        torch.as_tensor(d["y_test"], dtype=torch.int64),
        10,
        "mnist1d",
    )


@lru_cache(maxsize=1)
def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1797 images), pixels scaled to [0, 1].

    Args:
        test_fraction: Fraction held out for testing.
        seed: Seed of the shuffle.

    Returns:
        The dataset with inputs of shape ``[1, 8, 8]``.

    Raises:
        ImportError: Without scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise _missing_extra("scikit-learn", exc) from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], 10, "digits")


def ill_conditioned_regression(
    n: int = 512,
    d_in: int = 16,
    d_out: int = 4,
    *,
    decades: float = 3.0,
    noise: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Regression whose input feature scales spread over ``decades`` orders of magnitude.

    Inputs are Gaussian with per-feature standard deviations log-spaced from ``10**-decades``
    to 1; targets come from a random two-layer tanh teacher applied to the standardised inputs,
    plus noise. Learning the small-scale features needs large weights that gradient descent
    reaches slowly (the input covariance spans ``10**(2·decades)``); curvature-aware methods
    rescale them.

    Args:
        n: Training examples (the test split has ``n // 4``).
        d_in: Input features.
        d_out: Outputs.
        decades: Orders of magnitude spanned by the feature scales.
        noise: Standard deviation of the target noise.
        seed: Seed.
        dtype: Floating dtype.

    Returns:
        The dataset.
    """
    check_int("n", n, minimum=1)
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-decades, 0.0, d_in, dtype=torch.float64)
    total = n + n // 4
    z = torch.randn(total, d_in, generator=g, dtype=torch.float64)
    w1 = torch.randn(d_in, 32, generator=g, dtype=torch.float64) / d_in**0.5
    w2 = torch.randn(32, d_out, generator=g, dtype=torch.float64) / 32**0.5
    y = torch.tanh(z @ w1) @ w2 + noise * torch.randn(
        total, d_out, generator=g, dtype=torch.float64
    )
    x = z * scales
    return Dataset(
        x[:n].to(dtype), y[:n].to(dtype), x[n:].to(dtype), y[n:].to(dtype), 0, "ill_conditioned"
    )


def synthetic_classification(
    n: int, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random inputs and labels of the right shapes (for timing).

    Args:
        n: Examples.
        input_shape: Shape of one input.
        num_classes: Classes.
        seed: Seed.

    Returns:
        ``(x, y)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def _require_dir(root: str | Path, name: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Invalid root: {str(path)!r}. No local copy of {name} there; precond never downloads "
            f"data. Place the files in torchvision's layout ({expected}) and pass that folder."
        )
    return path


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(root: str | Path) -> Dataset:
    """MNIST from a local folder in torchvision's layout (``<root>/MNIST/raw/*-ubyte[.gz]``).

    Args:
        root: The folder that contains ``MNIST/raw``.

    Returns:
        The dataset with inputs ``[1, 28, 28]`` in [0, 1].

    Raises:
        FileNotFoundError: If the files are not there.
    """
    raw = _require_dir(root, "MNIST", "<root>/MNIST/raw/train-images-idx3-ubyte") / "MNIST" / "raw"

    def find(stem: str) -> Path:
        for cand in (raw / stem, raw / f"{stem}.gz"):
            if cand.exists():
                return cand
        raise FileNotFoundError(
            f"Invalid root: {str(root)!r}. Missing {raw / stem}; precond never downloads data."
        )

    def images(stem: str) -> Tensor:
        return torch.as_tensor(_read_idx(find(stem)).copy(), dtype=torch.float32).unsqueeze(1) / 255

    def labels(stem: str) -> Tensor:
        return torch.as_tensor(_read_idx(find(stem)).copy(), dtype=torch.int64)

    return Dataset(
        images("train-images-idx3-ubyte"),
        labels("train-labels-idx1-ubyte"),
        images("t10k-images-idx3-ubyte"),
        labels("t10k-labels-idx1-ubyte"),
        10,
        "mnist",
    )


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 from a local folder in torchvision's layout (``<root>/cifar-10-batches-py``).

    Args:
        root: The folder that contains ``cifar-10-batches-py``.

    Returns:
        The dataset with inputs ``[3, 32, 32]`` in [0, 1].

    Raises:
        FileNotFoundError: If the files are not there.
    """
    base = _require_dir(root, "CIFAR-10", "<root>/cifar-10-batches-py/data_batch_1") / (
        "cifar-10-batches-py"
    )

    def batch(name: str) -> tuple[Tensor, Tensor]:
        path = base / name
        if not path.exists():
            raise invalid("root", str(root), f"Missing {path}; precond never downloads data")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = torch.as_tensor(d[b"data"], dtype=torch.float32).reshape(-1, 3, 32, 32) / 255
        return x, torch.as_tensor(d[b"labels"], dtype=torch.int64)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = batch("test_batch")
    return Dataset(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        x_te,
        y_te,
        10,
        "cifar10",
    )
