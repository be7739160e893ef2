"""How gradient-statistics methods (Shampoo, SOAP, Muon) cut parameters into small tensors.

A parameter of shape ``s`` becomes a *view* and then a grid of *blocks*:

1. **Squeeze**: dimensions of size 1 are dropped (``[1, d]`` is a vector).
2. **Merge** (:func:`merge_shape`): for tensors of order ≥ 3, trailing dimensions are merged
   from the right while their product stays ≤ ``merge_dims``; dimension 0 (the output
   dimension) is never merged, so a kernel stays at least a matrix:
   ``[C_out, C_in, k, k] → [C_out, C_in·k·k]`` when ``C_in·k·k ≤ merge_dims``.
3. **Block** (:func:`chunk_sizes`): every dimension larger than ``block_size`` is cut into
   chunks of ``block_size`` (the last one smaller); the blocks are the Cartesian product of
   the chunks, and each block gets its own statistics.

Blocks of equal shape, from all parameters, form a :class:`BlockGroup`. Methods keep their
state per group as stacked tensors ``[B, *shape]`` (``B`` blocks), so that every update,
eigendecomposition and multiplication is one batched kernel instead of a Python loop.
:meth:`BlockLayout.gather` stacks the blocks of a list of parameter-shaped tensors (skipping
parameters whose tensor is ``None``) and :meth:`BlockLayout.scatter` puts them back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockGroup",
    "BlockLayout",
    "GroupBatch",
    "chunk_sizes",
    "fibre_gram",
    "merge_shape",
    "mode_product",
    "rows",
    "set_rows",
    "stats_dtype",
]


def merge_shape(shape: Sequence[int], merge_dims: int | None) -> tuple[int, ...]:
    """The view of a parameter of ``shape``: size-1 dimensions dropped, trailing ones merged.

    Args:
        shape: The parameter's shape.
        merge_dims: Largest size of a dimension obtained by merging (tensors of order ≥ 3
            only; dimension 0 is kept apart); ``None`` merges nothing.

    Returns:
        The view's shape (``(1,)`` for a parameter with a single element).
    """
    dims = [int(d) for d in shape if d != 1] or [1]
    if merge_dims is None or len(dims) <= 2:
        return tuple(dims)
    merged: list[int] = []
    acc = 1
    for d in reversed(dims[1:]):
        if acc * d <= merge_dims or acc == 1:
            acc *= d
        else:
            merged.append(acc)
            acc = d
    merged.append(acc)
    return (dims[0], *reversed(merged))


def chunk_sizes(size: int, block_size: int | None) -> list[int]:
    """Sizes of the chunks a dimension of ``size`` is cut into.

    Args:
        size: The dimension.
        block_size: Largest chunk; ``None`` keeps the dimension whole.

    Returns:
        ``[block_size, ..., block_size, rest]`` (a single entry when ``size ≤ block_size``).
    """
    if block_size is None or size <= block_size:
        return [size]
    full, rest = divmod(size, block_size)
    return [block_size] * full + ([rest] if rest else [])


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of statistics for parameters of ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BlockRef:
    """One block: the parameter it belongs to and its slices of the parameter's view.

    Attributes:
        param: Index of the parameter.
        index: One slice per dimension of the view.
        whole: Whether the block is the whole view (no slicing needed).
    """

    param: int
    index: tuple[slice, ...]
    whole: bool


@dataclass
class BlockGroup:
    """All blocks of one shape.

    Attributes:
        shape: The blocks' shape.
        members: The blocks, in the order of the stacked state.
    """

    shape: tuple[int, ...]
    members: list[BlockRef]

    @property
    def order(self) -> int:
        """Number of dimensions of a block."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of blocks ``B``."""
        return len(self.members)


@dataclass
class GroupBatch:
    """The stacked blocks of one group on one step.

    Attributes:
        data: ``[B', *shape]``: the blocks of the parameters that have a tensor this step.
        index: Rows of the group's state they belong to (``None``: all ``B`` rows, in order).
        present: The same rows as a Python list (``None``: all rows).
    """

    data: Tensor
    index: Tensor | None = None
    present: list[int] | None = None


class BlockLayout:
    """Views and blocks of a list of parameters, grouped by block shape.

    Args:
        views: The view shape of each parameter (same number of elements as the parameter).
        block_size: Largest block dimension; ``None`` keeps views whole.
    """

    def __init__(self, views: Sequence[tuple[int, ...]], block_size: int | None) -> None:
        self.views = [tuple(v) for v in views]
        by_shape: dict[tuple[int, ...], list[BlockRef]] = {}
        for i, view in enumerate(self.views):
            chunks = [chunk_sizes(d, block_size) for d in view]
            whole = all(len(c) == 1 for c in chunks)
            starts = [list(itertools.accumulate([0, *c[:-1]])) for c in chunks]
            for combo in itertools.product(*[range(len(c)) for c in chunks]):
                shape = tuple(chunks[d][k] for d, k in enumerate(combo))
                index = tuple(
                    slice(starts[d][k], starts[d][k] + chunks[d][k]) for d, k in enumerate(combo)
                )
                by_shape.setdefault(shape, []).append(BlockRef(i, index, whole))
        self.groups = [BlockGroup(shape, refs) for shape, refs in by_shape.items()]

    def gather(
        self, tensors: Sequence[Tensor | None], dtype: torch.dtype
    ) -> list[GroupBatch | None]:
        """Stack the blocks of parameter-shaped tensors, group by group.

        Args:
            tensors: One tensor per parameter (its shape), or ``None`` (skipped).
            dtype: dtype of the stacked blocks.

        Returns:
            One :class:`GroupBatch` per group, ``None`` for groups without any tensor. A group
            of one block in ``dtype`` holds a view of the given tensor: read it, never write it.
        """
        views = [None if t is None else t.reshape(v) for t, v in zip(tensors, self.views)]
        out: list[GroupBatch | None] = []
        for group in self.groups:
            present = [k for k, ref in enumerate(group.members) if views[ref.param] is not None]
            if not present:
                out.append(None)
                continue
            blocks = []
            for k in present:
                ref = group.members[k]
                view = views[ref.param]
                assert view is not None
                blocks.append(view if ref.whole else view[ref.index])
            # a lone block is a view of its tensor (no copy): callers never write batch data
            data = (blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)).to(dtype)
            if len(present) == group.size:
                out.append(GroupBatch(data))
            else:
                index = torch.tensor(present, device=data.device, dtype=torch.long)
                out.append(GroupBatch(data, index, present))
        return out

    def scatter(
        self, batches: Sequence[GroupBatch | None], shapes: Sequence[torch.Size]
    ) -> list[Tensor | None]:
        """Inverse of :meth:`gather`: parameter-shaped tensors from stacked blocks.

        Args:
            batches: One batch per group (as returned by :meth:`gather`, with new data).
            shapes: The parameters' shapes.

        Returns:
            One tensor per parameter (dtype of the batches), ``None`` where no block was given.
        """
        out: list[Tensor | None] = [None] * len(self.views)
        for group, batch in zip(self.groups, batches):
            if batch is None:
                continue
            present = range(group.size) if batch.present is None else batch.present
            for j, k in enumerate(present):
                ref = group.members[k]
                block = batch.data[j]
                if ref.whole:
                    out[ref.param] = block.reshape(shapes[ref.param])
                    continue
                full = out[ref.param]
                if full is None:
                    full = block.new_empty(self.views[ref.param])
                    out[ref.param] = full
                full[ref.index] = block
        return [None if t is None else t.reshape(shape) for t, shape in zip(out, shapes)]

    def numel(self) -> int:
        """Elements of all views."""
        return sum(math.prod(v) for v in self.views)


def rows(state: Tensor, index: Tensor | None) -> Tensor:
    """The rows of a stacked state that a batch touches (all rows when ``index`` is None)."""
    return state if index is None else state.index_select(0, index)


def set_rows(state: Tensor, index: Tensor | None, value: Tensor) -> None:
    """Write ``value`` into the rows of ``state`` selected by ``index`` (in place)."""
    if index is None:
        state.copy_(value)
    else:
        state.index_copy_(0, index, value.to(state.dtype))


def mode_product(x: Tensor, m: Tensor, dim: int) -> Tensor:
    """Multiply every fibre of ``x`` along block dimension ``dim`` by ``mᵀ`` (batched).

    ``y[b, …, j, …] = Σ_i x[b, …, i, …] m[b, i, j]``; for a symmetric ``m`` this is the mode
    product ``x ×_dim m``, and for an orthogonal ``Q`` it rotates into the basis ``Q``
    (``m = Q``) or back (``m = Qᵀ``).

    Args:
        x: ``[B, d_0, …, d_{k-1}]``.
        m: ``[B, d_dim, n]``.
        dim: Block dimension (0-based, not counting the batch dimension).

    Returns:
        ``[B, d_0, …, n, …, d_{k-1}]``.
    """
    b, n, k = x.shape[0], x.shape[dim + 1], m.shape[-1]
    # The first and last dimensions need no transposed copy of x.
    if dim == x.dim() - 2:
        return (x.reshape(b, -1, n) @ m).reshape(*x.shape[:-1], k)
    if dim == 0:
        return (m.mT @ x.reshape(b, n, -1)).reshape(b, k, *x.shape[2:])
    moved = x.movedim(dim + 1, -1)
    shape = moved.shape
    flat = moved.reshape(b, -1, n) @ m
    return flat.reshape(*shape[:-1], k).movedim(-1, dim + 1)


def fibre_gram(x: Tensor, dim: int) -> Tensor:
    """``Σ`` over all other indices of ``x_(dim) x_(dim)ᵀ``: the Shampoo statistic of mode ``dim``.

    For a matrix block ``G`` this is ``G Gᵀ`` (``dim = 0``) or ``Gᵀ G`` (``dim = 1``).

    Args:
        x: ``[B, d_0, …, d_{k-1}]``.
        dim: Block dimension.

    Returns:
        ``[B, d_dim, d_dim]``.
    """
    b, n = x.shape[0], x.shape[dim + 1]
    if dim == 0:
        flat = x.reshape(b, n, -1)
        return flat @ flat.mT
    flat = x.movedim(dim + 1, -1).reshape(b, -1, n)
    return flat.mT @ flat
