r"""Two backward passes through one graph, the second following the first segment by segment.

Sophia's GNB estimate needs ``Jᵀv`` (``v`` a vector at the logits) beside the loss's own
gradient ``Jᵀu``; both traverse the whole graph. Run one after the other, the first must retain
the graph, so its working set (the activations' gradients of the widest layer) sits beside
*every* activation, not only those a single backward still holds at that point.

:func:`twin_backward` cuts the graph at nodes that every path from the loss to the leaves
passes through (found by a topological walk of the autograd graph: the one node reached and not
yet walked). The loss's backward runs as usual but keeps the graph; when it reaches a cut (a
pre-hook on the cut node), the ``v`` pass runs through the segment above it and frees it. Which
cuts to make is estimated from the graph itself (:func:`_worthwhile_cuts`): the saved tensors
of every node (each freed after its last user), the gradients into and out of each node and
the parameters' gradients; a cut trades the segment's saved tensors for the other pass's
gradient at the cut, and costs a call into the engine, so it is made only where it lowers the
estimated peak (an MLP, whose parameters' gradients outweigh its activations, gets none at
small batches, and its two passes run one after the other). cnn_small at B = 512 (live tensor
peak of a step): one backward 104.1 MB, the two passes one after the other 148.5, cut at the
first pool alone 132.2, cut there and below the second conv (the estimate's choice) 120.3.

:func:`twin_backward_edges` also returns the ``v`` pass's gradients at given autograd edges
(layers' outputs), handing each segment's to a callback as soon as the segment is done: the
diagonal natural gradient's Fisher pass (``ng_diag``) forms a layer's block there and drops the
layer's statistics (cnn_small, B=512: peak 148.4 → 124.1 MB).

The results equal the two plain passes': every node runs the same kernels on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._cache import BoundedCache

__all__ = ["UncutGraphs", "twin_backward", "twin_backward_edges"]

_LEAF = "torch::autograd::AccumulateGrad"


def _parameter_side(node: Any) -> bool:
    """Whether a node only hands its gradient on to parameters (e.g. a weight's transpose).

    Its gradient is a parameter's, not an activation's: it says nothing about how wide the
    graph is there (an MLP's first weight would otherwise make every cut above look narrow).
    """
    nexts = node.next_functions
    return bool(nexts) and all(n is not None and n.name() == _LEAF for n, _ in nexts)


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}
#: Cut positions chosen per graph (see :func:`_segments`), the 16 most recent.
_CHOICES: BoundedCache[list[int]] = BoundedCache(16)


def _shapes(node: Any) -> tuple[Any, ...]:
    return tuple((tuple(meta.shape), meta.dtype) for meta in node._input_metadata)


def _nbytes(node: Any) -> int:
    """Bytes of the gradients flowing into a node (its outputs' gradients)."""
    total = 0
    for meta in node._input_metadata:
        n = meta.dtype.itemsize
        for s in meta.shape:
            n *= int(s)
        total += n
    return total


def _peek(node: Any, name: str) -> Any:
    try:
        return getattr(node, name)
    except RuntimeError:  # freed by an earlier backward
        return None


def _saved_storages(node: Any, exclude: set[int]) -> list[tuple[int, int]]:
    """``(address, bytes)`` of the storages a node saved for its backward, but ``exclude``'s.

    Read through the node's ``_saved_*`` attributes (their names cached per node class);
    attributes already freed are skipped.
    """
    names = _SAVED_NAMES.get(type(node))
    if names is None:  # those that hold tensors (not sizes, flags or numbers)
        names = tuple(
            a
            for a in dir(node)
            if a.startswith("_saved_")
            and not isinstance(_peek(node, a), (int, float, bool))
            and not a.endswith(("_sym_sizes", "_sym_strides", "_sym_sizes_opt"))
        )
        _SAVED_NAMES[type(node)] = names
    out = []
    for name in names:
        value = _peek(node, name)
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, Tensor) and t.layout == torch.strided:  # sparse: no storage
                storage = t.untyped_storage()
                if storage.data_ptr() not in exclude:
                    out.append((storage.data_ptr(), storage.nbytes()))
    return out


# Cuts are chosen for the lowest estimated peak; of the choices within this fraction of it,
# the one with the fewest cuts (each is a call into the engine: mlp512 at B = 32 lost 0.3 ms
# per step at one thread to one, where the activations are small beside the parameters).
_PEAK_SLACK = 0.05


def _worthwhile_cuts(order: list[tuple[Any, bool]], cut_at: list[int], first: int) -> list[int]:
    """Positions in ``order`` to cut at: ``first`` and the cuts below it that pay off.

    The live bytes of the two passes are estimated node by node from the saved tensors (each
    freed after its last user), the gradients into and out of each node and the parameters'
    gradients formed so far. While the loss's pass runs through a segment it keeps the whole
    segment's saved tensors and the other pass's gradient at the segment's top (the carry);
    while the other pass runs through it, the loss's pass waits at the next cut with its
    gradient there. A dynamic programme over the cut nodes finds the lowest estimated peak,
    then the fewest cuts within :data:`_PEAK_SLACK` of it. A cut is only made below every node
    of the segment above it in the engine's order (it runs a ready node of higher sequence
    number first: the whole segment has run when the cut is reached), and not at a node that
    only hands its gradient on to parameters (a weight's transpose).
    """
    nodes = [node for node, _ in order]
    n = len(nodes)
    gi = [_nbytes(node) for node in nodes] + [0]
    pd = [0] * (n + 1)  # pd[j + 1]: bytes of the leaves' gradients formed by nodes first..j
    leaves: set[int] = set()  # the leaves' storages (saved weights are not freed)
    for j in range(first, n):
        pd[j + 1] = pd[j]
        for nxt, _ in nodes[j].next_functions:
            if nxt is not None and nxt.name() == _LEAF:
                var = nxt.variable
                pd[j + 1] += var.numel() * var.element_size()
                leaves.add(var.untyped_storage().data_ptr())
    last: dict[int, tuple[int, int]] = {}
    for j in range(first, n):
        for key, nb in _saved_storages(nodes[j], leaves):
            last[key] = (j, nb)
    freed = [0] * (n + 1)  # freed[j]: saved bytes whose last user lies in first..j-1
    for j, nb in last.values():
        freed[j + 1] += nb
    for j in range(first + 1, n + 1):
        freed[j] += freed[j - 1]
    total = freed[n]
    # x[j]: gradients in and out of node j and the parameters' gradients formed so far
    x = [gi[j] + gi[j + 1] + pd[j + 1] for j in range(n)]
    for j in range(first, n):
        if nodes[j].name().startswith("Convolution"):
            x[j] += gi[j] + gi[j + 1]  # its kernels' copies of both (measured on CPU)
    candidates = [i for i in cut_at if i > first and not _parameter_side(nodes[i])]
    ends = [*candidates, n]
    seq = [node._sequence_nr() for node in nodes]
    y = [x[j] - freed[j] for j in range(n)]

    def costs(s: int) -> dict[int, int]:
        """Estimated peak of segment ``[s, c)`` for every end ``c`` it may have."""
        top = total - freed[s] + gi[s] + pd[s]  # + the other pass's carry and its gradients
        # running maxima over the segment's nodes, minimum of their sequence numbers
        mx = list(accumulate(x[s:], max))
        my = list(accumulate(y[s:], max))
        low = list(accumulate(seq[s:], min))
        out: dict[int, int] = {}
        for c in ends:
            if c > s and (c == n or low[c - s - 1] > seq[c]):
                out[c] = max(top + mx[c - s - 1], total + gi[c] + pd[c] + my[c - s - 1])
        return out

    starts = [first, *candidates]
    table = {s: costs(s) for s in starts}
    inf = float("inf")
    best: dict[int, float] = {first: 0}
    for c in ends:
        best[c] = min(
            (max(best[s], table[s][c]) for s in starts if s < c and c in table[s] and s in best),
            default=inf,
        )
    bound = best[n] * (1 + _PEAK_SLACK)
    fewest: dict[int, tuple[int, int]] = {first: (0, -1)}
    for c in ends:
        options = [
            (fewest[s][0] + 1, s)
            for s in starts
            if s < c and s in fewest and table[s].get(c, inf) <= bound
        ]
        if options:
            fewest[c] = min(options)
    chosen = []
    c = fewest[n][1] if n in fewest else first
    while c not in (-1, first):
        chosen.append(c)
        c = fewest[c][1]
    return [first, *reversed(chosen)]


def _segments(root: Any, start: Any) -> list[tuple[Any, list[int], list[Tensor], set[Any]]] | None:
    """Cut nodes from ``root`` down, with the outputs reached, leaves and nodes of each segment.

    Returns ``[(cut node, its outputs that receive gradients, leaves of its segment, its
    nodes)]`` in order (the first is ``start``, always a cut), or ``None`` if ``start`` is not
    a cut node or no cut below it pays (:func:`_worthwhile_cuts`).
    """
    indegree: dict[Any, int] = {}
    outputs: dict[Any, set[int]] = {}
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, k in node.next_functions:
            if nxt is None or nxt.name() == _LEAF:
                continue
            indegree[nxt] = indegree.get(nxt, 0) + 1
            outputs.setdefault(nxt, set()).add(k)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    # Kahn's walk; a node is a cut when it is the only node reached and not yet walked.
    order: list[tuple[Any, bool]] = []
    ready, touched = [root], {root}
    while ready:
        node = ready.pop()
        order.append((node, len(touched) == 1))
        touched.discard(node)
        for nxt, _ in node.next_functions:
            if nxt is None or nxt.name() == _LEAF:
                continue
            touched.add(nxt)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(seen):
        return None
    cut_at = [i for i, (_, is_cut) in enumerate(order) if is_cut]
    first = next((i for i in cut_at if order[i][0] is start), None)
    if first is None:
        return None
    # The same model and batch build the same graph every step: the choice is reused for a
    # graph of the same nodes (kinds and gradient sizes) in the same order, created in the
    # same order (the cuts' validity rests on the nodes' sequence numbers).
    seq = [node._sequence_nr() for node, _ in order]
    ranks = tuple(sorted(range(len(order)), key=seq.__getitem__))
    key = (first, ranks, tuple((node.name(), *_shapes(node)) for node, _ in order))
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen = _worthwhile_cuts(order, cut_at, first)
        _CHOICES.put(key, chosen)
    if len(chosen) == 1:
        return None  # no cut pays
    result = []
    for j, i in enumerate(chosen):
        end = chosen[j + 1] if j + 1 < len(chosen) else len(order)
        leaves: dict[int, Tensor] = {}
        for node, _ in order[i:end]:
            for nxt_fn, _ in node.next_functions:
                if nxt_fn is not None and nxt_fn.name() == _LEAF:
                    leaves[id(nxt_fn.variable)] = nxt_fn.variable
        node = order[i][0]
        nodes = {n for n, _ in order[i:end]}
        result.append((node, sorted(outputs.get(node, {0})), list(leaves.values()), nodes))
    return result


class UncutGraphs:
    """Graph signatures whose graphs have no cut that pays: their steps skip the walk.

    Finding the cuts walks the whole autograd graph in Python on every step (the choice itself
    is cached): on mlp512 at B = 32, which gets no cut, skipping the walk saved 0.02-0.06 ms of
    a 2.3 ms Sophia step in alternating blocks of one process. A
    gradient maker keeps one of these and passes its
    :meth:`~precond.grad_maker.GradientMaker.graph_signature`: a graph of a signature found
    without a cut is not walked again, and the caller runs its two passes one after the other
    (the same results; for a model whose graph depends on the values of its inputs, not only
    on their shapes, a later graph of the signature that a cut would suit runs uncut too).

    Args:
        limit: Signatures kept, the most recent.
    """

    def __init__(self, limit: int = 16) -> None:
        self._keys: BoundedCache[bool] = BoundedCache(limit)

    def __contains__(self, key: object) -> bool:
        return key is not None and key in self._keys

    def add(self, key: Hashable | None) -> None:
        """Remember ``key`` (``None`` is ignored)."""
        if key is not None:
            self._keys.put(key, True)


def twin_backward(
    loss: Tensor,
    logits: Tensor,
    vector: Tensor,
    params: Sequence[Tensor],
    *,
    uncut: UncutGraphs | None = None,
    key: Hashable | None = None,
) -> list[Tensor | None] | None:
    """``loss.backward()`` and ``Jᵀv`` for ``params`` (``J`` the logits' Jacobian), cut in segments.

    The loss's backward runs as usual (into the leaves' ``.grad``) but keeps the graph; when it
    reaches a cut, the ``v`` pass runs through the segment above it and frees it. The graph is
    freed at the end (but for the loss's own nodes above the logits).

    Args:
        loss: Scalar loss.
        logits: Tensor of the loss's graph that ``vector`` is the output gradient of.
        vector: Output gradient of ``logits``.
        params: Parameters to return ``Jᵀv`` for.
        uncut: Signatures found without a cut (see :class:`UncutGraphs`), updated.
        key: This graph's signature.

    Returns:
        ``Jᵀv`` per parameter (``None`` where zero), or ``None`` (nothing done) when the graph
        has no cut below the logits that pays or the logits are not a cut: then the caller runs
        the two passes one after the other.
    """
    out = twin_backward_edges(loss, logits, vector, params=params, uncut=uncut, key=key)
    return None if out is None else out[0]


def twin_backward_edges(
    loss: Tensor,
    logits: Tensor,
    vector: Tensor,
    *,
    params: Sequence[Tensor] = (),
    edges: Sequence[GradientEdge | None] = (),
    on_segment: Callable[[dict[int, Tensor | None], bool], None] | None = None,
    uncut: UncutGraphs | None = None,
    key: Hashable | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]] | None:
    """:func:`twin_backward` with gradients of the ``v`` pass at autograd edges too.

    Args:
        loss: Scalar loss.
        logits: Tensor of the loss's graph that ``vector`` is the output gradient of.
        vector: Output gradient of ``logits``.
        params: Parameters to return ``Jᵀv`` for.
        edges: Autograd edges (e.g. layers' outputs) to return the ``v`` pass's gradient at
            (``None`` entries and edges the pass does not reach get ``None``).
        on_segment: Called after the ``v`` pass has run through each segment, with the
            gradients at the edges of that segment (``{index into edges: gradient}``) and
            whether it is the last segment (the loss's backward has finished); gradients
            handed to it are not kept here (the caller may consume and drop them at once).
        uncut: Signatures found without a cut (see :class:`UncutGraphs`): nothing is done for
            ``key`` if it is among them, and it is added when this graph has no cut.
        key: This graph's signature.

    Returns:
        ``(Jᵀv per parameter, gradient per edge)`` (``None`` where zero or not reached;
        gradients handed to ``on_segment`` are ``None`` here), or ``None`` (nothing done) as
        :func:`twin_backward`.
    """
    if uncut is not None and key in uncut:
        return None
    root, start = loss.grad_fn, logits.grad_fn
    if root is None or start is None:
        return None
    segments = _segments(root, start)
    if segments is None:
        if uncut is not None:
            uncut.add(key)
        return None
    grads_v: dict[int, Tensor] = {}
    wanted = {id(p) for p in params}
    # the edges of each segment: at its cut node (their gradient is the carry into the
    # segment) or inside it (gradients of the segment's pass)
    at_cut: list[list[tuple[int, int]]] = [[] for _ in segments]
    inside: list[list[int]] = [[] for _ in segments]
    for j, edge in enumerate(edges):
        if edge is None:
            continue
        for k, (node, outs, _, nodes) in enumerate(segments):
            if edge.node in nodes:
                if edge.node is node:
                    if edge.output_nr in outs:
                        at_cut[k].append((j, outs.index(edge.output_nr)))
                else:
                    inside[k].append(j)
                break
    edge_grads: list[Tensor | None] = [None] * len(edges)
    carry = [vector.to(logits.dtype)]  # as the engine casts an output gradient
    done = [False] * len(segments)

    def run(k: int) -> None:
        nonlocal carry
        if done[k]:
            return
        done[k] = True
        node, outs, all_leaves, _ = segments[k]
        leaves = [t for t in all_leaves if id(t) in wanted]  # no weight gradient for the rest
        found: dict[int, Tensor | None] = {j: carry[o] for j, o in at_cut[k]}
        cut: list[Any] = []
        if k + 1 < len(segments):
            cut = [GradientEdge(segments[k + 1][0], o) for o in segments[k + 1][1]]
        targets = [edges[j] for j in inside[k]]
        if cut or leaves or targets:
            res = torch.autograd.grad(
                [GradientEdge(node, o) for o in outs],
                cut + leaves + targets,
                carry,
                allow_unused=True,
            )
            carry = _carry(res[: len(cut)], cut)
            for t, g in zip(leaves, res[len(cut) : len(cut) + len(leaves)]):
                if g is not None:
                    grads_v[id(t)] = g if id(t) not in grads_v else grads_v[id(t)] + g
            found.update(zip(inside[k], res[len(cut) + len(leaves) :]))
            del res
        else:
            carry = []
        if on_segment is not None:
            if found:
                on_segment(found, k == len(segments) - 1)
        else:
            for j, gj in found.items():
                edge_grads[j] = gj

    def hook(k: int) -> Any:
        def before(grad_outputs: Any) -> None:
            run(k)  # the loss's pass is done with segment k: the v pass runs through it

        return before

    handles = [segments[k + 1][0].register_prehook(hook(k)) for k in range(len(segments) - 1)]
    try:
        loss.backward(retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    for k in range(len(segments)):
        run(k)
    return [grads_v.get(id(p)) for p in params], edge_grads


def _carry(grads: Sequence[Tensor | None], cut: list[Any]) -> list[Tensor]:
    out = []
    for g, edge in zip(grads, cut):
        if g is None:
            meta = edge.node._input_metadata[edge.output_nr]
            g = torch.zeros(tuple(meta.shape), dtype=meta.dtype, device=meta.device)
        out.append(g)
    return out
