"""Curvature results per layer, in the requested representations, and their coordinate orders.

Coordinates (stated once):

* **Layer-wise, unit-wise, diagonal, Kronecker and eigenbasis** results of a layer with a
  capture adapter are in the *canonical* order of :mod:`precond.capture.base`: the layer's
  trained parameters as the matrix ``W̃`` of shape ``[G, d_out, d_in']`` (trained weight columns,
  then the bias column), flattened row-major. :meth:`LayerCurvature.to_param_order` converts a
  layer-wise block to the order ``torch.func`` uses (weight flattened, then bias), and
  :meth:`LayerCurvature.diag_params` returns the diagonal as parameter-shaped tensors.
* **Full** matrices are in *parameter* order: every parameter of :attr:`Curvature.params`,
  flattened and concatenated.

Layers without an adapter (possible for the Hessian, which needs none) use parameter order
throughout and have no unit-wise, Kronecker or eigenbasis form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..capture import Layer, LayerStats
from ..enums import CurvatureType, Shape, WeightSharing
from ..linalg.blocks import Block, DenseBlock, DiagBlock, KfeBlock, KronBlock, Solver
from . import fisher

__all__ = [
    "Curvature",
    "LayerCurvature",
    "canonical_permutation",
    "fisher_from_stats",
    "full_from_stats",
    "unit_blocks_from_layer",
]


def canonical_permutation(layer: Layer) -> Tensor:
    """``perm`` with ``M_canonical = M_param[perm][:, perm]`` for a layer's parameters.

    Entry ``i`` is the parameter-order index of canonical coordinate ``i``.

    Args:
        layer: A layer with an adapter.

    Returns:
        A permutation of ``range(layer.numel)``.
    """
    device = layer.params[0].device
    idx, start = [], 0
    for p in layer.params:
        n = p.numel()
        idx.append(torch.arange(start, start + n, device=device).reshape(p.shape))
        start += n
    return layer.to_matrix(idx).reshape(-1)


def unit_blocks_from_layer(matrix: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Unit-wise blocks ``[G, d_out, d_in', d_in']`` cut from a canonical layer block.

    Args:
        matrix: ``[P, P]`` in canonical order.
        shape: ``(G, d_out, d_in')``.

    Returns:
        The diagonal ``d_in' × d_in'`` blocks of every output unit.
    """
    g, o, i = shape
    m = matrix.reshape(g * o, i, g * o, i)
    units = torch.arange(g * o, device=matrix.device)
    return m[units, :, units, :].reshape(g, o, i, i)


@dataclass
class LayerCurvature:
    """One layer's curvature in each computed representation.

    Index it by representation (``lc["diag"]`` or ``lc[Shape.DIAG]``) or use the attributes.

    Attributes:
        layer: The layer (name, module, trained parameters).
        layer_wise: ``[P, P]`` dense block.
        unit_wise: ``[G, d_out, d_in', d_in']``: one block per output unit.
        diag: ``[G, d_out, d_in']`` (parameter-shaped concatenation for adapter-less layers).
        kron: K-FAC factors ``B ⊗ A`` as a :class:`~precond.linalg.blocks.KronBlock`.
        kfe: Kronecker eigenbasis with EKFAC scaling, a :class:`~precond.linalg.blocks.KfeBlock`.
    """

    layer: Layer
    layer_wise: Tensor | None = None
    unit_wise: Tensor | None = None
    diag: Tensor | None = None
    kron: KronBlock | None = None
    kfe: KfeBlock | None = None

    @property
    def name(self) -> str:
        """The layer's qualified module name."""
        return self.layer.name

    @property
    def canonical(self) -> bool:
        """Whether results use the canonical order (the layer has an adapter)."""
        return self.layer.adapter is not None

    def __getitem__(self, shape: Shape | str) -> Tensor | Block:
        key = Shape(shape)
        value = getattr(self, key.value, None)
        if value is None:
            raise KeyError(
                f"Representation {key.value!r} of layer {self.layer.label} was not computed "
                "(request it in shapes=[...]; unit_wise/kron/kfe need a capture adapter)."
            )
        assert isinstance(value, Tensor | Block)
        return value

    def __contains__(self, shape: object) -> bool:
        try:
            key = Shape(shape)
        except ValueError:
            return False
        return getattr(self, key.value, None) is not None

    def block(self, shape: Shape | str) -> Block:
        """A representation as a block with the shared protocol (refresh, apply, to_dense, ...).

        ``layer_wise`` and ``unit_wise`` become a :class:`~precond.linalg.blocks.DenseBlock`
        (``eigh`` solver: any power), ``diag`` a :class:`~precond.linalg.blocks.DiagBlock`;
        ``kron`` and ``kfe`` already are blocks.

        Args:
            shape: The representation.

        Returns:
            The block (call ``refresh(damping)`` before ``apply`` with a negative power).
        """
        value = self[shape]
        if isinstance(value, Block):
            return value
        if Shape(shape) is Shape.DIAG:
            diag = DiagBlock()
            diag.update(value)
            return diag
        dense = DenseBlock(Solver.EIGH)
        dense.update(value)
        return dense

    def to_param_order(self, matrix: Tensor) -> Tensor:
        """A canonical ``[P, P]`` block (``layer_wise``, ``kron.to_dense()``) in parameter order.

        Args:
            matrix: ``[P, P]`` in canonical order.

        Returns:
            The same matrix with coordinates ordered like ``torch.func`` (weight, then bias).
        """
        if not self.canonical:
            return matrix
        inv = torch.argsort(canonical_permutation(self.layer))
        return matrix[inv][:, inv]

    def diag_params(self) -> list[Tensor]:
        """The diagonal as one tensor per trained parameter, shaped like the parameter.

        Returns:
            Parameter-shaped diagonals.
        """
        d = self["diag"]
        assert isinstance(d, Tensor)
        if self.canonical:
            return self.layer.from_matrix(d)
        return [
            c.view_as(p)
            for c, p in zip(torch.split(d, _sizes(self.layer.params)), self.layer.params)
        ]


def _sizes(params: list[nn.Parameter]) -> list[int]:
    return [p.numel() for p in params]


@dataclass
class Curvature:
    """Curvature of a model on one batch: per-layer results and, if requested, the full matrix.

    Attributes:
        curvature: Which matrix (``fisher_exact``, ``fisher_mc``, ``fisher_emp``, ``ggn``,
            ``hessian``).
        layers: ``{layer name: LayerCurvature}`` in model order.
        params: The parameters covered, in the order of :attr:`full`'s coordinates.
        full: ``[P, P]`` over :attr:`params` (parameter order), if requested.
    """

    curvature: CurvatureType
    layers: dict[str, LayerCurvature] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)
    full: Tensor | None = None

    def __getitem__(self, name: str) -> LayerCurvature:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self) -> Iterator[tuple[str, LayerCurvature]]:
        """``(layer name, LayerCurvature)`` pairs."""
        return iter(self.layers.items())

    def param_slices(self) -> dict[str, slice]:
        """Where each layer's parameters sit in :attr:`full` (contiguous per layer)."""
        out: dict[str, slice] = {}
        start = 0
        for name, lc in self.layers.items():
            n = lc.layer.numel
            out[name] = slice(start, start + n)
            start += n
        return out


# ---- Fisher-type results from captured statistics -------------------------------------------
def full_from_stats(stats: Mapping[str, LayerStats], layers: list[Layer], tag: str) -> Tensor:
    """The full Fisher-type matrix over the layers' parameters (parameter order).

    ``Σ_kn vec(J_kn) vec(J_kn)ᵀ`` with the per-example Jacobians of all layers concatenated.

    Args:
        stats: Captured statistics with vectors under ``tag``.
        layers: The layers, in the order their parameters are concatenated.
        tag: Which back-propagated vectors.

    Returns:
        ``[P, P]``.
    """
    cols: list[Tensor] = []
    for layer in layers:
        pe = fisher.per_example(stats[layer.name], tag)  # [K, N, G, o, i]
        k, n = pe.shape[:2]
        cols.extend(t.reshape(k * n, -1) for t in layer.from_matrix(pe))
    jac = torch.cat(cols, dim=1)
    return jac.T @ jac


def fisher_from_stats(
    st: LayerStats,
    tag: str,
    shapes: set[Shape],
    sharing: WeightSharing = WeightSharing.EXPAND,
) -> LayerCurvature:
    """One layer's Fisher-type curvature in every requested representation.

    Args:
        st: The layer's statistics with vectors recorded under ``tag``.
        tag: Which back-propagated vectors (the curvature type's value).
        shapes: Representations to build (``full`` is ignored here).
        sharing: ``expand`` or ``reduce`` for the Kronecker factors and their eigenbasis.

    Returns:
        The layer's results.
    """
    out = LayerCurvature(st.layer)
    if Shape.LAYER_WISE in shapes:
        out.layer_wise = fisher.layer_matrix(st, tag)
    if Shape.UNIT_WISE in shapes:
        out.unit_wise = fisher.unit_matrices(st, tag)
    if Shape.DIAG in shapes:
        out.diag = fisher.diagonal(st, tag)
    if Shape.KRON in shapes or Shape.KFE in shapes:
        a = fisher.kron_input_factor(st, sharing)
        b = fisher.kron_output_factor(st, tag, sharing)
        if Shape.KRON in shapes:
            kron = KronBlock()
            kron.update(a, b)
            out.kron = kron
        if Shape.KFE in shapes:
            kfe = KfeBlock()
            if not kfe.set_basis(a, b):
                raise RuntimeError(
                    f"Could not eigendecompose the Kronecker factors of layer {st.layer.label} "
                    "(non-finite statistics)."
                )
            kfe.update(fisher.kfe_scale(st, tag, kfe.rotate))
            out.kfe = kfe
    return out
