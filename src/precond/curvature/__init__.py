"""What the curvature matrix is: loss-side vectors, exact oracles, Fisher and Hessian makers."""

from __future__ import annotations

from .loss import LossInputs, LossSpec, UnknownLossError, parse_loss_call

__all__ = ["LossInputs", "LossSpec", "UnknownLossError", "parse_loss_call"]
