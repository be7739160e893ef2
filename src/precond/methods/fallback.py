"""Diagonal fallback for modules a method cannot precondition (``unsupported="diag"``).

The fallback is an RMSProp-style diagonal second-moment preconditioner:
``v ← β v + (1 − β) g²`` on curvature steps and ``p.grad ← g / (√v + λ)`` on every step, with
``β = ema_decay`` and ``λ`` the damping. It needs only gradients, so it works for any module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DiagonalFallback"]


class DiagonalFallback:
    """Element-wise second-moment preconditioning of a list of parameters.

    Args:
        params: The parameters handled by the fallback.
        damping: Added to ``√v`` before dividing.
        ema_decay: Decay ``β`` of the second-moment average.
    """

    def __init__(self, params: list[nn.Parameter], *, damping: float, ema_decay: float) -> None:
        self.params = params
        # A floor keeps zero second moments from dividing by zero when damping is 0.
        self.damping = max(damping, 1e-12)
        self.ema_decay = ema_decay
        self.second_moments: list[Tensor | None] = [None] * len(params)

    def update(self) -> None:
        """Fold the current squared gradients into the second moments."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g2 = (
                p.grad.detach().float().square()
                if p.grad.dtype != torch.float64
                else p.grad.square()
            )
            v = self.second_moments[i]
            if v is None:
                self.second_moments[i] = torch.nan_to_num(g2, nan=0.0, posinf=0.0)
            else:
                # A non-finite gradient must not poison the running moment (no host sync).
                new = v * self.ema_decay + g2 * (1.0 - self.ema_decay)
                torch.where(torch.isfinite(g2).all(), new, v, out=v)

    def precondition(self) -> None:
        """Divide each gradient by ``√v + λ``."""
        for p, v in zip(self.params, self.second_moments):
            if p.grad is None or v is None:
                continue
            p.grad.copy_(p.grad / (v.sqrt() + self.damping).to(p.grad.dtype))

    def state_dict(self) -> dict[str, Any]:
        """The second moments."""
        return {"second_moments": [None if v is None else v.clone() for v in self.second_moments]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        moments = list(state["second_moments"])
        if len(moments) != len(self.params):
            raise ValueError(
                f"Invalid fallback state: {len(moments)} moments for {len(self.params)} parameters."
            )
        self.second_moments = [None if v is None else v.clone() for v in moments]
