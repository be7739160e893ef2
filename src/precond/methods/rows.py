r"""Per-example Jacobians of one layer in compact forms, for Gram-matrix (SMW) methods.

Row ``m`` of the matrix ``U`` is ``vec(J_m)``, the Jacobian of one example's (scaled) loss with
respect to a layer's canonical weight ``W̃`` (``[G, d_out, d_in']``, see
:mod:`precond.capture.base`), so that the layer's empirical Fisher is ``Uᵀ U``. Methods that
solve with ``λI + UᵀU`` through its ``M × M`` Gram matrix (Sherman-Morrison-Woodbury) need
three products, which every form below provides without building ``P × P`` matrices:

* :meth:`Rows.gram`: ``U Uᵀ`` (``[M, M]``);
* :meth:`Rows.dot`: ``U vec(V)`` for a canonical ``V`` (``[M]``);
* :meth:`Rows.combine`: ``Σ_m w_m J_m`` (canonical ``[G, d_out, d_in']``).

Forms:

* :class:`DenseRows`: ``J_m`` stored explicitly;
* :class:`FactorRows`: ``J_m = Σ_r g_mr a_mrᵀ`` per group. Without weight sharing ``r = 1``
  and the form is exact at ``M (d_out + d_in')`` memory instead of ``M d_out d_in'``;
* :class:`PairRows`: one-hot layers (embeddings), whose ``J_m`` is non-zero only on the tokens
  of example ``m``: one column per (example, token) pair that occurs, ``O(N·S·d_out)`` memory
  where a dense form on the batch's tokens needs ``O(N·U·d_out)`` (``U`` distinct tokens, up
  to ``N·S``: quadratic in the batch).

Every form may carry a *sketch* (Yang et al. 2022): uniformly sampled coordinates (dense, and
``(token, output)`` coordinates of the pairs) or rows of both factors (factored), rescaled so
that sketched inner products are unbiased. A sketch changes :meth:`~Rows.gram` and
:meth:`~Rows.dot` (the least-squares subproblem of the Woodbury solve), never
:meth:`~Rows.combine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..validation import invalid

__all__ = ["PAIR_CHUNK_NUMEL", "DenseRows", "FactorRows", "PairRows", "Rows", "load_rows", "select"]


class Rows(ABC):
    """Per-example Jacobians ``J_m`` of one layer (the rows of ``U``)."""

    kind: str = ""

    @property
    @abstractmethod
    def m(self) -> int:
        """Number of rows ``M``."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Dtype of the stored Jacobians."""

    @abstractmethod
    def gram(self) -> Tensor:
        """``U Uᵀ`` (sketched if a sketch is set): ``[M, M]``."""

    def gram_into(self, out: Tensor) -> Tensor:
        """``out += U Uᵀ`` (sketched if a sketch is set) in place; returns ``out`` ``[M, M]``.

        For a sum of layers' Gram matrices without one temporary per layer.
        """
        return out.add_(self.gram())

    @abstractmethod
    def dot(self, v: Tensor, *, sketched: bool = True) -> Tensor:
        """``⟨J_m, V⟩`` for every row (``[M]``) for canonical ``V`` ``[G, d_out, d_in']``."""

    @abstractmethod
    def combine(self, w: Tensor) -> Tensor:
        """``Σ_m w_m J_m`` as canonical ``[G, d_out, d_in']``, for ``w`` of shape ``[M]``."""

    def dot_parts(self, parts: list[Tensor], *, sketched: bool = True) -> Tensor:
        """:meth:`dot` of ``V`` given as column blocks ``[G, d_out, c_i]`` (concatenated: ``V``).

        The blocks are typically views of a layer's weight and bias gradients
        (:func:`precond.methods.kfac.grad_parts`).
        """
        v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return self.dot(v, sketched=sketched)

    def combine_into(self, w: Tensor, parts: list[Tensor], alpha: float, beta: float) -> None:
        """``V ← β V + α Σ_m w_m J_m`` in place, for ``V`` given as column blocks.

        Args:
            w: Weights ``[M]``.
            parts: Column blocks ``[G, d_out, c_i]`` of ``V`` (written in place).
            alpha: ``α``.
            beta: ``β``.
        """
        c = self.combine(w)
        pieces = []
        start = 0
        for part in parts:
            width = part.shape[-1]
            piece = c[..., start : start + width]
            pieces.append(piece if piece.dtype == part.dtype else piece.to(part.dtype))
            start += width
        # Every block in two foreach calls instead of two operations per block.
        torch._foreach_mul_(parts, beta)
        torch._foreach_add_(parts, pieces, alpha=alpha)

    @abstractmethod
    def sketch(self, size: int, generator: torch.Generator) -> None:
        """Set a random sketch (see the module docstring); no-op if it would not reduce work."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and sketch, enough to rebuild the object with :func:`load_rows`."""


def select(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """``t.index_select(dim, index)``, through a 2-D view where the dimensions allow one.

    Selecting along a middle or last dimension of a 3-D or 4-D tensor is several times slower
    on a CPU than the same selection on the ``[rows, columns]`` view; the values are the same.

    Args:
        t: The tensor.
        dim: Non-negative dimension to select along.
        index: Indices (1-D, int64).

    Returns:
        The selected entries, of ``t``'s shape with ``index.numel()`` along ``dim``.
    """
    shape = t.shape
    trail = 1
    for size in shape[dim + 1 :]:
        trail *= int(size)
    lead = 1
    for size in shape[:dim]:
        lead *= int(size)
    if t.dim() <= 2 or not t.is_contiguous():
        return t.index_select(dim, index)
    flat = (
        t.view(lead, int(shape[dim]) * trail)
        if trail == 1
        else t.view(lead, int(shape[dim]), trail)
    )
    out = flat.index_select(1, index)
    return out.view(*shape[:dim], index.numel(), *shape[dim + 1 :])


def _sample(n: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    idx = torch.randperm(n, generator=generator, device=generator.device)[:size]
    return idx.sort().values.to(device)


class DenseRows(Rows):
    """Explicit per-example Jacobians.

    Args:
        j: ``[M, G, d_out, d_in']``.
    """

    kind = "dense"

    def __init__(self, j: Tensor) -> None:
        self.j = j
        self.coords: Tensor | None = None
        self.scale = 1.0
        self._sub: Tensor | None = None

    @property
    def m(self) -> int:  # noqa: D102
        return int(self.j.shape[0])

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.j.dtype

    def _sketched(self) -> Tensor:
        flat = self.j.reshape(self.m, -1)
        if self.coords is None:
            return flat
        if self._sub is None:
            self._sub = flat.index_select(1, self.coords) * self.scale
        return self._sub

    def gram(self) -> Tensor:  # noqa: D102
        flat = self._sketched()
        return flat @ flat.T

    def gram_into(self, out: Tensor) -> Tensor:  # noqa: D102
        flat = self._sketched()
        return out.addmm_(flat, flat.T)

    def dot_parts(self, parts: list[Tensor], *, sketched: bool = True) -> Tensor:  # noqa: D102
        if sketched and self.coords is not None:
            return super().dot_parts(parts, sketched=sketched)
        # No sketch: one matrix-vector product with the concatenated blocks.
        v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if v.dtype != self.j.dtype:
            v = v.to(self.j.dtype)
        return self.j.reshape(self.m, -1) @ v.reshape(-1)

    def dot(self, v: Tensor, *, sketched: bool = True) -> Tensor:  # noqa: D102
        vec = v.to(self.j.dtype).reshape(-1)
        if sketched and self.coords is not None:
            return self._sketched() @ (vec.index_select(0, self.coords) * self.scale)
        return self.j.reshape(self.m, -1) @ vec

    def combine(self, w: Tensor) -> Tensor:  # noqa: D102
        return (w.to(self.j.dtype) @ self.j.reshape(self.m, -1)).reshape(self.j.shape[1:])

    def sketch(self, size: int, generator: torch.Generator) -> None:
        """Sample ``size`` coordinates of the ``j``'s flattened rows (if fewer than all).

        Args:
            size: Number of coordinates.
            generator: Random generator.
        """
        numel = self.j[0].numel()
        if size >= numel:
            return
        self.coords = _sample(numel, size, generator, self.j.device)
        self.scale = (numel / size) ** 0.5
        self._sub = None

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "kind": self.kind,
            "j": self.j,
            "coords": self.coords,
            "scale": self.scale,
        }


class _Block(NamedTuple):
    """One column block of ``V`` in the 2-D products of :class:`FactorRows`.

    Attributes:
        cols: The block's sampled columns (``None``: all of them).
        a: The input factors' matching columns, ``[M, k]`` (``[M]`` for one column).
    """

    cols: Tensor | None
    a: Tensor


class FactorRows(Rows):
    """Per-example Jacobians as sums of ``r`` outer products per group.

    Args:
        g: Output-side factors ``[M, G, d_out, r]``.
        a: Input-side factors ``[M, G, d_in', r]``; ``J_m[g] = coef · g[m, g] a[m, g]ᵀ``.
        coef: Scalar factor of every Jacobian, applied to the (small) products, so that ``g``
            may be the recorded output gradients themselves rather than a scaled copy.
    """

    kind = "factor"

    def __init__(self, g: Tensor, a: Tensor, coef: float = 1.0) -> None:
        self.g = g
        self.a = a
        self.coef = float(coef)
        self.out_rows: Tensor | None = None
        self.in_rows: Tensor | None = None
        self.scale = 1.0
        self._sub: tuple[Tensor, Tensor] | None = None
        self._part_cols: dict[tuple[int, int], Tensor] = {}
        self._flat_sub: tuple[Tensor, Tensor] | None = None
        self._flat_views: tuple[Tensor, Tensor] | None = None
        self._plans: dict[tuple[tuple[int, ...], bool], list[_Block | None]] = {}

    @property
    def m(self) -> int:  # noqa: D102
        return int(self.g.shape[0])

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.g.dtype

    def _sketched(self) -> tuple[Tensor, Tensor]:
        # The output side carries ``scale · coef``; without a sketch the factors are returned
        # unscaled and callers apply ``coef``.
        if self.out_rows is None and self.in_rows is None:
            return self.g, self.a
        if self._sub is None:
            g = self.g if self.out_rows is None else select(self.g, 2, self.out_rows)
            a = self.a if self.in_rows is None else select(self.a, 2, self.in_rows)
            self._sub = (g * (self.scale * self.coef), a)
        return self._sub

    @property
    def _is_sketched(self) -> bool:
        return self.out_rows is not None or self.in_rows is not None

    def sketch_dims(self) -> tuple[int, int]:
        """Rows of the output and input factors that the sketched products use."""
        so = self.g.shape[2] if self.out_rows is None else self.out_rows.numel()
        si = self.a.shape[2] if self.in_rows is None else self.in_rows.numel()
        return int(so), int(si)

    def _restrict(self, v: Tensor) -> Tensor:
        if self.out_rows is not None:
            v = select(v, v.dim() - 2, self.out_rows)
        if self.in_rows is not None:
            v = select(v, v.dim() - 1, self.in_rows)
        return v

    def _restrict_parts(self, parts: list[Tensor]) -> Tensor:
        """:meth:`_restrict` of the concatenated column blocks, without concatenating them.

        Each block gives its sampled output rows and those sampled input columns that fall in
        it; only the (small) restricted pieces are concatenated.
        """
        if len(parts) == 1:
            return self._restrict(parts[0])
        pieces = []
        start = 0
        for part in parts:
            width = part.shape[-1]
            if self.out_rows is not None:
                part = select(part, part.dim() - 2, self.out_rows)
            if self.in_rows is not None:
                part = select(part, part.dim() - 1, self._cols_in(start, width))
            pieces.append(part)
            start += width
        return torch.cat(pieces, dim=-1)

    def _cols_in(self, start: int, width: int) -> Tensor:
        """Sampled input columns in ``[start, start + width)``, relative to ``start``.

        Computed once per sketch (one host sync, on the first step that applies it).
        """
        key = (start, width)
        cols = self._part_cols.get(key)
        if cols is None:
            assert self.in_rows is not None
            lo, hi = torch.searchsorted(
                self.in_rows, torch.tensor([start, start + width], device=self.in_rows.device)
            ).tolist()
            cols = self.in_rows[lo:hi] - start
            self._part_cols[key] = cols
        return cols

    def gram(self) -> Tensor:  # noqa: D102
        if self._flat() is not None:
            # G = r = 1: (g gᵀ) ⊙ (a aᵀ) with 2-D products.
            if self._is_sketched:
                g2, a2 = self._flat_sketched()
                return (g2 @ g2.T).mul_(a2 @ a2.T)
            g2, a2 = self.g.view(self.m, -1), self.a.view(self.m, -1)
            full = (g2 @ g2.T).mul_(a2 @ a2.T)
            return full if self.coef == 1.0 else full.mul_(self.coef * self.coef)
        g, a = self._sketched()
        m, groups, _, r = g.shape
        # Per group: (G_m ᵀ G_n) ⊙ (A_m ᵀ A_n) summed over the r × r factor pairs.
        gg = g.permute(1, 0, 3, 2).reshape(groups, m * r, -1)
        aa = a.permute(1, 0, 3, 2).reshape(groups, m * r, -1)
        prod = torch.bmm(gg, gg.transpose(1, 2)).mul_(torch.bmm(aa, aa.transpose(1, 2)))
        full = prod[0] if groups == 1 else prod.sum(0)
        if r > 1:
            full = full.reshape(m, r, m, r).sum(dim=(1, 3))
        if not self._is_sketched and self.coef != 1.0:
            full.mul_(self.coef * self.coef)
        return full

    def gram_into(self, out: Tensor) -> Tensor:  # noqa: D102
        if self._flat() is None:
            return out.add_(self.gram())
        # G = r = 1: one pass adds (g gᵀ) ⊙ (a aᵀ), the coefficient folded into it.
        if self._is_sketched:
            g2, a2 = self._flat_sketched()
            return out.addcmul_(g2 @ g2.T, a2 @ a2.T)
        g2, a2 = self.g.view(self.m, -1), self.a.view(self.m, -1)
        return out.addcmul_(g2 @ g2.T, a2 @ a2.T, value=self.coef * self.coef)

    def dot(self, v: Tensor, *, sketched: bool = True) -> Tensor:  # noqa: D102
        v = v.to(self.g.dtype)
        if sketched and self._is_sketched:
            g, a = self._sketched()
            return self._dot(self._restrict(v), g, a).mul_(self.scale)
        out = self._dot(v, self.g, self.a)
        return out if self.coef == 1.0 else out.mul_(self.coef)

    @staticmethod
    def _dot(v: Tensor, g: Tensor, a: Tensor) -> Tensor:
        m, groups, d_out, r = g.shape
        # One GEMM per group: rows (m, r) of the output factors times V, then ⟨·, a_mr⟩.
        left = g.permute(1, 0, 3, 2).reshape(groups, m * r, d_out)
        right = a.permute(1, 0, 3, 2).reshape(groups, m * r, -1)
        t = torch.matmul(left, v).mul_(right)  # [G, M·r, d_in']
        out = t.sum(dim=-1)
        return out.reshape(m) if groups == 1 and r == 1 else out.reshape(groups, m, r).sum((0, 2))

    def combine(self, w: Tensor) -> Tensor:  # noqa: D102
        left, right = self._combine_factors(w)
        return left @ right

    def _combine_factors(self, w: Tensor) -> tuple[Tensor, Tensor]:
        m, groups, d_out, r = self.g.shape
        w = w.to(self.g.dtype)
        gw = self.g * (w if self.coef == 1.0 else w * self.coef).reshape(m, 1, 1, 1)
        left = gw.permute(1, 2, 0, 3).reshape(groups, d_out, m * r)
        right = self.a.permute(1, 0, 3, 2).reshape(groups, m * r, -1)
        return left, right

    def _flat(self) -> tuple[Tensor, Tensor] | None:
        """2-D views ``[M, d_out]``, ``[M, d_in']`` of the factors when ``G = r = 1``."""
        if self._flat_views is None:
            m, groups, d_out, r = self.g.shape
            if groups != 1 or r != 1:
                return None
            self._flat_views = (self.g.view(m, d_out), self.a.view(m, -1))
        return self._flat_views

    def _flat_sketched(self) -> tuple[Tensor, Tensor]:
        """:meth:`_flat` of the sketched factors (``G = r = 1``), made once per sketch."""
        if self._flat_sub is None:
            g, a = self._sketched()
            self._flat_sub = (g.reshape(self.m, -1), a.reshape(self.m, -1))
        return self._flat_sub

    def prepare(self, widths: list[int]) -> None:
        """Precompute what every step's products reuse, for ``V`` in blocks of these widths.

        Called on refresh steps: the sketched factors, which sampled input columns fall in each
        block (a host sync that would otherwise happen on the first step applying them) and
        the input factors' columns that meet each block.

        Args:
            widths: Column widths of the blocks of ``V`` (their sum is ``d_in'``).
        """
        if self._is_sketched:
            self._sketched()
            if self.in_rows is not None:  # every block's columns with one search, one sync
                bounds = [0]
                for width in widths:
                    bounds.append(bounds[-1] + width)
                edges = torch.tensor(bounds, device=self.in_rows.device)
                cuts = torch.searchsorted(self.in_rows, edges).tolist()
                for i, width in enumerate(widths):
                    cols = self.in_rows[cuts[i] : cuts[i + 1]]
                    self._part_cols[(bounds[i], width)] = cols - bounds[i] if i else cols
        if self._flat() is not None:
            self._plan(tuple(widths), False)
            if self._is_sketched:
                self._plan(tuple(widths), True)

    def _plan(self, widths: tuple[int, ...], sketch: bool) -> list[_Block | None]:
        """Per block of ``V``: its sampled columns and the input factors' matching columns.

        ``None`` for a block without sampled columns; ``cols`` is ``None`` when every column
        of the block is used. Cached per sketch (``G = r = 1`` only).
        """
        key = (widths, sketch)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        flat = self._flat()
        assert flat is not None
        a = self._flat_sketched()[1] if sketch else flat[1]
        plan = []
        start = offset = 0  # columns of ``a`` used so far; columns of ``V`` seen so far
        for width in widths:
            cols: Tensor | None = None
            if sketch and self.in_rows is not None:
                cols = self._cols_in(offset, width)
                if cols.numel() == width:
                    cols = None  # every column of the block is sampled (e.g. the bias)
            offset += width
            k = width if cols is None else int(cols.numel())
            if k == 0:
                plan.append(None)
                continue
            plan.append(_Block(cols, a[:, start] if k == 1 else a[:, start : start + k]))
            start += k
        self._plans[key] = plan
        return plan

    def _flat_parts(self, parts: list[Tensor]) -> list[Tensor] | None:
        """The blocks as 2-D ``[d_out, c_i]`` views when the 2-D fast path applies."""
        if self._flat() is None:
            return None
        flat = []
        for part in parts:
            if part.dim() != 3 or part.shape[0] != 1 or part.dtype != self.g.dtype:
                return None
            flat.append(part[0])
        return flat

    def _dot_flat(self, parts: list[Tensor], sketched: bool) -> Tensor:
        """:meth:`dot_parts` for ``G = r = 1``: one GEMM per block with 2-D operands.

        ``⟨g_m a_mᵀ, V⟩ = Σ_i (g_mᵀ V)_i a_mi``; a bias block (one column) is a matrix-vector
        product.
        """
        sketch = sketched and self._is_sketched
        if sketch:
            g = self._flat_sketched()[0]
            factor = self.scale
        else:
            flat = self._flat()
            assert flat is not None
            g, factor = flat[0], self.coef
        plan = self._plan(tuple(v.shape[-1] for v in parts), sketch)
        out: Tensor | None = None
        for v, block in zip(parts, plan):
            if block is None:
                continue  # no sampled column in this block
            if sketch and self.out_rows is not None:
                v = v.index_select(0, self.out_rows)
            if block.cols is not None:
                v = v.index_select(1, block.cols)
            if block.a.dim() == 1:
                term = g @ v[:, 0]
                out = term.mul_(block.a) if out is None else out.addcmul_(term, block.a)
            else:
                term = (g @ v).mul_(block.a).sum(dim=-1)
                out = term if out is None else out.add_(term)
        if out is None:
            return g.new_zeros(self.m)
        return out if factor == 1.0 else out.mul_(factor)

    def dot_parts(self, parts: list[Tensor], *, sketched: bool = True) -> Tensor:  # noqa: D102
        flat = self._flat_parts(parts)
        if flat is not None:
            return self._dot_flat(flat, sketched)
        if sketched and self._is_sketched:
            g, a = self._sketched()
            return self._dot(self._restrict_parts(parts).to(g.dtype), g, a).mul_(self.scale)
        m, groups, d_out, r = self.g.shape
        left = self.g.permute(1, 0, 3, 2).reshape(groups, m * r, d_out)
        right = self.a.permute(1, 0, 3, 2).reshape(groups, m * r, -1)
        total: Tensor | None = None
        start = 0
        # Σ_i ⟨(left @ V_i), right_i⟩ over the column blocks: V is never concatenated.
        for part in parts:
            width = part.shape[-1]
            t = torch.bmm(left, part.to(left.dtype))
            t = t.mul_(right[..., start : start + width]).sum(dim=-1)
            total = t if total is None else total.add_(t)
            start += width
        assert total is not None
        out = total.reshape(groups, m, r).sum(dim=(0, 2))
        return out if self.coef == 1.0 else out.mul_(self.coef)

    def combine_into(self, w: Tensor, parts: list[Tensor], alpha: float, beta: float) -> None:
        """``V ← β V + α Σ_m w_m J_m`` in place: one ``baddbmm_`` per block, no temporaries."""
        if any(part.dtype != self.g.dtype for part in parts):
            super().combine_into(w, parts, alpha, beta)
            return
        flat = self._flat_parts(parts)
        if flat is not None:
            self._combine_flat(w, flat, alpha, beta)
            return
        left, right = self._combine_factors(w)
        start = 0
        for part in parts:
            width = part.shape[-1]
            part.baddbmm_(left, right[..., start : start + width], beta=beta, alpha=alpha)
            start += width

    def _combine_flat(self, w: Tensor, parts: list[Tensor], alpha: float, beta: float) -> None:
        """:meth:`combine_into` for ``G = r = 1``: ``V_i ← β V_i + α Gᵀ diag(w) A_i`` per block.

        The weights scale the smaller factor; a bias block is a matrix-vector product.
        """
        flat = self._flat()
        assert flat is not None
        g, a = flat
        plan = self._plan(tuple(v.shape[-1] for v in parts), False)
        w = (w if w.dtype == g.dtype else w.to(g.dtype)).unsqueeze(-1)
        alpha = alpha * self.coef
        scale_g = g.shape[1] <= a.shape[1]
        left = (g * w).T if scale_g else g.T
        for v, block in zip(parts, plan):
            assert block is not None
            right = block.a if scale_g else block.a * (w if block.a.dim() == 2 else w[:, 0])
            if right.dim() == 1:
                v[:, 0].addmv_(left, right, beta=beta, alpha=alpha)
            else:
                low_rank_update_(v, left, right, alpha, beta)

    def sketch(self, size: int, generator: torch.Generator) -> None:
        """Sample ``size`` rows of each factor whose dimension exceeds ``size``.

        Args:
            size: Rows kept per factor.
            generator: Random generator.
        """
        d_out, d_in = self.g.shape[2], self.a.shape[2]
        scale = 1.0
        if size < d_out:
            self.out_rows = _sample(d_out, size, generator, self.g.device)
            scale *= d_out / size
        if size < d_in:
            self.in_rows = _sample(d_in, size, generator, self.a.device)
            scale *= d_in / size
        self.scale = scale**0.5
        self._sub = None
        self._part_cols = {}
        self._flat_sub = None
        self._plans = {}

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "kind": self.kind,
            "g": self.g,
            "a": self.a,
            "out_rows": self.out_rows,
            "in_rows": self.in_rows,
            "scale": self.scale,
            "coef": self.coef,
        }


#: Elements of the products of pair columns that :meth:`PairRows.gram` forms at once.
PAIR_CHUNK_NUMEL = 1 << 20


class PairRows(Rows):
    """Per-example Jacobians of a one-hot layer as its (example, token) pairs (one group).

    ``J_m[:, v]`` is the sum of the layer's output gradients of example ``m`` at the positions
    holding token ``v`` (zero for the tokens ``m`` does not hold). The Gram matrix sums the
    inner products of the couples of pairs that share a token (:meth:`couples`; at most
    :data:`PAIR_CHUNK_NUMEL` elements of products at once); products with a canonical ``V``
    (``[1, d_out, width]``) gather or scatter the pairs' tokens.
    A sketch samples coordinates ``(token, output)`` of the batch's tokens, like
    :class:`DenseRows` on those tokens.

    Args:
        j: Pair columns ``[P, d_out]``.
        example: Each pair's example ``[P]`` (int64, below ``m``).
        token: Each pair's token ``[P]`` (int64, below ``width``); pairs are distinct.
        m: Number of examples ``M``.
        width: Vocabulary size (input columns of the layer).
    """

    kind = "pairs"

    def __init__(self, j: Tensor, example: Tensor, token: Tensor, m: int, width: int) -> None:
        self.j = j
        self.example = example
        self.token = token
        self._m = int(m)
        self.width = int(width)
        self.coords: Tensor | None = None
        self.scale = 1.0
        self._mask: Tensor | None = None
        self._touched: tuple[Tensor, Tensor] | None = None

    @property
    def m(self) -> int:  # noqa: D102
        return self._m

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.j.dtype

    @property
    def d_out(self) -> int:
        """Output width of the layer."""
        return int(self.j.shape[-1])

    def touched(self) -> tuple[Tensor, Tensor]:
        """``(tokens, position)``: the distinct tokens ``[U]`` and each pair's among them."""
        if self._touched is None:
            self._touched = torch.unique(self.token, return_inverse=True)
        return self._touched

    def _partners(self) -> tuple[Tensor, Tensor]:
        """Every ordered couple ``(p, q)`` of pairs with the same token, as two index vectors.

        ``L = Σ_v c_v²`` couples for ``c_v`` pairs of token ``v``: at most ``U·M²``, the
        dense Gram product's multiply-adds divided by ``d_out``, and far fewer when tokens are
        spread over the vocabulary. Built where the Gram matrix is (curvature steps), not kept.
        """
        order = torch.argsort(self.touched()[1], stable=True)
        _, counts = torch.unique_consecutive(self.token[order], return_counts=True)
        starts = counts.cumsum(0) - counts
        per_pair = counts.repeat_interleave(counts)  # c of each pair's token, sorted
        first = starts.repeat_interleave(counts)  # where each pair's token group starts
        total = int(per_pair.sum())  # one host sync, on curvature steps only
        left = torch.arange(order.numel(), device=order.device).repeat_interleave(
            per_pair, output_size=total
        )
        offsets = per_pair.cumsum(0) - per_pair
        step = torch.arange(total, device=order.device) - offsets.repeat_interleave(
            per_pair, output_size=total
        )
        right = first.repeat_interleave(per_pair, output_size=total) + step
        return order[left], order[right]

    def couples(self) -> int:
        """Number ``L`` of couples of pairs with the same token (the Gram matrix's work)."""
        _, counts = torch.unique(self.token, return_counts=True)
        return int(counts.square().sum())

    def gram(self) -> Tensor:  # noqa: D102
        # G_mn = Σ over couples (p, q) of one token with p in example m, q in n of ⟨j_p, j_q⟩
        # (restricted to the sampled coordinates of the token if sketched)
        left, right = self._partners()
        m, d = self.m, self.d_out
        out = self.j.new_zeros(m * m)
        per_chunk = max(1, PAIR_CHUNK_NUMEL // max(1, d))
        for lo in range(0, int(left.numel()), per_chunk):
            p, q = left[lo : lo + per_chunk], right[lo : lo + per_chunk]
            prod = self.j.index_select(0, p).mul_(self.j.index_select(0, q))
            if self.coords is not None:
                assert self._mask is not None
                prod.mul_(self._mask.index_select(0, self.touched()[1].index_select(0, p)))
            where = self.example.index_select(0, p).mul(m).add_(self.example.index_select(0, q))
            out.index_add_(0, where, prod.sum(-1))
            del prod
        out = out.view(m, m)
        return out if self.coords is None else out.mul_(self.scale * self.scale)

    def _gathered(self, v: Tensor) -> Tensor:
        """``V`` at each pair's token: ``[P, d_out]`` for canonical ``V`` ``[1, d_out, width]``."""
        return v.to(self.j.dtype)[0].index_select(1, self.token).T

    def dot(self, v: Tensor, *, sketched: bool = True) -> Tensor:  # noqa: D102
        prod = self._gathered(v).mul(self.j)
        if sketched and self.coords is not None:
            assert self._mask is not None
            prod.mul_(self._mask.index_select(0, self.touched()[1]))
            prod.mul_(self.scale * self.scale)
        return prod.new_zeros(self.m).index_add_(0, self.example, prod.sum(-1))

    def _weighted(self, w: Tensor) -> Tensor:
        return self.j * w.to(self.j.dtype).index_select(0, self.example).unsqueeze(-1)

    def combine(self, w: Tensor) -> Tensor:  # noqa: D102
        out = self.j.new_zeros(self.d_out, self.width)
        return out.index_add_(1, self.token, self._weighted(w).T).unsqueeze(0)

    def combine_into(self, w: Tensor, parts: list[Tensor], alpha: float, beta: float) -> None:
        """``V ← β V + α Σ_m w_m J_m`` in place: a scatter of the pairs into ``V``'s columns."""
        if len(parts) != 1 or parts[0].dtype != self.j.dtype:
            super().combine_into(w, parts, alpha, beta)
            return
        v = parts[0]
        v.mul_(beta)
        v[0].index_add_(1, self.token, self._weighted(w).T, alpha=alpha)

    def sketch(self, size: int, generator: torch.Generator) -> None:
        """Sample ``size`` coordinates ``(token, output)`` of the batch's tokens (if fewer).

        Args:
            size: Number of coordinates.
            generator: Random generator.
        """
        numel = int(self.touched()[0].numel()) * self.d_out
        if size >= numel:
            return
        self.coords = _sample(numel, size, generator, self.j.device)
        self.scale = (numel / size) ** 0.5
        self._set_mask()

    def _set_mask(self) -> None:
        """The sampled coordinates as a 0/1 table ``[U, d_out]`` (the sketched products')."""
        assert self.coords is not None
        mask = self.j.new_zeros(int(self.touched()[0].numel()) * self.d_out)
        mask[self.coords] = 1.0
        self._mask = mask.view(-1, self.d_out)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "kind": self.kind,
            "j": self.j,
            "example": self.example,
            "token": self.token,
            "m": self.m,
            "width": self.width,
            "coords": self.coords,
            "scale": self.scale,
        }


#: Column widths of a CPU low-rank update ``V ← β V + α L R`` that run in blocks of at most
#: 512 columns (:func:`low_rank_update_`). MKL runs such an update (inner size M = 32, 2
#: threads) into a row-major output of these widths at about half the rate of the same update
#: in blocks: at ``d_out = 512``, widths 520-900 take 0.40-0.52 × as long in blocks (784:
#: 0.214 -> 0.111 ms); at ``d_out`` 784 and 1024, widths 784-900 take 0.46-0.57 × and widths
#: 520-700 1.2 × (no slow mode there); widths of 1000 and more are 1.05-1.16 × slower in blocks
#: at every ``d_out``. With M = 128 and 512 the two blocks take 0.75-0.86 and 0.91-0.99 × as
#: long at widths 513-960. Measured in the study of issue 6; the bounds are that study's.
UPDATE_BLOCK_WIDTHS = (513, 960)


def low_rank_update_(v: Tensor, left: Tensor, right: Tensor, alpha: float, beta: float) -> None:
    """``V ← β V + α L R`` in place; in blocks of at most 512 columns where that is faster.

    Blocks are used on a CPU for widths in :data:`UPDATE_BLOCK_WIDTHS`.

    Args:
        v: ``[d_out, c]``, written in place.
        left: ``[d_out, M]``.
        right: ``[M, c]``.
        alpha: Scale of the product.
        beta: Scale of ``V``.
    """
    width = v.shape[-1]
    low, high = UPDATE_BLOCK_WIDTHS
    if v.device.type != "cpu" or not low <= width <= high:
        v.addmm_(left, right, beta=beta, alpha=alpha)
        return
    step = -(-width // 2)  # two equal blocks: 784 -> 392 + 392
    for start in range(0, width, step):
        stop = min(start + step, width)
        v[:, start:stop].addmm_(left, right[:, start:stop], beta=beta, alpha=alpha)


def load_rows(state: Mapping[str, Any]) -> Rows:
    """Rebuild rows saved with :meth:`Rows.state_dict`.

    Args:
        state: The saved state.

    Returns:
        The rows.

    Raises:
        ValueError: For an unknown kind.
    """
    kind = state.get("kind")
    rows: Rows
    if kind == DenseRows.kind:
        if state.get("cols") is not None:
            # the one-hot dense form (restricted to some input columns) is no longer made:
            # embeddings take PairRows
            raise invalid(
                "state",
                "dense rows on a subset of input columns",
                "Saved by an earlier version for a one-hot layer; start from a fresh "
                "preconditioner (the next curvature step rebuilds it)",
            )
        dense = DenseRows(state["j"])
        dense.coords, dense.scale = state["coords"], float(state["scale"])
        rows = dense
    elif kind == FactorRows.kind:
        fac = FactorRows(state["g"], state["a"], float(state.get("coef", 1.0)))
        fac.out_rows, fac.in_rows = state["out_rows"], state["in_rows"]
        fac.scale = float(state["scale"])
        rows = fac
    elif kind == PairRows.kind:
        pairs = PairRows(
            state["j"], state["example"], state["token"], int(state["m"]), int(state["width"])
        )
        if state["coords"] is not None:
            pairs.coords, pairs.scale = state["coords"], float(state["scale"])
            pairs._set_mask()
        rows = pairs
    else:
        raise ValueError(
            f"Invalid rows state: kind {kind!r}. Supported: ('dense', 'factor', 'pairs')."
        )
    return rows
