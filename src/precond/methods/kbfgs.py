r"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton (Goldfarb, Ren & Bahamou 2020).

For a layer with canonical weight ``W̃`` (``[d_out, d_in']`` per group, see
:mod:`precond.capture.base`) the inverse Hessian block is approximated by ``H^g ⊗ H^a`` and

.. math::

    p.grad ← H^g \, ∇_{W̃} L \, H^a, \qquad H^a = (A + \sqrt{λ} I)^{-1},

* ``A`` is K-FAC's input factor (mean of ``ã ãᵀ`` over examples and weight-sharing positions),
  averaged with ``ema_decay`` and inverted by Cholesky on preconditioner steps;
* ``H^g ≈ (G + \sqrt{λ} I)^{-1}``, with ``G`` the (average) Hessian of the loss in the layer's
  pre-activations ``h``, is built by BFGS (``variant="bfgs"``, a dense ``d_out × d_out`` matrix
  per group, starting at ``initial_scale · I``) or L-BFGS (``variant="lbfgs"``, the last
  ``memory`` pairs, two-loop recursion) from pairs

  .. math::

      s = \overline{h}(θ) − \overline{h}(θ'), \qquad y = Σ_{rows} \big(∇_h L(θ) − ∇_h L(θ')\big),

  the change of the mean pre-activation and of the summed pre-activation gradients between
  two parameter values ``θ'``, ``θ`` *on the same batch*. Pairs are averaged with
  ``pair_decay`` (as in the authors' code) and made safe by *double damping* (Powell's damping
  of ``H`` with ``μ₁ = powell_mu``, then Levenberg-Marquardt-type damping with ``μ₂ = √λ``; see
  :mod:`precond.methods.bfgs`), so every update keeps ``H^g`` positive definite.

**Where the second pass happens.** The paper evaluates the batch again after the parameter step.
precond's optimizer step happens outside the gradient maker, so on a curvature step K-BFGS keeps
a copy ``θ'`` of the trained parameters as they were at the previous curvature step and, before
the ordinary pass at ``θ``, runs one extra forward and backward pass of the *current* batch at
``θ'`` (parameters swapped in without copying; random-number state and buffers such as batch-norm
statistics are restored, so the ordinary pass sees the same dropout masks and updates the
buffers once). With ``curvature_upd_interval = 1`` this is the paper's pair (the two iterates of
one step, on one batch); with ``T > 1`` it spans ``T`` steps. Steps in between do no extra work.
The first curvature step only sets ``A`` (no pair yet). The copy ``θ'`` is part of the state.

**Layers.** The method covers layers with dense affine inputs: Linear and convolutions (any
input rank; positions are weight sharing). Normalisation and embedding layers are routed to the
``unsupported`` policy, whose default for K-BFGS is ``"diag"``: they get the library's diagonal
second-moment fallback (:class:`~precond.methods.fallback.DiagonalFallback`); ``"skip"`` leaves
them plain and ``"error"`` rejects the model.

Knobs: ``variant``, ``memory``, ``damping`` (``λ < 1``), ``ema_decay`` (``A``'s average, 0.9),
``pair_decay``, ``powell_mu``, ``initial_scale``.

Reference:
    D. Goldfarb, Y. Ren, A. Bahamou. Practical Quasi-Newton Methods for Training Deep Neural
    Networks. NeurIPS 2020. https://arxiv.org/abs/2006.08877
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import GRAD_TAG, Layer, LayerStats, Recorder, UnsupportedModuleError, stat_dtype
from ..config import PreconditioningConfig
from ..curvature import fisher
from ..enums import UnsupportedPolicy, WeightSharing
from ..linalg.ema import ema_update
from ..linalg.solvers import damped_cholesky_inverse
from ..numerics import finite_flags, warn_once
from ..registry import register_method
from ..validation import check_float, check_int, check_probability, coerce_enum, invalid
from . import bfgs
from .base import PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches
from .fallback import DiagonalFallback
from .kfac import layer_has_grad, write_preconditioned

__all__ = ["KronBfgsConfig", "KronBfgsGradientMaker", "KbfgsVariant"]

_PREVIOUS_TAG = "kbfgs_previous"


class KbfgsVariant(str, Enum):
    """How the ``G`` factor's inverse is stored: dense BFGS matrix or L-BFGS pairs."""

    BFGS = "bfgs"
    LBFGS = "lbfgs"

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True)
class KronBfgsConfig(PreconditioningConfig):
    """K-BFGS options (see the module docstring).

    Args:
        variant: ``bfgs`` (default) or ``lbfgs``.
        memory: Pairs kept by ``lbfgs``.
        damping: ``λ ∈ [0, 1)``; ``√λ`` damps both factors (and is the LM damping ``μ₂``).
        ema_decay: Moving average of the input factor ``A``.
        pair_decay: Moving average of the pairs ``(s, y)``.
        powell_mu: ``μ₁ ∈ (0, 1)`` of Powell's damping.
        initial_scale: ``H^g`` starts at ``initial_scale · I`` (also L-BFGS's ``H₀``).
        unsupported: Policy for normalisation and embedding layers (default ``"diag"``).
    """

    variant: KbfgsVariant | str = KbfgsVariant.BFGS
    memory: int = 10
    damping: float = 1e-3
    ema_decay: float = 0.9
    pair_decay: float = 0.9
    powell_mu: float = 0.2
    initial_scale: float = 1.0
    unsupported: UnsupportedPolicy | str = UnsupportedPolicy.DIAG

    def __post_init__(self) -> None:
        super().__post_init__()
        self.variant = coerce_enum(KbfgsVariant, self.variant, "variant")
        check_int("memory", self.memory, minimum=1)
        check_float("damping", self.damping, minimum=0.0, maximum=1.0, strict_max=True)
        check_probability("pair_decay", self.pair_decay)
        check_float(
            "powell_mu", self.powell_mu, minimum=0.0, maximum=1.0, strict_min=True, strict_max=True
        )
        check_float("initial_scale", self.initial_scale, minimum=0.0, strict_min=True)


class _LayerState:
    """A layer's factors: ``A`` and its damped inverse, ``H^g`` (or L-BFGS pairs), pair EMA."""

    _names = ("a", "a_inv", "hg", "s_mem", "y_mem", "s_avg", "y_avg")

    def __init__(self) -> None:
        self.a: Tensor | None = None
        self.a_inv: Tensor | None = None
        self.hg: Tensor | None = None
        self.s_mem: Tensor | None = None
        self.y_mem: Tensor | None = None
        self.s_avg: Tensor | None = None
        self.y_avg: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            k: None if getattr(self, k) is None else getattr(self, k).clone() for k in self._names
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self._names:
            v = state[k]
            setattr(self, k, None if v is None else v.clone())


def _means(st: LayerStats, tag: str) -> tuple[Tensor, Tensor]:
    """Mean pre-activation and summed pre-activation gradient, ``[G, d_out]`` each.

    Both are reductions over the canonical views' leading dimensions (no flattened copy of
    the permuted convolution layouts, no concatenation of the calls).
    """
    g = st.g(tag)
    dt = stat_dtype(g.dtype)
    g_sum = g.sum(dim=tuple(range(g.dim() - 2)), dtype=dt)
    sums = st.output_sums
    rows = sum(n for _, n in sums)
    if len(sums) == 1:  # one call (the usual case): 0 + h is h
        return sums[0][0].to(dt) / max(rows, 1), g_sum
    h_sum = torch.zeros_like(g_sum)
    for h, _ in sums:
        h_sum += h.to(dt)
    return h_sum / max(rows, 1), g_sum


@register_method(
    "kbfgs",
    "K-BFGS / K-BFGS(L): Kronecker-factored damped (L-)BFGS per layer (Goldfarb et al. 2020)",
    family="global",
)
class KronBfgsGradientMaker(PreconditionedGradientMaker):
    """K-BFGS gradient maker (see the module docstring for the update and reference).

    Args:
        model: The model.
        config: :class:`KronBfgsConfig`.

    Raises:
        UnsupportedModuleError: For normalisation or embedding layers under
            ``unsupported="error"``.
    """

    config_class = KronBfgsConfig
    config: KronBfgsConfig

    def __init__(self, model: nn.Module, config: KronBfgsConfig | None = None) -> None:
        super().__init__(model, config)
        self._reroute_other_layers()
        # The G factor's pairs need the mean pre-activations: summed as the layers produce them
        # (no output kept; exact also when an output is later modified in place).
        self.recorder.output_sums = True
        self.states: dict[str, _LayerState] = {layer.name: _LayerState() for layer in self.layers}
        self.prev_params: list[Tensor] | None = None
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}
        self._pair_step = False
        self._rows: dict[str, int] = {}
        self._positions: dict[str, int] = {}

    def _reroute_other_layers(self) -> None:
        other = [
            layer
            for layer in self.layers
            if layer.adapter is not None
            and (layer.adapter.elementwise or layer.adapter.one_hot_input)
        ]
        if not other:
            return
        policy = UnsupportedPolicy(self.config.unsupported)
        if policy is UnsupportedPolicy.ERROR:
            layer = other[0]
            raise UnsupportedModuleError(
                f"Invalid module {layer.label}: {type(self).__name__} cannot precondition it "
                "(K-BFGS covers Linear and convolution layers). Exclude it with "
                "ignore_modules=[...], or pass unsupported='diag' (diagonal fallback, the "
                "default) or unsupported='skip' (plain gradient)."
            )
        self.layers = [layer for layer in self.layers if layer not in other]
        self.partition.layers = self.layers
        if policy is UnsupportedPolicy.SKIP:
            self.partition.plain.extend(p for layer in other for p in layer.params)
        else:
            self.partition.fallback.extend(other)
        self.recorder = Recorder(self.layers)
        self.fallback = DiagonalFallback(
            [p for layer in self.partition.fallback for p in layer.params],
            damping=self.config.effective_damping,
            ema_decay=self.config.ema_decay,
        )

    # ---- the extra pass ---------------------------------------------------------------------
    def _records_loss_grads(self) -> bool:
        return True

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        step = self._step
        curvature_step = self.curvature_schedule.is_update_step(step) or not self._has_curvature
        self._previous = {}
        self._pair_step = curvature_step and self.prev_params is not None and bool(self.layers)
        if self._pair_step:
            self._previous = self._previous_point_pass()
        return super()._forward_and_backward()

    def _previous_point_pass(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Pre-activations and their gradients on this batch at the stored parameters ``θ'``."""
        params = self.params
        assert self.prev_params is not None
        if len(params) != len(self.prev_params):
            return {}
        current = [p.data for p in params]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        dev = params[0].device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        out: dict[str, tuple[Tensor, Tensor]] = {}
        try:
            for p, old in zip(params, self.prev_params):
                p.data = old
            with (
                torch.random.fork_rng(devices=devices),
                self.recorder.record(self.batch_size) as stats,
            ):
                _, loss = self.forward()
                one = torch.ones(1, dtype=loss.dtype, device=loss.device)
                # nothing else differentiates this graph: free each activation once used (kept,
                # they sat beside the recorded gradients: cnn_small B=512 peak 204 -> 157 MB)
                self.recorder.backprop(loss, one, _PREVIOUS_TAG, retain_graph=False)
                for layer in self.layers:
                    st = stats[layer.name]
                    if st.num_calls:
                        out[layer.name] = _means(st, _PREVIOUS_TAG)
        finally:
            for p, cur in zip(params, current):
                p.data = cur
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        return out

    # ---- the three verbs ----------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        decay = self.config.ema_decay
        for layer in self.layers:
            st = stats.get(layer.name)
            if st is None or st.num_calls == 0:
                continue
            state = self.states[layer.name]
            a = fisher.kron_input_factor(st, WeightSharing.EXPAND)
            self._rows[layer.name] = st.batch_size * st.num_positions()
            self._positions[layer.name] = st.num_positions()
            if all(finite_flags([fisher.kron_factor_check(a)])):
                state.a = ema_update(state.a, a, decay)
            else:
                warn_once(
                    f"kbfgs:a:{layer.name}",
                    f"K-BFGS: non-finite inputs for layer {layer.label}; A update skipped.",
                )
            if state.hg is None and state.s_mem is None:
                self._init_g(layer, state, a)
            prev = self._previous.get(layer.name)
            if prev is None:
                continue
            h_mean, g_sum = _means(st, GRAD_TAG)
            self._update_g(layer, state, h_mean - prev[0], g_sum - prev[1])
        self._previous = {}
        params = [p.detach() for p in self.params]
        stored = self.prev_params
        if stored is not None and [t.shape for t in stored] == [p.shape for p in params]:
            torch._foreach_copy_(stored, params)
        else:
            self.prev_params = [p.clone() for p in params]

    def _init_g(self, layer: Layer, state: _LayerState, ref: Tensor) -> None:
        groups, d_out, _ = layer.shape
        eye = torch.eye(d_out, dtype=ref.dtype, device=ref.device)
        state.s_avg = ref.new_zeros(groups, d_out)
        state.y_avg = ref.new_zeros(groups, d_out)
        if self.config.variant is KbfgsVariant.BFGS:
            state.hg = (self.config.initial_scale * eye).expand(groups, d_out, d_out).clone()
        else:
            state.s_mem = ref.new_zeros(groups, 0, d_out)
            state.y_mem = ref.new_zeros(groups, 0, d_out)

    def _apply_hg(self, state: _LayerState, x: Tensor) -> Tensor:
        """``H^g X`` for ``X`` ``[G, d_out, k]``."""
        if state.hg is not None:
            return state.hg.to(x.dtype) @ x
        assert state.s_mem is not None and state.y_mem is not None
        s_mem, y_mem = state.s_mem.to(x.dtype), state.y_mem.to(x.dtype)
        return bfgs.lbfgs_apply(s_mem, y_mem, self.config.initial_scale, x)

    def _update_g(self, layer: Layer, state: _LayerState, s: Tensor, y: Tensor) -> None:
        if not all(finite_flags([s, y])):
            warn_once(
                f"kbfgs:pair:{layer.name}",
                f"K-BFGS: non-finite (s, y) pair for layer {layer.label}; G update skipped.",
            )
            return
        beta = self.config.pair_decay
        state.s_avg = ema_update(state.s_avg, s, beta)
        state.y_avg = ema_update(state.y_avg, y, beta)
        assert state.s_avg is not None and state.y_avg is not None
        hy = self._apply_hg(state, state.y_avg.unsqueeze(-1)).squeeze(-1)
        mu2 = math.sqrt(self.damping)
        s_t, y_t = bfgs.double_damping(state.s_avg, state.y_avg, hy, self.config.powell_mu, mu2)
        if state.hg is not None:
            state.hg, _ = bfgs.bfgs_update(state.hg, s_t, y_t)
            return
        assert state.s_mem is not None and state.y_mem is not None
        usable = ((s_t * y_t).sum(-1) > 0) & torch.isfinite(s_t + y_t).all(-1)
        s_t = torch.where(usable.unsqueeze(-1), s_t, 0.0)
        y_t = torch.where(usable.unsqueeze(-1), y_t, 0.0)
        state.s_mem, state.y_mem = bfgs.lbfgs_append(
            state.s_mem, state.y_mem, s_t, y_t, self.config.memory
        )

    def update_preconditioner(self) -> None:  # noqa: D102
        lam = math.sqrt(self.damping)
        for layer in self.layers:
            state = self.states[layer.name]
            if state.a is None:
                continue
            a_inv = damped_cholesky_inverse(state.a, lam)
            if a_inv is None:
                warn_once(
                    f"kbfgs:refresh:{layer.name}",
                    f"K-BFGS: could not factorise the input factor of layer {layer.label}; "
                    "keeping the previous preconditioner.",
                )
                continue
            state.a_inv = a_inv

    def precondition(self) -> None:  # noqa: D102
        for layer in self.layers:
            state = self.states[layer.name]
            if state.a_inv is None or not layer_has_grad(layer):
                continue
            if state.hg is not None and _apply_in_place(layer, state.hg, state.a_inv):
                continue
            x = layer.grads_matrix()
            dt = state.a_inv.dtype
            out = self._apply_hg(state, x.to(dt)) @ state.a_inv
            write_preconditioned(layer, out)

    # ---- state -------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "layers": {name: st.state_dict() for name, st in self.states.items()},
            "prev_params": None
            if self.prev_params is None
            else [t.clone() for t in self.prev_params],
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        missing = set(self.states) - set(state["layers"])
        if missing:
            raise invalid("state", sorted(missing), "Missing K-BFGS layer states")
        for name, st in self.states.items():
            st.load_state_dict(state["layers"][name])
        prev = state["prev_params"]
        self.prev_params = None if prev is None else [t.clone() for t in prev]

    def cost_model(self) -> CostModel:
        """One extra forward-backward pass, A statistics, (L-)BFGS update, refresh and apply.

        The pairs need the pre-activations and their gradients at the previous parameters on
        this batch: one forward pass and one back-propagation to the layers' outputs.
        """
        cm = CostModel(state_dtype=stat_dtype(self.params[0].dtype))
        cm.add(Phase.EXTRA_BACKWARD, "forward", (1,))
        cm.add(Phase.EXTRA_BACKWARD, "backward", (1,))
        lbfgs = self.config.variant is KbfgsVariant.LBFGS
        mem = self.config.memory
        for layer in self.layers:
            rows = self._rows.get(layer.name)
            if rows is None:
                continue
            groups, d_out, d_in = layer.shape
            s = self._positions.get(layer.name, 1)
            add_patches(cm, layer, rows // s, s)  # A's inputs at the shared positions
            cm.add(Phase.CURVATURE, "bmm", (groups, d_in, rows, d_in))
            if self.config.ema_decay > 0.0:  # A's moving average
                cm.add(Phase.CURVATURE, "elementwise", (groups * d_in * d_in,))
            cm.add(Phase.CURVATURE, "elementwise", (2 * rows * groups * d_out,))
            cm.add(Phase.REFRESH, "cholesky", (groups, d_in))
            cm.add(Phase.REFRESH, "cholesky_inverse", (groups, d_in))
            cm.add(Phase.APPLY, "bmm", (groups, d_out, d_in, d_in))
            # a refresh factorises and inverts the damped copy of A in one buffer (next to
            # the previous inverse, kept if the factorisation fails); the apply holds H^g·G
            # before the product with H^a (L-BFGS's two-loop recursion: its running matrix and
            # the result); a BFGS update holds the new H^g next to the old one
            apply = (2 if lbfgs else 1) * d_out * d_in
            workspace = groups * max(d_in * d_in, apply, 0 if lbfgs else d_out * d_out)
            cm.transient_numel = max(cm.transient_numel, workspace)
            if lbfgs:
                cm.add(Phase.CURVATURE, "elementwise", (4 * mem * groups * d_out,))
                cm.add(Phase.APPLY, "elementwise", (4 * mem * groups * d_out * d_in,))
                cm.state_numel += groups * (2 * d_in * d_in + 2 * mem * d_out + 2 * d_out)
            else:
                cm.add(Phase.CURVATURE, "elementwise", (4 * groups * d_out * d_out,))
                cm.add(Phase.APPLY, "bmm", (groups, d_out, d_out, d_in))
                cm.state_numel += groups * (2 * d_in * d_in + d_out * d_out + 2 * d_out)
        cm.state_numel += sum(p.numel() for p in self.params)
        return cm


def _apply_in_place(layer: Layer, hg: Tensor, a_inv: Tensor) -> bool:
    """``H^g [G_w | g_b] H^a`` written straight into ``weight.grad`` and ``bias.grad``.

    With ``H^a = [[P, q], [qᵀ, r]]`` (bias last): ``W' = (H^g G_w) P + (H^g g_b) qᵀ`` and
    ``b' = (H^g G_w) q + (H^g g_b) r``; no concatenation of the gradients and no copy of the
    result. Used when weight and bias are trained, both have gradients in the factors' dtype,
    and the weight gradient is a contiguous ``[G, d_out, d_in]`` (or when the layer has only a
    weight: ``W' = H^g G_w H^a``).

    Returns:
        ``False`` if the layer does not fit (the caller uses the generic path).
    """
    if layer.adapter is None or not layer.trained[0] or any(p.grad is None for p in layer.params):
        return False
    weight = layer.params[0]
    assert weight.grad is not None
    if weight.grad.dtype != a_inv.dtype:
        return False
    gw = layer.adapter.weight_to_matrix(layer.module, weight.grad)
    if not gw.is_contiguous() or gw.data_ptr() != weight.grad.data_ptr():
        return False
    d = gw.shape[-1]
    tw = torch.bmm(hg, gw)  # [G, d_out, d_in]
    if layer.trained == (True, False) and a_inv.shape[-1] == d:
        torch.bmm(tw, a_inv, out=gw)
        return True
    if layer.trained != (True, True) or a_inv.shape[-1] != d + 1:
        return False
    bias = layer.params[1]
    assert bias.grad is not None
    if bias.grad.dtype != a_inv.dtype:
        return False
    tb = torch.bmm(hg, bias.grad.reshape(gw.shape[0], gw.shape[1], 1))  # [G, d_out, 1]
    p_, q, r = a_inv[:, :d, :d], a_inv[:, :d, d:], a_inv[:, d:, d:]
    new_b = torch.baddbmm(tb * r, tw, q)
    # the rank-one bias term is added in place (no gradient-sized outer product)
    torch.bmm(tw, p_, out=gw).baddbmm_(tb, q.transpose(1, 2))
    bias.grad.copy_(new_b.reshape(bias.grad.shape))
    return True
