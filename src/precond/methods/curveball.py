r"""CurveBall: one interleaved step on the Newton system per iteration (Henriques et al. 2019).

CurveBall keeps a direction ``z`` (state) and, instead of solving ``(C + λI) z = −g`` to the
end, takes one momentum step on the quadratic model ``f̂(z) = gᵀz + ½ zᵀ(C + λI)z`` per iteration:

.. math::

    d = (C + λI)\, z + g, \qquad z \leftarrow ρ z − β d, \qquad θ \leftarrow θ + z,

with ``C`` the GGN (default) or the Hessian, and ``ρ, β`` chosen automatically as the minimiser
of ``f̂(ρz − βd)`` over the plane spanned by ``z`` and ``d``, a 2×2 linear system
(``Ĉ = C + λI``):

.. math::

    \begin{pmatrix} dᵀĈd & zᵀĈd \\ zᵀĈd & zᵀĈz \end{pmatrix}
    \begin{pmatrix} β \\ −ρ \end{pmatrix} = \begin{pmatrix} gᵀd \\ gᵀz \end{pmatrix}.

When ``z = 0`` (first step) or ``z ∥ d`` it reduces to the line search ``β = gᵀd / dᵀĈd``,
``ρ = 0``. Two curvature products per curvature step (``Ĉz`` and ``Ĉd``); the direction
converges to the damped Newton direction ``−(C + λI)^{-1} g`` on a fixed quadratic.

What ``p.grad`` receives: CurveBall produces a step, not a preconditioned gradient, so the
gradient maker writes ``p.grad ← −z``. Use ``torch.optim.SGD(lr=1, momentum=0)`` to apply the
paper's update ``θ ← θ + z`` (momentum is already in ``z``; a smaller ``lr`` shortens every
step, weight decay may be added by the optimizer).

Damping (``adapt_damping=True``): the paper's rule, ``λ ← λ · damping_growth`` when the ratio of
the actual to the predicted loss change is below 1/2 and ``λ ← λ / damping_growth`` above 3/2,
the prediction being the damped model ``f̂`` along the step taken. The paper evaluates the loss
at the new point on the same batch; here the ratio uses the next curvature step's loss (see
:class:`~precond.methods.second_order.DampingAdapter`).

Amortisation (``curvature_upd_interval > 1``), the "stored inverse action" of Hessian-free and
LiSSA: every curvature step computes ``Ĉd`` exactly, so ``(s, y) = (d, Ĉd)`` is an exact
curvature pair of the damped model (``dᵀĈd > 0`` whenever ``ρ, β`` exist; it is checked, with
finiteness). From it :class:`~precond.methods.second_order.SecantInverse` builds the symmetric
positive definite memoryless-BFGS operator ``M`` with ``M Ĉd = d``, which scales the other
directions by the measured inverse curvature ``γ = dᵀĈd / ‖Ĉd‖²`` (``1/λ_max(Ĉ) ≤ γ ≤
1/λ_min(Ĉ)``); it is adopted on preconditioner steps. The steps in between, without products,
write

.. math::

    p.\mathrm{grad} \leftarrow M g, \qquad z \leftarrow −M g,

a quasi-Newton step ``−M g ≈ −(C + λI)^{-1} g`` of the fresh gradient. ``z`` thus always holds
the last step taken (``θ ← θ + z`` with SGD at ``lr=1``), as in the paper, and the next
curvature step starts from it: ``d = Ĉz + g``, ``z ← ρz − βd`` with the ``z`` of the last step
in between. No momentum is carried through the steps in between: each is a fixed positive
definite map of the fresh gradient, a descent direction that cannot grow geometrically (the
former heavy-ball rule ``z ← ρz − βg`` with stale ``ρ, β`` had no curvature feedback, and
``|ρ| > 1`` made ``z`` grow geometrically: on MNIST-1D it diverged at every learning rate tried,
1 down to 0.03). Before the first pair, the steps in between write the plain
gradient (``z ← −g``).

Why ``(d, Ĉd)`` and not ``(−z_k, g_k)``: ``z_k`` is only one iteration towards
``−(C + λI)^{-1} g_k`` (the first one is the Cauchy step ``β g`` along the gradient, whose pair
gives ``M = β I``, the long step ``gᵀg / gᵀĈg``), so it is not a curvature pair; on MNIST-1D
with ``damping=1e-3`` and SGD at ``lr=1`` it diverged for intervals 3, 5 and 10, while the exact
pair trained at all three.

Parameters frozen after construction: curvature steps work on the loss as a function of the
trained parameters (zero gradient and zero curvature rows/columns in the frozen slots, and
``z`` with its frozen slots zeroed), so ``z``'s update and the stored pair are those of that
restricted problem; ``z``'s frozen slots are kept unchanged (no gradient is written there) and
resume when the parameter is un-frozen.

Non-finite numbers: a curvature step with a non-finite loss, gradient or product is skipped
(host check, warned once: ``ρ, β``, the damping and its record are kept, ``Ĉz`` is dropped; the
step is then run as a step in between), and on every step ``z`` keeps its previous value when
its update is not finite (device-side guard, no host sync), so ``p.grad`` then receives the
previous ``−z``.

References:
    J. F. Henriques, S. Ehrhardt, S. Albanie, A. Vedaldi. Small steps and giant leaps: Minimal
    Newton solvers for Deep Learning. ICCV 2019. https://arxiv.org/abs/1805.08095
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayerStats
from ..config import PreconditioningConfig
from ..enums import CurvatureType
from ..numerics import flags_on_host, is_finite, warn_once
from ..registry import register_method
from ..validation import check_float, invalid
from .cost import CostModel, Phase
from .flat import all_finite, stack_rows
from .second_order import (
    DampingAdapter,
    PairPool,
    SecantInverse,
    SecondOrderGradientMaker,
    coerce_curvature,
)

__all__ = ["CurveBallConfig", "CurveBallGradientMaker", "solve_rho_beta"]


@dataclass(kw_only=True)
class CurveBallConfig(PreconditioningConfig):
    """CurveBall options.

    Args:
        damping: Initial ``λ`` (the paper starts at 1).
        curvature: ``ggn`` (default) or ``hessian``.
        adapt_damping: Adapt ``λ`` from the loss reduction ratio.
        damping_growth: Factor of one adaptation (the paper: ``1/0.999`` per iteration).
    """

    damping: float = 1.0
    curvature: CurvatureType | str = CurvatureType.GGN
    adapt_damping: bool = True
    damping_growth: float = 1.001

    def __post_init__(self) -> None:
        super().__post_init__()
        self.curvature = coerce_curvature(self.curvature)
        if not isinstance(self.adapt_damping, bool):
            raise invalid("adapt_damping", self.adapt_damping, "Must be True or False")
        check_float("damping_growth", self.damping_growth, minimum=1.0, strict_min=True)
        if self.adapt_damping and self.damping <= 0.0:
            raise invalid(
                "damping",
                self.damping,
                "adapt_damping=True scales the damping multiplicatively; start it > 0",
            )


def solve_rho_beta(
    zcz: float, zcd: float, dcd: float, gz: float, gd: float
) -> tuple[float, float] | None:
    """The minimiser ``(ρ, β)`` of ``f̂(ρz − βd)`` from the 2×2 system (float64 scalars).

    Args:
        zcz: ``zᵀĈz``.
        zcd: ``zᵀĈd``.
        dcd: ``dᵀĈd``.
        gz: ``gᵀz``.
        gd: ``gᵀd``.

    Returns:
        ``(ρ, β)``, or ``None`` if the model has no positive curvature along ``d``.
    """
    if not dcd > 0.0:
        return None
    det = dcd * zcz - zcd * zcd
    if zcz > 0.0 and det > 1e-12 * dcd * zcz:
        beta = (zcz * gd - zcd * gz) / det
        minus_rho = (dcd * gz - zcd * gd) / det
        return -minus_rho, beta
    return 0.0, gd / dcd


@register_method(
    "curveball",
    "CurveBall: one interleaved GGN-Newton step per iteration, automatic ρ, β (Henriques 2019)",
    family="global",
)
class CurveBallGradientMaker(SecondOrderGradientMaker):
    """CurveBall gradient maker; ``p.grad`` receives ``−z`` (see the module docstring).

    Args:
        model: The model.
        config: :class:`CurveBallConfig`.
    """

    config_class = CurveBallConfig
    config: CurveBallConfig

    def __init__(self, model: nn.Module, config: CurveBallConfig | None = None) -> None:
        super().__init__(model, config)
        self.lm = DampingAdapter(
            self.config.effective_damping, 0.5, 1.5, self.config.damping_growth
        )
        self.z: Tensor | None = None
        self.rho = 0.0
        self.beta = 0.0
        #: The operator ``M`` of the steps in between, from an exact pair ``(d, Ĉd)``.
        self.inverse = SecantInverse()
        # The last curvature step's pair [d; Ĉd], until a preconditioner step adopts it, and
        # its dᵀĈd.
        self._pair: Tensor | None = None
        self._pair_sy: float | None = None
        # d = Ĉz + g of this curvature step, consumed by precondition() on the same step.
        self._d: Tensor | None = None
        # u = βd − ρz of this curvature step when the damping adaptation computed it: the
        # paper's update is exactly −u (precondition() then negates it, one pass). Whether
        # uᵀu came out finite, which makes every entry of u finite (see
        # SecantInverse.curvature).
        self._u_now: Tensor | None = None
        self._u_finite = False
        # −z of the last curvature step, for the damping adaptation's step length.
        self._u: Tensor | None = None
        # Reused buffers: rows [the new z (or g), Ĉz], and the new pairs.
        self._work: Tensor | None = None
        self._pairs = PairPool(self.vec, self.work_dtype)

    def _hessian_products(self) -> bool:
        return self.config.curvature is CurvatureType.HESSIAN

    @property
    def damping(self) -> float:
        """The current damping ``λ`` (adapted when ``adapt_damping``)."""
        return self.lm.damping if self.config.adapt_damping else self.config.effective_damping

    def _rows(self) -> Tensor:
        if self._work is None:
            self._work = self.vec.empty(2, dtype=self.work_dtype)
        return self._work

    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        batch = self.batch
        if batch is None:
            return
        kind = CurvatureType(self.config.curvature)
        loss = self._curvature_loss if self.config.adapt_damping else None
        finite_loss = loss is None or math.isfinite(loss)
        if self.config.adapt_damping and loss is not None and finite_loss and self._u is not None:
            self.lm.observe(loss, self.vec.dot_params(self._u))
        lam = self.damping
        work = self._rows()
        # g is p.grad (the gradient this step preconditions; the batch's unless accumulated)
        g, cz = self.vec.flatten_into(self._grads(), work[0]), work[1]
        z = None if self.z is None else self._trained_part(self.z)
        if z is None:
            cz.zero_()
        else:
            batch.product(kind, z, out=cz)
            cz.add_(z, alpha=lam)
        pair = self._pairs.take(self._pair, self.inverse.pair)
        d, cd = pair[0], pair[1]
        torch.add(cz, g, out=d)
        batch.product(kind, d, out=cd)
        cd.add_(d, alpha=lam)
        dots = [d.dot(cd), g.dot(d)]
        if z is not None:
            dots += [z.dot(cz), z.dot(cd), g.dot(z)]
        f64 = [*torch.stack(dots).tolist(), 0.0, 0.0, 0.0]  # one host sync
        dcd, gd, zcz, zcd, gz = f64[:5]
        if not (finite_loss and all(map(_finite, f64))):
            # Nothing of this step is kept: ρ, β stay, d is not used by precondition() (whose
            # guard then keeps z), and the damping adaptation starts afresh at the next step.
            warn_once(
                "curveball:non_finite",
                "CurveBall: non-finite loss, gradient or curvature products; this curvature "
                "step was skipped (z, ρ, β and the damping are kept).",
            )
            self._d = self._u_now = None
            self._u = None
            self.lm.record = None
            return
        sol = solve_rho_beta(zcz, zcd, dcd, gz, gd)
        if sol is None:
            warn_once(
                "curveball:rho_beta",
                "CurveBall: no positive curvature in the (z, d) plane; keeping the previous ρ, β "
                "and the previous operator of the steps in between.",
            )
        else:
            self.rho, self.beta = sol
            # dᵀĈd is finite (checked above, which also makes d and Ĉd finite: see
            # SecantInverse.curvature); positive makes the pair acceptable
            if dcd > 0.0:
                self._pair, self._pair_sy = pair, dcd  # adopted by update_preconditioner
        self._d = d
        if self.config.adapt_damping and loss is not None:
            rho, beta = self.rho, self.beta
            # u = −z_new = βd − ρz: the direction p.grad receives (z itself moves on).
            if self._u is None:
                self._u = torch.empty_like(g)
            u = torch.mul(d, beta, out=self._u)
            if z is not None:
                u.add_(z, alpha=-rho)
            self._u_now = u
            uu = float(u.dot(u))
            self._u_finite = math.isfinite(uu)
            # gᵀu = −gᵀz_new and uᵀĈu = z_newᵀĈz_new.
            self.lm.remember(
                loss,
                gu=-(rho * gz - beta * gd),
                ucu=rho * rho * zcz - 2.0 * rho * beta * zcd + beta * beta * dcd,
                uu=uu,
                theta_u=self.vec.dot_params(u),
            )

    def update_preconditioner(self) -> None:  # noqa: D102
        # ρ and β come with the curvature step; the refresh adopts the last exact pair.
        if self._pair is not None:
            self.inverse.set_pair(self._pair, sy=self._pair_sy)
            self._pair = self._pair_sy = None

    def precondition(self) -> None:  # noqa: D102
        if self._d is None and self.inverse.ready:
            self._precondition_secant()
            return
        mask = self.vec.mask()
        u = self._u_now
        if self._d is not None and u is not None and self._u_finite and mask is None:
            # z ← −u, p.grad ← u: u is finite, so the guard below would select it anyway
            self._d = self._u_now = None
            if self.z is None:
                self.z = torch.empty_like(u)
            torch.neg(u, out=self.z)
            for g, a, b in self.vec.trained_grads():
                g.copy_(u[a:b].view(g.shape))  # = −z, bit for bit
            return
        new = self._rows()[0]
        if self._d is not None and self._u_now is not None:
            torch.neg(self._u_now, out=new)  # −u = ρz − βd, bit for bit (signs are exact)
        elif self._d is not None:
            # The paper's update z ← ρz − βd, d = Ĉz + g (Ĉz from the same trained part of z).
            torch.mul(self._d, -self.beta, out=new)
            if self.z is not None:
                new.add_(self._trained_part(self.z), alpha=self.rho)
        else:
            self.vec.flatten_into(self._grads(), new)
            new.neg_()
        self._d = self._u_now = None
        if self.z is None:
            self.z = torch.zeros_like(new)
        z = self.z
        ok = all_finite(new)
        if mask is not None:
            ok = ok & mask  # frozen slots of z are kept
        # A non-finite gradient (or Ĉz) must not enter z: keep the previous z (device-side
        # flag, no host sync). z ← lerp(z, new, ok) selects exactly: weight 1 gives ``new``,
        # weight 0 gives ``z`` once ``new``'s non-finite entries are zeroed (a CPU
        # ``torch.where`` with a broadcast flag costs some six copies).
        new.nan_to_num_(0.0, 0.0, 0.0)
        z.lerp_(new, ok.to(z.dtype))
        for g, a, b in self.vec.trained_grads():
            _neg_into(g, z[a:b].view(g.shape))

    def _precondition_secant(self) -> None:
        """A step in between: ``z ← −M g`` (kept if ``g`` is not finite), ``p.grad ← −z``.

        ``M g`` is computed in place in ``p.grad`` (no flat copy of the gradient). A trained
        parameter without a gradient counts as ``g = 0`` there: its slot of ``M g`` is
        ``W c``.

        Whether ``g`` is finite needs no pass of its own: ``c = K Wᵀg`` is finite exactly when
        ``g`` is (a non-finite ``gᵢ`` makes ``sᵀg`` and ``yᵀg`` infinite or NaN, even where
        ``sᵢ = 0``, and ``K``'s entries are finite and those that multiply them non-zero), and
        ``γ`` and the pair are finite (checked when the pair was accepted).

        Where that flag can be read without a device synchronisation (:func:`host_flag`, a
        CPU), ``p.grad``'s entries of ``M g`` that overflowed although ``g`` and ``c`` are
        finite are zeroed and the trained slots of ``z`` take ``−p.grad`` (two passes instead
        of four), or, when ``g`` is not finite, ``p.grad`` takes ``−z`` and ``z`` is kept.
        Elsewhere the selection happens on the device: ``z ← lerp(z, −M g, ok)`` after zeroing
        the non-finite entries (which makes it exact), then ``p.grad ← −z``; an entry of
        ``−M g`` that overflows although ``g`` and ``c`` are finite is zeroed by that
        ``nan_to_num`` and cannot reach ``z`` or the parameters. The two branches give the
        same ``z`` and ``p.grad`` bit for bit (the signs are exact).
        """
        pair = self.inverse.pair
        assert pair is not None
        on_host = flags_on_host(pair.device)
        c = self.inverse.apply_to_grads(self.vec, scale=1.0 if on_host else -1.0)
        if self.z is None:
            self.z = self.vec.empty(dtype=self.work_dtype).zero_()
        z = self.z
        slots: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for p, (a, b), on in zip(self.vec.params, self.vec.spans, self.vec.active()):
            if not on:
                continue  # frozen slots of z are kept
            g = p.grad
            if g is None:
                new = pair.new_zeros(b - a) if c is None else torch.mv(pair[:, a:b].T, c)
            elif g.dtype == z.dtype and g.is_contiguous():
                new = g.view(-1)
            else:
                new = g.reshape(-1).to(z.dtype)
            slots.append((z[a:b], new, g))
        if not slots:
            return
        if on_host:
            # new = M g (or W c): z takes −new, p.grad keeps it (an overflowed entry zeroed
            # in both); a non-finite g leaves z and gives p.grad = −z (c's few entries read
            # here: the flag's device operators would cost more than the reading)
            if c is None or all(math.isfinite(v) for v in c.tolist()):
                for zs, new, g in slots:
                    torch.neg(new.nan_to_num_(0.0, 0.0, 0.0), out=zs)
                    if g is not None and new.data_ptr() != g.data_ptr():
                        g.copy_(new.view(g.shape))
            else:
                for zs, _, g in slots:
                    if g is not None:
                        _neg_into(g, zs.view(g.shape))
            return
        ok = z.new_ones(()) if c is None else is_finite(c).all().to(z.dtype)
        for zs, new, g in slots:
            # selects exactly (see precondition): weight 1 gives new, 0 keeps z
            zs.lerp_(new.nan_to_num_(0.0, 0.0, 0.0), ok)
            if g is not None:
                _neg_into(g, zs.view(g.shape))

    def _grads(self) -> list[Tensor | None]:
        return [p.grad if p.requires_grad else None for p in self.vec.params]

    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "z": None if self.z is None else self.z.clone(),
            "rho": self.rho,
            "beta": self.beta,
            "lm": self.lm.state_dict(),
            "u": None if self._u is None else self._u.clone(),
            "inverse": self.inverse.state_dict(),
            "pair": None if self._pair is None else (self._pair[0].clone(), self._pair[1].clone()),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self.z = None if state["z"] is None else state["z"].clone()
        self.rho = float(state["rho"])
        self.beta = float(state["beta"])
        self.lm.load_state_dict(state["lm"])
        self._u = None if state["u"] is None else state["u"].clone()
        self.inverse.load_state_dict(state["inverse"])
        pair = state["pair"]
        self._pair = None if pair is None else stack_rows([pair[0], pair[1]])
        self._pair_sy = None
        self._pairs.clear()

    def cost_model(self) -> CostModel:
        """Two curvature products per curvature step; the secant operator and ``z`` every step.

        Products are declared by ``add_products`` (see the Hessian-free cost model).
        """
        cm = CostModel()
        p = self.vec.numel
        self.add_products(cm, 2, CurvatureType(self.config.curvature))
        # Ĉz = Cz + λz, d = Ĉz + g, Ĉd = Cd + λd, the five inner products and u = βd − ρz.
        cm.add(Phase.CURVATURE, "elementwise", (10 * p,))
        # Every step: z ← −M g (or ρz − β(g + Ĉz)) reads (s, y, g) twice and writes z, then
        # p.grad ← −z: 9P elements of traffic, an elementwise pass over 4.5P.
        cm.add(Phase.APPLY, "elementwise", (9 * p // 2,))
        # z, the pair (s, y), and −z of the last curvature step for the damping adaptation
        cm.state_numel = 4 * p if self.config.adapt_damping else 3 * p
        # The work rows, the new pair, the graph of the products, and the part of a product's
        # output allocated by autograd before it is copied (see the Hessian-free cost model).
        cm.transient_numel = 4 * p + self.product_copy_numel + self.graph_numel
        return cm


def _neg_into(dst: Tensor, src: Tensor) -> None:
    """``dst ← −src`` in place, also into a lower precision.

    A bfloat16 ``p.grad`` takes the float32 ``z``: rounding is symmetric, so copying then
    negating gives ``−round(z) = round(−z)``, bit for bit.
    """
    if dst.dtype == src.dtype:
        torch.neg(src, out=dst)
    else:
        dst.copy_(src).neg_()


def _finite(v: float) -> bool:
    return math.isfinite(v)
