from __future__ import annotations

import pytest
import torch

from precond.numerics import reset_warnings


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    reset_warnings()
    yield
