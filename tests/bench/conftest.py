"""Shared fixtures of the benchmark tests."""

from __future__ import annotations

from typing import Any

import pytest


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
