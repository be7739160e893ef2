"""How the GGN products of the second-order methods get ``J v`` (the logits' tangent).

:class:`TangentProductsMixin` is the part of
:class:`~precond.methods.second_order.SecondOrderGradientMaker` that chooses, per curvature
step, between the three ways (``jvp_mode``): pushing tangents through the retained graph
(:class:`~precond.methods.graph_jvp.GraphTangent`, the default), replaying the model call in
forward mode (:class:`~precond.methods.forward_jvp.ModelReplay`) and the double
vector-Jacobian product of :class:`~precond.methods.second_order.BatchCurvature`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..curvature.loss import parse_loss_call
from ..dummy import evaluate
from ..enums import CurvatureType
from ..grad_maker import uncompiled
from ..numerics import warn_once
from .base import PreconditionedGradientMaker
from .flat import ParamVector
from .forward_jvp import ModelReplay, RngState, capture_rng
from .graph_jvp import GraphTangent, Unsupported

__all__ = ["TangentProductsMixin"]


class TangentProductsMixin(PreconditionedGradientMaker):
    """Chooses how GGN products get ``J v``; records the random state the replay needs.

    Attributes (set by the subclass): ``vec`` (the flat layout), ``jvp_mode``, ``_rng`` and
    ``_record_rng``.
    """

    vec: ParamVector
    jvp_mode: str
    _rng: RngState | None
    _record_rng: bool

    def _hessian_products(self) -> bool:
        return True

    def _method_state_dict(self) -> dict[str, Any]:
        # a fallback to reverse mode is kept across a resume (products equal to rounding)
        return {**super()._method_state_dict(), "jvp_mode": self.jvp_mode}

    def _load_method_state_dict(self, state: Mapping[str, Any]) -> None:
        super()._load_method_state_dict(state)
        self.jvp_mode = str(state.get("jvp_mode", self.jvp_mode))

    def _ggn_products_in(self, mode: str) -> bool:
        """Whether this step's GGN products get ``J v`` the way ``mode`` names."""
        curvature = getattr(self.config, "curvature", None)
        return (
            self.jvp_mode == mode
            and curvature is CurvatureType.GGN
            and not self._hessian_products()
        )

    def _forward_products(self) -> bool:
        """Whether this step's GGN products take ``J v`` from a forward-mode replay."""
        return self._ggn_products_in("forward")

    def _trained(self) -> list[Any]:
        """The preconditioned parameters trained at this step."""
        return [p for p, a in zip(self.vec.params, self.vec.active()) if a]

    def forward(self) -> tuple[Any, Tensor]:  # noqa: D102 (GradientMaker.forward)
        if self._record_rng:  # curvature steps with forward-mode products only
            self._rng = capture_rng(self._device())
        return super().forward()

    def _logits_of(self, output: Any) -> Tensor:
        """The tensor the loss reads, from a model output (as :meth:`loss_inputs` finds it)."""
        if self._logits_repr is not None:
            return evaluate(self._logits_repr.dummy, self._token, output)
        lc = self._loss_call
        assert lc is not None
        args = evaluate(lc.args, self._token, output)
        kwargs = evaluate(lc.kwargs, self._token, output)
        return parse_loss_call(lc.fn, args, kwargs, self.batch_size).logits

    def _replay(self) -> ModelReplay | None:
        """The forward-mode replay of this step's model call, or ``None`` (reverse mode)."""
        call = self._model_call
        z = self.loss_inputs().logits
        if self._rng is None or call is None or not isinstance(z, Tensor):
            return None
        reason = None
        model = uncompiled(self.model)
        if uncompiled(call.fn) is not model:
            reason = "the model call is not the module itself"
        else:
            try:
                return ModelReplay(
                    model,
                    call.args,
                    call.kwargs,
                    self._trained(),
                    self._logits_of,
                    self._rng,
                    z.shape,
                    self._autocast,
                )
            except ValueError as exc:
                reason = str(exc)
        warn_once(
            "second_order.replay",
            f"GGN products: {reason}, so it cannot be replayed with forward-mode "
            "differentiation; using the double vector-Jacobian product (slower, same result).",
        )
        self.jvp_mode = "reverse"
        return None

    def _graph_products(self) -> bool:
        """Whether GGN products push tangents through the retained graph (``"graph"`` mode)."""
        return self._ggn_products_in("graph")

    def _graph_tangent(self) -> GraphTangent | None:
        """``J v`` through this step's retained graph, or ``None`` (reverse mode)."""
        z = self.loss_inputs().logits
        if not isinstance(z, Tensor) or z.grad_fn is None:
            return None
        try:
            return GraphTangent(z, self._trained())
        except Unsupported as exc:
            warn_once(
                f"second_order.graph.{exc}",
                f"GGN products: {exc} in the model's graph, so J v uses the double "
                "vector-Jacobian product on this batch (slower, same result).",
            )
            return None
