"""Plain functions over the makers: ``precond.fisher``, ``precond.hessian`` and products.

Each function runs ``loss_fn(model(x), t, **loss_kwargs)`` once and returns curvature of that
loss as written (``mean`` or ``sum``; see ``docs/conventions.md``). For models with several
inputs, dict outputs or their own loss, use :class:`~precond.curvature.maker.FisherMaker` /
:class:`~precond.curvature.maker.HessianMaker` and the gradient-maker call protocol instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..enums import CurvatureType, Shape, WeightSharing
from .maker import FisherMaker, FisherMakerConfig, HessianMaker, HessianMakerConfig
from .operators import CurvatureOperator
from .representation import Curvature

__all__ = ["curvature_operator", "fisher", "fisher_vp", "ggn_vp", "hessian", "hvp"]

LossFn = Callable[..., Tensor]


def fisher(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    *,
    curvature: CurvatureType | str = CurvatureType.FISHER_EXACT,
    shapes: Sequence[Shape | str] | Shape | str = (Shape.LAYER_WISE,),
    n_mc_samples: int = 1,
    weight_sharing: WeightSharing | str = WeightSharing.EXPAND,
    seed: int | None = None,
    ignore_modules: Sequence[Any] = (),
    **loss_kwargs: Any,
) -> Curvature:
    """Fisher-type curvature of one batch, per layer, in the requested representations.

    Args:
        model: The model.
        loss_fn: ``F.cross_entropy``/``nn.CrossEntropyLoss``, ``F.mse_loss``/``nn.MSELoss`` or
            ``F.binary_cross_entropy_with_logits``/``nn.BCEWithLogitsLoss``.
        x: The model input.
        t: The targets.
        curvature: ``fisher_exact``, ``fisher_mc``, ``fisher_emp`` or ``ggn``.
        shapes: Any of ``full``, ``layer_wise``, ``unit_wise``, ``diag``, ``kron``, ``kfe``.
        n_mc_samples: Samples per example for ``fisher_mc``.
        weight_sharing: ``expand`` or ``reduce`` for ``kron``/``kfe``.
        seed: Seed of the Monte-Carlo labels.
        ignore_modules: Modules left out.
        **loss_kwargs: Passed to ``loss_fn`` (``reduction``, ``ignore_index``,
            ``label_smoothing``, ...).

    Returns:
        The :class:`~precond.curvature.representation.Curvature`.
    """
    config = FisherMakerConfig(
        curvature=curvature,
        shapes=shapes if isinstance(shapes, Sequence) else (shapes,),
        n_mc_samples=n_mc_samples,
        weight_sharing=weight_sharing,
        seed=seed,
        ignore_modules=tuple(ignore_modules),
    )
    fm = FisherMaker(model, config)
    dummy = fm.setup_model_call(model, x)
    fm.setup_loss_call(loss_fn, dummy, t, **loss_kwargs)
    return fm.compute()


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    *,
    shapes: Sequence[Shape | str] | Shape | str = (Shape.LAYER_WISE,),
    ignore_modules: Sequence[Any] = (),
    **loss_kwargs: Any,
) -> Curvature:
    """The Hessian of one batch's loss, per layer, from Hessian-vector products.

    Args:
        model: The model.
        loss_fn: Any loss callable returning a scalar.
        x: The model input.
        t: The targets.
        shapes: Any of ``full``, ``layer_wise``, ``unit_wise``, ``diag``.
        ignore_modules: Modules left out.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        The :class:`~precond.curvature.representation.Curvature`.
    """
    config = HessianMakerConfig(
        shapes=shapes if isinstance(shapes, Sequence) else (shapes,),
        ignore_modules=tuple(ignore_modules),
    )
    hm = HessianMaker(model, config)
    dummy = hm.setup_model_call(model, x)
    hm.setup_loss_call(loss_fn, dummy, t, **loss_kwargs)
    return hm.compute()


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    *,
    curvature: CurvatureType | str = CurvatureType.HESSIAN,
    n_mc_samples: int = 1,
    seed: int | None = None,
    **loss_kwargs: Any,
) -> CurvatureOperator:
    """A matrix-free operator (``op @ v``) for one batch; the forward graph is kept.

    Args:
        model: The model.
        loss_fn: The loss (a supported one for Fisher types and the GGN).
        x: The model input.
        t: The targets.
        curvature: ``hessian``, ``ggn``, ``fisher_exact``, ``fisher_mc`` or ``fisher_emp``.
        n_mc_samples: Samples for ``fisher_mc`` (drawn once).
        seed: Seed of the Monte-Carlo labels.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        The operator over the model's trained parameters (parameter order).
    """
    hm = HessianMaker(model, HessianMakerConfig(seed=seed))
    dummy = hm.setup_model_call(model, x)
    hm.setup_loss_call(loss_fn, dummy, t, **loss_kwargs)
    return hm.operator(curvature, n_mc_samples=n_mc_samples)


def _apply(op: CurvatureOperator, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
    if isinstance(v, Tensor):
        return op @ v
    return op.matvec(list(v))


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    v: Tensor | Sequence[Tensor],
    **loss_kwargs: Any,
) -> Tensor | list[Tensor]:
    """Hessian-vector product ``H v``.

    Args:
        model: The model.
        loss_fn: The loss.
        x: The model input.
        t: The targets.
        v: Flat ``[P]`` (or ``[P, k]``) in parameter order, or one tensor per trained parameter.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        ``H v`` in the form of ``v``.
    """
    return _apply(curvature_operator(model, loss_fn, x, t, **loss_kwargs), v)


def ggn_vp(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    v: Tensor | Sequence[Tensor],
    **loss_kwargs: Any,
) -> Tensor | list[Tensor]:
    """GGN-vector product ``Jᵀ (∇²_z L) J v``.

    Args:
        model: The model.
        loss_fn: The loss.
        x: The model input.
        t: The targets.
        v: Flat ``[P]`` (or ``[P, k]``) in parameter order, or one tensor per trained parameter.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        ``G v`` in the form of ``v``.
    """
    op = curvature_operator(model, loss_fn, x, t, curvature=CurvatureType.GGN, **loss_kwargs)
    return _apply(op, v)


def fisher_vp(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    t: Any,
    v: Tensor | Sequence[Tensor],
    *,
    curvature: CurvatureType | str = CurvatureType.FISHER_EXACT,
    n_mc_samples: int = 1,
    seed: int | None = None,
    **loss_kwargs: Any,
) -> Tensor | list[Tensor]:
    """Fisher-vector product for ``fisher_exact``, ``fisher_mc`` or ``fisher_emp``.

    Args:
        model: The model.
        loss_fn: A supported loss.
        x: The model input.
        t: The targets.
        v: Flat ``[P]`` (or ``[P, k]``) in parameter order, or one tensor per trained parameter.
        curvature: Which Fisher.
        n_mc_samples: Samples for ``fisher_mc``.
        seed: Seed of the Monte-Carlo labels.
        **loss_kwargs: Passed to ``loss_fn``.

    Returns:
        ``F v`` in the form of ``v``.
    """
    op = curvature_operator(
        model,
        loss_fn,
        x,
        t,
        curvature=curvature,
        n_mc_samples=n_mc_samples,
        seed=seed,
        **loss_kwargs,
    )
    return _apply(op, v)
