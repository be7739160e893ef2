"""Per-layer statistics captured on one step, in canonical form.

See :mod:`precond.capture.base` for the shape conventions (``K, N, S, G, d_in, d_out``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .base import Adapter

__all__ = [
    "CHUNK_NUMEL",
    "GRAD_TAG",
    "Layer",
    "LayerStats",
    "examples_per_chunk",
    "per_example_workspace",
    "stat_dtype",
]

#: Tag of the output gradients recorded during the ordinary backward pass of the loss.
GRAD_TAG = "grad"


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which statistics of tensors of ``dtype`` accumulate (float32 or better)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(eq=False)
class Layer:
    """One preconditioned unit of the model: a module and its trained parameters.

    Attributes:
        name: Qualified module name (``""`` for the root module).
        module: The module.
        adapter: The capture adapter, or ``None`` for modules handled from gradients only.
        params: Trained parameters, in the adapter's canonical order (weight, bias).
    """

    name: str
    module: nn.Module
    adapter: Adapter | None
    params: list[nn.Parameter] = field(default_factory=list)
    #: ``(weight, bias)`` trained at construction: the canonical layout stays fixed even if a
    #: parameter is frozen later (it then simply receives no gradient).
    trained: tuple[bool, bool] = (True, True)
    #: Weight-sharing positions per example by batch size and recorded output shapes (a cache of
    #: :meth:`LayerStats.num_positions`, which otherwise lays out meta tensors every call).
    positions_cache: dict[tuple[int | torch.Size, ...], int] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.adapter is not None:
            ids = {id(p) for p in self.params}
            w, b = self.adapter.weight(self.module), self.adapter.bias(self.module)
            self.trained = (w is not None and id(w) in ids, b is not None and id(b) in ids)

    @property
    def label(self) -> str:
        """Printable name: the qualified name and the module class."""
        return f"'{self.name or '<root>'}' ({type(self.module).__name__})"

    @property
    def numel(self) -> int:
        """Number of trained scalars."""
        return sum(p.numel() for p in self.params)

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors to canonical ``[..., G, d_out, d_in']``."""
        assert self.adapter is not None
        return self.adapter.to_matrix(self.module, tensors, self.trained)

    def from_matrix(self, m: Tensor) -> list[Tensor]:
        """Canonical ``[..., G, d_out, d_in']`` to parameter-shaped tensors."""
        assert self.adapter is not None
        return self.adapter.from_matrix(self.module, m, self.trained)

    def grads_matrix(self) -> Tensor:
        """The parameters' current ``.grad`` in canonical form (zeros where ``grad`` is None)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return self.to_matrix(grads)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical ``(G, d_out, d_in')``."""
        assert self.adapter is not None
        a, m = self.adapter, self.module
        return (a.groups(m), a.out_features(m), a.in_features_aug(m, self.trained))


def _fold_batch(t: Tensor, batch_size: int, label: str, lead: int = 0) -> Tensor:
    """View ``[*lead, N0, S, ...]`` as ``[*lead, N, (N0/N)·S, ...]`` for example-major rows."""
    n0 = t.shape[lead]
    if n0 == batch_size:
        return t
    if n0 % batch_size != 0:
        raise ValueError(
            f"Invalid input to layer {label}: its first dimension is {n0}, which is not a "
            f"multiple of the batch size {batch_size}. precond assumes batch-first layouts "
            "(dimension 0 indexes examples; use batch_first=True)."
        )
    shape = list(t.shape)
    return t.reshape(
        *shape[:lead], batch_size, (n0 // batch_size) * shape[lead + 1], *shape[lead + 2 :]
    )


class LayerStats:
    """What one step captured for one layer: inputs and output gradients per call.

    A module called several times in one forward pass contributes one entry per call; the
    canonical tensors concatenate the calls along the position axis ``S``.
    """

    def __init__(self, layer: Layer, batch_size: int) -> None:
        self.layer = layer
        self.batch_size = batch_size
        self.raw_inputs: list[Tensor] = []
        self._input_versions: list[int] = []
        self.raw_outputs: list[Tensor] = []
        # (shape, dtype, device) of every call's output: outlives raw_outputs, which the
        # Recorder drops when the recording ends (they hold autograd graph references).
        self._output_meta: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._output_versions: list[int] = []
        #: Autograd edge of every call's output as the layer produced it (while recording).
        self.output_edges: list[GradientEdge | None] = []
        #: Per call: the canonical outputs ``[*, G, d_out]`` summed over their leading
        #: dimensions (statistics dtype) and the number of rows summed, taken as the layer
        #: produced them (recorded when the recorder has ``output_sums``).
        self.output_sums: list[tuple[Tensor, int]] = []
        self.raw_grads: dict[str, list[Tensor | None]] = {}
        self._aliases: dict[str, tuple[str, Tensor]] = {}
        self._a_cache: Tensor | None = None
        self._x_cache: Tensor | None = None

    # ---- recording ------------------------------------------------------------------------
    def add_call(
        self,
        x: Tensor,
        output: Tensor | None,
        keep_output: bool = True,
        output_sum: bool = False,
    ) -> int:
        """Record one forward call; returns its index.

        Args:
            x: The layer's input.
            output: Its output (``None`` if it is not a tensor).
            keep_output: Keep the output tensor in :attr:`raw_outputs`; otherwise only its
                shape and autograd edge are kept, and its storage is freed with the model's.
            output_sum: Record the sum of the canonical outputs (:attr:`output_sums`).
        """
        self.raw_inputs.append(x.detach())
        self._input_versions.append(x._version)
        if output is not None:
            if keep_output:
                self.raw_outputs.append(output)
                self._output_versions.append(output._version)
            self._output_meta.append((output.shape, output.dtype, output.device))
            if output_sum:
                h = self.adapter.output_grads(self.layer.module, output.detach())
                rows = h.numel() // (h.shape[-2] * h.shape[-1])
                dims = tuple(range(h.dim() - 2))
                self.output_sums.append((h.sum(dim=dims, dtype=stat_dtype(h.dtype)), rows))
            self.output_edges.append(get_gradient_edge(output) if output.requires_grad else None)
        self._a_cache = None
        self._x_cache = None
        return len(self.raw_inputs) - 1

    def outputs_unmodified(self) -> bool:
        """Whether no recorded output was modified in place after the layer produced it."""
        return all(o._version == v for o, v in zip(self.raw_outputs, self._output_versions))

    def set_grad(self, tag: str, call: int, gy: Tensor | None) -> None:
        """Store the output gradient of call ``call`` under ``tag``."""
        slots = self.raw_grads.setdefault(tag, [None] * len(self.raw_inputs))
        if len(slots) < len(self.raw_inputs):
            slots.extend([None] * (len(self.raw_inputs) - len(slots)))
        slots[call] = None if gy is None else gy.detach()

    @property
    def num_calls(self) -> int:
        """How many times the module ran in the recorded forward pass."""
        return len(self.raw_inputs)

    # ---- canonical views ------------------------------------------------------------------
    @property
    def adapter(self) -> Adapter:
        """The layer's adapter."""
        assert self.layer.adapter is not None
        return self.layer.adapter

    def _check_inputs(self) -> None:
        for x, v in zip(self.raw_inputs, self._input_versions):
            if x._version != v:
                raise RuntimeError(
                    f"The input of layer {self.layer.label} was modified in place after the layer "
                    "used it; precond needs the value the layer saw. Avoid the in-place operation "
                    "(e.g. use x = x + y instead of x += y)."
                )

    def a(self) -> Tensor:
        """Canonical inputs ``[N, S, G, d_in']`` (trailing 1 column when the bias is trained).

        Only the trained weight's columns are included, so a frozen weight with a trained bias
        gives a single all-ones column.
        """
        if self._a_cache is not None:
            return self._a_cache
        a = self.x()
        cols: list[Tensor] = []
        trains_weight, trains_bias = self.layer.trained
        if trains_weight:
            cols.append(a)
        if trains_bias:
            cols.append(a.new_ones(*a.shape[:-1], 1))
        out = cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)
        if len(cols) > 1:
            self._x_cache = None  # ``a`` is a copy: holding both would keep the inputs twice
        self._a_cache = out
        return out

    def x(self) -> Tensor:
        """Canonical inputs ``[N, S, G, d_in]`` without the bias column (all calls)."""
        if self._x_cache is not None:
            return self._x_cache
        self._check_inputs()
        ad, m = self.adapter, self.layer.module
        parts = [
            _fold_batch(ad.inputs(m, x), self.batch_size, self.layer.label) for x in self.raw_inputs
        ]
        self._x_cache = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self._x_cache

    def input_chunks(self) -> Iterator[Tensor]:
        """Canonical inputs ``[n, S_call, G, d_in]`` of every call, a chunk of examples at a time.

        Together (examples of a call, then the calls' positions) they are :meth:`x`. Inputs
        that the adapter expands (im2col patches) are formed for :func:`examples_per_chunk`
        examples at a time, so the whole batch's patches never exist at once; inputs formed
        before (:meth:`x` cached) are yielded whole. For statistics that are sums over rows.
        """
        if self._x_cache is not None:
            yield self._x_cache
            return
        self._check_inputs()
        ad, m, n = self.adapter, self.layer.module, self.batch_size
        for x in self.raw_inputs:
            if x.dim() == 0 or x.shape[0] % n != 0 or not ad.per_example_inputs:
                yield _fold_batch(ad.inputs(m, x), n, self.layer.label)
                continue
            rows = x.shape[0] // n
            step = examples_per_chunk(ad.inputs(m, x[:rows]).numel())
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                yield _fold_batch(ad.inputs(m, x[lo * rows : hi * rows]), hi - lo, self.layer.label)

    def a_indices(self) -> Tensor:
        """For one-hot adapters: indices ``[N, S]`` of the hot input (-1: none)."""
        self._check_inputs()
        ad, m = self.adapter, self.layer.module
        parts = [
            _fold_batch(ad.input_indices(m, x), self.batch_size, self.layer.label)
            for x in self.raw_inputs
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def has(self, tag: str) -> bool:
        """Whether output gradients were recorded under ``tag``."""
        return tag in self.raw_grads or tag in self._aliases

    def alias(self, tag: str) -> tuple[str, Tensor] | None:
        """``(base tag, factor)`` if ``tag`` is an alias (:meth:`alias_tag`), else ``None``."""
        return self._aliases.get(tag)

    def alias_tag(self, tag: str, base: str, factor: Tensor) -> None:
        """Make ``g(tag)`` return ``factor · g(base)`` without copying the recorded gradients."""
        self._aliases[tag] = (base, factor)

    def g(self, tag: str = GRAD_TAG) -> Tensor:
        """Canonical output gradients ``[K, N, S, G, d_out]`` recorded under ``tag``.

        Calls that received no gradient (the output did not reach the loss) contribute zeros.
        """
        if tag in self._aliases:
            base, factor = self._aliases[tag]
            g = self.g(base)
            return g * factor.to(g.dtype)
        if tag not in self.raw_grads:
            raise KeyError(f"No output gradients recorded under tag {tag!r} for {self.layer.label}")
        parts = [self._call_grads(tag, call) for call in range(len(self.raw_inputs))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _call_grads(self, tag: str, call: int) -> Tensor:
        """Canonical output gradients ``[K, N, S_call, G, d_out]`` of one call (not aliased)."""
        ad, m = self.adapter, self.layer.module
        raw = self.raw_grads[tag]
        gy = raw[call] if call < len(raw) else None
        if gy is None:
            if call >= len(self._output_meta):
                raise RuntimeError(f"Missing output gradient for {self.layer.label}")
            shape, dtype, device = self._output_meta[call]
            gy = torch.zeros(self._num_vectors(tag), *shape, dtype=dtype, device=device)
        elif tag == GRAD_TAG:
            gy = gy.unsqueeze(0)
        k = gy.shape[0]
        canon = ad.output_grads(m, gy.reshape(k * gy.shape[1], *gy.shape[2:]))
        canon = canon.reshape(k, gy.shape[1], *canon.shape[1:])
        return _fold_batch(canon, self.batch_size, self.layer.label, lead=1)

    def _num_vectors(self, tag: str) -> int:
        if tag == GRAD_TAG:
            return 1
        for gy in self.raw_grads.get(tag, []):
            if gy is not None:
                return int(gy.shape[0])
        return 1

    def per_example_grads(self, tag: str = GRAD_TAG) -> Tensor:
        """Per-example gradients in canonical form ``[K, N, G, d_out, d_in']``.

        For ``tag="grad"`` and ``K = 1`` these sum over ``N`` to the layer's batch gradient.
        Inputs that the adapter expands (im2col patches of a convolution) are formed for a
        chunk of examples at a time (:func:`examples_per_chunk`), never for the whole batch; the
        bias column is ``Σ_s g``, so no ones column is appended to the inputs.
        """
        alias = self._aliases.get(tag)
        if alias is not None and alias[1].numel() == 1:
            # A scalar alias scales the (smaller) result rather than the output gradients.
            out = self.per_example_grads(alias[0])
            return out.mul_(alias[1].to(out.dtype))
        trains_weight, trains_bias = self.layer.trained
        single = trains_bias and self.num_positions() == 1
        if self._a_cache is not None or not trains_weight or single:
            # Without weight sharing the inputs with their ones column are small (one row per
            # example): one product writes the Jacobians with their bias column directly.
            g = self.g(tag)
            a = self.a()
            dt = stat_dtype(a.dtype)
            return torch.einsum("knsgo,nsgi->kngoi", g.to(dt), a.to(dt))
        self._check_inputs()
        ad, m = self.adapter, self.layer.module
        calls = range(len(self.raw_inputs))
        grads = [self._grads_of(tag, c) for c in calls]
        k, n, _, groups, d_out = grads[0].shape
        d_in = ad.in_features(m)
        dt = stat_dtype(grads[0].dtype)
        if not trains_bias and len(grads) == 1 and self._chunk(0, grads[0]) >= n:
            x = self._x_cache if self._x_cache is not None else self._call_inputs(0)
            return torch.einsum("knsgo,nsgi->kngoi", grads[0].to(dt), x.to(dt))
        out = torch.empty(
            k, n, groups, d_out, d_in + int(trains_bias), dtype=dt, device=grads[0].device
        )
        weight = out[..., :d_in]
        for c, g in zip(calls, grads):
            x = self.raw_inputs[c]
            rows = x.shape[0] // n if x.dim() > 0 else 0
            cached = self._x_cache if len(self.raw_inputs) == 1 else None
            step = self._chunk(c, g)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                if cached is not None and step >= n:
                    xc = cached
                elif step >= n:
                    xc = self._call_inputs(c)
                else:
                    xc = ad.inputs(m, x[lo * rows : hi * rows])
                    xc = _fold_batch(xc, hi - lo, self.layer.label)
                j = _example_jacobians(g[:, lo:hi].to(dt), xc.to(dt))
                if c == 0:
                    weight[:, lo:hi].copy_(j)
                else:
                    weight[:, lo:hi].add_(j)
        if trains_bias:
            bias = out[..., d_in]
            for c, g in zip(calls, grads):
                if c == 0:
                    torch.sum(g.to(dt), dim=2, out=bias)
                else:
                    bias.add_(g.to(dt).sum(dim=2))
        return out

    def _chunk(self, call: int, g: Tensor) -> int:
        """Examples per chunk for call ``call`` with canonical output gradients ``g``."""
        n = g.shape[1]
        x = self.raw_inputs[call]
        if len(self.raw_inputs) == 1 and self._x_cache is not None:
            return n
        if x.dim() == 0 or x.shape[0] % n != 0 or not self.adapter.per_example_inputs:
            return n
        return examples_per_chunk(
            g.shape[2] * g.shape[3] * self.adapter.in_features(self.layer.module)
        )

    def _grads_of(self, tag: str, call: int) -> Tensor:
        """:meth:`_call_grads` through aliases."""
        if tag in self._aliases:
            base, factor = self._aliases[tag]
            g = self._grads_of(base, call)
            return g * factor.to(g.dtype)
        if tag not in self.raw_grads:
            raise KeyError(f"No output gradients recorded under tag {tag!r} for {self.layer.label}")
        return self._call_grads(tag, call)

    def _call_inputs(self, call: int) -> Tensor:
        """Canonical inputs ``[N, S_call, G, d_in]`` of one call."""
        ad, m = self.adapter, self.layer.module
        return _fold_batch(ad.inputs(m, self.raw_inputs[call]), self.batch_size, self.layer.label)

    def num_positions(self) -> int:
        """Weight-sharing positions ``S`` per example, without forming the canonical inputs."""
        if len(self._output_meta) < len(self.raw_inputs):
            if self.adapter.one_hot_input:
                return int(self.a_indices().shape[1])
            return int(self.x().shape[1])
        key: tuple[int | torch.Size, ...] = (
            self.batch_size,
            *(shape for shape, _, _ in self._output_meta),
        )
        cached = self.layer.positions_cache.get(key)
        if cached is not None:
            return cached
        ad, m = self.adapter, self.layer.module
        total = 0
        for shape, dtype, _ in self._output_meta:
            # The canonical output gradients' layout, computed on a tensor without storage.
            gy = torch.empty(shape, dtype=dtype, device="meta")
            try:
                canon = ad.output_grads(m, gy)
            except (NotImplementedError, RuntimeError):  # an adapter without meta support
                return int(self.x().shape[1])
            total += int(canon.shape[0]) * int(canon.shape[1])
        positions = total // self.batch_size
        self.layer.positions_cache[key] = positions
        return positions


def _example_jacobians(g: Tensor, x: Tensor) -> Tensor:
    """``J[k, n, g] = Σ_s g[k, n, s, g] x[n, s, g]ᵀ``: ``[K, N, G, d_out, d_in]`` (maybe a view).

    With one vector per example, narrow inputs (``d_in < 64``, e.g. the ``3·k·k`` patches of a
    first convolution) and at least 16 outputs, the products are computed transposed
    (``x gᵀ``, a transposed view is returned): on the tested CPU the matrix products with
    such a short, odd output row run at half the rate of the transposed ones (cnn_small's
    first layer, ``d_out = 16``, ``d_in = 27``, ``S = 1024``: 0.80 → 0.53 ms for 32 examples).
    """
    transposed = g.shape[0] == 1 and x.shape[-1] < 64 and g.shape[-1] >= 16
    if g.shape[0] == 1 and g.shape[3] == 1:
        # One vector, one group: the batched product itself (the einsum's values, without
        # its dispatch).
        gm, xm = g[0, :, :, 0], x[:, :, 0]  # [N, S, d_out], [N, S, d_in]
        if transposed:
            j = torch.bmm(xm.transpose(1, 2), gm).transpose(1, 2)
        else:
            j = torch.bmm(gm.transpose(1, 2), xm)
        return j.unsqueeze(1).unsqueeze(0)
    if transposed:
        return torch.einsum("nsgi,knsgo->kngio", x, g).transpose(-1, -2)
    return torch.einsum("knsgo,nsgi->kngoi", g, x)


def examples_per_chunk(numel_per_example: int) -> int:
    """Examples whose expanded inputs (``numel_per_example`` elements each) form one chunk.

    Per-example gradients of layers whose adapter expands the inputs (im2col patches) are
    accumulated over chunks of at most :data:`CHUNK_NUMEL` input elements (at least one
    example), so the patches of the whole batch never exist at once.

    Args:
        numel_per_example: Elements of one example's canonical inputs.

    Returns:
        Examples per chunk (at least 1).
    """
    return max(1, CHUNK_NUMEL // max(1, numel_per_example))


def per_example_workspace(
    n: int, s: int, groups: int, d_in: int, numel: int, vectors: int = 1
) -> int:
    """Elements of the chunk workspace of :meth:`LayerStats.per_example_grads` (weight sharing).

    One chunk's canonical inputs and its per-example Jacobians before they are written into
    the result.

    Args:
        n: Examples.
        s: Positions per example.
        groups: Groups ``G``.
        d_in: Input width per group (without the bias column).
        numel: Elements of one Jacobian (``G · d_out · d_in'``).
        vectors: Back-propagated vectors per example ``K``.

    Returns:
        The workspace in elements.
    """
    chunk = min(n, examples_per_chunk(s * groups * d_in))
    return chunk * (s * groups * d_in + vectors * numel)


#: Elements of canonical inputs formed at once by :meth:`LayerStats.per_example_grads`.
CHUNK_NUMEL = 1 << 20
