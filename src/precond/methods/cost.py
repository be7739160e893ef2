"""What a method's math must compute: the input of the benchmark's cost floor.

Each preconditioner describes, for the shapes of its last curvature step, the kernels it cannot
avoid (per phase) and the state it must keep. The harness times the same kernels at the same
shapes on the same machine and adds them to an SGD step; the result is the floor that no
implementation can beat, and ``floor / measured`` is the method's efficiency.

Kernel kinds and their ``shape`` (all matrices dense, dtype ``KernelOp.dtype``):

* ``matmul``: ``(m, k, n)``: ``[m, k] @ [k, n]``; ``bmm``: ``(b, m, k, n)``.
* ``cholesky`` / ``cholesky_inverse`` / ``eigh`` / ``eigvalsh`` / ``qr``: ``(b, n)``: ``b``
  matrices ``n × n`` (``eigvalsh``: eigenvalues only).
* ``elementwise``: ``(numel,)``: one pass over that many elements.
* ``randn``: ``(numel,)``: that many standard normal draws (random probes and sketches).
* ``backward``: ``(count,)``: extra backward passes through the model (vectors from the loss),
  measured as a fraction of the model's own backward pass.
* ``hvp``: ``(count,)``: Hessian-vector products (double backward) through the model.
* ``grad``: ``(count,)``: extra gradients of a loss w.r.t. all parameters (a full backward
  pass with weight gradients, measured as the model's own backward).
* ``forward``: ``(count,)``: extra forward passes through the model (building the graph), e.g.
  K-BFGS's pass at the previous parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = ["CostModel", "KernelOp", "Phase", "add_patches", "eigh_workspace_numel"]


class Phase(str, Enum):
    """When a kernel runs."""

    EXTRA_BACKWARD = "extra_backward"  # every curvature step
    CURVATURE = "curvature"  # every curvature step
    REFRESH = "refresh"  # every preconditioner step
    APPLY = "apply"  # every step

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class KernelOp:
    """One unavoidable kernel.

    Attributes:
        phase: When it runs.
        kind: Kernel kind (see the module docstring).
        shape: Its shape parameters.
        count: How many times per occurrence of the phase.
        dtype: Precision.
    """

    phase: Phase
    kind: str
    shape: tuple[int, ...]
    count: int = 1
    dtype: torch.dtype = torch.float32


@dataclass
class CostModel:
    """The unavoidable work and state of a method for given shapes.

    Attributes:
        ops: Kernels per phase.
        state_numel: Elements of persistent state the math must keep (statistics, factors,
            their inverses or roots), in ``state_dtype``.
        transient_numel: Elements that must exist at once during a step beyond SGD's
            (per-example gradients, sketches, back-propagated vectors).
        state_dtype: Precision of the state.
    """

    ops: list[KernelOp] = field(default_factory=list)
    state_numel: int = 0
    transient_numel: int = 0
    state_dtype: torch.dtype = torch.float32

    def add(self, phase: Phase, kind: str, shape: tuple[int, ...], count: int = 1) -> None:
        """Append a kernel."""
        self.ops.append(KernelOp(phase, kind, tuple(int(s) for s in shape), int(count)))


def eigh_workspace_numel(n: int) -> int:
    """Elements of the workspace of one ``n × n`` symmetric eigendecomposition.

    LAPACK's divide-and-conquer ``syevd`` (what ``torch.linalg.eigh`` calls on a CPU) needs
    ``1 + 6n + 2n²`` elements of workspace besides the ``n × n`` eigenvector output; a batch
    is decomposed one matrix at a time with the same workspace.
    """
    return 1 + 6 * n + 2 * n * n


def add_patches(cm: CostModel, layer: Any, examples: int, positions: int) -> None:
    """Forming a layer's expanded inputs once per curvature step (im2col patches).

    Statistics that contract a convolution's inputs over its positions (input factors,
    per-example Jacobians) read them as a dense ``[examples · positions, groups · width]``
    array, which must be copied out of the input: one element-wise pass over that many
    elements. Nothing for layers whose canonical inputs are views of the input (linear
    layers, also on sequences) or indices (embeddings).

    Args:
        cm: The cost model to extend.
        layer: The layer (its adapter, module and canonical shape ``(G, d_out, d_in')``).
        examples: Examples whose inputs are expanded.
        positions: Positions per example.
    """
    adapter = getattr(layer, "adapter", None)
    if positions <= 1 or adapter is None or not adapter.expands_inputs:
        return
    width = adapter.in_features(layer.module)
    cm.add(Phase.CURVATURE, "elementwise", (examples * positions * layer.shape[0] * width,))
