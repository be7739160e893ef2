"""The moving average of curvature statistics."""

from __future__ import annotations

import torch

from precond.linalg.ema import ema_update


def test_ema_is_the_convex_combination_in_place_on_the_old_average():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    new = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    expected = 0.9 * old + 0.1 * new
    out = ema_update(old, new, 0.9)
    assert out is old  # no second buffer
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_ema_keeps_a_lower_precision_statistic_in_the_average_dtype():
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float32)
    out = ema_update(old, new, 0.75)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, 0.25 * new.double(), rtol=0, atol=0)


def test_ema_without_decay_or_history_takes_the_new_statistic():
    new = torch.randn(2, 2)
    assert ema_update(None, new, 0.9) is new
    old = torch.randn(2, 2)
    out = ema_update(old, new, 0.0)
    assert out is old and torch.equal(out, new)
