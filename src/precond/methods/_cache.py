"""A small mapping of bounded size for caches keyed by the shape of a step's graph.

Several parts of a step remember what they found for a graph of a given signature (the shapes,
modes and trained parameters of the model call, see
:meth:`~precond.grad_maker.GradientMaker.graph_signature`): the memory a second-derivative graph
holds, whether a graph has a cut that pays, where the cuts go. A model called with inputs of
ever new shapes must not make these grow without bound, so each keeps its ``limit`` most recent
signatures. None of them is state: a cleared cache only makes the next step do the work again.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from ..validation import check_int

__all__ = ["BoundedCache"]

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """A dict of at most ``limit`` entries that drops its oldest entry to make room.

    Args:
        limit: Entries kept (at least 1).
    """

    def __init__(self, limit: int = 16) -> None:
        check_int("limit", limit, minimum=1)
        self.limit = limit
        self._items: dict[Hashable, V] = {}

    def get(self, key: Hashable) -> V | None:
        """The value stored for ``key``, or ``None``."""
        return self._items.get(key)

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` for ``key``, dropping the oldest entry if the cache is full."""
        if key not in self._items and len(self._items) >= self.limit:
            del self._items[next(iter(self._items))]
        self._items[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget every entry."""
        self._items.clear()
