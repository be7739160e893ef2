"""Memory held by the graphs that second-derivative products differentiate.

A Hessian-vector product by double backward needs the graph of the gradient (built with
``create_graph=True``), a GGN product the graph of ``Jᵀu``: tensors saved by those backward
passes beyond the ones the forward pass saved. :class:`SavedCounter` counts them as they are
saved, so that cost models declare exactly that transient memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SavedCounter", "gradient_with_saved"]


class SavedCounter:
    """Counts the elements of tensors saved by the graphs built inside the ``with`` block.

    Tensors that are parameters or outputs of the forward pass (their ``grad_fn`` is not newer
    than the loss's) are not counted: they exist without the graph. Storages count once. The
    hook stores a detached alias: the tensor itself would make a saved output hold its own
    ``grad_fn`` (a reference cycle that keeps the graph alive).
    """

    def __init__(self, loss: Tensor) -> None:
        fn = loss.grad_fn
        self._seq = fn._sequence_nr() if fn is not None else -1
        self._seen: set[int] = set()
        self.numel = 0
        #: Elements of the largest storage counted.
        self.largest = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> Tensor:
        fn = t.grad_fn
        if fn is not None and fn._sequence_nr() > self._seq:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                self.numel += n
                self.largest = max(self.largest, n)
        return t.detach()

    @property
    def working_numel(self) -> int:
        """Working set of differentiating the counted graph: two vectors of its largest node."""
        return 2 * self.largest

    def __enter__(self) -> SavedCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: Tensor) -> Tensor:
    return t


def gradient_with_saved(loss: Tensor, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
    """``∇_θ L`` built with ``create_graph=True``, and the transient memory of its products.

    Args:
        loss: Scalar loss (its forward graph is kept).
        params: Parameters.

    Returns:
        The gradients (zeros for unused parameters) and the elements of the tensors the
        gradient's graph saved beyond the forward pass's plus the working set of a product's
        second pass (see :class:`SavedCounter`).
    """
    with SavedCounter(loss) as counter:
        grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out, counter.numel + counter.working_numel
