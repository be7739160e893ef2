"""The per-step paths that read their finiteness flags on a CPU (``numerics.host_flag``) give
bit for bit what the device-side selection gives, finite steps and non-finite ones alike."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.methods._second_order_cases import run_step, tanh_mlp

from precond import make_gradient_maker, numerics


def _steps_in_between(monkeypatch, host: bool, name: str, **options) -> list[torch.Tensor]:
    """One full step, then three bare ``precondition`` calls: finite gradients, one NaN entry
    in the first parameter, finite again; the second parameter has no gradient."""
    monkeypatch.setattr(numerics, "READ_CPU_FLAGS", host)
    torch.manual_seed(0)
    model, x, t = tanh_mlp()
    gm = make_gradient_maker(name, model, **options)
    run_step(gm, model, x, t, F.cross_entropy)
    params = list(model.parameters())
    out = []
    for k in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        params[1].grad = None
        if k == 1:
            params[0].grad.view(-1)[3] = math.nan
        gm.precondition()
        state = gm.preconditioner_state_dict()
        moments = (
            state.get("exp_avg") or state.get("graft") or state.get("momentum") or [state["z"]]
        )
        out += [m.clone() for m in moments if m is not None]
        out += [p.grad.clone() for p in params if p.grad is not None]
    return out


@pytest.mark.parametrize(
    "name,options",
    [
        ("curveball", {"damping": 0.1, "curvature_upd_interval": 4}),
        ("sophia", {"curvature_upd_interval": 4}),
        ("adahessian", {"curvature_upd_interval": 4}),
        ("soap", {"curvature_upd_interval": 4}),
        ("muon", {"momentum": 0.9}),
        ("muon", {"momentum": 0.37, "nesterov": False, "fallback": "momentum"}),
    ],
)
def test_host_and_device_selections_agree_bit_for_bit(monkeypatch, name, options):
    host = _steps_in_between(monkeypatch, True, name, **options)
    device = _steps_in_between(monkeypatch, False, name, **options)
    assert len(host) == len(device) > 3
    assert all(torch.equal(a, b) for a, b in zip(host, device))
    assert all(torch.isfinite(v).all() for v in host)


@pytest.mark.parametrize("grafting", ["adagrad", "adam"])
def test_shampoo_grafting_host_and_device_agree_bit_for_bit(monkeypatch, grafting):
    # Shampoo passes a non-finite gradient's NaN on to its direction (documented); the
    # grafting accumulators must stay finite and agree bit for bit, NaNs in the same places.
    options = {"curvature_upd_interval": 4, "grafting": grafting}
    host = _steps_in_between(monkeypatch, True, "shampoo", **options)
    device = _steps_in_between(monkeypatch, False, "shampoo", **options)
    assert len(host) == len(device) > 3
    for a, b in zip(host, device):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    gm_state = [v for v in host if not torch.isfinite(v).all()]
    assert len(gm_state) == 1  # only the direction of the NaN gradient, on the second call
