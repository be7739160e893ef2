"""Shared fixtures of the benchmark tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_cpu_mode():
    """Workers run in this process by some tests set threads and the floating-point mode."""
    threads = torch.get_num_threads()
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """A configuration a worker measures in about a second: SGD on the tiny MLP, B=4."""
    return {
        "method": "plain",
        "model": "mlp_tiny",
        "batch_size": 4,
        "interval": 1,
        "device": "cpu",
        "threads": 1,
    }
