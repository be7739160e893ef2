"""The common part of the methods that solve ``(C + λI) x = g`` and precondition with the pair.

Hessian-free and LiSSA solve the damped curvature system on curvature steps; the accepted pair
``(x, g)`` becomes, on the next refresh, the secant operator that every step applies to the
gradients. This base keeps the pair, its adoption and its state; the solvers add the solve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PreconditioningConfig
from .flat import row, stack_rows
from .secant import PairPool, SecantInverse
from .second_order import SecondOrderGradientMaker

__all__ = ["SecantSolverGradientMaker"]


class SecantSolverGradientMaker(SecondOrderGradientMaker):
    """A second-order maker whose preconditioner is the secant operator of its last solve.

    Args:
        model: The model.
        config: The method's config.
    """

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        super().__init__(model, config)
        #: ``[2, P]``: the last accepted solution and its right-hand side (rows).
        self._latest: Tensor | None = None
        self.inverse = SecantInverse()
        #: A solved pair waits for the next refresh.
        self._pending = False
        # sᵀy of the pending pair when its check computed it (not state: recomputed after a
        # resume).
        self._pending_sy: float | None = None
        # Reused buffers: the solver's work rows and the new pairs.
        self._work: Tensor | None = None
        self._pairs = PairPool(self.vec, self.work_dtype)

    @property
    def solution(self) -> Tensor | None:
        """The last accepted solution ``x`` (flat), or ``None``."""
        return row(self._latest, 0)

    @property
    def rhs(self) -> Tensor | None:
        """The right-hand side ``g`` of :attr:`solution`."""
        return row(self._latest, 1)

    def _accept(self, pair: Tensor, sy: float | None = None) -> None:
        """Keep ``[x; g]`` as the latest solution (``sy = xᵀg`` if known); the refresh adopts it."""
        self._latest, self._pending, self._pending_sy = pair, True, sy

    def update_preconditioner(self) -> None:  # noqa: D102
        if self._pending and self._latest is not None:
            self.inverse.set_pair(self._latest, sy=self._pending_sy)
            self._pending = False
            self._pending_sy = None

    def precondition(self) -> None:  # noqa: D102
        if self.inverse.ready:
            self.inverse.apply_to_grads(self.vec)

    def _secant_state(self) -> dict[str, Any]:
        """The operator, the latest pair and whether it waits for a refresh (cloned)."""
        return {
            "inverse": self.inverse.state_dict(),
            "solution": None if self.solution is None else self.solution.clone(),
            "rhs": None if self.rhs is None else self.rhs.clone(),
            "pending": self._pending,
        }

    def _load_secant_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_secant_state` saved."""
        self.inverse.load_state_dict(state["inverse"])
        self._pending = bool(state["pending"])
        self._pending_sy = None
        self._latest = None
        if state["solution"] is not None:
            latest = stack_rows([state["solution"], state["rhs"]])
            pair = self.inverse.pair
            # Not pending: the refresh adopted this very pair; share it, as a live run does.
            same = not self._pending and pair is not None and torch.equal(pair, latest)
            self._latest = pair if same else latest
        self._pairs.clear()
