from __future__ import annotations

import pytest
import torch

from precond import numerics
from precond.numerics import reset_warnings


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    reset_warnings()
    yield


@pytest.fixture(params=["host", "device"])
def flags(request, monkeypatch):
    """Both selections of the per-step paths: flags read on the host (a CPU's default, see
    :func:`precond.numerics.host_flag`) and the device-side selection an accelerator runs."""
    monkeypatch.setattr(numerics, "READ_CPU_FLAGS", request.param == "host")
    return request.param
