"""``FisherMaker`` and ``HessianMaker``: curvature itself, through the gradient-maker protocol.

.. code-block:: python

    fm = precond.FisherMaker(model, precond.FisherMakerConfig(curvature="fisher_mc", seed=0))
    dummy_y = fm.setup_model_call(model, x)
    fm.setup_loss_call(F.cross_entropy, dummy_y, t)
    result = fm.compute(shapes=("kron", "diag"), n_mc_samples=4)
    result["fc1"].diag                     # [G, d_out, d_in'] (canonical order)
    result["fc1"].kron.to_dense()          # B ⊗ A

Every number is the curvature of the loss *as written* (``mean`` or ``sum``; see
``docs/conventions.md``). ``forward_and_backward()`` also works: it computes the configured
curvature, writes the ordinary gradient into ``p.grad`` and keeps the result in
:attr:`FisherMaker.result`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture import Layer, Recorder, find_layers
from ..config import PreconditioningConfig
from ..enums import CurvatureType, Shape, WeightSharing
from ..grad_maker import GradientMaker, caller_autocast
from ..methods.base import FisherConfig
from ..numerics import warn_once
from ..validation import check_int, coerce_enum, invalid
from .hessian import (
    hessian_diagonal_hutchinson,
    hessian_full,
    hessian_layer_block,
    hessian_layer_curvature,
)
from .operators import CurvatureOperator, fisher_product, ggn_product, hessian_product
from .products import gradient_with_graph, twice_differentiable
from .representation import Curvature, fisher_from_stats, full_from_stats

__all__ = ["FisherMaker", "FisherMakerConfig", "HessianMaker", "HessianMakerConfig"]

_HESSIAN_SHAPES = (Shape.FULL, Shape.LAYER_WISE, Shape.UNIT_WISE, Shape.DIAG)


def _coerce_shapes(shapes: Any, allowed: Sequence[Shape], what: str) -> tuple[Shape, ...]:
    if isinstance(shapes, str | Shape):
        shapes = (shapes,)
    if not isinstance(shapes, Sequence) or len(shapes) == 0:
        raise invalid(
            "shapes", shapes, f"Request at least one of {tuple(s.value for s in allowed)}"
        )
    out = []
    for s in shapes:
        shape = coerce_enum(Shape, s, "shapes")
        if shape not in allowed:
            raise invalid(
                "shapes",
                shape.value,
                f"{what}; supported: {tuple(a.value for a in allowed)}",
            )
        out.append(shape)
    return tuple(dict.fromkeys(out))


@dataclass(kw_only=True)
class FisherMakerConfig(FisherConfig):
    """Options of :class:`FisherMaker` (and defaults of :meth:`FisherMaker.compute`).

    Args:
        curvature: ``fisher_exact`` (default), ``fisher_mc``, ``fisher_emp`` or ``ggn``.
        shapes: Representations to compute: any of ``full``, ``layer_wise``, ``unit_wise``,
            ``diag``, ``kron``, ``kfe``.
    """

    curvature: CurvatureType | str = CurvatureType.FISHER_EXACT
    shapes: Sequence[Shape | str] = (Shape.LAYER_WISE,)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shapes = _coerce_shapes(self.shapes, tuple(Shape), "Unknown representation")


@dataclass(kw_only=True)
class HessianMakerConfig(PreconditioningConfig):
    """Options of :class:`HessianMaker`.

    Args:
        shapes: Any of ``full``, ``layer_wise``, ``unit_wise``, ``diag`` (the Hessian has no
            Kronecker factorisation).
    """

    shapes: Sequence[Shape | str] = (Shape.LAYER_WISE,)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shapes = _coerce_shapes(
            self.shapes, _HESSIAN_SHAPES, "The Hessian has no Kronecker factorisation"
        )


class _CurvatureMaker(GradientMaker):
    """Shared plumbing: layers, the loss inputs of the last forward, operators."""

    layers: list[Layer]

    def _init_layers(self, model: nn.Module, needs_adapter: bool) -> None:
        part = find_layers(
            model, self.config, needs_adapter=needs_adapter, method=type(self).__name__
        )
        self.layers = part.layers
        if not self.layers:
            raise invalid(
                "model",
                type(model).__name__,
                f"{type(self).__name__} found no trained parameter (all frozen or ignored)",
            )
        self.result: Curvature | None = None
        self._last: tuple[Any, Tensor] | None = None
        # Curvature is differentiated twice (products, Hessian blocks), which torch.compile's
        # autograd cannot do: a compiled model is always called uncompiled here.
        self._eager_model = True

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters covered, in the order of full matrices and flat vectors."""
        return [p for layer in self.layers for p in layer.params]

    @caller_autocast
    def operator(
        self,
        curvature: CurvatureType | str = CurvatureType.HESSIAN,
        *,
        n_mc_samples: int = 1,
    ) -> CurvatureOperator:
        """A matrix-free operator for the current batch (runs one forward pass, keeps its graph).

        Args:
            curvature: ``hessian``, ``ggn``, ``fisher_exact``, ``fisher_mc`` or ``fisher_emp``.
            n_mc_samples: Samples for ``fisher_mc`` (drawn once, from :attr:`generator`).

        Returns:
            The operator over :attr:`params`.
        """
        kind = coerce_enum(CurvatureType, curvature, "curvature")
        check_int("n_mc_samples", n_mc_samples, minimum=1)
        self._check_ready()
        # every product differentiates the graph twice (a GGN or Fisher product by a double
        # vector-Jacobian product): attention on its composite path
        with torch.enable_grad(), twice_differentiable(True):
            _, loss = self.forward()
            params = self.params
            if kind is CurvatureType.HESSIAN:
                return CurvatureOperator(params, hessian_product(loss, params))
            inputs = self.loss_inputs()
            if kind is CurvatureType.GGN:
                return CurvatureOperator(params, ggn_product(loss, inputs.logits, params))
            product = fisher_product(
                inputs, params, kind, n_samples=n_mc_samples, generator=self.generator
            )
            return CurvatureOperator(params, product)

    def _finish(self, result: Curvature) -> tuple[Any, Tensor]:
        self.result = result
        assert self._last is not None
        return self._last


def _accumulate(params: list[nn.Parameter], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads):
        g = g.detach()
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)


class FisherMaker(_CurvatureMaker):
    """Fisher-type curvature (exact, Monte-Carlo, empirical Fisher; GGN) per layer.

    What is back-propagated for each type is decided by
    :class:`~precond.curvature.loss.LossInputs` alone; every representation is then built from
    the captured layer inputs and output gradients (:mod:`precond.curvature.fisher`).

    Args:
        model: The model (BatchNorm in eval mode: in training mode examples are coupled and
            per-example curvature is not defined).
        config: :class:`FisherMakerConfig`.
    """

    config_class = FisherMakerConfig
    config: FisherMakerConfig

    def __init__(self, model: nn.Module, config: FisherMakerConfig | None = None) -> None:
        super().__init__(model, config)
        self._init_layers(model, needs_adapter=True)
        self.recorder = Recorder(self.layers)

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        return self._finish(self.compute(accumulate_grad=True))

    def _warn_coupled_examples(self) -> None:
        for layer in self.layers:
            if isinstance(layer.module, _BatchNorm) and layer.module.training:
                warn_once(
                    f"fisher_maker:batchnorm_train:{layer.name}",
                    f"FisherMaker: {layer.label} is in training mode, so its batch statistics "
                    "couple the examples and per-example curvature is not the exact Fisher/GGN; "
                    "call model.eval() to measure curvature.",
                )

    @caller_autocast
    def compute(
        self,
        *,
        curvature: CurvatureType | str | None = None,
        shapes: Sequence[Shape | str] | Shape | str | None = None,
        n_mc_samples: int | None = None,
        weight_sharing: WeightSharing | str | None = None,
        accumulate_grad: bool = False,
    ) -> Curvature:
        """Run the forward pass and the curvature's backward passes; build the representations.

        Arguments left ``None`` come from the config.

        Args:
            curvature: ``fisher_exact``, ``fisher_mc``, ``fisher_emp`` or ``ggn``.
            shapes: Representations (``full``, ``layer_wise``, ``unit_wise``, ``diag``,
                ``kron``, ``kfe``).
            n_mc_samples: Monte-Carlo samples per example (``fisher_mc``).
            weight_sharing: ``expand`` or ``reduce`` for ``kron``/``kfe``.
            accumulate_grad: Also run the loss's backward pass (``p.grad``).

        Returns:
            The per-layer results (and the full matrix if requested).
        """
        changes: dict[str, Any] = {}
        if curvature is not None:
            changes["curvature"] = curvature
            if (
                n_mc_samples is None
                and coerce_enum(CurvatureType, curvature, "curvature")
                is not CurvatureType.FISHER_MC
            ):
                changes["n_mc_samples"] = 1
        for key, value in (
            ("shapes", shapes),
            ("n_mc_samples", n_mc_samples),
            ("weight_sharing", weight_sharing),
        ):
            if value is not None:
                changes[key] = value
        cfg = self.config.replace(**changes) if changes else self.config
        assert isinstance(cfg, FisherMakerConfig)
        kind = CurvatureType(cfg.curvature)
        self._check_ready()
        self._warn_coupled_examples()
        with torch.enable_grad(), self.recorder.record(self.batch_size) as stats:
            output, loss = self.forward()
            inputs = self.loss_inputs()
            vecs = inputs.vectors(kind, n_samples=cfg.n_mc_samples, generator=self.generator)
            self.recorder.backprop(inputs.logits, torch.stack(list(vecs)), kind.value)
            if accumulate_grad:
                loss.backward()
        self._last = (output, loss.detach())
        wanted = {Shape(s) for s in cfg.shapes}
        sharing = WeightSharing(cfg.weight_sharing)
        result = Curvature(kind, params=self.params)
        for layer in self.layers:
            st = stats[layer.name]
            result.layers[layer.name] = fisher_from_stats(st, kind.value, wanted, sharing)
        if Shape.FULL in wanted:
            result.full = full_from_stats(stats, self.layers, kind.value)
        self.result = result
        return result


class HessianMaker(_CurvatureMaker):
    """The Hessian of the loss per layer (and in full) from Hessian-vector products.

    Args:
        model: The model. Parameters of modules without a capture adapter are included; their
            results are in parameter order.
        config: :class:`HessianMakerConfig`.
    """

    config_class = HessianMakerConfig
    config: HessianMakerConfig

    def __init__(self, model: nn.Module, config: HessianMakerConfig | None = None) -> None:
        super().__init__(model, config)
        self._init_layers(model, needs_adapter=False)

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        return self._finish(self.compute(accumulate_grad=True))

    @caller_autocast
    def compute(
        self,
        *,
        shapes: Sequence[Shape | str] | Shape | str | None = None,
        accumulate_grad: bool = False,
    ) -> Curvature:
        """Run the forward pass and build the requested Hessian representations.

        Args:
            shapes: ``full``, ``layer_wise``, ``unit_wise``, ``diag`` (default: the config's).
            accumulate_grad: Also add ``∇_θ L`` into ``p.grad``.

        Returns:
            The per-layer results (and the full matrix if requested).
        """
        wanted = set(
            self.config.shapes
            if shapes is None
            else _coerce_shapes(
                shapes, _HESSIAN_SHAPES, "The Hessian has no Kronecker factorisation"
            )
        )
        self._check_ready()
        with torch.enable_grad(), twice_differentiable(True):
            output, loss = self.forward()
            params = self.params
            grads = gradient_with_graph(loss, params)
            result = Curvature(CurvatureType.HESSIAN, params=params)
            full = hessian_full(grads, params) if Shape.FULL in wanted else None
            start = 0
            for layer in self.layers:
                n = layer.numel
                if full is not None:
                    block = full[start : start + n, start : start + n]
                else:
                    block = hessian_layer_block(grads, params, layer)
                start += n
                result.layers[layer.name] = hessian_layer_curvature(
                    block,
                    layer,
                    layer_wise=Shape.LAYER_WISE in wanted,
                    unit_wise=Shape.UNIT_WISE in wanted,
                    diag=Shape.DIAG in wanted,
                )
            result.full = full
            if accumulate_grad:
                _accumulate(params, grads)
        self._last = (output, loss.detach())
        self.result = result
        return result

    @caller_autocast
    def diagonal(self, n_samples: int = 100) -> list[Tensor]:
        """Hutchinson estimate of the Hessian diagonal (no blocks formed).

        Args:
            n_samples: Rademacher probes (the estimate's variance falls like ``1/n_samples``).

        Returns:
            One parameter-shaped tensor per parameter of :attr:`params`.
        """
        check_int("n_samples", n_samples, minimum=1)
        self._check_ready()
        with torch.enable_grad(), twice_differentiable(True):
            _, loss = self.forward()
            params = self.params
            grads = gradient_with_graph(loss, params)
            return [
                d.detach()
                for d in hessian_diagonal_hutchinson(grads, params, n_samples, self.generator)
            ]
