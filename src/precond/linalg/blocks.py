"""Curvature representations as blocks that share one protocol.

``update(...)`` folds a statistic in (EMA), ``refresh(damping)`` computes the amortised
factorisation, ``apply(v, power)`` multiplies by a power of the damped block, ``to_dense()``
returns the undamped matrix and ``state_dict()`` holds everything (statistics and factorisation)
so that a resumed run continues exactly.

Vectors are in the canonical layout of :mod:`precond.capture.base` where a layer is involved:
``[..., G, d_out, d_in]`` for Kronecker, eigenbasis, unit-wise and diagonal blocks; flat
``[..., P]`` for dense (layer-wise or full) blocks. ``to_dense`` orders coordinates row-major in
that layout (``vec`` of ``[G, d_out, d_in]``), so ``kron(B, A)`` is a group's Kronecker block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ..numerics import all_sums_finite
from .ema import ema_update
from .solvers import (
    damped_cholesky,
    damped_factor,
    eigh_psd,
    factor_inverse,
    psd_power,
)

__all__ = [
    "Block",
    "DenseBlock",
    "DiagBlock",
    "KfeBlock",
    "KronBlock",
    "KronDamping",
    "Solver",
]


class Solver(str, Enum):
    """How a dense or Kronecker block is inverted."""

    CHOLESKY = "cholesky"
    EIGH = "eigh"

    def __str__(self) -> str:
        return self.value


class KronDamping(str, Enum):
    """How damping enters a Kronecker block.

    ``pi``: split between the factors with Martens & Grosse's π (``A + π√λ I``,
    ``B + √λ/π I``); ``sqrt``: ``√λ`` on each factor; ``exact``: ``(B ⊗ A + λ I)`` through the
    factors' eigendecompositions (needs the ``eigh`` solver).
    """

    PI = "pi"
    SQRT = "sqrt"
    EXACT = "exact"

    def __str__(self) -> str:
        return self.value


def _state(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in names:
        v = getattr(obj, n)
        out[n] = v.clone() if isinstance(v, Tensor) else v
    return out


def _load(obj: Any, state: Mapping[str, Any], names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"Invalid block state: missing {missing} for {type(obj).__name__}.")
    for n in names:
        v = state[n]
        setattr(obj, n, v.clone() if isinstance(v, Tensor) else v)


class Block(ABC):
    """The protocol shared by every representation."""

    _state_names: tuple[str, ...] = ()

    @abstractmethod
    def refresh(self, damping: float) -> bool:
        """Compute the damped factorisation; keep the previous one and return False on failure."""

    @abstractmethod
    def apply(self, v: Tensor, power: float = -1.0) -> Tensor:
        """Multiply ``v`` by ``(C + λI)^power`` (``power = 1``: the undamped ``C``)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The undamped curvature as a dense matrix in canonical coordinate order."""

    @property
    def ready(self) -> bool:
        """Whether a refreshed factorisation exists."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """Statistics and factorisation, cloned."""
        return _state(self, self._state_names)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        _load(self, state, self._state_names)


class DenseBlock(Block):
    """A dense symmetric block per batch entry: layer-wise, full or unit-wise curvature.

    Args:
        solver: ``cholesky`` (powers −1 and 1) or ``eigh`` (any power).
    """

    _state_names = ("matrix", "inverse", "evals", "evecs", "damping")

    def __init__(self, solver: Solver | str = Solver.CHOLESKY) -> None:
        self.solver = Solver(solver)
        self.matrix: Tensor | None = None
        self.inverse: Tensor | None = None
        self.evals: Tensor | None = None
        self.evecs: Tensor | None = None
        self.damping = 0.0

    def update(self, matrix: Tensor, ema_decay: float = 0.0) -> None:
        """Fold in ``[..., n, n]``."""
        self.matrix = ema_update(self.matrix, matrix, ema_decay)

    @property
    def ready(self) -> bool:  # noqa: D102
        return self.inverse is not None or self.evecs is not None

    def refresh(self, damping: float) -> bool:  # noqa: D102
        assert self.matrix is not None, "update() before refresh()"
        if self.solver is Solver.EIGH:
            dec = eigh_psd(self.matrix)
            if dec is None:
                return False
            self.evals, self.evecs = dec
            self.damping = damping
            return True
        fac = damped_cholesky(self.matrix, damping, padded=True)
        if fac is None:
            return False
        # the factor is column-major in a buffer of its own (at a padded order where that is
        # faster): inverted where it lies (no buffer for the inverse beside it)
        self.inverse = factor_inverse(fac[0], self.matrix.shape[-1])
        self.damping = fac[1]
        return True

    def apply(self, v: Tensor, power: float = -1.0) -> Tensor:  # noqa: D102
        vec = v.unsqueeze(-1)
        if power == 1.0:
            assert self.matrix is not None
            return (self.matrix.to(v.dtype) @ vec).squeeze(-1)
        if self.solver is Solver.EIGH:
            assert self.evals is not None and self.evecs is not None
            mat = psd_power(self.evals, self.evecs, power, self.damping)
            return (mat.to(v.dtype) @ vec).squeeze(-1)
        if power != -1.0:
            raise ValueError(f"Invalid power: {power}. The cholesky solver supports -1 and 1.")
        assert self.inverse is not None
        return (self.inverse.to(v.dtype) @ vec).squeeze(-1)

    def to_dense(self) -> Tensor:  # noqa: D102
        assert self.matrix is not None
        return self.matrix


class DiagBlock(Block):
    """Element-wise curvature (the diagonal of any representation), any shape."""

    _state_names = ("values", "damping")

    def __init__(self) -> None:
        self.values: Tensor | None = None
        self.damping = 0.0

    def update(self, values: Tensor, ema_decay: float = 0.0) -> None:
        """Fold in the diagonal entries."""
        self.values = ema_update(self.values, values, ema_decay)

    def refresh(self, damping: float) -> bool:  # noqa: D102
        if self.values is None or not all_sums_finite([self.values]):
            return False
        self.damping = damping
        return True

    def apply(self, v: Tensor, power: float = -1.0) -> Tensor:  # noqa: D102
        assert self.values is not None
        if power == 1.0:
            return v * self.values.to(v.dtype)
        return v * (self.values + self.damping).pow(power).to(v.dtype)

    def to_dense(self) -> Tensor:  # noqa: D102
        assert self.values is not None
        return torch.diag(self.values.reshape(-1))


class KronBlock(Block):
    """Kronecker-factored curvature ``B ⊗ A`` per group (K-FAC).

    ``A`` (``[G, d_in, d_in]``, or ``[G, d_in]`` when diagonal, as for embeddings) is the input
    factor, ``B`` (``[G, d_out, d_out]``) the output-gradient factor; ``apply`` computes
    ``B^p V A^p`` for ``V`` of shape ``[..., G, d_out, d_in]``.

    Args:
        solver: ``cholesky`` (inverse only) or ``eigh`` (any power, exact damping).
        damping_mode: ``pi``, ``sqrt`` or ``exact`` (see :class:`KronDamping`).
    """

    _state_names = ("a", "b", "a_inv", "b_inv", "a_eig", "b_eig", "damping")

    def __init__(
        self,
        solver: Solver | str = Solver.CHOLESKY,
        damping_mode: KronDamping | str = KronDamping.PI,
    ) -> None:
        self.solver = Solver(solver)
        self.damping_mode = KronDamping(damping_mode)
        if self.damping_mode is KronDamping.EXACT and self.solver is not Solver.EIGH:
            raise ValueError(
                "Invalid damping_mode: 'exact'. Exact Kronecker damping needs solver='eigh'."
            )
        self.a: Tensor | None = None
        self.b: Tensor | None = None
        self.a_inv: Tensor | None = None
        self.b_inv: Tensor | None = None
        self.a_eig: tuple[Tensor, Tensor] | None = None
        self.b_eig: tuple[Tensor, Tensor] | None = None
        self.damping = 0.0

    @property
    def a_diagonal(self) -> bool:
        """Whether the input factor is diagonal."""
        return self.a is not None and self.a.dim() == 2

    def update(self, a: Tensor | None, b: Tensor | None, ema_decay: float = 0.0) -> None:
        """Fold in new factors (either may be ``None`` to keep the current one)."""
        if a is not None:
            self.a = ema_update(self.a, a, ema_decay)
        if b is not None:
            self.b = ema_update(self.b, b, ema_decay)

    @property
    def ready(self) -> bool:  # noqa: D102
        return self.b_inv is not None or self.b_eig is not None

    def _split(self, damping: float) -> tuple[Tensor, Tensor]:
        assert self.a is not None and self.b is not None
        root = damping**0.5
        if self.damping_mode is KronDamping.SQRT:
            one = torch.ones(self.b.shape[0], dtype=self.b.dtype, device=self.b.device)
            return root * one, root * one
        tr_a = self.a.mean(-1) if self.a_diagonal else self.a.diagonal(dim1=-2, dim2=-1).mean(-1)
        tr_b = self.b.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = (tr_a / tr_b.clamp(min=1e-30)).clamp(min=1e-30).sqrt()
        pi = torch.where(torch.isfinite(pi) & (tr_a > 0) & (tr_b > 0), pi, torch.ones_like(pi))
        return root * pi, root / pi

    def refresh(self, damping: float) -> bool:  # noqa: D102
        assert self.a is not None and self.b is not None, "update() before refresh()"
        if self.solver is Solver.EIGH:
            b_eig = eigh_psd(self.b)
            if self.a_diagonal:
                a_eig: tuple[Tensor, Tensor] | None = (self.a.clamp(min=0), self.a)
            else:
                a_eig = eigh_psd(self.a)
            if a_eig is None or b_eig is None:
                return False
            self.a_eig, self.b_eig, self.damping = a_eig, b_eig, damping
            return True
        da, db = self._split(damping)
        fa: Tensor | None = None
        if self.a_diagonal:
            a_den = self.a + da.unsqueeze(-1)
            if not bool(torch.isfinite(a_den).all() and (a_den > 0).all()):
                return False
            a_inv = 1.0 / a_den
        else:
            fa = damped_factor(self.a, da)
            if fa is None:
                return False
        fb = damped_factor(self.b, db)
        if fb is None:
            return False
        # Both factorisations succeeded: each is inverted in its own buffer.
        if fa is not None:
            a_inv = factor_inverse(fa, self.a.shape[-1])
            del fa
        self.a_inv = a_inv
        self.b_inv = factor_inverse(fb, self.b.shape[-1])
        self.damping = damping
        return True

    def apply(self, v: Tensor, power: float = -1.0) -> Tensor:  # noqa: D102
        if power == 1.0:
            assert self.a is not None and self.b is not None
            return self._sandwich(v, self.b, self.a)
        if self.solver is Solver.CHOLESKY:
            if power != -1.0:
                raise ValueError(f"Invalid power: {power}. The cholesky solver supports -1 and 1.")
            assert self.a_inv is not None and self.b_inv is not None
            return self._sandwich(v, self.b_inv, self.a_inv)
        assert self.a_eig is not None and self.b_eig is not None
        (la, qa), (lb, qb) = self.a_eig, self.b_eig
        if self.damping_mode is KronDamping.EXACT:
            rot = self._rotate(v, qb, qa)
            scale = (lb.unsqueeze(-1) * la.unsqueeze(-2) + self.damping).pow(power)
            return self._unrotate(rot * scale.to(v.dtype), qb, qa)
        da, db = self._split(self.damping)
        a_pow = (la + da.unsqueeze(-1)).pow(power)
        b_pow = psd_power(lb, qb, power, db)
        if self.a_diagonal:
            return (b_pow.to(v.dtype) @ v) * a_pow.unsqueeze(-2).to(v.dtype)
        return self._sandwich(v, b_pow, psd_power(la, qa, power, da))

    @staticmethod
    def _sandwich(v: Tensor, left: Tensor, right: Tensor) -> Tensor:
        out = left.to(v.dtype) @ v
        if right.dim() == left.dim() - 1:  # diagonal right factor
            return out * right.unsqueeze(-2).to(v.dtype)
        return out @ right.to(v.dtype)

    @staticmethod
    def _rotate(v: Tensor, qb: Tensor, qa: Tensor) -> Tensor:
        out = qb.transpose(-1, -2).to(v.dtype) @ v
        if qa.dim() == qb.dim() - 1:  # diagonal A: identity eigenbasis
            return out
        return out @ qa.to(v.dtype)

    @staticmethod
    def _unrotate(v: Tensor, qb: Tensor, qa: Tensor) -> Tensor:
        out = qb.to(v.dtype) @ v
        if qa.dim() == qb.dim() - 1:
            return out
        return out @ qa.transpose(-1, -2).to(v.dtype)

    def to_dense(self) -> Tensor:  # noqa: D102
        assert self.a is not None and self.b is not None
        a = torch.diag_embed(self.a) if self.a_diagonal else self.a
        # torch.kron fails on some non-contiguous slices (e.g. of eigh outputs): copy first.
        blocks = [
            torch.kron(self.b[g].contiguous(), a[g].contiguous()) for g in range(self.b.shape[0])
        ]
        return torch.block_diag(*blocks)


class KfeBlock(Block):
    """Kronecker-factored eigenbasis with per-coordinate scaling (EKFAC).

    ``C ≈ (Q_B ⊗ Q_A) diag(s) (Q_B ⊗ Q_A)ᵀ`` where ``Q_A``, ``Q_B`` are the eigenvectors of the
    Kronecker factors and ``s`` (``[G, d_out, d_in]``) are second moments of the gradients
    rotated into that basis (George et al. 2018).
    """

    _state_names = ("qa", "qb", "scale", "damping")

    def __init__(self) -> None:
        self.qa: Tensor | None = None
        self.qb: Tensor | None = None
        self.scale: Tensor | None = None
        self.damping = 0.0

    def set_basis(self, a: Tensor, b: Tensor) -> bool:
        """Eigenbases from Kronecker factors ``A`` (dense or diagonal) and ``B``."""
        eb = eigh_psd(b)
        if eb is None:
            return False
        if a.dim() == 2:
            qa = a.new_ones(a.shape)  # marker: identity basis for a diagonal factor
        else:
            ea = eigh_psd(a)
            if ea is None:
                return False
            qa = ea[1]
        self.qa, self.qb = qa, eb[1]
        return True

    def rotate(self, v: Tensor) -> Tensor:
        """``Q_Bᵀ V Q_A`` for ``V`` of shape ``[..., G, d_out, d_in]``."""
        assert self.qa is not None and self.qb is not None
        return KronBlock._rotate(v, self.qb, self.qa)

    def unrotate(self, v: Tensor) -> Tensor:
        """``Q_B V Q_Aᵀ``."""
        assert self.qa is not None and self.qb is not None
        return KronBlock._unrotate(v, self.qb, self.qa)

    def update(self, scale: Tensor, ema_decay: float = 0.0) -> None:
        """Fold in second moments of rotated gradients ``[G, d_out, d_in]``."""
        self.scale = ema_update(self.scale, scale, ema_decay)

    @property
    def ready(self) -> bool:  # noqa: D102
        return self.scale is not None and self.qb is not None

    def refresh(self, damping: float) -> bool:  # noqa: D102
        if self.scale is None or not all_sums_finite([self.scale]):
            return False
        self.damping = damping
        return True

    def apply(self, v: Tensor, power: float = -1.0) -> Tensor:  # noqa: D102
        assert self.scale is not None
        s = self.scale if power == 1.0 else (self.scale + self.damping).pow_(power)
        # The rotated copy is ours: scaled in place (same values, one temporary fewer).
        return self.unrotate(self.rotate(v).mul_(s.to(v.dtype)))

    def to_dense(self) -> Tensor:  # noqa: D102
        assert self.qa is not None and self.qb is not None and self.scale is not None
        groups = []
        for g in range(self.qb.shape[0]):
            qa = torch.eye(self.scale.shape[-1], dtype=self.qb.dtype, device=self.qb.device)
            if self.qa.dim() == 3:
                qa = self.qa[g]
            # torch.kron fails on non-contiguous slices of eigh's column-major output.
            q = torch.kron(self.qb[g].contiguous(), qa.contiguous())
            groups.append(q @ torch.diag(self.scale[g].reshape(-1)) @ q.T)
        return torch.block_diag(*groups)
