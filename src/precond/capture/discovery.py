"""Splitting a model into preconditioned layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import PreconditioningConfig, matches_with_ancestors
from ..enums import UnsupportedPolicy
from .base import find_adapter
from .stats import Layer

__all__ = ["LayerPartition", "UnsupportedModuleError", "find_layers"]


class UnsupportedModuleError(ValueError):
    """A module with trained parameters that the method cannot precondition."""


@dataclass
class LayerPartition:
    """How a model's trained parameters are handled.

    Attributes:
        layers: Preconditioned layers (with an adapter when the method needs one).
        fallback: Layers of unsupported modules preconditioned by the diagonal fallback.
        plain: Parameters that keep their plain gradient (ignored or skipped modules).
    """

    layers: list[Layer] = field(default_factory=list)
    fallback: list[Layer] = field(default_factory=list)
    plain: list[nn.Parameter] = field(default_factory=list)

    @property
    def all_layers(self) -> list[Layer]:
        """Preconditioned and fallback layers."""
        return self.layers + self.fallback


def _ignored(name: str, module: nn.Module, config: PreconditioningConfig, model: nn.Module) -> bool:
    return matches_with_ancestors(config.ignore_modules, model, name)


def find_layers(
    model: nn.Module,
    config: PreconditioningConfig,
    *,
    needs_adapter: bool,
    method: str = "this method",
) -> LayerPartition:
    """Assign every trained parameter of ``model`` to a layer, the fallback, or plain gradients.

    Each module's own (non-recursive) trained parameters form one unit. With
    ``needs_adapter=True`` a unit is preconditioned only if its module has a capture adapter;
    otherwise the ``unsupported`` policy decides.

    Args:
        model: The model.
        config: Supplies ``ignore_modules`` and ``unsupported``.
        needs_adapter: Whether the method needs layer inputs/output gradients (Fisher-type
            methods) or only parameter gradients (Shampoo-type methods).
        method: The method's name for error messages.

    Returns:
        The partition.

    Raises:
        UnsupportedModuleError: For an unsupported module under the ``error`` policy.
    """
    part = LayerPartition()
    seen: set[int] = set()
    for name, module in model.named_modules():
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        tied = [p for p in direct if id(p) in seen]
        own = [p for p in direct if id(p) not in seen]
        for p in own:
            seen.add(id(p))
        if tied and needs_adapter and not _ignored(name, module, config, model):
            # The parameter is preconditioned with its first owner's statistics only; this
            # module's use of it is not captured, which the user must accept explicitly.
            _unsupported(
                name,
                module,
                config,
                method,
                "it shares (ties) a parameter with a module visited before it",
                part,
                own,
            )
            continue
        if not own:
            continue
        if _ignored(name, module, config, model):
            part.plain.extend(own)
            continue
        adapter = find_adapter(module)
        reason = None
        if adapter is not None:
            reason = adapter.check(module)
            covered = {id(p) for p in adapter.params(module)}
            extra = [p for p in own if id(p) not in covered]
            if extra and reason is None:
                reason = "it has parameters besides weight and bias"
        else:
            reason = "no capture adapter is registered for its class"
        if adapter is not None and reason is None:
            part.layers.append(Layer(name, module, adapter, adapter.params(module)))
            continue
        sparse = bool(getattr(module, "sparse", False))  # nn.Embedding(Bag)(sparse=True)
        if sparse:
            # no method works on sparse gradients (nor the diagonal fallback)
            _unsupported(name, module, config, method, _SPARSE, part, own, sparse=True)
            continue
        if not needs_adapter:
            part.layers.append(Layer(name, module, None, own))
            continue
        _unsupported(name, module, config, method, reason or "", part, own)
    return part


_SPARSE = "sparse gradients (sparse=True) are not supported"


def _unsupported(
    name: str,
    module: nn.Module,
    config: PreconditioningConfig,
    method: str,
    reason: str,
    part: LayerPartition,
    own: list[nn.Parameter],
    *,
    sparse: bool = False,
) -> None:
    policy = UnsupportedPolicy(config.unsupported)
    label = f"'{name or '<root>'}' ({type(module).__name__})"
    if sparse and policy is not UnsupportedPolicy.SKIP:
        raise UnsupportedModuleError(
            f"Invalid module {label}: {method} cannot precondition it ({reason}; neither can "
            f"the diagonal fallback of unsupported={policy.value!r}). Construct it with "
            "sparse=False, exclude it with ignore_modules=[...], or pass unsupported='skip' "
            "(plain sparse gradient)."
        )
    if policy is UnsupportedPolicy.ERROR:
        raise UnsupportedModuleError(
            f"Invalid module {label}: {method} cannot precondition it ({reason}). "
            "Register an adapter with precond.capture.register_adapter(...), exclude it "
            "with ignore_modules=[...], or pass unsupported='skip' (plain gradient) or "
            "unsupported='diag' (diagonal fallback)."
        )
    if not own:
        return
    if policy is UnsupportedPolicy.SKIP:
        part.plain.extend(own)
    else:
        part.fallback.append(Layer(name, module, None, own))
