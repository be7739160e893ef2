"""The bounded cache behind the per-signature caches of a step."""

from __future__ import annotations

import pytest

from precond.methods._cache import BoundedCache


def test_keeps_the_most_recent_entries():
    cache: BoundedCache[int] = BoundedCache(limit=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # an update takes no room
    assert len(cache) == 2 and cache.get("a") == 3
    cache.put("c", 4)  # full: the oldest entry goes
    assert "a" not in cache and cache.get("b") == 2 and cache.get("c") == 4
    assert cache.get("a") is None
    cache.clear()
    assert not len(cache) and "c" not in cache


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_limit_must_be_a_positive_int(limit):
    with pytest.raises(ValueError, match="limit"):
        BoundedCache(limit=limit)
