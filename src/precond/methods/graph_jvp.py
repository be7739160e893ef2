"""``J v`` by pushing tangents forward through the retained autograd graph of the logits.

The forward pass saved what the tangent of every node needs (layer inputs and weights,
activation results, pooling indices, dropout masks). :class:`GraphTangent` reads the graph of
the logits once per batch and then, per product, runs only the linearised work: per affine
layer ``W t_in + V a`` (``V`` the tangent of the weight), per elementwise or pooling node its
derivative applied to the incoming tangent; nothing of the values is recomputed, so ``J v``
costs one first-order pass. A node without a rule (see ``_RULES``) raises
:class:`Unsupported` and the caller uses reverse mode for that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["GraphTangent", "Unsupported", "only_through"]


class Unsupported(RuntimeError):
    """The retained graph holds an operation :class:`GraphTangent` has no rule for."""


def _reshaped(t: Tensor | None, shape: Any) -> Tensor | None:
    return None if t is None else t.reshape(shape)


def _sum(terms: list[Tensor | None]) -> Tensor | None:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _addmm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t_self, t1, t2 = ins
    rows, inner = saved["mat1_sym_sizes"]
    cols = saved["mat2_sym_sizes"][1]
    # mat2 is saved when mat1 requires a gradient (t1 is set), mat1 when mat2 does; the
    # product is accumulated in place (one output-sized tensor)
    prod = None if t1 is None else t1.reshape(rows, inner) @ saved["mat2"]
    if t2 is not None:
        m1, t2 = saved["mat1"], t2.reshape(inner, cols)
        prod = m1 @ t2 if prod is None else prod.addmm_(m1, t2)
    alpha, beta = saved["alpha"], saved["beta"]
    if prod is not None and alpha != 1:
        prod.mul_(alpha)
    if t_self is None:
        return prod
    t_self = t_self * beta if beta != 1 else t_self
    return t_self.expand(rows, cols) if prod is None else prod.add_(t_self)


def _mm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t1, t2 = ins
    rows, inner = saved["self_sym_sizes"]
    cols = saved["mat2_sym_sizes"][1]
    return _sum(
        [
            None if t1 is None else t1.reshape(rows, inner) @ saved["mat2"],
            None if t2 is None else saved["self"] @ t2.reshape(inner, cols),
        ]
    )


def _conv(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t_in, t_w, t_b = ins
    geometry = (
        saved["stride"],
        saved["padding"],
        saved["dilation"],
        saved["transposed"],
        saved["output_padding"],
        saved["groups"],
    )
    # the input is saved when the weight requires a gradient (t_w is set), the weight when
    # the input does; a tangent arriving through a flattening view is reshaped back; the two
    # terms are summed in place (one output-sized tensor)
    out = None
    if t_w is not None:
        out = torch.convolution(saved["input"], t_w, t_b, *geometry)
        t_b = None
    if t_in is not None:
        if "input" in saved:
            t_in = t_in.reshape(saved["input"].shape)
        term = torch.convolution(t_in, saved["weight"], None, *geometry)
        out = term if out is None else out.add_(term)
    if t_b is not None:
        # the bias's tangent broadcasts over examples and positions; alone (a frozen weight
        # and no tangent from below) it is expanded to the output's shape, which the next
        # node reads (a view: no output-sized memory)
        shape = [1, -1] + [1] * len(saved["stride"])
        if out is None:
            out = t_b.reshape(shape).expand(saved["shapes"][0])
        else:
            out = out.add_(t_b.reshape(shape))
    return out


def _maxpool(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    (t,) = ins
    if t is None:
        return None
    idx = saved["result1"]
    t = t.reshape(saved["self"].shape)
    return t.flatten(-2).gather(-1, idx.flatten(-2)).view_as(idx)


def _centred(t: Tensor, xhat: Tensor, dims: Any) -> Tensor:
    """Tangent of ``x̂ = (x - mean) · rstd`` over ``dims`` before the ``rstd`` factor."""
    return t - t.mean(dims, keepdim=True) - xhat * (xhat * t).mean(dims, keepdim=True)


def _affine(
    t_xhat: Tensor | None,
    xhat: Tensor,
    weight: Tensor | None,
    t_w: Tensor | None,
    t_b: Tensor | None,
    view: list[int] | None,
) -> Tensor | None:
    """Tangent of ``w ⊙ x̂ + b`` (``view`` broadcasts per-channel ``w`` and ``b``)."""

    def shaped(t: Tensor) -> Tensor:
        return t if view is None else t.reshape(view)

    terms: list[Tensor | None] = []
    if t_xhat is not None:
        terms.append(t_xhat if weight is None else t_xhat * shaped(weight))
    if t_w is not None:
        terms.append(xhat * shaped(t_w))
    if t_b is not None:
        terms.append(shaped(t_b).expand(xhat.shape))
    return _sum(terms)


def _batch_norm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t_x, t_w, t_b = ins
    x = saved["input"]
    view = [1, -1] + [1] * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    if saved["training"]:  # batch statistics: their tangents enter too
        mean, invstd = saved["result1"].reshape(view), saved["result2"].reshape(view)
    else:
        mean = saved["running_mean"].reshape(view)
        invstd = torch.rsqrt(saved["running_var"].reshape(view) + saved["eps"])
    xhat = (x - mean) * invstd
    t_xhat = None
    if t_x is not None:
        t_x = t_x.reshape(x.shape)
        t_xhat = (_centred(t_x, xhat, dims) if saved["training"] else t_x) * invstd
    return _affine(t_xhat, xhat, saved.get("weight"), t_w, t_b, view)


def _layer_norm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t_x, t_w, t_b = ins
    x = saved["input"]
    dims = list(range(x.dim() - len(saved["normalized_shape"]), x.dim()))
    xhat = (x - saved["result1"]) * saved["result2"]
    t_xhat = None
    if t_x is not None:
        t_xhat = _centred(t_x.reshape(x.shape), xhat, dims) * saved["result2"]
    return _affine(t_xhat, xhat, saved.get("weight"), t_w, t_b, None)


def _group_norm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    t_x, t_w, t_b = ins
    x = saved["input"]
    n, groups = x.shape[0], saved["group"]
    mean = saved["result1"].reshape(n, groups, 1)
    rstd = saved["result2"].reshape(n, groups, 1)
    xg = (x.reshape(n, groups, -1) - mean) * rstd
    t_xhat = None
    if t_x is not None:  # per example and group, like LayerNorm over the group's elements
        t_xhat = (_centred(t_x.reshape(n, groups, -1), xg, -1) * rstd).reshape(x.shape)
    view = [1, -1] + [1] * (x.dim() - 2)
    return _affine(t_xhat, xg.reshape(x.shape), saved.get("weight"), t_w, t_b, view)


def _embedding(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    (t_w,) = ins
    if t_w is None:
        return None
    idx = saved["indices"]
    out = t_w[idx]
    pad = saved["padding_idx"]
    if pad >= 0:  # the padding row is a constant of the embedding
        out = out.masked_fill((idx == pad).unsqueeze(-1), 0)
    return out


def _mul(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    ta, tb = ins
    return _sum(
        [
            None if ta is None else ta * saved["other"],
            None if tb is None else saved["self"] * tb,
        ]
    )


def _elementwise(fn: Callable[[Tensor, dict[str, Any]], Tensor], key: str) -> Any:
    def rule(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
        (t,) = ins
        if t is None:
            return None
        ref = saved[key]
        return fn(t.reshape(ref.shape), saved)

    return rule


def _shapes(node: Any) -> tuple[tuple[int, ...], list[tuple[int, ...] | None]]:
    """The output shape of ``node`` and the shapes of its inputs (``None``: not a tensor).

    A node's input metadata describes the gradient it receives, i.e. its forward output; an
    input's shape is that of the node producing it (a leaf's: the variable's).
    """
    out = tuple(int(s) for s in node._input_metadata[0].shape)
    ins: list[tuple[int, ...] | None] = []
    for nxt, k in node.next_functions:
        if nxt is None:
            ins.append(None)
        elif hasattr(nxt, "variable"):
            ins.append(tuple(nxt.variable.shape))
        else:
            ins.append(tuple(int(s) for s in nxt._input_metadata[k].shape))
    return out, ins


def _add(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """``a + α b`` with broadcasting (residual connections, biases added by hand)."""
    out_shape, in_shapes = saved["shapes"]
    alpha = saved.get("alpha", 1)
    terms: list[Tensor] = []
    for k, t in enumerate(ins):
        if t is None:
            continue
        shape = in_shapes[k]
        if shape is None:
            raise Unsupported("AddBackward0 with an input of unknown shape")
        t = t.reshape(shape)  # a tangent may arrive in the shape before a view
        if k == 1 and alpha != 1:
            t = t * alpha
        terms.append(t)
    if len(terms) == 2 and terms[0].shape == terms[1].shape:
        return terms[0] + terms[1]
    # broadcasting: each term read at the output's shape (consumers reshape what they read)
    return _sum([t if t.shape == out_shape else t.expand(out_shape) for t in terms])


def _mean(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """Mean over dimensions (global average pooling)."""
    (t,) = ins
    if t is None:
        return None
    t = t.reshape(saved["self_sym_sizes"])
    return t.mean(dim=saved["dim"], keepdim=saved["keepdim"])


def _passthrough(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    (t,) = ins
    return t  # a row-major reshape: consumers reshape to the shape they read


def _bmm(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """A batched matrix product (attention scores and their weighting of the values)."""
    t1, t2 = ins
    _, (s1, s2) = saved["shapes"]
    return _sum(
        [
            None if t1 is None else torch.bmm(t1.reshape(s1), saved["mat2"]),
            None if t2 is None else torch.bmm(saved["self"], t2.reshape(s2)),
        ]
    )


def _signed(value: Any) -> int:
    """A dimension or index that autograd saved as an unsigned 64-bit integer (-1: 2⁶⁴ − 1)."""
    value = int(value)
    return value - (1 << 64) if value >= 1 << 63 else value


def _reshaping(op: Callable[[Tensor, dict[str, Any], tuple[int, ...]], Tensor]) -> Any:
    """The rule of a node that rearranges its input (its tangent is rearranged likewise).

    ``op(t, saved, out_shape)`` gets the input's tangent in the input's shape (a tangent may
    arrive as a row-major reshape of it).
    """

    def rule(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
        (t,) = ins
        if t is None:
            return None
        out, (shape,) = saved["shapes"]
        return op(t.reshape(shape), saved, out)

    return rule


#: A transpose of two dimensions (MLP-Mixer's token mixing, the attention's keys).
_transpose = _reshaping(lambda t, sv, _: t.transpose(_signed(sv["dim0"]), _signed(sv["dim1"])))
#: A permutation of the dimensions (the attention's heads).
_permute = _reshaping(lambda t, sv, _: t.permute([_signed(d) for d in sv["dims"]]))
#: A broadcast of size-1 dimensions.
_expand = _reshaping(lambda t, _, out: t.expand(out))
#: One index of a dimension (query, key and value out of one projection).
_select = _reshaping(lambda t, sv, _: t.select(_signed(sv["dim"]), _signed(sv["index"])))


def _div(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """``t_a / b − a t_b / b²`` for ``a / b`` with broadcasting (a temperature, a scale)."""
    out_shape, in_shapes = saved["shapes"]
    ta, tb = (
        None if t is None or shape is None else t.reshape(shape) for t, shape in zip(ins, in_shapes)
    )
    other = saved["other"]
    terms = [None if ta is None else ta / other]
    if tb is not None:
        terms.append(tb * (saved["self"] / (other * other)).neg_())
    out = _sum(terms)
    if out is None or out.shape == out_shape:
        return out
    return out.expand(out_shape)


def _scale(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """A product with a number (the attention's ``1/√d``)."""
    (t,) = ins
    return None if t is None else t * saved["other"]


def _softmax(saved: dict[str, Any], ins: list[Tensor | None]) -> Tensor | None:
    """``y ⊙ (t − Σ y ⊙ t)`` along the softmax dimension, ``y`` the saved result."""
    (t,) = ins
    if t is None:
        return None
    y = saved["result"]
    t = t.reshape(y.shape)
    return y * (t - (y * t).sum(_signed(saved["dim"]), keepdim=True))


#: Rules by node name: the saved fields they read and the tangent of the node's output.
_RULES: dict[str, tuple[tuple[str, ...], Any]] = {
    "AddmmBackward0": (
        ("mat1", "mat2", "alpha", "beta", "mat1_sym_sizes", "mat2_sym_sizes"),
        _addmm,
    ),
    "MmBackward0": (("self", "mat2", "self_sym_sizes", "mat2_sym_sizes"), _mm),
    "TBackward0": ((), lambda saved, ins: None if ins[0] is None else ins[0].t()),
    "ConvolutionBackward0": (
        (
            "input",
            "weight",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "shapes",
        ),
        _conv,
    ),
    "MaxPool2DWithIndicesBackward0": (("self", "result1"), _maxpool),
    "ReluBackward0": (
        ("result",),
        _elementwise(lambda t, s: torch.ops.aten.threshold_backward(t, s["result"], 0), "result"),
    ),
    "TanhBackward0": (
        ("result",),
        _elementwise(lambda t, s: torch.ops.aten.tanh_backward(t, s["result"]), "result"),
    ),
    "SigmoidBackward0": (
        ("result",),
        _elementwise(lambda t, s: torch.ops.aten.sigmoid_backward(t, s["result"]), "result"),
    ),
    "GeluBackward0": (
        ("self", "approximate"),
        _elementwise(
            lambda t, s: torch.ops.aten.gelu_backward(t, s["self"], approximate=s["approximate"]),
            "self",
        ),
    ),
    "MulBackward0": (("self", "other"), _mul),
    "DivBackward0": (("self", "other", "shapes"), _div),
    "AddBackward0": (("alpha", "shapes"), _add),
    "MeanBackward1": (("self_sym_sizes", "dim", "keepdim"), _mean),
    "NativeLayerNormBackward0": (
        ("input", "normalized_shape", "weight", "result1", "result2"),
        _layer_norm,
    ),
    "EmbeddingBackward0": (("indices", "padding_idx"), _embedding),
    "NativeGroupNormBackward0": (("input", "weight", "result1", "result2", "group"), _group_norm),
    "NativeBatchNormBackward0": (
        ("input", "weight", "running_mean", "running_var", "result1", "result2", "training", "eps"),
        _batch_norm,
    ),
    "ViewBackward0": ((), _passthrough),
    "ReshapeAliasBackward0": ((), _passthrough),
    "UnsafeViewBackward0": ((), _passthrough),
    "CloneBackward0": ((), _passthrough),  # `.contiguous()` of a transposed activation
    # dimensions of size one added or removed (nn.MultiheadAttention's batch-first inputs)
    "UnsqueezeBackward0": ((), _passthrough),
    "SqueezeBackward0": ((), _passthrough),
    "SqueezeBackward1": ((), _passthrough),
    "SqueezeBackward2": ((), _passthrough),
    # a change of dtype (autocast's casts): every tangent is cast to its node's output dtype
    "ToCopyBackward0": ((), _passthrough),
    "TransposeBackward0": (("dim0", "dim1", "shapes"), _transpose),
    "PermuteBackward0": (("dims", "shapes"), _permute),
    # the composite attention (what steps with second derivatives run)
    "BmmBackward0": (("self", "mat2", "shapes"), _bmm),
    "ExpandBackward0": (("shapes",), _expand),
    "SelectBackward0": (("dim", "index", "shapes"), _select),
    "MulBackward1": (("other",), _scale),
    "SafeSoftmaxBackward0": (("result", "dim"), _softmax),
    "SoftmaxBackward0": (("result", "dim"), _softmax),
}


class GraphTangent:
    """``J v`` of ``z`` by pushing tangents forward through ``z``'s retained autograd graph.

    The forward pass already saved what the tangents need (layer inputs, weights, activation
    results, pooling indices, dropout masks), so the tangent pass does only the linearised
    work: per affine layer ``W t_in + V a`` (``V`` the tangent of ``W``), per elementwise or
    pooling node its derivative, and nothing of the values. The graph is read once per batch;
    a node without a rule raises :class:`Unsupported` (the caller then uses reverse mode).

    Args:
        z: The tensor the loss reads (its graph retained).
        params: The parameters ``v`` is a tangent of (trained at this step).
    """

    def __init__(self, z: Tensor, params: Sequence[Tensor]) -> None:
        root = z.grad_fn
        if root is None:
            raise Unsupported("the logits have no graph")
        self.shape = z.shape
        index = {id(p): i for i, p in enumerate(params)}
        order: list[Any] = []
        seen: set[Any] = set()
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:  # post-order: every node after the nodes it reads
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None)
        uses: dict[Any, int] = {}  # references to each node from the nodes that read it
        for node in order:
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    uses[nxt] = uses.get(nxt, 0) + 1
        slot: dict[Any, int] = {}  # tangent slot of each node (leaves of v and rule nodes)
        self.leaves: list[tuple[int, int]] = []
        steps: list[tuple[Any, dict[str, Any], list[Any], Any]] = []
        largest = 0
        for node in order:
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf
                i = index.get(id(node.variable))
                if i is not None:
                    slot[node] = len(slot)
                    self.leaves.append((slot[node], i))
                continue
            name = node.name()
            rule = _RULES.get(name)
            if rule is None:
                raise Unsupported(f"no tangent rule for {name}")
            if any(i != 0 for nxt, i in node.next_functions if nxt is not None):
                raise Unsupported(f"{name} reads a second output of a node")
            saved: dict[str, Any] = {}
            for key in rule[0]:
                if key == "shapes":  # broadcasting rules: the shapes of inputs and output
                    saved[key] = _shapes(node)
                    continue
                attr = "_saved_" + key
                if hasattr(node, attr):
                    saved[key] = getattr(node, attr)
            for value in saved.values():
                if isinstance(value, Tensor):
                    largest = max(largest, value.numel())
            slot[node] = len(slot)
            steps.append((rule[1], saved, [nxt for nxt, _ in node.next_functions], node))
        # per step: its rule, saved fields, input slots (-1: no tangent), output slot and the
        # slots whose last reader it is (their tangents are dropped after it)
        last: dict[int, int] = {}
        for k, (_, _, inputs, _) in enumerate(steps):
            for nxt in inputs:
                if nxt in slot:
                    last[slot[nxt]] = k
        frees: list[list[int]] = [[] for _ in steps]
        for s_, k in last.items():
            frees[k].append(s_)
        # per step also the dtype of the node's output: a rule mixing dtypes (autocast's
        # low-precision values with float32 parameters, e.g. batch norm's) is cast back to it
        self.steps = [
            (
                rule,
                saved,
                tuple(slot.get(n, -1) for n in inputs),
                slot[node],
                tuple(frees[k]),
                node._input_metadata[0].dtype,
            )
            for k, (rule, saved, inputs, node) in enumerate(steps)
        ]
        self.slots = len(slot)
        self.out = slot.get(root, -1)
        #: Working set of a product: the tangents into and out of the widest node.
        self.working_numel = 2 * largest
        self.like = z.detach()
        self.params = list(params)
        self.z = z
        #: Affine layers whose weight gradients the transposed product contracts itself.
        self.sites = [site for node in order if (site := _site(node, index, uses)) is not None]
        covered = {i for _, _, w, b in self.sites for i in (w, b) if i is not None}
        #: Parameters whose part of ``Jᵀw`` autograd computes (not in an affine site).
        self.others = [i for i in range(len(self.params)) if i not in covered]
        #: Elements of ``Jᵀw`` that autograd allocates before they are copied.
        self.copy_numel = sum(self.params[i].numel() for i in self.others)
        #: What the transposed product differentiates for: the sites' outputs, then the others.
        self.grad_inputs: list[Any] = [GradientEdge(node, 0) for node, _, _, _ in self.sites]
        self.grad_inputs += [self.params[i] for i in self.others]

    def jvp(self, tangents: list[Tensor]) -> Tensor:
        """``J v`` for the parameters' tangents ``v`` (``z``-shaped, ``z``'s dtype)."""
        values: list[Tensor | None] = [None] * (self.slots + 1)  # the last: "no tangent"
        params = self.params
        with torch.no_grad():
            for s_, i in self.leaves:
                values[s_] = tangents[i].to(params[i].dtype).view_as(params[i])
            for rule, saved, ins, out, frees, dtype in self.steps:
                args = [values[k] for k in ins]
                for k in frees:
                    values[k] = None
                for t in args:
                    if t is not None:  # some input carries a tangent
                        tangent = rule(saved, args)
                        if tangent is not None and tangent.dtype != dtype:
                            tangent = tangent.to(dtype)
                        values[out] = tangent
                        break
                del args
            result = values[self.out]
            if result is None:
                return torch.zeros_like(self.like)
            return result.reshape(self.shape)

    def vjp_into(self, w: Tensor, outs: list[Tensor]) -> None:
        """``Jᵀw`` written into ``outs`` (one tensor per parameter, parameter-shaped views).

        One back-propagation through the retained graph to the outputs of the affine layers
        (no weight gradients: autograd computes only what reaches the requested outputs), then
        per layer the weight gradient ``gᵀ a`` and the bias gradient ``Σ g`` contracted straight
        into ``outs``; parameters outside such layers get their part from autograd (copied).
        """
        grads = torch.autograd.grad(
            self.z,
            self.grad_inputs,
            w,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        k = len(self.sites)
        with torch.no_grad():
            for (_, a, wi, bi), gy in zip(self.sites, grads[:k]):
                gy = gy.reshape(-1, outs[wi].shape[0])
                _into(outs[wi], torch.mm, gy.t(), a)
                if bi is not None:
                    _into(outs[bi], torch.sum, gy, 0)
            for i, g in zip(self.others, grads[k:]):
                outs[i].copy_(g)


def _into(out: Tensor, fn: Callable[..., Tensor], *args: Any) -> None:
    """``out ← fn(*args)``, computed in place when the dtypes agree (else copied)."""
    if args[0].dtype == out.dtype and out.is_contiguous():
        fn(*args, out=out)
    else:
        out.copy_(fn(*args))


def _leaf(node: Any, index: dict[int, int], uses: dict[Any, int]) -> int | None:
    """The trained parameter behind ``node`` if it is its leaf and read only there."""
    if node is None or uses.get(node, 0) != 1 or not hasattr(node, "variable"):
        return None
    return index.get(id(node.variable))


def _site(
    node: Any, index: dict[int, int], uses: dict[Any, int]
) -> tuple[Any, Tensor, int, int | None] | None:
    """``(node, a, weight, bias)`` for an affine layer ``a Wᵀ (+ b)`` whose ``W`` is trained.

    ``W`` must reach the node only through its transpose and be read nowhere else (its
    gradient is then exactly ``gᵀa``, ``g`` the gradient of the node's output); a bias is
    included when it is a trained parameter read only there, added with factor 1.
    """
    name = node.name()
    if name == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        bias_fn, (t_fn, _), key = node.next_functions[0][0], node.next_functions[2], "mat1"
    elif name == "MmBackward0":
        bias_fn, (t_fn, _), key = None, node.next_functions[1], "self"
    else:
        return None
    if t_fn is None or t_fn.name() != "TBackward0" or uses.get(t_fn, 0) != 1:
        return None
    weight = _leaf(t_fn.next_functions[0][0], index, uses)
    if weight is None:
        return None
    a = getattr(node, "_saved_" + key)  # saved because W requires a gradient
    if not isinstance(a, Tensor) or a.dim() != 2:
        return None
    bias = _leaf(bias_fn, index, uses)
    if bias is not None:
        b, w = bias_fn.variable, t_fn.next_functions[0][0].variable
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            bias = None  # not a per-output bias broadcast over rows: autograd's part
    return node, a, weight, bias


def only_through(loss: Tensor, z: Tensor) -> bool:
    """Whether every path of ``loss``'s graph to a leaf goes through ``z`` (no host sync).

    Walks the (usually tiny) part of the graph between the loss and ``z``: if it reaches no
    leaf that requires a gradient, ``∇_θ L = Jᵀ ∇_z L`` exactly.
    """
    target = z.grad_fn
    if target is None or loss.grad_fn is None:
        return False
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    found = False
    while stack:
        node = stack.pop()
        if node is target:
            found = True
            continue
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf reached around z
            return False
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found
