"""Hooks that record layer inputs and output gradients, only while a step needs them.

Hooks are registered when :meth:`Recorder.record` is entered and removed when it exits, so steps
that need no statistics run the model with no hook at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .stats import GRAD_TAG, Layer, LayerStats

__all__ = ["Recorder", "HookCounter"]


class HookCounter:
    """Counts hook invocations (tests use it to prove that idle steps do no capture work)."""

    forward_calls: int = 0
    grad_calls: int = 0

    @classmethod
    def reset(cls) -> None:
        """Zero the counters."""
        cls.forward_calls = 0
        cls.grad_calls = 0


def _in_backward() -> bool:
    """Whether a backward pass is running (a forward call now is a recomputation).

    Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) runs the forward of its
    block again inside the backward pass to restore the activations it dropped; the gradients
    still flow through the first call's autograd nodes, so the recomputed calls are not new
    calls of the layer (recording them would hold each input again for nothing).
    """
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            return v
    return None


class Recorder:
    """Records :class:`~precond.capture.stats.LayerStats` for a fixed list of layers."""

    def __init__(self, layers: list[Layer], keep_outputs: bool = False) -> None:
        self.layers = [layer for layer in layers if layer.adapter is not None]
        self._tag: str | None = None
        self._stats: dict[str, LayerStats] | None = None
        #: Keep the layers' output tensors in :attr:`LayerStats.raw_outputs` (K-BFGS reads the
        #: pre-activations). Off by default: the outputs are then freed as soon as the model no
        #: longer needs them (back-propagation to the outputs uses their autograd edges, not the
        #: tensors).
        self.keep_outputs = keep_outputs
        #: Record each call's canonical outputs summed over rows (:attr:`LayerStats.output_sums`,
        #: K-BFGS's mean pre-activations): a reduction in the forward hook, no output kept.
        self.output_sums = False

    @contextmanager
    def record(self, batch_size: int, *, grads: bool = False) -> Iterator[dict[str, LayerStats]]:
        """Record inputs (and, if ``grads``, output gradients of ``loss.backward()``).

        Args:
            batch_size: Number of examples ``N`` of this step.
            grads: Also record the output gradients of the ordinary backward pass under the tag
                ``"grad"``.

        Yields:
            ``{layer name: LayerStats}``, filled as the forward and backward passes run.
        """
        stats = {layer.name: LayerStats(layer, batch_size) for layer in self.layers}
        handles: list[RemovableHandle] = []
        self._stats = stats
        self._tag = GRAD_TAG if grads else None
        for layer in self.layers:
            handles.append(
                layer.module.register_forward_hook(
                    self._make_forward_hook(stats[layer.name], grads), with_kwargs=True
                )
            )
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()
            self._tag = None
            self._stats = None
            # A recorded output holds (through its grad_fn) the tensor hook whose closure holds
            # these stats: a cycle through autograd nodes that Python's gc cannot collect, which
            # kept every curvature step's statistics alive. Detached values break the cycle and
            # stay readable (K-BFGS uses the pre-activations after the recording).
            # The autograd edges are only needed while recording.
            for st in stats.values():
                st.raw_outputs = [o.detach() for o in st.raw_outputs]
                st.output_edges = []

    def _make_forward_hook(self, st: LayerStats, grads: bool) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not torch.is_grad_enabled() or _in_backward():
                return
            HookCounter.forward_calls += 1
            x = _first_tensor(args, kwargs)
            if x is None or not isinstance(output, Tensor):
                return
            call = st.add_call(
                x, output, keep_output=self.keep_outputs, output_sum=self.output_sums
            )
            # The loss's own backward records the output gradients through tensor hooks.
            if grads and output.requires_grad:
                output.register_hook(self._make_grad_hook(st, call))

        return hook

    def _make_grad_hook(self, st: LayerStats, call: int) -> Any:
        # The hook lives on the output's autograd node, which outlives the recording as long as
        # anything holds the graph (e.g. the returned output). A strong reference to the stats
        # would keep this step's inputs, patches and gradients alive until the graph dies (into
        # the next step); a weak one lets them go when the step drops its statistics.
        ref = weakref.ref(st)

        def hook(gy: Tensor) -> None:
            tag = self._tag
            st = ref()
            if tag is None or self._stats is None or st is None:
                return
            HookCounter.grad_calls += 1
            if tag == GRAD_TAG:
                st.set_grad(tag, call, gy)

        return hook

    def backprop(
        self, root: Tensor, vectors: Tensor, tag: str, *, retain_graph: bool = True
    ) -> None:
        """Back-propagate ``K`` vectors from ``root`` and record output gradients under ``tag``.

        Nothing is accumulated into ``.grad`` and no weight gradient is computed: the gradients
        are taken with respect to the autograd edges that the layers' outputs had when the
        layers produced them. Those are the gradients of the outputs as the layers computed them,
        also when an output was later modified in place (the edge still leads into the layer's
        own node), and they need no reference to the output tensors themselves.

        Args:
            root: The tensor the vectors are gradients for (e.g. the logits passed to the loss).
            vectors: ``[K, *root.shape]``.
            tag: Name under which the gradients are stored (``[K, *output.shape]`` per call).
            retain_graph: Keep the graph after the last vector (``False`` frees each saved
                tensor as soon as the last pass has used it, as an ordinary backward does).
        """
        stats = self._stats
        if stats is None:
            raise RuntimeError("Recorder.backprop() must run inside Recorder.record()")
        if tag == GRAD_TAG:
            raise ValueError(f"Invalid tag: {tag!r}. It is reserved for the loss's own backward.")
        index = [
            (st, call)
            for st in stats.values()
            for call, edge in enumerate(st.output_edges)
            if edge is not None
        ]
        if not index:
            return
        edges = [e for st, call in index if (e := st.output_edges[call]) is not None]
        per_output: list[list[Tensor | None]] = [[] for _ in edges]
        previous, self._tag = self._tag, None
        try:
            last = vectors.shape[0] - 1
            for k in range(vectors.shape[0]):
                grads = torch.autograd.grad(
                    root,
                    edges,
                    vectors[k],
                    retain_graph=retain_graph or k < last,
                    allow_unused=True,
                )
                HookCounter.grad_calls += len(edges)
                for i, gy in enumerate(grads):
                    per_output[i].append(gy)
        finally:
            self._tag = previous
        for (st, call), gys in zip(index, per_output):
            st.set_grad(tag, call, _stack(gys))


def _stack(gys: Sequence[Tensor | None]) -> Tensor | None:
    """``[K, *output.shape]`` from one gradient per vector (a view when ``K = 1``)."""
    if any(g is None for g in gys):
        return None
    if len(gys) == 1:
        assert gys[0] is not None
        return gys[0].unsqueeze(0)
    return torch.stack([g for g in gys if g is not None])
