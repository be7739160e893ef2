"""Name → (gradient maker, config) registry.

Every method registers itself under a short name, which gives it a place in
:func:`methods`, in :func:`make_gradient_maker`, in the CLI and in the contract test suite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from .config import PreconditioningConfig
from .grad_maker import GradientMaker
from .validation import invalid

__all__ = ["MethodInfo", "register_method", "methods", "method_info", "make_gradient_maker"]

T = TypeVar("T", bound=type[GradientMaker])


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    Attributes:
        name: Registry name (``"kfac"``).
        maker: The gradient maker class.
        config: Its config class.
        description: One line for ``precond list``.
        family: ``"baseline"``, ``"fisher"`` (curvature of the current batch) or ``"global"``
            (statistics accumulated across steps).
    """

    name: str
    maker: type[GradientMaker]
    config: type[PreconditioningConfig]
    description: str
    family: str = "fisher"


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str, description: str, *, family: str = "fisher", overwrite: bool = False
) -> Any:
    """Class decorator registering a gradient maker under ``name``.

    Args:
        name: Short registry name.
        description: One-line description.
        family: Method family (``"baseline"``, ``"fisher"``, ``"global"``).
        overwrite: Replace an existing registration instead of raising.

    Returns:
        The decorator.
    """

    def decorator(cls: T) -> T:
        if name in _METHODS and not overwrite:
            raise ValueError(
                f"Invalid name: {name!r}. It is already registered to "
                f"{_METHODS[name].maker.__name__}; pass overwrite=True to replace it."
            )
        _METHODS[name] = MethodInfo(name, cls, cls.config_class, description, family)
        return cls

    return decorator


def methods() -> dict[str, str]:
    """Registered methods and their one-line descriptions, in registration order.

    Returns:
        ``{name: description}``.
    """
    return {name: info.description for name, info in _METHODS.items()}


def method_info(name: str) -> MethodInfo:
    """The registration of ``name``.

    Args:
        name: Registry name.

    Returns:
        The :class:`MethodInfo`.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in _METHODS:
        raise invalid("method", name, f"Registered: {tuple(_METHODS)}")
    return _METHODS[name]


def make_gradient_maker(name: str, model: nn.Module, **options: Any) -> GradientMaker:
    """Build a registered gradient maker from config options.

    Args:
        name: Registry name (see :func:`methods`).
        model: The model.
        **options: Fields of the method's config class.

    Returns:
        The gradient maker.

    Raises:
        ValueError: For an unknown method or an option its config does not have.
    """
    info = method_info(name)
    known = {f.name for f in dataclasses.fields(info.config)}
    for key in options:
        if key not in known:
            raise invalid("option", key, f"{info.config.__name__} accepts: {tuple(sorted(known))}")
    return info.maker(model, info.config(**options))


register_method(
    "plain",
    "ordinary gradient (SGD baseline): one forward and one backward pass",
    family="baseline",
)(GradientMaker)
