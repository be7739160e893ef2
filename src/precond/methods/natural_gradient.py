r"""Natural gradient with the Fisher in a chosen shape: full, layer-wise, unit-wise or diagonal.

The update is the damped natural gradient

.. math::

    \Delta\theta = (F + \lambda I)^{-1} \nabla L(\theta),

where ``F`` is the Fisher-type curvature of the current batch (``curvature``: exact, Monte-Carlo
or empirical Fisher, or the GGN; see :mod:`precond.curvature.loss`), kept as an exponential
moving average when ``ema_decay > 0``, and restricted to blocks by ``fisher_shape``:

* ``full``: one dense block over the concatenated parameters of all preconditioned layers,
  ``F = Σ_kn vec(J_kn) vec(J_kn)ᵀ`` from the per-example Jacobians of every layer;
* ``layer_wise``: the diagonal blocks of ``F`` per layer;
* ``unit_wise``: per output unit of a layer, the ``d_in' × d_in'`` block of its weight row
  and bias (for normalisation layers: the 2 × 2 block of a unit's scale and shift; for
  embeddings: the ``V × V`` block of one embedding coordinate);
* ``diag``: the diagonal of ``F``.

Dense blocks are inverted by a damped Cholesky factorisation on refresh steps and applied as a
matrix product on every step; the diagonal shape forms ``values + damping`` on refresh steps
and divides the gradients by it on every step. With the diagonal shape and one sampled label
(``fisher_mc``, ``n_mc_samples=1``) the Fisher pass runs beside the loss's own backward, segment
by segment (:func:`~precond.methods.diag_fisher.fisher_pass_with_backward`), and each layer's
block is formed as soon as its output gradients are complete: the graph's saved tensors are not
all held through a second pass (same results, bit for bit).

Costs: the full block needs ``P²`` memory and a ``P³`` factorisation (``P`` = all
preconditioned parameters): small models only. Layer-wise needs ``Σ_l P_l²``; unit-wise
``Σ_l G d_out d_in'²``; diagonal ``P``.

The shortcuts :class:`FullNaturalGradientMaker` (``ng_full``),
:class:`LayerWiseNaturalGradientMaker` (``ng_layer``), :class:`UnitWiseNaturalGradientMaker`
(``ng_unit``), :class:`DiagNaturalGradientMaker` (``ng_diag``) fix the shape;
:class:`EmpNaturalGradientMaker` (``ng_emp``) is the layer-wise natural gradient with the
empirical Fisher.

References:
    S. Amari. Natural Gradient Works Efficiently in Learning. Neural Computation 10(2), 1998.
    https://doi.org/10.1162/089976698300017746

    K. Osawa et al. ASDL: A Unified Interface for Gradient Preconditioning in PyTorch.
    NeurIPS 2022 workshop (OPT). https://arxiv.org/abs/2305.04684
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import Layer, LayerStats, per_example_workspace, stat_dtype
from ..curvature import fisher
from ..enums import CurvatureType, Shape
from ..linalg.blocks import Block, DenseBlock, DiagBlock, Solver
from ..linalg.solvers import gram_diagonal
from ..numerics import all_sums_finite, warn_once
from ..registry import register_method
from ..validation import check_int, invalid
from ._twin_backward import UncutGraphs
from .base import FisherConfig, PreconditionedGradientMaker
from .cost import CostModel, Phase, add_patches
from .diag_fisher import (
    diag_chunk,
    diag_denominators,
    diagonal,
    fisher_pass_with_backward,
    one_hot_diagonal,
    positive_damping,
    worth_forming_early,
)
from .kfac import layer_has_grad, write_preconditioned
from .per_example import compact_one_hot

__all__ = [
    "DiagNaturalGradientConfig",
    "DiagNaturalGradientMaker",
    "EmpNaturalGradientConfig",
    "EmpNaturalGradientMaker",
    "FullNaturalGradientConfig",
    "FullNaturalGradientMaker",
    "LayerWiseNaturalGradientConfig",
    "LayerWiseNaturalGradientMaker",
    "NaturalGradientConfig",
    "NaturalGradientMaker",
    "UnitWiseNaturalGradientConfig",
    "UnitWiseNaturalGradientMaker",
]

NG_SHAPES = (Shape.FULL, Shape.LAYER_WISE, Shape.UNIT_WISE, Shape.DIAG)
_FULL = "<full>"


def coerce_shape(value: Any, allowed: tuple[Shape, ...], name: str = "fisher_shape") -> Shape:
    """Turn a :class:`~precond.enums.Shape` or its string into a member of ``allowed``.

    Args:
        value: The value to check.
        allowed: Supported shapes.
        name: Argument name for the error message.

    Returns:
        The shape.

    Raises:
        ValueError: If the value is not one of ``allowed``.
    """
    for shape in allowed:
        if value is shape or value == shape.value:
            return shape
    raise invalid(name, value, f"Supported: {tuple(s.value for s in allowed)}")


@dataclass(kw_only=True)
class NaturalGradientConfig(FisherConfig):
    """Natural-gradient options.

    Args:
        fisher_shape: ``full``, ``layer_wise`` (default), ``unit_wise`` or ``diag``.
        max_block_numel: Largest number of elements of the dense blocks together (``full``,
            ``layer_wise``, ``unit_wise``); a model above it is refused when the gradient
            maker is built, before anything is allocated. The blocks, their factors and the
            Jacobians they are built from take several times this many; the default ``2²⁸``
            is 1 GiB per float32 copy.

    ``weight_sharing`` has no effect: every shape is built from the exact per-example
    Jacobians ``Σ_s g ãᵀ``.
    """

    fisher_shape: Shape | str = Shape.LAYER_WISE
    max_block_numel: int = 1 << 28

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fisher_shape = coerce_shape(self.fisher_shape, NG_SHAPES)
        check_int("max_block_numel", self.max_block_numel, minimum=1)


def _fix_shape(config: NaturalGradientConfig, shape: Shape) -> None:
    if config.fisher_shape is not shape:
        raise invalid(
            "fisher_shape",
            Shape(config.fisher_shape).value,
            f"{type(config).__name__} fixes fisher_shape='{shape.value}'; use "
            "NaturalGradientConfig to choose another shape",
        )


@dataclass(kw_only=True)
class FullNaturalGradientConfig(NaturalGradientConfig):
    """Options of the natural gradient with the full Fisher (``fisher_shape='full'``)."""

    fisher_shape: Shape | str = Shape.FULL

    def __post_init__(self) -> None:
        super().__post_init__()
        _fix_shape(self, Shape.FULL)


@dataclass(kw_only=True)
class LayerWiseNaturalGradientConfig(NaturalGradientConfig):
    """Options of the layer-wise natural gradient (``fisher_shape='layer_wise'``)."""

    fisher_shape: Shape | str = Shape.LAYER_WISE

    def __post_init__(self) -> None:
        super().__post_init__()
        _fix_shape(self, Shape.LAYER_WISE)


@dataclass(kw_only=True)
class UnitWiseNaturalGradientConfig(NaturalGradientConfig):
    """Options of the unit-wise natural gradient (``fisher_shape='unit_wise'``)."""

    fisher_shape: Shape | str = Shape.UNIT_WISE

    def __post_init__(self) -> None:
        super().__post_init__()
        _fix_shape(self, Shape.UNIT_WISE)


@dataclass(kw_only=True)
class DiagNaturalGradientConfig(NaturalGradientConfig):
    """Options of the diagonal natural gradient (``fisher_shape='diag'``)."""

    fisher_shape: Shape | str = Shape.DIAG

    def __post_init__(self) -> None:
        super().__post_init__()
        _fix_shape(self, Shape.DIAG)


@dataclass(kw_only=True)
class EmpNaturalGradientConfig(NaturalGradientConfig):
    """Options of the empirical-Fisher natural gradient (layer-wise unless ``fisher_shape``).

    ``curvature`` is fixed to ``fisher_emp``.
    """

    curvature: CurvatureType | str = CurvatureType.FISHER_EMP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.curvature is not CurvatureType.FISHER_EMP:
            raise invalid(
                "curvature",
                CurvatureType(self.curvature).value,
                "EmpNaturalGradientConfig fixes curvature='fisher_emp'; use "
                "NaturalGradientConfig for another Fisher type",
            )


@register_method(
    "natural_gradient",
    "natural gradient (F + λI)⁻¹g with the Fisher full, layer-wise, unit-wise or diagonal",
)
class NaturalGradientMaker(PreconditionedGradientMaker):
    """Natural-gradient gradient maker (see the module docstring for the update and shapes).

    Args:
        model: The model.
        config: :class:`NaturalGradientConfig`.
    """

    config_class: type[NaturalGradientConfig] = NaturalGradientConfig
    config: NaturalGradientConfig

    def __init__(self, model: torch.nn.Module, config: NaturalGradientConfig | None = None) -> None:
        super().__init__(model, config)
        self.shape = Shape(self.config.fisher_shape)
        self._check_block_numel()
        self.blocks: dict[str, Block] = {}
        if self.shape is Shape.FULL:
            self.blocks[_FULL] = DenseBlock(Solver.CHOLESKY)
        for layer in self.layers:
            if self.shape is Shape.DIAG:
                self.blocks[layer.name] = DiagBlock()
            elif self.shape is not Shape.FULL:
                self.blocks[layer.name] = DenseBlock(Solver.CHOLESKY)
        self._shapes: dict[str, tuple[int, int]] = {}
        self._vectors: dict[str, int] = {}  # back-propagated vectors per example
        # Blocks updated since their last factorisation.
        self._stale: set[str] = set()
        # Diagonal shape: values + damping per trained parameter, in the parameter's own
        # layout, formed on refresh steps, so that a step is one fused in-place division of
        # the gradients. A cache of the DiagBlock (rebuilt from its values and damping, bit for
        # bit), not state.
        self._diag_inv: dict[str, list[Tensor]] = {}
        # Diagonal blocks whose values were set from statistics found finite and not refreshed
        # since (their refresh skips its own finiteness check).
        self._finite: set[str] = set()
        # Diagonal shape, one sampled label: the statistics of a curvature step whose Fisher
        # pass runs with the loss's backward (see _backward), and the layers updated in it.
        self._twin_stats: Mapping[str, LayerStats] | None = None
        self._twin_done: set[str] = set()
        #: Graph signatures without a cut for the twin pass (a cache, not state).
        self._uncut = UncutGraphs()

    def _twin_pass(self) -> bool:
        """Whether the Fisher pass runs beside the loss's backward (diagonal, one sample)."""
        return (
            self.shape is Shape.DIAG
            and self._extra_passes() == [CurvatureType.FISHER_MC]
            and self.config.n_mc_samples == 1
            and not self._records_loss_grads()
        )

    def _extra_passes_last(self) -> bool:
        # _backward is the plain backward but on twin steps: decide as for a plain one
        return bool(self._extra_passes()) and not self._twin_pass()

    def _curvature_backward(
        self, stats: Mapping[str, LayerStats], free_graph: bool = False
    ) -> None:
        # The diagonal inverses are rebuilt from the new values before they are next applied
        # (bit for bit from the values, so also for a layer whose update is skipped): dropped
        # now, they do not occupy memory through the backward passes and the statistics.
        self._diag_inv.clear()
        if self._twin_pass() and not free_graph:
            self._twin_stats = stats  # the pass runs with the loss's backward (_backward)
            return
        super()._curvature_backward(stats, free_graph)

    def _backward(self, loss: Tensor, curvature_step: bool) -> None:
        stats, self._twin_stats = self._twin_stats, None
        if stats is None:
            loss.backward()
            return
        inputs = self.loss_inputs()
        curvature = CurvatureType.FISHER_MC
        (vector,) = inputs.vectors(curvature, n_samples=1, generator=self.generator)
        if not fisher_pass_with_backward(
            loss,
            inputs.logits,
            vector,
            stats,
            curvature.value,
            self._update_layer_early,
            uncut=self._uncut,
            key=self.graph_signature(),
        ):
            # no cut that pays: the two passes one after the other (the vector is drawn)
            loss.backward(retain_graph=True)
            self.recorder.backprop(
                inputs.logits, vector.unsqueeze(0), curvature.value, retain_graph=False
            )

    def _update_layer_early(self, name: str, st: LayerStats) -> None:
        """Form a layer's block during the Fisher pass and drop its inputs and output gradients.

        Only where that lowers the peak (:func:`~.diag_fisher.worth_forming_early`); otherwise
        the block is formed in :meth:`update_curvature`, after the graph is freed.
        """
        if st.num_calls == 0 or not worth_forming_early(self._layer(name), st, self.tag):
            return
        self._update_layer(name, st)
        self._twin_done.add(name)
        st.raw_grads.pop(self.tag, None)
        st.raw_inputs = []
        st._input_versions = []
        st._x_cache = st._a_cache = None

    def _check_block_numel(self) -> None:
        """Refuse dense blocks above ``max_block_numel`` elements, before any is allocated."""
        if self.shape is Shape.DIAG:
            return
        sizes = [layer.shape for layer in self.layers]
        if self.shape is Shape.FULL:
            total = sum(g * o * i for g, o, i in sizes) ** 2
        elif self.shape is Shape.LAYER_WISE:
            total = sum((g * o * i) ** 2 for g, o, i in sizes)
        else:
            total = sum(g * o * i * i for g, o, i in sizes)
        if total > self.config.max_block_numel:
            raise invalid(
                "number of dense Fisher block elements",
                total,
                f"{type(self).__name__} with fisher_shape='{self.shape.value}' allows at most "
                f"max_block_numel={self.config.max_block_numel}; raise max_block_numel, exclude "
                "modules with ignore_modules, or use a smaller shape or a factored method "
                "(ng_unit, ng_diag, kfac, ekfac)",
            )

    @property
    def tag(self) -> str:
        """Tag of the back-propagated vectors of the configured curvature."""
        return CurvatureType(self.config.curvature).value

    # ---- curvature --------------------------------------------------------------------------
    def update_curvature(self, stats: Mapping[str, LayerStats]) -> None:  # noqa: D102
        done, self._twin_done = self._twin_done, set()
        live = {n: st for n, st in stats.items() if st.num_calls > 0 and n not in done}
        if self.shape is Shape.FULL:
            for name, layer_stats in live.items():
                self._note_shapes(name, layer_stats)
            self._update_full(live)
            return
        for layer in self.layers:
            st = live.get(layer.name)
            if st is not None:
                self._update_layer(layer.name, st)

    def _note_shapes(self, name: str, st: LayerStats) -> None:
        self._vectors[name] = num_vectors(st, self.tag)
        self._shapes[name] = (num_vectors(st, self.tag) * st.batch_size, positions(st))

    def _update_layer(self, name: str, st: LayerStats) -> None:
        """Fold one layer's statistics into its block (all shapes but the full one)."""
        self._note_shapes(name, st)
        self._diag_inv.pop(name, None)  # rebuilt from the new values when applied
        # Gram matrices (layer- and unit-wise) are finite exactly when their diagonals are; a
        # diagonal is checked whole
        if self.shape is Shape.LAYER_WISE:
            stat = fisher.layer_matrix(st, self.tag)
            check = gram_diagonal(stat)
        elif self.shape is Shape.UNIT_WISE:
            stat = fisher.unit_matrices(st, self.tag)
            check = gram_diagonal(stat)
        else:
            stat = (one_hot_diagonal if compact_one_hot(st) else diagonal)(st, self.tag)
            check = stat
        # checked (and installed, freeing the previous values) one layer at a time: the new
        # statistics of all layers never coexist with all the previous ones
        self._set_stat(name, stat, all_sums_finite([check]))

    def _set_stat(self, name: str, stat: Tensor, finite: bool) -> None:
        """Fold one layer's new statistics into its block (skipped with a warning if not finite)."""
        if not finite:
            self._warn_stats(self._layer(name).label)
            return
        block = self.blocks[name]
        assert isinstance(block, DenseBlock | DiagBlock)
        if isinstance(block, DiagBlock) and self.config.ema_decay == 0.0:
            block.values = stat  # a fresh tensor of ours: no copy into the old one
            self._finite.add(name)  # checked: its refresh need not check it again
        else:
            block.update(stat, self.config.ema_decay)
            self._finite.discard(name)
        self._stale.add(name)

    def _layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def _update_full(self, live: Mapping[str, LayerStats]) -> None:
        if not live:
            return
        parts = {
            n: fisher.per_example(st, self.tag).flatten(2).flatten(0, 1) for n, st in live.items()
        }
        ref = next(iter(parts.values()))
        rows = torch.cat(
            [
                parts[layer.name]
                if layer.name in parts
                else ref.new_zeros(ref.shape[0], layer.numel)
                for layer in self.layers
            ],
            dim=1,
        )
        stat = rows.T @ rows
        if not all_sums_finite([gram_diagonal(stat)]):  # a Gram matrix: its diagonal decides
            self._warn_stats("(all layers)")
            return
        block = self.blocks[_FULL]
        assert isinstance(block, DenseBlock)
        block.update(stat, self.config.ema_decay)
        self._stale.add(_FULL)

    def _warn_stats(self, label: str) -> None:
        warn_once(
            f"{type(self).__name__}:stats:{label}",
            f"{type(self).__name__}: non-finite Fisher statistics for layer {label}; curvature "
            "update skipped (the previous estimate is kept).",
        )

    # ---- preconditioner ---------------------------------------------------------------------
    def update_preconditioner(self) -> None:  # noqa: D102
        for name, block in self.blocks.items():
            if name not in self._stale:
                continue  # unchanged since its factorisation
            damping = self.damping
            if isinstance(block, DiagBlock):
                assert block.values is not None
                damping = positive_damping(damping, block.values)
                if name in self._finite:
                    # the values were found finite when they were set: what refresh() checks
                    block.damping = damping
                    self._finite.discard(name)
                    self._stale.discard(name)
                    self._diag_inv[name] = diag_denominators(self._layer(name), block)
                    continue
            if block.refresh(damping):
                self._stale.discard(name)
                self._diag_inv.pop(name, None)
                if isinstance(block, DiagBlock):
                    self._diag_inv[name] = diag_denominators(self._layer(name), block)
            else:
                warn_once(
                    f"{type(self).__name__}:refresh:{name}",
                    f"{type(self).__name__}: could not invert the damped Fisher block "
                    f"'{name}'; keeping the previous preconditioner (plain gradient if none).",
                )

    def precondition(self) -> None:  # noqa: D102
        if self.shape is Shape.FULL:
            self._precondition_full()
            return
        if self.shape is Shape.DIAG:
            self._precondition_diag()
            return
        for layer in self.layers:
            block = self.blocks[layer.name]
            if not _ready(block) or not layer_has_grad(layer):
                continue
            v = layer.grads_matrix()
            v = v.to(stat_dtype(v.dtype))
            if self.shape is Shape.LAYER_WISE:
                out = block.apply(v.reshape(-1)).reshape(v.shape)
            else:
                out = block.apply(v)
            write_preconditioned(layer, out)

    def _precondition_diag(self) -> None:
        grads: list[Tensor] = []
        scales: list[Tensor] = []
        for layer in self.layers:
            block = self.blocks[layer.name]
            if not _ready(block):
                continue
            denoms = self._diag_inv.get(layer.name)
            if denoms is None:  # e.g. after loading a state
                assert isinstance(block, DiagBlock)
                denoms = self._diag_inv[layer.name] = diag_denominators(layer, block)
            for p, d in zip(layer.params, denoms):
                if p.grad is not None:
                    grads.append(p.grad)
                    scales.append(d)
        if grads:
            torch._foreach_div_(grads, scales)

    def _precondition_full(self) -> None:
        block = self.blocks[_FULL]
        if not _ready(block) or not any(layer_has_grad(layer) for layer in self.layers):
            return
        grads = [layer.grads_matrix() for layer in self.layers]
        dt = stat_dtype(grads[0].dtype)
        out = block.apply(torch.cat([g.reshape(-1).to(dt) for g in grads]))
        for layer, g, part in zip(self.layers, grads, out.split([g.numel() for g in grads])):
            if layer_has_grad(layer):
                write_preconditioned(layer, part.reshape(g.shape))

    # ---- state and cost ---------------------------------------------------------------------
    def preconditioner_state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "blocks": {name: block.state_dict() for name, block in self.blocks.items()},
            "stale": sorted(self._stale),
        }

    def load_preconditioner_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        for name, block in self.blocks.items():
            block.load_state_dict(state["blocks"][name])
        self._stale = set(state["stale"])
        self._diag_inv = {}
        self._finite = set()

    def cost_model(self) -> CostModel:
        """Unavoidable kernels at the shapes of the last curvature step."""
        cm = CostModel()
        k = extra_backward_cost(self.config, cm)
        total = 0
        for layer in self.layers:
            if layer.name not in self._shapes:
                continue
            rows, s = self._shapes[layer.name]
            groups, d_out, d_in = layer.shape
            p = groups * d_out * d_in
            total += p
            one_hot = layer.adapter is not None and layer.adapter.one_hot_input
            if one_hot and self.shape is Shape.DIAG:
                # an embedding's diagonal: the output gradients added into their (example,
                # token) pairs and squared, then into the vocabulary table
                # (precond.methods.per_example.one_hot_pairs)
                pairs = rows * s * d_out
                cm.add(Phase.CURVATURE, "elementwise", (2 * pairs + p,))
                cm.transient_numel = max(cm.transient_numel, pairs + p)
            elif s > 1 or self.shape is not Shape.DIAG:
                # per-example Jacobians Σ_s g aᵀ
                cm.add(Phase.CURVATURE, "bmm", (rows * groups, d_out, s, d_in))
                transient = rows * p
                if s > 1 and layer.adapter is not None and not one_hot:
                    # the inputs at the shared positions (im2col patches) must be formed:
                    # a chunk of examples at a time, with that chunk's Jacobians
                    vectors = self._vectors.get(layer.name, 1)
                    add_patches(cm, layer, rows // vectors, s)
                    width = layer.adapter.in_features(layer.module) * int(layer.trained[0])
                    transient += per_example_workspace(
                        rows // vectors, s, groups, width, p, vectors
                    )
                cm.transient_numel = max(cm.transient_numel, transient)
            if self.shape is Shape.LAYER_WISE:
                cm.add(Phase.CURVATURE, "matmul", (p, rows, p))
                cm.add(Phase.REFRESH, "cholesky", (1, p))
                cm.add(Phase.REFRESH, "cholesky_inverse", (1, p))
                cm.add(Phase.APPLY, "matmul", (p, p, 1))
                cm.state_numel += 2 * p * p
            elif self.shape is Shape.UNIT_WISE:
                cm.add(Phase.CURVATURE, "bmm", (groups * d_out, d_in, rows, d_in))
                cm.add(Phase.REFRESH, "cholesky", (groups * d_out, d_in))
                cm.add(Phase.REFRESH, "cholesky_inverse", (groups * d_out, d_in))
                cm.add(Phase.APPLY, "bmm", (groups * d_out, d_in, d_in, 1))
                cm.state_numel += 2 * groups * d_out * d_in * d_in
            elif self.shape is Shape.DIAG:
                if one_hot:
                    pass  # priced above
                elif s == 1:
                    cm.add(Phase.CURVATURE, "bmm", (groups, d_out, max(k, 1) * rows, d_in))
                    # the squares of a chunk of examples' inputs and output gradients
                    n = rows // self._vectors.get(layer.name, 1)
                    chunk = diag_chunk(n, d_in + d_out) * (d_in + d_out)
                    cm.transient_numel = max(cm.transient_numel, chunk)
                else:
                    cm.add(Phase.CURVATURE, "elementwise", (rows * p,))
                # the damped diagonal, formed once per refresh, divides every step's gradient
                cm.add(Phase.REFRESH, "elementwise", (p,))
                cm.add(Phase.APPLY, "elementwise", (p,))
                cm.state_numel += 2 * p  # the diagonal and its damped copy
        if self.shape is Shape.FULL and total:
            rows = max(r for r, _ in self._shapes.values())
            cm.add(Phase.CURVATURE, "matmul", (total, rows, total))
            cm.add(Phase.REFRESH, "cholesky", (1, total))
            cm.add(Phase.REFRESH, "cholesky_inverse", (1, total))
            cm.add(Phase.APPLY, "matmul", (total, total, 1))
            cm.state_numel += 2 * total * total
            cm.transient_numel = rows * total
        return cm


def num_vectors(st: LayerStats, tag: str) -> int:
    """Back-propagated vectors per example recorded under ``tag`` (without building them)."""
    for gy in st.raw_grads.get(tag, []):
        if gy is not None:
            return int(gy.shape[0])
    return 1


def positions(st: LayerStats) -> int:
    """Weight-sharing positions ``S`` per example (without building one-hot inputs)."""
    return st.num_positions()


def _ready(block: Block) -> bool:
    if isinstance(block, DiagBlock):
        return block.values is not None and block.damping > 0
    return block.ready


def extra_backward_cost(config: FisherConfig, cm: CostModel) -> int:
    """Add the curvature type's extra backward passes; return vectors per example (-1: classes)."""
    k = 0
    if config.curvature is CurvatureType.FISHER_MC:
        k = config.n_mc_samples
    elif config.curvature in (CurvatureType.FISHER_EXACT, CurvatureType.GGN):
        k = -1  # one pass per class; the harness reads the class count from the problem
    if k:
        cm.add(Phase.EXTRA_BACKWARD, "backward", (k,))
    return k


@register_method("ng_full", "natural gradient with the full Fisher over all layers (small models)")
class FullNaturalGradientMaker(NaturalGradientMaker):
    """Natural gradient with one dense Fisher block over all preconditioned layers."""

    config_class = FullNaturalGradientConfig


@register_method("ng_layer", "natural gradient with the layer-wise (block-diagonal) Fisher")
class LayerWiseNaturalGradientMaker(NaturalGradientMaker):
    """Natural gradient with one dense Fisher block per layer."""

    config_class = LayerWiseNaturalGradientConfig


@register_method("ng_unit", "natural gradient with the unit-wise Fisher (a block per output unit)")
class UnitWiseNaturalGradientMaker(NaturalGradientMaker):
    """Natural gradient with one dense Fisher block per output unit."""

    config_class = UnitWiseNaturalGradientConfig


@register_method("ng_diag", "natural gradient with the diagonal Fisher")
class DiagNaturalGradientMaker(NaturalGradientMaker):
    """Natural gradient with the diagonal of the Fisher."""

    config_class = DiagNaturalGradientConfig


@register_method("ng_emp", "natural gradient with the layer-wise empirical Fisher")
class EmpNaturalGradientMaker(NaturalGradientMaker):
    """Natural gradient with the empirical Fisher, layer-wise by default."""

    config_class = EmpNaturalGradientConfig
