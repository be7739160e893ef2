"""What is back-propagated from the loss for each Fisher-type curvature.

Conventions (written once, see also ``docs/conventions.md``): the loss as written is
``L = c · Σ_r ℓ_r`` where ``ℓ_r`` is the negative log-likelihood of one *row* (one prediction:
an example, or one position of a sequence output) and ``c`` is the reduction factor: 1 for
``sum``, ``1 / (number of terms)`` for ``mean`` (non-ignored targets, or the sum of class weights,
exactly as PyTorch normalises). Every curvature is that of ``L``:

* ``ggn``:          ``Σ_n J_nᵀ (∇²_z L) J_n``: the Hessian of ``L`` in the logits ``z``.
* ``fisher_exact``: ``c Σ_n J_nᵀ E_{t~p(·|z)}[∇ℓ ∇ℓᵀ] J_n``; equal to ``ggn`` for cross-entropy
  (with or without label smoothing), MSE and BCE-with-logits when no weights are used.
* ``fisher_mc``:    the same expectation estimated from labels sampled from the model.
* ``fisher_emp``:   ``(1/c) Σ_n ∇L_n ∇L_nᵀ`` where ``L_n`` is example ``n``'s part of ``L``;
  for a ``mean`` loss this is the familiar ``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ``.

Each type is realised by ``K`` vectors ``v_k`` (logits-shaped) with ``Σ_k v_k v_kᵀ`` equal to
(an unbiased estimate of) the matrix in the middle, block by block per example; back-propagating
them gives the ``g`` statistics that every representation is built from. The MSE likelihood is
Gaussian with variance ½ per element (so that ``ℓ = (z − t)²``), BCE's is Bernoulli.

Rows follow the batch-first, example-major layout: the loss input's dimension 0 is the batch or
a flattening ``[N·T, ...]`` of it (``logits.view(-1, C)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..enums import CurvatureType, LossKind
from ..numerics import flags_on_host
from ..validation import invalid

__all__ = [
    "LossSpec",
    "LossInputs",
    "UnknownLossError",
    "parse_loss_call",
    "num_exact_vectors",
    "sample_classes",
]


#: ``√(c/n)`` of :meth:`LossInputs.mc_vectors` when no row is ignored, per (rows shape, samples,
#: dtypes, reduction): a cache of numbers, computed with the tensor path's own operators.
_MC_WEIGHTS: dict[tuple[Any, ...], float] = {}


def sample_classes(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class per row of ``probs`` (``[..., C]``), drawn with those probabilities.

    Inverse-CDF sampling: a uniform ``u`` per row, scaled by the row's total, and the first
    class whose cumulative probability exceeds it (three elementwise kernels; a third to a
    quarter of ``torch.multinomial``'s time at 32-512 rows of 10 classes on a CPU, and no
    error on invalid rows: a row with a NaN, an infinity or no mass gives class 0 or the last
    class, and its statistics stay non-finite or zero for the caller to skip).

    Args:
        probs: Non-negative weights per class, last dimension (rows need not sum to 1).
        generator: Random generator on ``probs``' device.

    Returns:
        Class indices (int64), ``probs``' shape without its last dimension.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[:-1], generator=generator, dtype=cdf.dtype, device=cdf.device)
    below = cdf < (u * cdf[..., -1]).unsqueeze(-1)
    return below.sum(-1).clamp_(max=probs.shape[-1] - 1)


class UnknownLossError(ValueError):
    """The loss function is not one whose likelihood precond knows."""


@dataclass(frozen=True)
class LossSpec:
    """A loss and its options.

    Attributes:
        kind: Cross-entropy, MSE or BCE-with-logits.
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: Cross-entropy target value that contributes nothing.
        label_smoothing: Cross-entropy label smoothing ``ε``.
        weight: Cross-entropy class weights or BCE element weights.
        pos_weight: BCE positive-class weights.
    """

    kind: LossKind
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    weight: Tensor | None = None
    pos_weight: Tensor | None = None


_FUNCTIONAL: dict[Callable[..., Any], LossKind] = {
    F.cross_entropy: LossKind.CROSS_ENTROPY,
    F.mse_loss: LossKind.MSE,
    F.binary_cross_entropy_with_logits: LossKind.BCE_WITH_LOGITS,
}
_MODULES: dict[type[nn.Module], LossKind] = {
    nn.CrossEntropyLoss: LossKind.CROSS_ENTROPY,
    nn.MSELoss: LossKind.MSE,
    nn.BCEWithLogitsLoss: LossKind.BCE_WITH_LOGITS,
}
_FUNCTIONAL_KWARGS = {
    LossKind.CROSS_ENTROPY: (
        "weight",
        "size_average",
        "ignore_index",
        "reduce",
        "reduction",
        "label_smoothing",
    ),
    LossKind.MSE: ("size_average", "reduce", "reduction", "weight"),
    LossKind.BCE_WITH_LOGITS: ("weight", "size_average", "reduce", "reduction", "pos_weight"),
}


def _loss_kind(fn: Any) -> LossKind | None:
    if fn in _FUNCTIONAL:
        return _FUNCTIONAL[fn]
    for cls, kind in _MODULES.items():
        if isinstance(fn, cls):
            return kind
    return None


def parse_loss_call(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int
) -> LossInputs:
    """Recognise a loss call and extract the logits, targets and options.

    Args:
        fn: The loss function or module.
        args: Evaluated positional arguments (``input, target, ...``).
        kwargs: Evaluated keyword arguments.
        batch_size: Examples ``N`` in the batch.

    Returns:
        The parsed :class:`LossInputs`.

    Raises:
        UnknownLossError: If ``fn`` is not a supported loss.
        ValueError: For options precond cannot honour (``reduction='none'``).
    """
    kind = _loss_kind(fn)
    name = getattr(fn, "__name__", type(fn).__name__)
    if kind is None:
        raise UnknownLossError(
            f"Invalid loss function: {name}. Fisher-type curvature knows "
            "F.cross_entropy/nn.CrossEntropyLoss, F.mse_loss/nn.MSELoss and "
            "F.binary_cross_entropy_with_logits/nn.BCEWithLogitsLoss; for another loss declare "
            "the logits and likelihood with setup_logits_repr(dummy_y, loss_type=...)."
        )
    names = ("input", "target", *_FUNCTIONAL_KWARGS[kind])
    bound: dict[str, Any] = {}
    if isinstance(fn, nn.Module):
        names = ("input", "target")
        for attr in ("reduction", "ignore_index", "label_smoothing", "weight", "pos_weight"):
            if hasattr(fn, attr):
                bound[attr] = getattr(fn, attr)
    for key, value in zip(names, args):
        bound[key] = value
    bound.update(kwargs)
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        raise invalid("size_average/reduce", "given", "Use reduction='mean' or 'sum' instead")
    reduction = bound.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise invalid(
            "reduction", reduction, "Supported: ('mean', 'sum'): the loss must be a scalar"
        )
    if kind is LossKind.MSE and bound.get("weight") is not None:
        raise invalid("weight", "given", "Weighted MSE is not supported")
    spec = LossSpec(
        kind=kind,
        reduction=reduction,
        ignore_index=int(bound.get("ignore_index", -100)),
        label_smoothing=float(bound.get("label_smoothing", 0.0)),
        weight=bound.get("weight"),
        pos_weight=bound.get("pos_weight"),
    )
    return LossInputs(spec, bound["input"], bound.get("target"), batch_size)


def num_exact_vectors(logits: Tensor, kind: LossKind, batch_size: int) -> int:
    """Number of vectors that realise the exact Fisher/GGN: positions per example × classes.

    Args:
        logits: The loss input.
        kind: The loss kind.
        batch_size: Examples ``N``.

    Returns:
        ``K``.
    """
    if kind is LossKind.CROSS_ENTROPY:
        classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        return logits.numel() // max(batch_size, 1) // classes * classes
    return logits.numel() // max(batch_size, 1)


@dataclass
class LossInputs:
    """A loss call's logits, targets and options, with the vectors of every curvature type.

    Attributes:
        spec: The loss and its options.
        logits: The loss input as passed (part of the autograd graph).
        targets: The targets, or ``None`` (allowed unless the empirical Fisher or ``ignore_index``
            masking needs them).
        batch_size: Examples ``N``.
    """

    spec: LossSpec
    logits: Tensor
    targets: Tensor | None
    batch_size: int

    # ---- canonical layout: [N, P, C] ------------------------------------------------------
    def _class_dim_last(self, t: Tensor) -> Tensor:
        if self.spec.kind is LossKind.CROSS_ENTROPY and t.dim() > 2:
            return t.movedim(1, -1)
        return t

    def _canonical(self, t: Tensor) -> Tensor:
        """Logits-shaped ``t`` as ``[N, P, C]`` (``C = 1`` for element-wise losses)."""
        n = self.batch_size
        if self.spec.kind is LossKind.CROSS_ENTROPY:
            if t.dim() == 1:
                t = t.unsqueeze(0)
            t = self._class_dim_last(t)
            c = t.shape[-1]
        else:
            c = 1
        total = t.numel() // c
        if total % n != 0:
            raise invalid(
                "logits",
                f"tensor of shape {tuple(self.logits.shape)}",
                f"Its rows are not a multiple of the batch size {n}; precond assumes batch-first, "
                "example-major layouts",
            )
        return t.reshape(n, total // n, c)

    def _from_canonical(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`_canonical` with any leading dims ``[..., N, P, C]``."""
        lead = z.shape[:-3]
        shape = self.logits.shape
        if self.spec.kind is LossKind.CROSS_ENTROPY:
            if self.logits.dim() == 1:
                return z.reshape(*lead, *shape)
            moved = self._class_dim_last(self.logits).shape
            z = z.reshape(*lead, *moved)
            if self.logits.dim() > 2:
                z = z.movedim(-1, len(lead) + 1)
            return z
        return z.reshape(*lead, *shape)

    def _row_mask_and_weight(self) -> Tensor | None:
        """Per-row factor ``[N, P]`` (ignore mask × class weight of the true target), or None."""
        spec = self.spec
        if spec.kind is not LossKind.CROSS_ENTROPY or self.targets is None:
            return None
        t = self.targets
        if t.is_floating_point():  # class probabilities: no ignore_index, weights per class
            return None
        t = t.reshape(self.batch_size, -1)
        keep = t != spec.ignore_index
        factor = keep.to(self.logits.dtype)
        if spec.weight is not None:
            w = spec.weight.to(self.logits.dtype)[t.clamp(min=0)]
            factor = factor * w
        return factor

    def _hessian_row_factor(self) -> Tensor | None:
        """Per-row factor ``[N, P]`` of the loss Hessian in the logits, or None.

        With class weights ``w`` and label smoothing ``ε`` PyTorch's row loss is
        ``(1 − ε) w_t (−log p_t) + (ε / C) Σ_j w_j (−log p_j)``, whose Hessian is
        ``((1 − ε) w_t + (ε / C) Σ_j w_j) (diag p − p pᵀ)``; without smoothing this is the
        ignore mask times ``w_t`` (:meth:`_row_mask_and_weight`).
        """
        factor = self._row_mask_and_weight()
        spec = self.spec
        if factor is None or spec.weight is None or spec.label_smoothing == 0.0:
            return factor
        assert self.targets is not None
        t = self.targets.reshape(self.batch_size, -1)
        keep = (t != spec.ignore_index).to(self.logits.dtype)
        w = spec.weight.to(self.logits.dtype)
        eps = spec.label_smoothing
        return keep * ((1.0 - eps) * w[t.clamp(min=0)] + eps * w.mean())

    def scale(self) -> Tensor:
        """The reduction factor ``c`` (0-dim tensor on the logits' device; no host sync)."""
        return self._scale(self._row_mask_and_weight())

    def _scale(self, factor: Tensor | None) -> Tensor:
        """:meth:`scale` given :meth:`_row_mask_and_weight` (computed once by callers of both)."""
        z = self.logits
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        if self.spec.reduction == "sum":
            return torch.ones((), dtype=dtype, device=z.device)
        if self.spec.kind is LossKind.CROSS_ENTROPY:
            if factor is not None:
                return 1.0 / factor.sum().to(dtype)
            rows = z.numel() // (z.shape[1] if z.dim() > 1 else z.shape[0])
            return torch.full((), 1.0 / rows, dtype=dtype, device=z.device)
        return torch.full((), 1.0 / z.numel(), dtype=dtype, device=z.device)

    def _check_fisher(self, curvature: CurvatureType) -> None:
        spec = self.spec
        if curvature in (CurvatureType.FISHER_EXACT, CurvatureType.FISHER_MC):
            if spec.weight is not None:
                raise invalid(
                    "weight",
                    "given",
                    f"With class/element weights the loss is not the model's likelihood, so "
                    f"{curvature.value} is undefined; use curvature='ggn' or 'fisher_emp'",
                )
            if spec.pos_weight is not None:
                raise invalid(
                    "pos_weight",
                    "given",
                    f"With pos_weight the loss is not the model's likelihood, so "
                    f"{curvature.value} is undefined; use curvature='ggn' or 'fisher_emp'",
                )
        if (
            spec.kind is LossKind.CROSS_ENTROPY
            and self.targets is not None
            and self.targets.is_floating_point()
            and spec.weight is not None
        ):
            raise invalid(
                "weight", "given", "Class weights with probability targets are not supported"
            )

    # ---- the vectors ----------------------------------------------------------------------
    def exact_vectors(
        self, curvature: CurvatureType = CurvatureType.FISHER_EXACT
    ) -> Iterator[Tensor]:
        """Vectors ``v_k`` with ``Σ_k v_k v_kᵀ = ∇²_z L`` per example (``ggn``/``fisher_exact``).

        One vector per (position within an example, class): position ``p`` and class ``j`` of
        every example at once, since examples do not interact through the loss.

        Args:
            curvature: ``fisher_exact`` or ``ggn`` (they differ only with weights).

        Yields:
            Logits-shaped tensors, ``num_exact_vectors(...)`` of them.
        """
        self._check_fisher(curvature)
        z = self._canonical(self.logits.detach())
        dt = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(dt)
        n, positions, classes = z.shape
        c = self.scale().to(dt)
        row = torch.ones(n, positions, dtype=dt, device=z.device)
        factor = self._hessian_row_factor()
        if factor is not None:
            row = row * factor.to(dt)
        spec = self.spec
        if spec.kind is LossKind.CROSS_ENTROPY:
            p = torch.softmax(z, dim=-1)
            sp = p.sqrt()
            # column j of sqrt(diag p − p pᵀ) is √p_j (e_j − p)
            for pos in range(positions):
                for j in range(classes):
                    v = torch.zeros_like(z)
                    col = -p[:, pos, :] * sp[:, pos, j : j + 1]
                    col[:, j] += sp[:, pos, j]
                    v[:, pos, :] = col * (c * row[:, pos]).sqrt().unsqueeze(-1)
                    yield self._from_canonical(v).to(self.logits.dtype)
            return
        if spec.kind is LossKind.MSE:
            h = torch.full_like(z, 2.0)
        else:
            s = torch.sigmoid(z)
            h = s * (1 - s)
            if curvature is CurvatureType.GGN:
                h = h * self._bce_ggn_factor(z)
        for pos in range(positions):
            v = torch.zeros_like(z)
            v[:, pos, :] = (c * h[:, pos, :]).sqrt()
            yield self._from_canonical(v).to(self.logits.dtype)

    def hessian_operator(self) -> Callable[[Tensor], Tensor] | None:
        """``v ↦ (∇²_z L) v`` in closed form for logits-shaped ``v`` (no autograd call).

        The loss's Hessian in its input, as :meth:`exact_vectors` factorises it: for
        cross-entropy ``c · r_n · (diag p − p pᵀ)`` per row (``p`` the softmax, ``r_n`` the
        ignore mask times the class weights of :meth:`_hessian_row_factor`), for MSE ``2c``,
        for BCE with logits ``c · w · (pw·t + 1 − t) · σ(1 − σ)`` per element. A product
        costs three element-wise kernels on the logits instead of a double backward through
        the loss (on this project's CPU 8 µs against 28 µs for 32 × 10 logits, and no graph
        of ``∇_z L``). The softmax or sigmoid is computed once, here.

        Returns:
            The operator (valid while these logits are), or ``None`` where the closed form
            does not apply: cross-entropy with class-probability targets (whose Hessian scales
            with their sum) or without targets, and BCE with ``pos_weight`` but no targets.
        """
        spec = self.spec
        z = self._canonical(self.logits.detach())
        c = self._scale(self._row_mask_and_weight()).to(z.dtype)
        if spec.kind is LossKind.CROSS_ENTROPY:
            if self.targets is None or self.targets.is_floating_point():
                return None
            p = torch.softmax(z, dim=-1)
            factor = self._hessian_row_factor()
            coef = c if factor is None else c * factor.to(z.dtype).unsqueeze(-1)
            pc = p * coef

            def cross_entropy(v: Tensor) -> Tensor:
                vc = self._canonical(v)
                return self._from_canonical(pc * (vc - (p * vc).sum(dim=-1, keepdim=True)))

            return cross_entropy
        if spec.kind is LossKind.MSE:
            two_c = 2.0 * c
            return lambda v: v * two_c
        if spec.pos_weight is not None and self.targets is None:
            return None
        s = torch.sigmoid(z)
        h = self._from_canonical(s * (1.0 - s) * self._bce_ggn_factor(z) * c)
        return lambda v: v * h

    def _bce_ggn_factor(self, z: Tensor) -> Tensor:
        spec = self.spec
        factor = torch.ones_like(z)
        if spec.pos_weight is not None:
            if self.targets is None:
                raise invalid("targets", None, "BCE with pos_weight needs the targets for the GGN")
            t = self._canonical(self.targets.to(z.dtype).expand_as(self.logits))
            pw = torch.broadcast_to(spec.pos_weight.to(z.dtype), self.logits.shape)
            factor = factor * (self._canonical(pw) * t + 1 - t)
        if spec.weight is not None:
            w = torch.broadcast_to(spec.weight.to(z.dtype), self.logits.shape)
            factor = factor * self._canonical(w)
        return factor

    def mc_vectors(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Monte-Carlo vectors: ``√(c/n)·∇_z ℓ(z, t̃)`` for labels ``t̃`` sampled from the model.

        ``E[Σ_k v_k v_kᵀ] = c E_t[∇ℓ ∇ℓᵀ]``, the exact Fisher.

        Args:
            n_samples: Samples ``n`` (``K = n``).
            generator: Random generator on the logits' device.

        Returns:
            ``[n, *logits.shape]``.
        """
        self._check_fisher(CurvatureType.FISHER_MC)
        z = self._canonical(self.logits.detach())
        dt = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(dt)
        factor, weight = self._mc_weight(n_samples, dt)
        out = []
        if self.spec.kind is LossKind.CROSS_ENTROPY:
            p = torch.softmax(z, dim=-1)
            scale = weight if factor is None else factor.to(dt).unsqueeze(-1) * weight
        for k in range(n_samples):
            if self.spec.kind is LossKind.CROSS_ENTROPY:
                # p − onehot(t̃): 1 subtracted at the sampled class. Non-finite logits (a
                # diverging model) do not stop the sampling; their statistics are non-finite
                # and the methods skip them with a warning.
                idx = sample_classes(p, generator).unsqueeze(-1)
                v = p if k == n_samples - 1 else p.clone()
                v.scatter_add_(-1, idx, torch.full_like(idx, -1, dtype=dt))
                out.append(self._from_canonical(v.mul_(scale)))
                continue
            if self.spec.kind is LossKind.MSE:
                # ℓ = (z − t)², t ~ N(z, ½): ∇ℓ = 2(z − t) ~ N(0, 2)
                v = torch.randn(z.shape, generator=generator, dtype=dt, device=z.device)
                v = v * (2.0**0.5)
            else:
                s = torch.sigmoid(z)
                t = torch.bernoulli(torch.nan_to_num(s, nan=0.5), generator=generator)
                v = s - t
            out.append(self._from_canonical(v * weight))
        stacked = out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)
        return stacked.to(self.logits.dtype)

    def _mc_weight(self, n_samples: int, dt: torch.dtype) -> tuple[Tensor | None, Tensor | float]:
        """The rows' factor (``None``: all 1) and ``√(c/n)`` of :meth:`mc_vectors`.

        Where the targets can be read for free (a CPU, see
        :func:`precond.numerics.host_flag`) and no row is ignored, every row's factor is 1 and
        the weight is one number: the value the tensor path computes for all-ones factors,
        bit for bit (computed with the same operators once per shape, :data:`_MC_WEIGHTS`),
        without its eight operators per call.
        """
        t = self.targets
        if (
            self.spec.kind is LossKind.CROSS_ENTROPY
            and t is not None
            and not t.is_floating_point()
            and self.spec.weight is None
            and flags_on_host(self.logits.device)
        ):
            keep = t.reshape(self.batch_size, -1) != self.spec.ignore_index
            if int(keep.sum()) == keep.numel():
                key = (tuple(keep.shape), n_samples, dt, self.logits.dtype, self.spec.reduction)
                weight = _MC_WEIGHTS.get(key)
                if weight is None:
                    ones = torch.ones(keep.shape, dtype=self.logits.dtype)
                    weight = float((self._scale(ones).to(dt) / n_samples).sqrt())
                    if len(_MC_WEIGHTS) >= 64:
                        _MC_WEIGHTS.clear()
                    _MC_WEIGHTS[key] = weight
                return None, weight
        factor = self._row_mask_and_weight()
        c = self._scale(factor).to(dt)
        return factor, (c / n_samples).sqrt()

    def empirical_factor(self) -> Tensor:
        """Factor ``1/√c`` that turns the loss's own output gradients into empirical-Fisher ones."""
        return self.scale().rsqrt()

    def empirical_vectors(self) -> Tensor:
        """``∇_z L / √c`` computed from the loss itself (``K = 1``); needs the targets.

        Returns:
            ``[1, *logits.shape]``.

        Raises:
            ValueError: If the targets are unknown.
        """
        if self.targets is None:
            raise invalid(
                "targets", None, "The empirical Fisher needs the true targets of the loss"
            )
        z = self.logits.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn()(z, self.targets)
            (grad,) = torch.autograd.grad(loss, z)
        return (grad * self.empirical_factor().to(grad.dtype)).unsqueeze(0)

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The loss as a function of ``(logits, targets)`` with this spec's options."""
        spec = self.spec
        if spec.kind is LossKind.CROSS_ENTROPY:
            return lambda z, t: F.cross_entropy(
                z,
                t,
                weight=spec.weight,
                ignore_index=spec.ignore_index,
                reduction=spec.reduction,
                label_smoothing=spec.label_smoothing,
            )
        if spec.kind is LossKind.MSE:
            return lambda z, t: F.mse_loss(z, t, reduction=spec.reduction)
        return lambda z, t: F.binary_cross_entropy_with_logits(
            z, t, weight=spec.weight, pos_weight=spec.pos_weight, reduction=spec.reduction
        )

    def vectors(
        self,
        curvature: CurvatureType,
        *,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """The back-propagated vectors of a Fisher-type curvature, one logits-shaped tensor each.

        Args:
            curvature: ``fisher_exact``, ``ggn``, ``fisher_mc`` or ``fisher_emp``.
            n_samples: Monte-Carlo samples.
            generator: Random generator for ``fisher_mc``.

        Yields:
            Logits-shaped tensors.

        Raises:
            ValueError: For ``hessian`` (no vector form).
        """
        if curvature in (CurvatureType.FISHER_EXACT, CurvatureType.GGN):
            yield from self.exact_vectors(curvature)
        elif curvature is CurvatureType.FISHER_MC:
            yield from self.mc_vectors(n_samples, generator)
        elif curvature is CurvatureType.FISHER_EMP:
            yield from self.empirical_vectors()
        else:
            raise invalid(
                "curvature", curvature.value, "The Hessian has no back-propagated vector form"
            )
