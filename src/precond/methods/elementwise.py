"""Shared skeleton of element-wise second-order methods (AdaHessian, Sophia).

Both keep, per preconditioned parameter, a first moment ``m`` of the gradient (updated every
step) and a moving average of a diagonal curvature estimate (updated on curvature steps), and
write an element-wise function of them into ``p.grad``. The curvature estimate is computed in
:meth:`_backward` on curvature steps (Hessian-vector products or an extra backward pass), which
is why these methods need no capture adapter.

The momentum lives inside the gradient maker: pair them with plain SGD (no momentum; weight
decay in the optimizer is applied to the preconditioned direction, i.e. decoupled).

Parameters frozen after construction: each step estimates the curvature of (and
differentiates) only the preconditioned parameters trained at that step; a frozen parameter's
moment, curvature average and denominator are neither updated nor dropped, so un-freezing
resumes them, and nothing is written to its ``p.grad``. Each parameter also counts its own
steps and curvature updates (the counts behind bias corrections), which do not advance while it
is frozen; without freezing they equal the global counters.

Non-finite numbers: a step whose gradient of a parameter is not finite leaves that parameter's
first moment unchanged (a device-side guard, no host sync; on a CPU the flags are read, which
costs nothing there, see :func:`precond.numerics.host_flag`); a non-finite curvature estimate is
not folded in (host check on curvature steps, warned once). The step counter still advances.

Cost: the per-step path is one reduction per parameter for the finiteness flag and three
in-place passes (non-finite entries of the gradient zeroed, the moment's update, the direction
written into ``p.grad``; Sophia's clip is a fourth; on a CPU the zeroing runs only on the
gradients that need it); no parameter-sized temporary is allocated and nothing is synchronised
with the host. Operations that act on every parameter alike run as
``torch._foreach_*`` kernels (one dispatch for all parameters), the rest as one operator call
per parameter with no other per-parameter work. Curvature steps and refreshes update their
buffers in place.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capture import LayerStats, stat_dtype
from ..config import PreconditioningConfig
from ..numerics import all_sums_finite, finite_sums, host_flags, warn_once
from ._saved import SavedCounts, gradient_with_saved
from .base import PreconditionedGradientMaker, accumulate_grads, backward_other_leaves

__all__ = ["ElementwiseSecondOrderMaker"]


class ElementwiseSecondOrderMaker(PreconditionedGradientMaker):
    """Base of AdaHessian and Sophia: moments, diagonal estimate, state.

    Args:
        model: The model.
        config: The method's config.
    """

    needs_adapter = False
    _label = "element-wise"
    #: Whether the moving average holds the square of the (smoothed) estimate (AdaHessian's
    #: ``D ⊙ D``) or the estimate itself (Sophia's ``ĥ``).
    _average_square: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        super().__init__(model, config)
        self.precond_params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self.exp_avg: list[Tensor | None] = [None] * len(self.precond_params)
        self.curvature: list[Tensor | None] = [None] * len(self.precond_params)
        self.denominator: list[Tensor | None] = [None] * len(self.precond_params)
        self.num_steps = 0
        self.num_curvature_updates = 0
        #: Per parameter: steps and curvature updates while it was trained.
        self.param_steps = [0] * len(self.precond_params)
        self.param_curvature_updates = [0] * len(self.precond_params)
        #: Elements saved by the gradient's graph on the last curvature step (Hessian-vector
        #: products only): transient memory of the double backward.
        self.graph_numel = 0
        #: The gradient graph's memory, counted once per graph signature (a cache, not state).
        self._saved_counts = SavedCounts()
        # Indices (into precond_params) of the parameters estimated this step, and estimates.
        self._estimate: tuple[list[int], list[Tensor]] | None = None

    # ---- what a method defines ------------------------------------------------------------------
    @abstractmethod
    def _diagonal_estimate(
        self, loss: Tensor, params: list[nn.Parameter], pre_grads: list[Tensor]
    ) -> list[Tensor]:
        """This step's diagonal curvature estimate for ``params``.

        ``params`` are the preconditioned parameters trained now; ``pre_grads`` their gradients
        with a graph when :meth:`_needs_graph`. Otherwise ``pre_grads`` is empty and the method
        runs the loss's own backward too (into ``.grad``, freeing the graph), so that it can
        share the walk of the graph with its own pass. The estimates are fresh tensors the
        caller may overwrite.
        """

    @abstractmethod
    def _needs_graph(self) -> bool:
        """Whether the estimate needs the gradient's graph (Hessian-vector products)."""

    def _second_derivatives(self, curvature_step: bool) -> bool:
        return curvature_step and self._needs_graph()

    @abstractmethod
    def _directions_(
        self, outs: list[Tensor], moments: list[Tensor], denoms: list[Tensor], steps: list[int]
    ) -> None:
        """Write the preconditioned directions into ``outs`` (in place, one pass if possible).

        From the first moments, the cached denominators and each parameter's own step count;
        ``torch._foreach`` kernels where the operation is the same for all parameters.
        """

    @abstractmethod
    def _denominators_(
        self, outs: list[Tensor], curvatures: list[Tensor], updates: list[int]
    ) -> None:
        """Write the denominators cached by :meth:`update_preconditioner` into ``outs``.

        ``updates`` holds each parameter's own count of curvature updates. In place (a fresh
        buffer of a few MB costs its page faults on every refresh), with ``torch._foreach``
        kernels where the operation is the same for all parameters.
        """

    def _smooth(self, estimate: Tensor) -> Tensor:
        """The estimate folded into ``curvature`` (default: itself; may broadcast to it)."""
        return estimate

    # ---- the backward pass ----------------------------------------------------------------------
    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        rows = [i for i, p in enumerate(self.precond_params) if p.requires_grad]
        if not curvature_step or not rows:
            loss.backward()
            return
        trained = [self.precond_params[i] for i in rows]
        params = self.params
        if self._needs_graph():
            backward_other_leaves(self, loss)
            grads, self.graph_numel = gradient_with_saved(
                loss, params, self._saved_counts, self.graph_signature()
            )
            index = {id(p): i for i, p in enumerate(params)}
            pre_grads = [grads[index[id(p)]] for p in trained]
            self._estimate = (rows, self._diagonal_estimate(loss, trained, pre_grads))
            del pre_grads
            accumulate_grads(params, _standalone(grads))
        else:
            # the estimate runs the loss's backward with its own pass (see _diagonal_estimate)
            self._estimate = (rows, self._diagonal_estimate(loss, trained, []))

    # ---- the three verbs ------------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        if self._estimate is None:
            return
        rows, est = self._estimate
        self._estimate = None
        if est and not all_sums_finite(est):
            warn_once(
                f"{self._label}:estimate",
                f"{self._label}: non-finite curvature estimate; curvature update skipped.",
            )
            return
        beta = self.config.ema_decay
        avgs: list[Tensor] = []
        folded: list[Tensor] = []
        for i, e in zip(rows, est):
            stat = self._smooth(e)  # a fresh tensor (the estimate or its average)
            avg = self.curvature[i]
            if avg is None:
                avg = self.curvature[i] = e.new_zeros(self.precond_params[i].shape)
            if stat.shape != avg.shape:
                # broadcast over the kernel positions (one op per such parameter)
                avg.lerp_(stat.square_() if self._average_square else stat, 1.0 - beta)
                continue
            avgs.append(avg)
            folded.append(stat)
        if avgs:
            if self._average_square:
                torch._foreach_mul_(folded, folded)
            # β h + (1 − β) s in one pass per parameter
            torch._foreach_lerp_(avgs, folded, 1.0 - beta)
        self.num_curvature_updates += 1
        for i in rows:
            self.param_curvature_updates[i] += 1

    def update_preconditioner(self) -> None:  # noqa: D102
        outs: list[Tensor] = []
        curvatures: list[Tensor] = []
        updates: list[int] = []
        for i, c in enumerate(self.curvature):
            if c is None:
                continue
            out = self.denominator[i]
            if out is None or out.shape != c.shape or out.dtype != c.dtype:
                out = self.denominator[i] = torch.empty_like(c)
            outs.append(out)
            curvatures.append(c)
            updates.append(self.param_curvature_updates[i])
        if outs:
            self._denominators_(outs, curvatures, updates)

    def precondition(self) -> None:  # noqa: D102
        self.num_steps += 1
        beta1 = float(getattr(self.config, "momentum", 0.0))
        idx: list[int] = []
        grads: list[Tensor] = []
        for i, p in enumerate(self.precond_params):
            if p.requires_grad:
                self.param_steps[i] += 1
                g = p.grad
                if g is not None:
                    idx.append(i)
                    grads.append(g)
        if not idx:
            return
        # A non-finite gradient must not enter the moment: the moment's update weight is
        # (1 − β₁) where the gradient is finite and 0 elsewhere, and the gradient is zeroed
        # where not finite so that 0 · g stays 0. Where the flags can be read for free (a CPU,
        # see host_flag), the finite gradients skip the zeroing pass and the others the
        # moment's update; elsewhere the weights stay on the device (no host sync).
        finite = finite_sums(grads)
        dtype = stat_dtype(grads[0].dtype)
        known = host_flags(finite)
        moments: list[Tensor] = []
        works: list[Tensor] = []
        mixed = False
        for k, (i, g) in enumerate(zip(idx, grads)):
            m = self.exp_avg[i]
            if m is None:
                m = self.exp_avg[i] = torch.zeros_like(g, dtype=stat_dtype(g.dtype))
            # p.grad is overwritten in place when it will receive the direction and holds the
            # statistics' dtype; otherwise a copy is worked on.
            own = self.denominator[i] is not None and g.dtype == m.dtype
            work = g if own else g.to(m.dtype, copy=True)
            mixed = mixed or m.dtype != dtype
            moments.append(m)
            works.append(
                work if known is not None and known[k] else work.nan_to_num_(0.0, 0.0, 0.0)
            )
        if known is not None:
            # m + (1 − β₁)(g − m) for the finite gradients, one dispatch
            fresh = [k for k, ok in enumerate(known) if ok]
            if fresh:
                torch._foreach_lerp_(
                    [moments[k] for k in fresh], [works[k] for k in fresh], 1.0 - beta1
                )
        else:
            weights = list(finite.to(dtype).mul_(1.0 - beta1).unbind())
            if mixed:
                weights = [w.to(m.dtype) for w, m in zip(weights, moments)]
            # m + w (g − m); the zeroed non-finite entries meet w = 0
            torch._foreach_lerp_(moments, works, weights)
        outs: list[Tensor] = []
        outs_m: list[Tensor] = []
        denoms: list[Tensor] = []
        steps: list[int] = []
        for i, m, work in zip(idx, moments, works):
            denom = self.denominator[i]
            if denom is None:
                continue  # no curvature for it yet: p.grad keeps the plain gradient
            outs.append(work)
            outs_m.append(m)
            denoms.append(denom)
            steps.append(self.param_steps[i])
        if not outs:
            return
        self._directions_(outs, outs_m, denoms, steps)
        for i, g, work in zip(idx, grads, works):
            if work is not g and self.denominator[i] is not None:
                g.copy_(work)

    # ---- state ----------------------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        def clone(ts: list[Tensor | None]) -> list[Tensor | None]:
            return [None if t is None else t.clone() for t in ts]

        return {
            "exp_avg": clone(self.exp_avg),
            "curvature": clone(self.curvature),
            "denominator": clone(self.denominator),
            "num_steps": self.num_steps,
            "num_curvature_updates": self.num_curvature_updates,
            "param_steps": list(self.param_steps),
            "param_curvature_updates": list(self.param_curvature_updates),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        for key in ("exp_avg", "curvature", "denominator"):
            if len(state[key]) != len(self.precond_params):
                raise ValueError(
                    f"Invalid state: {len(state[key])} entries of {key!r} for "
                    f"{len(self.precond_params)} parameters."
                )
            setattr(self, key, [None if t is None else t.clone() for t in state[key]])
        self.num_steps = int(state["num_steps"])
        self.num_curvature_updates = int(state["num_curvature_updates"])
        self.param_steps = [int(n) for n in state["param_steps"]]
        self.param_curvature_updates = [int(n) for n in state["param_curvature_updates"]]

    @property
    def _numel(self) -> int:
        return sum(p.numel() for p in self.precond_params)


def _standalone(grads: list[Tensor]) -> list[Tensor]:
    """The gradients detached, each its own tensor (cloned only where it is not).

    The estimate's last product freed the gradients' graph, so nothing else reads them: a
    dense, contiguous gradient that spans its whole storage and shares it with no other
    gradient can become ``p.grad`` as it is (a clone would cost a pass over it and, for a new
    buffer of a few MB, its page faults). That includes a view spanning its whole base (a
    linear map's weight gradient is the transpose of a product computed transposed, a bias
    gradient a reshaped sum): the base is the graph's intermediate, which only the view still
    references. Partial views, expanded or shared results are cloned, as ``backward()`` would.
    """
    out = []
    seen: set[int] = set()
    for g in grads:
        d = g.detach()
        if d.layout != torch.strided:  # a sparse gradient (a skipped embedding's): a copy
            out.append(d.clone())
            continue
        ptr = d.untyped_storage().data_ptr()
        own = (
            d.storage_offset() == 0
            and d.is_contiguous()
            and d.untyped_storage().nbytes() == d.numel() * d.element_size()
            and ptr not in seen
        )
        seen.add(ptr)
        out.append(d if own else d.clone())
    return out
