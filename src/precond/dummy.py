"""Placeholders for a model's output that record how the loss reads it.

``setup_model_call`` returns a :class:`Dummy` standing for the output. Indexing it, taking an
attribute, calling it or doing arithmetic on it records an expression, e.g.
``dummy_y.view(-1, dummy_y.size(-1))`` or ``dummy_y.logits / 2``. On every step the expression
is evaluated against the real output. Dummies may appear anywhere inside call arguments
(nested in tuples, lists and dicts).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

__all__ = ["Dummy", "DummyError", "evaluate", "contains_dummy"]


class DummyError(ValueError):
    """A dummy that does not fit the model output, or one used where it cannot be."""


_BINARY_OPS: dict[str, tuple[Callable[[Any, Any], Any], str]] = {
    "__add__": (operator.add, "+"),
    "__sub__": (operator.sub, "-"),
    "__mul__": (operator.mul, "*"),
    "__truediv__": (operator.truediv, "/"),
    "__floordiv__": (operator.floordiv, "//"),
    "__pow__": (operator.pow, "**"),
    "__matmul__": (operator.matmul, "@"),
}


class Dummy:
    """A recorded expression over the output of one ``setup_model_call``.

    Users never construct dummies themselves; they receive the root dummy from
    ``setup_model_call`` and derive others from it.
    """

    __slots__ = ("_args", "_op", "_parent", "_token")
    _args: tuple[Any, ...]
    _op: str
    _parent: Dummy | None
    _token: object

    def __init__(
        self,
        token: object,
        parent: Dummy | None = None,
        op: str = "root",
        args: tuple[Any, ...] = (),
    ) -> None:
        object.__setattr__(self, "_token", token)
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_op", op)
        object.__setattr__(self, "_args", args)

    def _derive(self, op: str, *args: Any) -> Dummy:
        return Dummy(self._token, self, op, args)

    def __getattr__(self, name: str) -> Dummy:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._derive("getattr", name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise DummyError(f"Cannot set attribute {name!r} on a dummy output ({self!r}).")

    def __getitem__(self, key: Any) -> Dummy:
        return self._derive("getitem", key)

    def __call__(self, *args: Any, **kwargs: Any) -> Dummy:  # noqa: D102
        return self._derive("call", args, kwargs)

    def __neg__(self) -> Dummy:
        return self._derive("neg")

    def __iter__(self) -> Any:
        raise DummyError(
            f"Cannot unpack or iterate over a dummy output ({self!r}); index it instead, "
            "e.g. dummy_y[0]."
        )

    def __bool__(self) -> bool:
        raise DummyError(
            f"A dummy output ({self!r}) has no truth value: it stands for a tensor that exists "
            "only inside forward_and_backward()."
        )

    def __len__(self) -> int:
        raise DummyError(f"A dummy output ({self!r}) has no length before the model runs.")

    def __repr__(self) -> str:
        return _describe(self)

    def __reduce__(self) -> Any:
        raise DummyError("Dummy outputs cannot be pickled or copied.")


def _make_binary(name: str, reflected: bool) -> Callable[[Dummy, Any], Dummy]:
    def method(self: Dummy, other: Any) -> Dummy:
        return self._derive("rbinop" if reflected else "binop", name, other)

    method.__name__ = name
    return method


for _name in _BINARY_OPS:
    setattr(Dummy, _name, _make_binary(_name, reflected=False))
    setattr(Dummy, "__r" + _name[2:], _make_binary(_name, reflected=True))


def _describe(d: Dummy) -> str:
    if d._op == "root":
        return "y"
    base = _describe(d._parent) if d._parent is not None else "?"
    if d._op == "getattr":
        return f"{base}.{d._args[0]}"
    if d._op == "getitem":
        return f"{base}[{d._args[0]!r}]"
    if d._op == "call":
        args, kwargs = d._args
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"{base}({', '.join(parts)})"
    if d._op == "neg":
        return f"-{base}"
    symbol = _BINARY_OPS[d._args[0]][1]
    if d._op == "binop":
        return f"({base} {symbol} {d._args[1]!r})"
    return f"({d._args[1]!r} {symbol} {base})"


def contains_dummy(obj: Any) -> bool:
    """Whether a (possibly nested) argument structure contains a dummy.

    Args:
        obj: A value, or tuples, lists and dicts of values.

    Returns:
        ``True`` if any leaf is a :class:`Dummy`.
    """
    if isinstance(obj, Dummy):
        return True
    if isinstance(obj, tuple | list):
        return any(contains_dummy(o) for o in obj)
    if isinstance(obj, dict):
        return any(contains_dummy(v) for v in obj.values())
    return False


def evaluate(obj: Any, token: object, output: Any) -> Any:
    """Replace every dummy in a nested structure by its value for a model output.

    Args:
        obj: A dummy, or a value, or tuples/lists/dicts of those.
        token: The token of the current ``setup_model_call``; dummies from another call are
            rejected.
        output: The model output the root dummy stands for.

    Returns:
        The structure with dummies evaluated.

    Raises:
        DummyError: If a dummy comes from another ``setup_model_call`` or does not fit the output.
    """
    if isinstance(obj, Dummy):
        return _evaluate_dummy(obj, token, output)
    if isinstance(obj, tuple):
        return tuple(evaluate(o, token, output) for o in obj)
    if isinstance(obj, list):
        return [evaluate(o, token, output) for o in obj]
    if isinstance(obj, dict):
        return {k: evaluate(v, token, output) for k, v in obj.items()}
    return obj


def _evaluate_dummy(d: Dummy, token: object, output: Any) -> Any:
    if d._token is not token:
        raise DummyError(
            f"The dummy {d!r} comes from an earlier setup_model_call(); use the dummy returned "
            "by the latest call."
        )
    if d._op == "root":
        return output
    assert d._parent is not None
    base = _evaluate_dummy(d._parent, token, output)
    try:
        if d._op == "getattr":
            return getattr(base, d._args[0])
        if d._op == "getitem":
            return base[evaluate(d._args[0], token, output)]
        if d._op == "call":
            args, kwargs = d._args
            return base(*evaluate(args, token, output), **evaluate(kwargs, token, output))
        if d._op == "neg":
            return -base
        fn = _BINARY_OPS[d._args[0]][0]
        other = evaluate(d._args[1], token, output)
        return fn(base, other) if d._op == "binop" else fn(other, base)
    except DummyError:
        raise
    except Exception as exc:
        raise DummyError(
            f"The dummy {d!r} does not fit the model output (output type "
            f"{type(output).__name__}; evaluating it raised {type(exc).__name__}: {exc})."
        ) from exc
