"""The finiteness checks shared by every method (precond.numerics)."""

from __future__ import annotations

import pytest
import torch

from precond.numerics import all_sums_finite, finite_flags, finite_sums, is_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_fails_its_tensor_only(dtype, bad):
    good = torch.randn(5, 7, dtype=dtype)
    broken = torch.zeros(3, 4, dtype=dtype)
    broken[1, 2] = bad
    flags = finite_sums([good, broken, good[0]])
    assert flags.dtype == torch.bool and flags.tolist() == [True, False, True]
    assert finite_flags([good, broken]) == [True, False]
    assert not all_sums_finite([good, broken]) and all_sums_finite([good, good])
    # one tensor alone (read without stacking) and the bad one first
    assert finite_flags([broken]) == [False] and finite_flags([broken, good]) == [False, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_is_finite_agrees_with_torch(dtype):
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.5, -2.0, info.max, -info.max, info.tiny, float("nan")]
    values += [float("inf"), float("-inf")]
    t = torch.tensor(values, dtype=dtype).reshape(2, 5)
    out = is_finite(t)
    assert out.dtype == torch.bool and out.shape == t.shape
    assert torch.equal(out, torch.isfinite(t))


def test_low_precision_sums_accumulate_in_float32():
    # 100 × 60000 overflows float16 (largest 65504) but not its float32 accumulation
    big = torch.full((100,), 60000.0, dtype=torch.float16)
    assert torch.isinf(big.sum())
    assert finite_flags([big]) == [True]


def test_overflowing_sum_reads_as_not_finite():
    # entries within a factor numel of the range: documented as read non-finite
    top = torch.full((4,), torch.finfo(torch.float32).max)
    assert finite_flags([top]) == [False]


def test_no_tensors():
    assert finite_flags([]) == [] and all_sums_finite([])


def test_host_flags_read_on_a_cpu_and_not_when_turned_off(monkeypatch):
    from precond import numerics

    flags = torch.tensor([True, False, True])
    assert numerics.host_flags(flags) == [True, False, True]
    monkeypatch.setattr(numerics, "READ_CPU_FLAGS", False)
    assert numerics.host_flags(flags) is None
