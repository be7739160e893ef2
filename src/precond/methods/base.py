"""The skeleton every preconditioner follows.

One step of :meth:`PreconditionedGradientMaker.forward_and_backward`::

    forward  (capture hooks record layer inputs, only on curvature steps)
    extra backward passes chosen by the curvature type (record output gradients)
    loss.backward()                       (p.grad = plain gradient)
    update_curvature(stats)               (every curvature_upd_interval steps)
    update_preconditioner()               (every preconditioner_upd_interval steps)
    precondition()                        (every step: p.grad ← P p.grad)

A method subclasses :class:`PreconditionedGradientMaker`, sets ``config_class``, declares what
it needs (``needs_adapter``, :meth:`_curvature_tags`) and implements the three verbs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capture import GRAD_TAG, Layer, LayerStats, Recorder, find_layers
from ..config import PreconditioningConfig
from ..curvature.loss import LossInputs
from ..curvature.products import twice_differentiable
from ..enums import CurvatureType, LossKind, WeightSharing
from ..grad_maker import GradientMaker
from ..validation import check_int, coerce_enum, invalid
from .fallback import DiagonalFallback

__all__ = [
    "FisherConfig",
    "PreconditionedGradientMaker",
    "accumulate_grads",
    "backward_other_leaves",
]


@dataclass(kw_only=True)
class FisherConfig(PreconditioningConfig):
    """Config of methods whose curvature is a Fisher-type matrix of the current batch.

    Args:
        curvature: ``fisher_exact``, ``fisher_mc`` (default), ``fisher_emp`` or ``ggn``.
        n_mc_samples: Labels sampled per example for ``fisher_mc``.
        weight_sharing: ``expand`` or ``reduce`` for layers with weight-sharing positions.
    """

    curvature: CurvatureType | str = CurvatureType.FISHER_MC
    n_mc_samples: int = 1
    weight_sharing: WeightSharing | str = WeightSharing.EXPAND

    def __post_init__(self) -> None:
        super().__post_init__()
        self.curvature = coerce_enum(CurvatureType, self.curvature, "curvature")
        if self.curvature is CurvatureType.HESSIAN:
            raise invalid(
                "curvature",
                "hessian",
                "This method builds its curvature from back-propagated vectors; supported: "
                "('fisher_exact', 'fisher_mc', 'fisher_emp', 'ggn')",
            )
        check_int("n_mc_samples", self.n_mc_samples, minimum=1)
        if self.curvature is not CurvatureType.FISHER_MC and self.n_mc_samples != 1:
            raise invalid(
                "n_mc_samples",
                self.n_mc_samples,
                "Only curvature='fisher_mc' draws samples; leave n_mc_samples=1",
            )
        self.weight_sharing = coerce_enum(WeightSharing, self.weight_sharing, "weight_sharing")


class PreconditionedGradientMaker(GradientMaker):
    """Base class of all preconditioners.

    Args:
        model: The model.
        config: The method's config (an instance of ``config_class``).

    Raises:
        ValueError: If the model has no parameter the method can precondition.
    """

    config_class: type[PreconditioningConfig] = PreconditioningConfig
    #: Whether layers need a capture adapter (Fisher-type methods) or only gradients.
    needs_adapter: ClassVar[bool] = True
    #: Whether curvature steps run the model without the caller's autocast (in its parameters'
    #: precision): for methods whose curvature products feed an iterative solver that assumes
    #: an exact operator (see :mod:`precond.precision`). Other steps keep the autocast.
    full_precision_curvature: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        super().__init__(model, config)
        self.partition = find_layers(
            model, self.config, needs_adapter=self.needs_adapter, method=type(self).__name__
        )
        self.layers: list[Layer] = self.partition.layers
        if not self.layers and not self.partition.fallback:
            raise invalid(
                "model",
                type(model).__name__,
                f"{type(self).__name__} found no trained parameter it can precondition "
                "(all frozen or ignored)",
            )
        self.recorder = Recorder(self.layers)
        self.curvature_schedule = self.config.curvature_schedule()
        self.preconditioner_schedule = self.config.preconditioner_schedule()
        self.fallback = DiagonalFallback(
            [p for layer in self.partition.fallback for p in layer.params],
            damping=self.config.effective_damping,
            ema_decay=self.config.ema_decay,
        )
        self._has_curvature = False
        self._has_preconditioner = False

    # ---- what a method declares -------------------------------------------------------------
    def _capture(self) -> bool:
        """Whether curvature steps record layer statistics (default: if the method has layers)."""
        return self.needs_adapter

    def _curvature_tags(self) -> list[CurvatureType]:
        """Fisher-type curvatures whose output gradients the curvature step records."""
        curvature = getattr(self.config, "curvature", None)
        if isinstance(curvature, CurvatureType) and curvature is not CurvatureType.HESSIAN:
            return [curvature]
        return []

    def _records_loss_grads(self) -> bool:
        """Whether the loss's own backward pass must record output gradients (tag ``grad``)."""
        return CurvatureType.FISHER_EMP in self._curvature_tags()

    def _second_derivatives(self, curvature_step: bool) -> bool:
        """Whether this step differentiates through the gradient's graph (a double backward).

        Methods with Hessian-vector products, or GGN products by a double vector-Jacobian
        product, say so on their curvature steps: the model's forward then runs the attention
        kernel that can be differentiated twice (:func:`twice_differentiable`).
        """
        return False

    @abstractmethod
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:
        """Fold this step's statistics into the curvature estimate."""

    @abstractmethod
    def update_preconditioner(self) -> None:
        """Refresh the preconditioner (inverses, eigendecompositions) from the curvature."""

    @abstractmethod
    def precondition(self) -> None:
        """Replace ``p.grad`` by the preconditioned gradient for every preconditioned parameter."""

    # ---- the step ---------------------------------------------------------------------------
    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        try:
            return self._passes()
        except RuntimeError as exc:
            if "double backward" not in str(exc) or "compile" not in str(exc):
                raise
            raise invalid(
                "model",
                "a model with torch.compile'd parts",
                f"{type(self).__name__} differentiates the gradient (Hessian or GGN products) "
                "on curvature steps, and torch.compile does not support double backward; a "
                "compiled top-level module is called uncompiled on those steps, compiled "
                "submodules are not: compile the whole model instead, or not at all "
                f"(torch: {exc})",
            ) from exc
        finally:
            self._eager_model = False

    def _passes(self) -> tuple[Any, Tensor]:
        """One step's forward and backward passes, curvature, refresh and apply."""
        step = self._step
        upd_curvature = self.curvature_schedule.is_update_step(step) or not self._has_curvature
        upd_preconditioner = self.preconditioner_schedule.is_update_step(step) or (
            upd_curvature and not self._has_preconditioner
        )
        second = self._second_derivatives(upd_curvature)
        twice = twice_differentiable(second)
        # torch.compile'd models have no double backward: such steps call the original module
        self._eager_model = second
        if upd_curvature and self.full_precision_curvature:
            # the model (forward() and any replay of it) runs without the caller's autocast
            # for the rest of this step; forward_and_backward restores it for the next
            self._autocast = ()
        if upd_curvature and self._capture():
            with self.recorder.record(self.batch_size, grads=self._records_loss_grads()) as stats:
                with twice:
                    output, loss = self.forward()
                if self._extra_passes_last():
                    # The loss's backward first: the extra passes' recorded output gradients
                    # then accumulate while the last pass frees the activations, instead of
                    # being held beside the whole graph.
                    loss.backward(retain_graph=True)
                    self._curvature_backward(stats, free_graph=True)
                else:
                    self._curvature_backward(stats)
                    self._backward(loss, upd_curvature)
                self._finish_stats(stats)
        else:
            stats = {}
            with twice:
                output, loss = self.forward()
            self._backward(loss, upd_curvature)
        if upd_curvature:
            self.update_curvature(stats)
            self.fallback.update()
            self._has_curvature = True
        # The step's statistics (inputs, im2col patches, output gradients) die here, before the
        # refresh's factorisations allocate their workspaces.
        del stats
        if upd_preconditioner:
            self.update_preconditioner()
            self._has_preconditioner = True
        self.precondition()
        self.fallback.precondition()
        return output, loss

    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        """The loss's backward pass, which writes ``p.grad``.

        Methods that need second derivatives (Hessian-vector products) override it and use
        :func:`accumulate_grads`.
        """
        loss.backward()

    @property
    def params(self) -> list[nn.Parameter]:
        """Every trained parameter of the model (preconditioned, fallback and plain)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _extra_passes(self) -> list[CurvatureType]:
        """The curvatures that need backward passes of their own (all but the empirical)."""
        return [t for t in self._curvature_tags() if t is not CurvatureType.FISHER_EMP]

    def _extra_passes_last(self) -> bool:
        """Whether the extra passes run after the loss's own backward (the last freeing the graph).

        Only for methods with the plain loss backward: one that overrides :meth:`_backward`
        (second derivatives) keeps the graph its own way.
        """
        plain = type(self)._backward is PreconditionedGradientMaker._backward
        return plain and bool(self._extra_passes())

    def _curvature_backward(
        self, stats: Mapping[str, LayerStats], free_graph: bool = False
    ) -> None:
        """Run the extra backward passes of the Fisher-type curvatures.

        Args:
            stats: This step's statistics (filled with the recorded output gradients).
            free_graph: The last pass frees the graph (it runs after the loss's backward).
        """
        tags = self._extra_passes()
        if not tags:
            return
        inputs = self.loss_inputs()
        for i, curvature in enumerate(tags):
            vectors = inputs.vectors(
                curvature,
                n_samples=int(getattr(self.config, "n_mc_samples", 1)),
                generator=self.generator,
            )
            self.recorder.backprop(
                inputs.logits,
                torch.stack(list(vectors)),
                curvature.value,
                retain_graph=not free_graph or i < len(tags) - 1,
            )

    def _finish_stats(self, stats: Mapping[str, LayerStats]) -> None:
        if CurvatureType.FISHER_EMP in self._curvature_tags():
            factor = self.loss_inputs().empirical_factor()
            for st in stats.values():
                st.alias_tag(CurvatureType.FISHER_EMP.value, GRAD_TAG, factor)

    @property
    def damping(self) -> float:
        """The damping added to the curvature (``damping / data_size``)."""
        return self.config.effective_damping

    def _method_state_dict(self) -> dict[str, Any]:
        return {
            "has_curvature": self._has_curvature,
            "has_preconditioner": self._has_preconditioner,
            "fallback": self.fallback.state_dict(),
            "preconditioner": self.preconditioner_state_dict(),
        }

    def _load_method_state_dict(self, state: Mapping[str, Any]) -> None:
        self._has_curvature = bool(state["has_curvature"])
        self._has_preconditioner = bool(state["has_preconditioner"])
        self.fallback.load_state_dict(state["fallback"])
        self.load_preconditioner_state_dict(state["preconditioner"])

    @abstractmethod
    def preconditioner_state_dict(self) -> dict[str, Any]:
        """The method's own state (curvature estimates, preconditioners, counters)."""

    @abstractmethod
    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`preconditioner_state_dict`."""


def loss_kind_of(inputs: LossInputs) -> LossKind:
    """The loss kind of parsed inputs (convenience for methods)."""
    return inputs.spec.kind


def backward_other_leaves(gm: GradientMaker, loss: Tensor) -> None:
    """Fill ``.grad`` of the call arguments' leaves (:meth:`GradientMaker.other_leaves`).

    For the methods whose curvature steps take the gradient with ``torch.autograd.grad`` on
    the parameters alone, which leaves an input that requires a gradient without one; called
    before that pass (the graph is retained for it). Nothing is done without such leaves.

    Args:
        gm: The gradient maker (its model and loss calls).
        loss: The step's loss (its graph intact).
    """
    leaves = gm.other_leaves()
    if not leaves:
        return
    grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    used = [(t, g) for t, g in zip(leaves, grads) if g is not None]
    accumulate_grads([t for t, _ in used], [g for _, g in used])


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add ``grads`` into ``p.grad`` like ``backward()`` does (``None`` grads become the value).

    Args:
        params: Parameters.
        grads: Gradients (detached here), aligned with ``params``.
    """
    for p, g in zip(params, grads):
        g = g.detach()
        if p.grad is None:
            p.grad = g.clone() if g.requires_grad else g
        else:
            p.grad.add_(g)
