"""The adapter protocol: every supported layer is a grouped affine map on canonical inputs.

Shape conventions used throughout precond:

* ``N``: examples in the batch (dimension 0 of every layer input; batch-first layouts).
* ``S``: positions that share the weight within one example (sequence tokens, conv patches,
  spatial positions of a norm layer; 1 for a plain Linear on ``[N, d_in]`` inputs).
* ``G``: independent groups of the layer (conv ``groups``; one per unit of a norm layer).
* ``d_in`` / ``d_out``: input and output width per group.
* ``K``: back-propagated vectors (classes for exact Fisher, samples for MC Fisher, 1 otherwise).

A layer computes ``y[n, s, g] = W̃[g] @ ã[n, s, g]`` where ``ã`` is the canonical input with a
trailing 1 appended when the bias is trained, and ``W̃[g]`` (``[d_out, d_in']``) is the canonical
weight matrix: the trained weight columns followed by the trained bias column. The gradient of
the loss with respect to ``W̃[g]`` is ``Σ_{n,s} g[n,s,g] ã[n,s,g]^T``, where ``g`` are the output
gradients. Everything downstream (Fisher blocks, Kronecker factors, per-example gradients) works
on this form only; adapters are the one place that knows module types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Adapter", "register_adapter", "find_adapter", "registered_adapters"]


class Adapter(ABC):
    """Reduces one kind of module to the canonical grouped affine form.

    Subclasses set ``module_types`` and implement the abstract methods. The base class derives
    the trained-parameter bookkeeping from :meth:`weight` and :meth:`bias`.
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Scale-and-shift layers (norm layers): every group is one unit with a scalar input.
    elementwise: ClassVar[bool] = False
    #: Inputs are indices into the weight (embeddings): the canonical input is one-hot.
    one_hot_input: ClassVar[bool] = False
    #: Canonical inputs are formed by copying the input out (im2col patches of a convolution:
    #: each input element appears at several positions), not by viewing it.
    expands_inputs: ClassVar[bool] = False
    #: Each example's canonical inputs depend on that example's input alone (false for batch
    #: normalisation), so they may be formed for a chunk of examples at a time.
    per_example_inputs: ClassVar[bool] = True

    # ---- parameters -------------------------------------------------------------------------
    def weight(self, module: nn.Module) -> nn.Parameter | None:
        """The module's weight parameter, if it has one."""
        w = getattr(module, "weight", None)
        return w if isinstance(w, nn.Parameter) else None

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        """The module's bias parameter, if it has one."""
        b = getattr(module, "bias", None)
        return b if isinstance(b, nn.Parameter) else None

    def trains_weight(self, module: nn.Module) -> bool:
        """Whether the weight exists and requires a gradient."""
        w = self.weight(module)
        return w is not None and w.requires_grad

    def trains_bias(self, module: nn.Module) -> bool:
        """Whether the bias exists and requires a gradient."""
        b = self.bias(module)
        return b is not None and b.requires_grad

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        """Trained parameters in canonical order (weight, then bias)."""
        out: list[nn.Parameter] = []
        w, b = self.weight(module), self.bias(module)
        if w is not None and w.requires_grad:
            out.append(w)
        if b is not None and b.requires_grad:
            out.append(b)
        return out

    def check(self, module: nn.Module) -> str | None:
        """Return why ``module`` cannot be handled despite its type, or ``None``."""
        return None

    # ---- canonical shapes -------------------------------------------------------------------
    @abstractmethod
    def groups(self, module: nn.Module) -> int:
        """Number of groups ``G``."""

    @abstractmethod
    def in_features(self, module: nn.Module) -> int:
        """Input width per group ``d_in`` (weight columns, without the bias column)."""

    @abstractmethod
    def out_features(self, module: nn.Module) -> int:
        """Output width per group ``d_out``."""

    def trained(self, module: nn.Module) -> tuple[bool, bool]:
        """``(weight trained, bias trained)`` as of now (layers freeze this at construction)."""
        return self.trains_weight(module), self.trains_bias(module)

    def in_features_aug(self, module: nn.Module, trained: tuple[bool, bool] | None = None) -> int:
        """Columns of the canonical weight ``W̃``: trained weight columns plus the bias column.

        Args:
            module: The module.
            trained: ``(weight, bias)`` flags; ``None`` reads the parameters' ``requires_grad``.
        """
        w, b = self.trained(module) if trained is None else trained
        return self.in_features(module) * int(w) + int(b)

    # ---- canonical tensors ------------------------------------------------------------------
    @abstractmethod
    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """Canonical inputs ``[N, S, G, d_in]`` from the module's forward input."""

    @abstractmethod
    def output_grads(self, module: nn.Module, gy: Tensor) -> Tensor:
        """Canonical output gradients ``[..., N, S, G, d_out]`` from gradients w.r.t. the output.

        Leading dimensions (back-propagated vectors) are kept.
        """

    def input_indices(self, module: nn.Module, x: Tensor) -> Tensor:
        """For one-hot inputs: the index of the hot entry ``[N, S]`` (-1 where none is hot)."""
        raise NotImplementedError(f"{type(self).__name__} has no one-hot inputs")

    @abstractmethod
    def weight_to_matrix(self, module: nn.Module, w: Tensor) -> Tensor:
        """Weight-shaped ``[..., *weight.shape]`` to canonical ``[..., G, d_out, d_in]``."""

    @abstractmethod
    def matrix_to_weight(self, module: nn.Module, m: Tensor) -> Tensor:
        """Canonical ``[..., G, d_out, d_in]`` to weight-shaped ``[..., *weight.shape]``."""

    def bias_to_matrix(self, module: nn.Module, b: Tensor) -> Tensor:
        """Bias-shaped ``[..., *bias.shape]`` to canonical ``[..., G, d_out, 1]``."""
        lead = b.shape[: b.dim() - self._bias_ndim(module)]
        return b.reshape(*lead, self.groups(module), self.out_features(module), 1)

    def matrix_to_bias(self, module: nn.Module, m: Tensor) -> Tensor:
        """Canonical ``[..., G, d_out, 1]`` to bias-shaped ``[..., *bias.shape]``."""
        b = self.bias(module)
        assert b is not None
        return m.reshape(*m.shape[:-3], *b.shape)

    def _bias_ndim(self, module: nn.Module) -> int:
        b = self.bias(module)
        return 1 if b is None else b.dim()

    # ---- conversions over the trained parameters --------------------------------------------
    def to_matrix(
        self, module: nn.Module, tensors: list[Tensor], trained: tuple[bool, bool] | None = None
    ) -> Tensor:
        """Parameter-shaped tensors (one per trained parameter) to canonical ``W̃`` form.

        Args:
            module: The module.
            tensors: One tensor per trained parameter, each ``[..., *param.shape]`` with the same
                leading dimensions.
            trained: ``(weight, bias)`` flags; ``None`` reads the parameters' ``requires_grad``.

        Returns:
            ``[..., G, d_out, d_in']``.
        """
        w, b = self.trained(module) if trained is None else trained
        parts: list[Tensor] = []
        i = 0
        if w:
            parts.append(self.weight_to_matrix(module, tensors[i]))
            i += 1
        if b:
            parts.append(self.bias_to_matrix(module, tensors[i]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def from_matrix(
        self, module: nn.Module, m: Tensor, trained: tuple[bool, bool] | None = None
    ) -> list[Tensor]:
        """Canonical ``[..., G, d_out, d_in']`` to parameter-shaped tensors (trained ones).

        Args:
            module: The module.
            m: Canonical tensor.
            trained: ``(weight, bias)`` flags; ``None`` reads the parameters' ``requires_grad``.

        Returns:
            One tensor per trained parameter.
        """
        w, b = self.trained(module) if trained is None else trained
        out: list[Tensor] = []
        if w:
            d = self.in_features(module)
            out.append(self.matrix_to_weight(module, m[..., :d]))
            m = m[..., d:]
        if b:
            out.append(self.matrix_to_bias(module, m))
        return out


_ADAPTERS: dict[type[nn.Module], Adapter] = {}


def register_adapter(
    module_type: type[nn.Module], adapter: Adapter, overwrite: bool = False
) -> None:
    """Register the adapter for a module class (and, by inheritance, its subclasses).

    Args:
        module_type: The ``nn.Module`` subclass.
        adapter: The adapter instance.
        overwrite: Replace an existing registration instead of raising.

    Raises:
        ValueError: If ``module_type`` is already registered and ``overwrite`` is false.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"Invalid module_type: {module_type!r}. Must be an nn.Module subclass.")
    if module_type in _ADAPTERS and not overwrite:
        raise ValueError(
            f"Invalid module_type: {module_type.__name__}. It already maps to "
            f"{type(_ADAPTERS[module_type]).__name__}; pass overwrite=True to replace it."
        )
    _ADAPTERS[module_type] = adapter


def find_adapter(module: nn.Module) -> Adapter | None:
    """The adapter for a module: its exact class first, then the nearest registered base class.

    Args:
        module: The module.

    Returns:
        The adapter, or ``None`` if no class in the module's MRO is registered.
    """
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def registered_adapters() -> dict[type[nn.Module], Adapter]:
    """A copy of the adapter registry."""
    return dict(_ADAPTERS)
