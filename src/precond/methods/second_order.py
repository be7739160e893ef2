r"""Shared machinery of the Hessian/GGN methods (Newton, Hessian-free, LiSSA, CurveBall).

These methods need second derivatives of the loss, not layer statistics: they set
``needs_adapter = False`` (any module with parameters is handled), install no capture hooks and
override :meth:`PreconditionedGradientMaker._backward`:

* on curvature steps the gradient is computed with a graph (``create_graph=True``), written into
  ``p.grad`` like ``loss.backward()`` would, and the step's :class:`BatchCurvature` (matrix-free
  Hessian and GGN products on this batch) is kept until the step ends, for
  ``update_curvature`` to use;
* on the other steps the backward pass is the plain ``loss.backward()``.

A GGN product ``Jᵀ (∇²_z L) J v`` gets ``J v`` by forward mode (``jvp_mode``, see
:mod:`~precond.methods.jvp_modes`): by default tangents are pushed through the forward graph
the step retains anyway (:mod:`~precond.methods.graph_jvp`: one first-order pass, nothing
recomputed); a batch whose graph has an operation without a tangent rule uses the double
vector-Jacobian product through a transposed-Jacobian graph instead (same result, slower: for
a convolution PyTorch's double backward also computes two convolutions nobody reads).

Vectors are flat: the preconditioned parameters flattened and concatenated in order
(:class:`ParamVector`). This layout is fixed at construction.

Parameters frozen after construction (``requires_grad_(False)``, e.g. a fine-tuning schedule):
at every step the methods work on the loss as a function of the parameters trained *now*.
Only those are differentiated; a frozen parameter's slot of every flat vector is a zero
gradient, the curvature products have zero rows and columns there (the products are those of
the loss restricted to the trained parameters), and nothing is written to its ``p.grad``.
State vectors that persist across steps keep their frozen slots unchanged (see each method),
so un-freezing resumes them. Nothing of this costs anything while no parameter is frozen.

Two amortisation tools live here too. :class:`SecantInverse` turns one solve
``x ≈ (C + λI)^{-1} g`` into a linear operator applied on the steps in between (memoryless
BFGS from the exact curvature pair ``(s, y) = (x, g)``), and :class:`DampingAdapter` is the
Levenberg-Marquardt rule that compares the loss change between two curvature steps with the
change the quadratic model predicted for the step actually taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PreconditioningConfig
from ..curvature import products
from ..curvature.loss import UnknownLossError
from ..enums import CurvatureType
from ..grad_maker import ProtocolError
from ..numerics import warn_once
from ..validation import invalid
from ._saved import SavedCounter as _SavedCounter
from ._saved import SavedCounts
from .base import accumulate_grads, backward_other_leaves
from .cost import CostModel, Phase
from .flat import ParamVector
from .forward_jvp import RngState
from .graph_jvp import only_through as _only_through
from .jvp_modes import TangentProductsMixin
from .secant import DampingAdapter, PairPool, SecantInverse

__all__ = [
    "BatchCurvature",
    "DampingAdapter",
    "PairPool",
    "ParamVector",
    "SecantInverse",
    "SecondOrderGradientMaker",
    "coerce_curvature",
]


def coerce_curvature(value: Any) -> CurvatureType:
    """Validate a ``curvature`` field of a product-based method (``ggn`` or ``hessian``).

    Args:
        value: A :class:`~precond.enums.CurvatureType` or its string.

    Returns:
        The member.

    Raises:
        ValueError: For anything but ``ggn`` and ``hessian``.
    """
    allowed = (CurvatureType.GGN, CurvatureType.HESSIAN)
    for member in allowed:
        if value in (member, member.value):
            return member
    shown = value.value if isinstance(value, CurvatureType) else value
    raise invalid("curvature", shown, "Supported: ('ggn', 'hessian')")


class BatchCurvature:
    """Matrix-free curvature products of the current batch, on flat vectors.

    Only the parameters trained at this step are differentiated: the slots of frozen ones are
    zero in every product (inputs there are ignored), i.e. the products are those of the loss
    as a function of the trained parameters, embedded in the fixed layout.

    Every product takes an optional ``out`` (a flat vector it is written into, e.g. a solver's
    work buffer); without it a new vector is returned.

    Args:
        loss: The scalar loss (graph kept).
        params: The preconditioned parameters.
        grads: ``∇_θ L`` for ``params`` (zeros for frozen parameters); built with
            ``create_graph=True`` when ``hessian`` is set.
        logits: Callable returning the tensor the loss reads (for GGN and sampled products).
        active: Whether each parameter is trained at this step (default: all).
        hessian: Whether ``grads`` carry the graph of Hessian-vector products (otherwise it is
            built at the first one; the forward graph must be retained).
        jacobian: A transposed-Jacobian graph built by the caller: ``(z, ∇_z L, u, Jᵀu)``
            with ``∇_z L`` built with ``create_graph=True``, ``u`` a leaf and ``Jᵀu`` aligned
            with ``params``; otherwise it is built at the first GGN product.
        tangent: ``J v`` by forward mode (:class:`~precond.methods.forward_jvp.ModelReplay`),
            called with the trained parameters' parts of ``v``; if it raises, the products
            fall back to the double vector-Jacobian product for good (:attr:`forward_failed`).
        transpose: ``Jᵀw`` written into the trained parameters' views of a flat vector
            (:meth:`~precond.methods.graph_jvp.GraphTangent.vjp_into`); otherwise autograd's
            parameter gradients are flattened.
        loss_hessian: Returns ``v ↦ (∇²_z L) v`` in closed form for the logits (called at the
            first GGN product; see :meth:`~precond.curvature.loss.LossInputs.hessian_operator`),
            or ``None``; then, and without it, the products differentiate ``∇_z L`` again.
    """

    def __init__(
        self,
        loss: Tensor,
        params: ParamVector,
        grads: list[Tensor],
        logits: Callable[[], Tensor],
        active: list[bool] | None = None,
        *,
        hessian: bool = True,
        jacobian: tuple[Tensor, Tensor, Tensor, list[Tensor]] | None = None,
        tangent: Callable[[list[Tensor]], Tensor] | None = None,
        transpose: Callable[[Tensor, list[Tensor]], None] | None = None,
        loss_hessian: Callable[[], Callable[[Tensor], Tensor] | None] | None = None,
    ) -> None:
        self.loss = loss
        self.vec = params
        self.grads = grads
        self._logits_fn = logits
        self.active = [True] * len(grads) if active is None else list(active)
        self.hessian = hessian
        #: Indices of the trained parameters, and those parameters and their gradients.
        self._on = [i for i, a in enumerate(self.active) if a]
        self._diff = [params.params[i] for i in self._on]
        self._dgrads = [grads[i] for i in self._on]
        self._z: Tensor | None = None
        self._gz: Tensor | None = None
        self._u: Tensor | None = None
        self._ju: list[Tensor] | None = None
        if jacobian is not None:
            self._z, self._gz, self._u, ju = jacobian
            self._ju = [ju[i] for i in self._on]
        self._tangent = tangent
        self._transpose = transpose
        self._loss_hessian_fn = loss_hessian
        self._loss_hessian: Callable[[Tensor], Tensor] | None = None
        self._loss_hessian_built = loss_hessian is None
        #: Whether the forward-mode ``J v`` raised (the products then use reverse mode).
        self.forward_failed = False
        #: Number of curvature-vector products computed (for tests and cost accounting).
        self.count = 0
        #: Elements held by the graphs the products differentiate (see ``_SavedCounter``).
        self.graph_numel = 0
        #: Working set of the largest pass differentiating one of them (passes do not overlap).
        self.working_numel = 0
        #: Elements of a product's output that autograd allocates before they are copied into
        #: the flat result (all of them, unless ``transpose`` contracts them in place).
        #: Set by the caller for ``transpose`` (the parameters it leaves to autograd).
        self.copy_numel = sum(p.numel() for p in self._diff)
        #: Parameter-shaped views of the flat vectors products read and write, by ``id``
        #: (the iterative solvers pass the same few buffers to every product).
        self._views: dict[int, tuple[Tensor, int, list[Tensor]]] = {}

    @property
    def params(self) -> list[nn.Parameter]:
        """The preconditioned parameters."""
        return self.vec.params

    def gradient(self, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """The batch gradient ``g`` as a flat vector (written into ``out`` if given)."""
        if out is None:
            out = self.vec.empty(dtype=dtype)
        return self.vec.flatten_into(list(self.grads), out)

    def _out(self, tensors: list[Tensor], like: Tensor, out: Tensor | None) -> Tensor:
        """Flatten products over the trained parameters (frozen slots: zeros)."""
        self.count += 1
        full: list[Tensor | None] = [None] * len(self.active)
        for i, t in zip(self._on, tensors):
            full[i] = t
        if out is None:
            out = torch.empty_like(like)
        return self.vec.flatten_into(full, out)

    def _views_of(self, vec: Tensor) -> list[Tensor]:
        """Parameter-shaped views of a flat vector, kept while ``vec`` keeps its storage.

        A hit needs the same tensor object at the same address (a resized or re-pointed
        tensor gets fresh views); host-side metadata only, no sync.
        """
        hit = self._views.get(id(vec))
        ptr = vec.data_ptr()
        if hit is not None and hit[0] is vec and hit[1] == ptr:
            return hit[2]
        views = self.vec.views(vec)
        if len(self._views) >= 8:  # a few buffers per solver: drop stale entries
            self._views.clear()
        self._views[id(vec)] = (vec, ptr, views)
        return views

    def _split(self, v: Tensor) -> list[Tensor]:
        """The trained parameters' parts of a flat vector (in the parameters' dtypes)."""
        views, params = self._views_of(v), self.vec.params
        return [views[i].to(params[i].dtype) for i in self._on]

    def hvp(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        """``H v`` (Hessian of the loss as written)."""
        if not self._diff:
            return self._out([], v, out)
        if not self.hessian:  # the gradient's graph, built at the first Hessian product
            with _SavedCounter(self.loss) as counter:
                grads = torch.autograd.grad(
                    self.loss, self._diff, create_graph=True, allow_unused=True
                )
            self._dgrads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(self._diff, grads)
            ]
            self.graph_numel += counter.numel + sum(p.numel() for p in self._diff)
            self.working_numel = max(self.working_numel, counter.working_numel)
            self.hessian = True
        return self._out(products.hvp(self._dgrads, self._diff, self._split(v)), v, out)

    def _logits(self, with_gradient: bool = True) -> Tensor:
        """The logits ``z``; with ``∇_z L`` built with ``create_graph=True`` if asked."""
        if self._z is None:
            self._z = self._logits_fn()
        if with_gradient and self._gz is None:
            (self._gz,) = torch.autograd.grad(self.loss, self._z, create_graph=True)
        return self._z

    def _closed_form_loss_hessian(self) -> Callable[[Tensor], Tensor] | None:
        """The closed-form ``(∇²_z L)(·)`` (built once per batch), or ``None``."""
        if not self._loss_hessian_built:
            assert self._loss_hessian_fn is not None
            self._loss_hessian = self._loss_hessian_fn()
            self._loss_hessian_built = True
        return self._loss_hessian

    def product(
        self,
        kind: CurvatureType,
        v: Tensor,
        row_weights: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """``C v`` for ``kind`` (``hessian`` or ``ggn``); sub-sampled if ``row_weights`` is set."""
        if kind is CurvatureType.GGN:
            return self.ggn(v, row_weights, out)
        if row_weights is None:
            return self.hvp(v, out)
        return self.sampled_hvp(v, row_weights, out)

    def _jacobian(self) -> tuple[Tensor, list[Tensor]]:
        """``u`` and the graph of ``Jᵀu`` (built once per batch)."""
        if self._ju is None:
            z = self._logits(with_gradient=False)
            self._u = torch.zeros_like(z, requires_grad=True)
            with _SavedCounter(self.loss) as counter:
                ju = torch.autograd.grad(
                    z, self._diff, self._u, create_graph=True, allow_unused=True
                )
            self._ju = [torch.zeros_like(p) if g is None else g for p, g in zip(self._diff, ju)]
            self.graph_numel += counter.numel + sum(p.numel() for p in self._diff)
            self.working_numel = max(self.working_numel, counter.working_numel)
        assert self._u is not None
        return self._u, self._ju

    def ggn(
        self, v: Tensor, row_weights: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        """``G v = Jᵀ (∇²_z L) J v``, equal to :func:`precond.curvature.products.ggn_vp`.

        ``J v`` comes from forward mode when the batch has a replay of the model call (one
        pass carrying the tangent ``v``), otherwise it is the derivative of ``(Jᵀu)·v`` in
        ``u`` (double vjp): one back-propagation through the transposed-Jacobian graph, built
        once per batch. ``Jᵀ(·)`` is one more
        through the retained forward graph. ``row_weights`` re-weights the loss terms along
        dimension 0 of the logits (sub-sampled GGN).
        """
        if not self._diff:
            return self._out([], v, out)
        z = self._logits(with_gradient=self._closed_form_loss_hessian() is None)
        if self._tangent is not None:
            try:
                jv = self._tangent(self._split(v))
            except (RuntimeError, NotImplementedError, TypeError, ValueError, KeyError) as exc:
                warn_once(
                    "second_order.forward_jvp",
                    "GGN products: J v by forward-mode differentiation failed "
                    f"({type(exc).__name__}: {exc}); using the double vector-Jacobian "
                    "product instead (slower, same result).",
                )
                self._tangent = self._transpose = None
                self.forward_failed = True
                self.copy_numel = sum(p.numel() for p in self._diff)
            else:
                return self._ggn_from_jv(z, jv.to(z.dtype), row_weights, v, out)
        u, ju = self._jacobian()
        pairs = [(j, vi) for j, vi in zip(ju, self._split(v)) if j.requires_grad]
        if not pairs:
            self.count += 1
            return torch.zeros_like(v) if out is None else out.zero_()
        (jv,) = torch.autograd.grad(
            [j for j, _ in pairs], u, [vi.to(j.dtype) for j, vi in pairs], retain_graph=True
        )
        return self._ggn_from_jv(z, jv, row_weights, v, out)

    def _ggn_from_jv(
        self, z: Tensor, jv: Tensor, row_weights: Tensor | None, v: Tensor, out: Tensor | None
    ) -> Tensor:
        """``Jᵀ (∇²_z L) (J v)`` from ``J v`` (re-weighted rows for a sub-sampled GGN)."""
        loss_hessian = self._closed_form_loss_hessian()
        if loss_hessian is not None:
            hjv = loss_hessian(jv)
        else:
            assert self._gz is not None
            (hjv,) = torch.autograd.grad(self._gz, z, jv, retain_graph=True)
        if row_weights is not None:
            hjv = hjv * row_weights.to(hjv.dtype).reshape(-1, *([1] * (hjv.dim() - 1)))
        if self._transpose is None:
            return self._out(products.vjp(z, self._diff, hjv), v, out)
        self.count += 1
        if out is None:
            out = torch.empty_like(v)
        views = self._views_of(out)
        self._transpose(hjv, [views[i] for i in self._on])
        if len(self._on) < len(views):
            self._out_frozen(views)
        return out

    def _out_frozen(self, views: list[Tensor]) -> None:
        """Zero the frozen parameters' slots of a product."""
        for view, on in zip(views, self.active):
            if not on:
                view.zero_()

    def sampled_hvp(self, v: Tensor, row_weights: Tensor, out: Tensor | None = None) -> Tensor:
        """``H_S v``: Hessian of the loss terms re-weighted along dimension 0 of the logits.

        ``row_weights`` (``[rows]``) multiplies the loss's gradient in the logits row-wise, so
        ``∇_θ L_S = Jᵀ (w ⊙ ∇_z L)`` and its derivative is the Hessian of the sub-sampled loss
        (rows with weight 0 are left out). Costs one extra backward pass with graph per call.
        """
        if not self._diff:
            return self._out([], v, out)
        z = self._logits()
        assert self._gz is not None
        w = row_weights.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        g_s = torch.autograd.grad(z, self._diff, w * self._gz, create_graph=True, allow_unused=True)
        g_list = [torch.zeros_like(p) if g is None else g for p, g in zip(self._diff, g_s)]
        return self._out(products.hvp(g_list, self._diff, self._split(v)), v, out)

    def hessian_block(self, start: int, stop: int, chunk: int) -> Tensor:
        """Dense ``∂g_S/∂θ_S`` for the parameters ``params[start:stop]`` (a diagonal block of H).

        Columns come from Hessian-vector products with unit vectors, ``chunk`` at a time through
        ``is_grads_batched`` (vmap); models whose operators have no batching rule fall back to
        one product at a time. Either way the block costs one product per coordinate.

        Args:
            start: First parameter of the block (index into the preconditioned parameters).
            stop: One past its last parameter.
            chunk: Products per autograd call.

        Returns:
            The symmetrised block in float64 (rows and columns of frozen parameters: zero).
        """
        d = sum(self.vec.sizes[start:stop])
        ref = self.params[start]
        full = torch.zeros(d, d, dtype=torch.float64, device=ref.device)
        on = [i for i in range(start, stop) if self.active[i]]
        if len(on) < stop - start:
            if not on:
                return full
            # Only the trained parameters' sub-block; embedded at their coordinates.
            keep = self.vec.mask(start, stop)
            assert keep is not None
            idx = keep.nonzero().squeeze(1)
            sub = self._hessian_rows(on, chunk)
            full[idx[:, None], idx] = sub
            return full
        return self._hessian_rows(on, chunk)

    def _hessian_rows(self, on: list[int], chunk: int) -> Tensor:
        """The symmetrised Hessian block of the parameters ``on`` (all trained), float64."""
        params = [self.params[i] for i in on]
        grads = [self.grads[i] for i in on]
        d = sum(self.vec.sizes[i] for i in on)
        ref = params[0]
        out = torch.zeros(d, d, dtype=torch.float64, device=ref.device)
        self.count += d
        flat_g = torch.cat([g.reshape(-1) for g in grads])
        if not flat_g.requires_grad:
            return out
        batched = chunk > 1
        for lo in range(0, d, chunk):
            hi = min(lo + chunk, d)
            eye = torch.zeros(hi - lo, d, dtype=flat_g.dtype, device=ref.device)
            eye[:, lo:hi].fill_diagonal_(1.0)
            rows = None
            if batched:
                try:
                    rows = self._rows_batched(flat_g, params, eye)
                except RuntimeError:
                    batched = False
            if rows is None:
                rows = torch.stack([self._rows_batched(flat_g, params, e[None])[0] for e in eye])
            out[lo:hi] = rows.to(torch.float64)
        return 0.5 * (out + out.T)

    @staticmethod
    def _rows_batched(flat_g: Tensor, params: list[nn.Parameter], eye: Tensor) -> Tensor:
        cols = torch.autograd.grad(
            flat_g,
            params,
            eye if eye.shape[0] > 1 else eye[0],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=eye.shape[0] > 1,
        )
        k = eye.shape[0]
        return torch.cat(
            [
                torch.zeros(k, p.numel(), dtype=eye.dtype, device=eye.device)
                if c is None
                else c.reshape(k, -1)
                for p, c in zip(params, cols)
            ],
            dim=1,
        )

    def rows(self) -> int:
        """Rows of the logits (dimension 0), the units of Hessian sub-sampling."""
        return int(self._logits(with_gradient=False).shape[0])


class SecondOrderGradientMaker(TangentProductsMixin):
    """Base of the methods built on Hessian or GGN products (no capture hooks, any module).

    Subclasses read :attr:`batch` in ``update_curvature``; it exists on curvature steps only and
    is released when the step ends. A subclass whose products are all GGN products overrides
    :meth:`_hessian_products` to return ``False``: its curvature steps then build only the
    transposed-Jacobian graph of the GGN, not the (larger) graph of the gradient.

    Args:
        model: The model.
        config: The method's config.
    """

    needs_adapter = False

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        super().__init__(model, config)
        self.vec = ParamVector([p for layer in self.layers for p in layer.params])
        self.batch: BatchCurvature | None = None
        self._loss: Tensor | None = None
        #: Elements held by the graphs of the last curvature step's products (tensors saved
        #: beyond the forward pass's, and Jacobian-graph outputs): transient memory.
        self.graph_numel = 0
        #: Elements of one product's output allocated by autograd and copied into the flat
        #: result at the last curvature step (all parameters before the first).
        self.product_copy_numel = self.vec.numel
        #: The backward pass's saved graph, counted once per graph signature and kind of pass
        #: (a cache, not state).
        self._saved_counts = SavedCounts()
        #: Curvature products computed so far, and the curvature steps they were computed on
        #: (diagnostics for :meth:`mean_products`; not training state).
        self.products_run = 0
        self.curvature_steps_run = 0
        #: How GGN products get ``J v`` (see :mod:`~precond.methods.forward_jvp`): ``"graph"``
        #: (tangents pushed through the retained graph; a batch whose graph has an operation
        #: without a rule uses reverse mode), ``"forward"`` (a forward-mode replay of the model
        #: call: a second forward per product) or ``"reverse"`` (double vector-Jacobian
        #: product), to which a model that cannot be replayed falls back for good.
        self.jvp_mode = "graph"
        #: The random state at the start of this curvature step's forward (for the replay).
        self._rng: RngState | None = None
        self._record_rng = False

    def add_products(self, cm: CostModel, count: int, kind: CurvatureType) -> None:
        """Declare ``count`` curvature products of ``kind`` in the curvature phase.

        A Hessian product is one double back-propagation (``hvp``). A GGN product
        ``Jᵀ(∇²_z L)(J v)`` is two first-order passes, not a double backward: ``J v`` carries a
        tangent through the layers (per layer ``W t_in``, the matmuls of a back-propagation to
        the layers' outputs, and ``V a``, a contraction as large as a weight gradient) and
        ``Jᵀ w`` back-propagates to the layers' outputs and contracts each weight gradient.
        Each is the work of a gradient: two ``grad`` passes (a back-propagation to every
        parameter, measured on the model). Timing the contractions as plain matrix products
        instead, with an explicit im2col for a convolution, overstated them against the
        convolution kernels' own weight gradients.
        """
        if count <= 0:
            return
        if kind is not CurvatureType.GGN:
            cm.add(Phase.CURVATURE, "hvp", (count,))
            return
        cm.add(Phase.CURVATURE, "grad", (2 * count,))

    def mean_products(self, default: int) -> int:
        """Curvature products per curvature step, on average over the steps run so far.

        Solvers that stop early (CG at its tolerance) compute fewer products than their cap;
        the cost model counts the work actually done. ``default`` is returned before the first
        curvature step.
        """
        if self.curvature_steps_run == 0:
            return default
        return max(1, round(self.products_run / self.curvature_steps_run))

    def _capture(self) -> bool:
        return False

    def _hessian_products(self) -> bool:
        """Whether curvature steps need Hessian-vector products (the gradient's graph)."""
        return True

    def _second_derivatives(self, curvature_step: bool) -> bool:
        # Hessian products, and GGN products whose graph falls back to a double backward
        return curvature_step

    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        if not curvature_step:
            loss.backward()
            return
        backward_other_leaves(self, loss)
        params = self.params
        jacobian = None
        grads: tuple[Tensor | None, ...]
        hessian = self._hessian_products()
        replay = None if hessian or self.jvp_mode != "forward" else self._replay()
        # read before the backward pass: if the graph has a node without a rule, the gradient
        # pass builds the transposed-Jacobian graph as well
        graph = None if hessian or not self._graph_products() else self._graph_tangent()
        # Only the passes that build a graph (create_graph) save tensors worth a signature;
        # the forward-mode products' backward saves none, and its hooks then never run.
        builds = hessian or (replay is None and graph is None)
        key = (hessian, self.graph_signature()) if builds else None
        with self._saved_counts.counting(loss, key) as counter:
            if hessian:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            elif replay is not None or graph is not None:
                # J v comes from forward mode: no transposed-Jacobian graph; the forward graph
                # is kept for the products' Jᵀ(·).
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            else:
                grads, jacobian = self._gradient_and_jacobian(loss, params)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        # accumulate_grads copies gradients that carry a graph; p.grad is written (by
        # precondition) only after the last product of the step.
        accumulate_grads([p for p, _ in used], [g for _, g in used])
        by_id = {id(p): g for p, g in zip(params, grads)}
        own = [by_id.get(id(p)) for p in self.vec.params]
        graph_grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.vec.params, own)
        ]
        tangent: Callable[[list[Tensor]], Tensor] | None = None
        transpose: Callable[[Tensor, list[Tensor]], None] | None = None
        if replay is not None:
            tangent = replay.jvp
        elif graph is not None:
            tangent, transpose = graph.jvp, graph.vjp_into
        self.batch = BatchCurvature(
            loss,
            self.vec,
            graph_grads,
            lambda: self.loss_inputs().logits,
            active=self.vec.active(),
            hessian=hessian,
            jacobian=None if jacobian is None else (*jacobian, graph_grads),
            tangent=tangent,
            transpose=transpose,
            loss_hessian=self._closed_form_loss_hessian,
        )
        self.batch.graph_numel = counter.numel
        self.batch.working_numel = counter.working_numel
        if graph is not None:
            self.batch.working_numel = max(self.batch.working_numel, graph.working_numel)
            self.batch.copy_numel = graph.copy_numel
        self._loss = loss.detach()

    def _closed_form_loss_hessian(self) -> Callable[[Tensor], Tensor] | None:
        """``(∇²_z L)(·)`` in closed form when the loss is a recognised call, else ``None``.

        Only for the loss of :meth:`setup_loss_call` itself, parsed from its arguments: a loss
        declared through ``setup_logits_repr`` may be any function of the declared logits, and
        an unknown loss function has no closed form (its products differentiate ``∇_z L``).
        """
        if self._logits_repr is not None or self._loss_call is None:
            return None
        try:
            inputs = self.loss_inputs()
        except (UnknownLossError, ProtocolError, ValueError):
            return None
        return inputs.hessian_operator()

    def _gradient_and_jacobian(
        self, loss: Tensor, params: list[nn.Parameter]
    ) -> tuple[tuple[Tensor | None, ...], tuple[Tensor, Tensor, Tensor] | None]:
        """The gradient, and with it the graph of GGN products when the loss allows.

        When every path from the loss to the parameters goes through the logits ``z``,
        ``∇_θ L = Jᵀu`` at ``u = ∇_z L``: one backward pass with ``create_graph=True`` from
        ``z`` with a leaf ``u`` gives the gradient and the transposed-Jacobian graph that the
        GGN products differentiate (``Jᵀu`` is linear in ``u``). Otherwise the gradient comes
        from a plain backward pass and the graph is built at the first product.
        """
        z = self.loss_inputs().logits
        if not (isinstance(z, Tensor) and z.requires_grad and _only_through(loss, z)):
            return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), None
        (gz,) = torch.autograd.grad(loss, z, create_graph=True)
        u = gz.detach().requires_grad_(True)
        grads = torch.autograd.grad(z, params, u, create_graph=True, allow_unused=True)
        return grads, (z, gz, u)

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        step = self._step
        curvature_step = self.curvature_schedule.is_update_step(step) or not self._has_curvature
        self._record_rng = curvature_step and self._forward_products()
        try:
            return super()._forward_and_backward()
        finally:
            self._record_rng = False
            self._rng = None
            if self.batch is not None:
                if self.batch.forward_failed:
                    self.jvp_mode = "reverse"
                # the saved graphs and the working set of the passes that differentiate them
                self.graph_numel = self.batch.graph_numel + self.batch.working_numel
                self.product_copy_numel = self.batch.copy_numel
                self.products_run += self.batch.count
                self.curvature_steps_run += 1
            self.batch = None  # frees the double-backward graph

    def _trained_part(self, v: Tensor) -> Tensor:
        """``v`` with the slots of frozen parameters zeroed (``v`` itself if none is frozen)."""
        mask = self.vec.mask()
        return v if mask is None else torch.where(mask, v, torch.zeros_like(v))

    @property
    def _curvature_loss(self) -> float | None:
        """The loss of this curvature step as a host float (a sync; damping adaptation)."""
        return None if self._loss is None else float(self._loss)

    @property
    def work_dtype(self) -> torch.dtype:
        """Precision of solver vectors: the parameters' dtype, at least float32."""
        return torch.promote_types(self.vec.params[0].dtype, torch.float32)
