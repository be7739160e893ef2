"""The training-loop interface shared by every method.

.. code-block:: python

    gm = precond.GradientMaker(model)              # or KfacGradientMaker(model, KfacConfig())
    dummy_y = gm.setup_model_call(model, x)        # how to call the model
    gm.setup_loss_call(F.cross_entropy, dummy_y, t)
    y, loss = gm.forward_and_backward()            # p.grad holds the (preconditioned) gradient
    optimizer.step()

The plain :class:`GradientMaker` does an ordinary forward and backward pass, so switching a script
to or from preconditioning changes one line.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .config import PreconditioningConfig
from .curvature.loss import LossInputs, LossSpec, parse_loss_call
from .dummy import Dummy, DummyError, contains_dummy, evaluate
from .enums import LossKind
from .precision import AutocastRegion, ambient_autocast, autocast_off, autocast_on
from .validation import coerce_enum, invalid

__all__ = ["GradientMaker", "LogitsRepr", "ProtocolError", "caller_autocast", "uncompiled"]


_F = TypeVar("_F", bound=Callable[..., Any])


def uncompiled(fn: Any) -> Any:
    """The module or function that ``torch.compile`` wrapped (``fn`` itself if not compiled).

    The compiled and the original module share their parameters; steps that differentiate
    the gradient (Hessian or GGN products by a double backward) call the original, since
    ``torch.compile``'s autograd does not support double backward.
    """
    orig = getattr(fn, "_orig_mod", None)
    if isinstance(fn, nn.Module) and isinstance(orig, nn.Module):
        return orig
    inner = getattr(fn, "_torchdynamo_orig_callable", None)
    return fn if inner is None else inner


def caller_autocast(method: _F) -> _F:
    """Run a gradient maker's entry point with the caller's autocast around model calls only.

    The caller's autocast regions are recorded and turned off for the call; :meth:`forward`
    (and any replay of the model call) turns them back on (:mod:`precond.precision`). Calls
    nested in another entry point, and calls without autocast, run as they are.
    """

    @functools.wraps(method)
    def wrapper(self: GradientMaker, *args: Any, **kwargs: Any) -> Any:
        if self._autocast:  # inside another entry point already
            return method(self, *args, **kwargs)
        regions = ambient_autocast(self._device().type)
        if not regions:
            return method(self, *args, **kwargs)
        self._autocast = regions
        try:
            with autocast_off(regions):
                return method(self, *args, **kwargs)
        finally:
            self._autocast = ()

    return wrapper  # type: ignore[return-value]


class ProtocolError(RuntimeError):
    """The call protocol was used out of order (e.g. ``forward_and_backward`` before setup)."""


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class LogitsRepr:
    """Where the logits are and which likelihood they parametrise (``setup_logits_repr``).

    Attributes:
        dummy: Expression of the model output giving the logits.
        loss_type: The likelihood: ``cross_entropy``, ``mse`` or ``bce_with_logits``.
        reduction: ``"mean"`` or ``"sum"``: how the model's own loss reduces over terms.
        targets: Expression (or tensor) of the true targets, needed by the empirical Fisher when
            the loss is not set up with ``setup_loss_call``.
        loss_kwargs: Further loss options (``ignore_index``, ``label_smoothing``).
    """

    dummy: Dummy
    loss_type: LossKind
    reduction: str = "mean"
    targets: Any = None
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


def _find_batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    def walk(obj: Any) -> int | None:
        if isinstance(obj, Tensor):
            return int(obj.shape[0]) if obj.dim() > 0 else None
        if isinstance(obj, tuple | list):
            for o in obj:
                n = walk(o)
                if n is not None:
                    return n
        if isinstance(obj, Mapping):
            for o in obj.values():
                n = walk(o)
                if n is not None:
                    return n
        return None

    return walk((args, dict(kwargs)))


def _signature(obj: Any) -> Any:
    """Tensors by shape, dtype and device, containers recursively, plain values as they are."""
    if isinstance(obj, Tensor):
        return (tuple(obj.shape), obj.dtype, obj.device, obj.requires_grad)
    if isinstance(obj, tuple | list):
        return (type(obj).__name__, tuple(_signature(o) for o in obj))
    if isinstance(obj, Mapping):
        return ("mapping", tuple((str(k), _signature(v)) for k, v in obj.items()))
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return type(obj).__qualname__


def _leaves_requiring_grad(obj: Any, out: list[Tensor]) -> None:
    """Append the leaf tensors that require a gradient in ``obj`` (containers recursively)."""
    if isinstance(obj, Tensor):
        if obj.requires_grad and obj.is_leaf:
            out.append(obj)
    elif isinstance(obj, tuple | list):
        for o in obj:
            _leaves_requiring_grad(o, out)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            _leaves_requiring_grad(o, out)
    elif isinstance(obj, Dummy):  # an expression of the output, e.g. ``dummy_y / temperature``
        node: Dummy | None = obj
        while node is not None:
            _leaves_requiring_grad(object.__getattribute__(node, "_args"), out)
            node = object.__getattribute__(node, "_parent")


class GradientMaker:
    """Ordinary gradients through precond's call protocol.

    Args:
        model: The model whose parameters receive gradients.
        config: Shared configuration; the plain gradient maker uses only ``seed``.

    Raises:
        ValueError: If ``model`` is not an ``nn.Module`` or ``config`` has the wrong type.
    """

    config_class: type[PreconditioningConfig] = PreconditioningConfig

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise invalid("model", type(model).__name__, "Must be a torch.nn.Module")
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise invalid(
                "config",
                type(config).__name__,
                f"{type(self).__name__} takes a {self.config_class.__name__}",
            )
        self.model = model
        self.config = config
        self._token = object()
        self._model_call: _Call | None = None
        self._loss_call: _Call | None = None
        self._loss_repr: Dummy | None = None
        self._logits_repr: LogitsRepr | None = None
        self._step = 0
        seed = config.seed if config.seed is not None else int(torch.initial_seed() % (2**63))
        self._seed = seed
        self._generator: torch.Generator | None = None
        # Filled by forward(): the evaluated loss inputs of the last step.
        self._last_loss_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._last_output: Any = None
        #: The caller's autocast regions during ``forward_and_backward`` (see
        #: :mod:`precond.precision`): on around model and loss calls, off elsewhere.
        self._autocast: tuple[AutocastRegion, ...] = ()
        #: The step differentiates the gradient: forward() calls the uncompiled model.
        self._eager_model = False

    # ---- the call protocol ------------------------------------------------------------------
    def setup_model_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Dummy:
        """Declare how to run the model on this step's input.

        Args:
            fn: Usually the model; any callable that runs it.
            *args: Positional arguments (the input batch). Dimension 0 of the first tensor is the
                batch size.
            **kwargs: Keyword arguments.

        Returns:
            A dummy standing for the model's output; index it, take attributes of it or call
            methods on it to describe what the loss reads.

        Raises:
            ValueError: If ``fn`` is not callable.
        """
        if not callable(fn):
            raise invalid("fn", fn, "setup_model_call needs a callable (usually the model)")
        if contains_dummy((args, kwargs)):
            raise DummyError("The model call's arguments cannot contain dummy outputs.")
        self._model_call = _Call(fn, args, kwargs)
        return Dummy(self._token)

    def setup_loss_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Declare how to compute the loss from the model output.

        Args:
            fn: A loss function (``F.cross_entropy``) or loss module (``nn.MSELoss()``), or any
                callable returning a scalar tensor.
            *args: Arguments; dummies from :meth:`setup_model_call` stand for the output.
            **kwargs: Keyword arguments (``label_smoothing=0.1``, ``ignore_index=-100``, ...).

        Raises:
            ValueError: If ``fn`` is not callable or no argument depends on the model output.
        """
        if not callable(fn):
            raise invalid("fn", fn, "setup_loss_call needs a loss function or loss module")
        if not contains_dummy((args, kwargs)):
            raise invalid(
                "loss call",
                getattr(fn, "__name__", type(fn).__name__),
                "None of its arguments is a dummy from setup_model_call(); pass dummy_y or an "
                "expression of it (e.g. dummy_y.logits)",
            )
        self._loss_call = _Call(fn, args, kwargs)
        self._loss_repr = None

    def setup_loss_repr(self, dummy: Dummy) -> None:
        """Declare that the model computes its own loss, found at ``dummy`` (e.g. ``dummy_y.loss``).

        Args:
            dummy: Expression of the model output that evaluates to the scalar loss.

        Raises:
            ValueError: If ``dummy`` is not a dummy from :meth:`setup_model_call`.
        """
        if not isinstance(dummy, Dummy):
            raise invalid("dummy", dummy, "setup_loss_repr needs a dummy from setup_model_call()")
        self._loss_repr = dummy
        self._loss_call = None

    def setup_logits_repr(
        self,
        dummy: Dummy,
        loss_type: LossKind | str = LossKind.CROSS_ENTROPY,
        *,
        reduction: str = "mean",
        targets: Any = None,
        **loss_kwargs: Any,
    ) -> None:
        """Declare which part of the output is the logits, for Fisher-type curvature.

        Needed when the loss is set up with :meth:`setup_loss_repr` (the model computes its
        loss) or with a loss function precond does not know.

        Args:
            dummy: Expression of the model output that evaluates to the logits.
            loss_type: The likelihood the logits parametrise.
            reduction: How the model's loss reduces: ``"mean"`` or ``"sum"``.
            targets: The true targets (tensor or dummy), used by the empirical Fisher.
            **loss_kwargs: ``ignore_index``, ``label_smoothing`` (cross-entropy only).

        Raises:
            ValueError: For an unknown loss type or reduction, or if ``dummy`` is not a dummy.
        """
        if not isinstance(dummy, Dummy):
            raise invalid("dummy", dummy, "setup_logits_repr needs a dummy from setup_model_call()")
        kind = coerce_enum(LossKind, loss_type, "loss_type")
        if reduction not in ("mean", "sum"):
            raise invalid("reduction", reduction, "Supported: ('mean', 'sum')")
        allowed = {"ignore_index", "label_smoothing"} if kind is LossKind.CROSS_ENTROPY else set()
        for key, value in loss_kwargs.items():
            if key not in allowed:
                raise invalid(
                    key,
                    value,
                    f"Options for loss_type={kind.value!r}: {sorted(allowed)}",
                )
        self._logits_repr = LogitsRepr(dummy, kind, reduction, targets, dict(loss_kwargs))

    # ---- running a step ---------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self._model_call is None:
            raise ProtocolError(
                "forward_and_backward() needs setup_model_call(model, x) first (once per batch)."
            )
        if self._loss_call is None and self._loss_repr is None:
            raise ProtocolError(
                "forward_and_backward() needs the loss: call setup_loss_call(loss_fn, dummy_y, "
                "target) or, if the model computes its loss, setup_loss_repr(dummy_y.loss)."
            )

    def graph_signature(self) -> tuple[Any, ...]:
        """A hashable key of what decides the sizes of this step's autograd graph.

        The shapes, dtypes and devices of the tensors that the model and loss calls receive
        (plain values as they are, other objects by type), whether each parameter is trained,
        each module's training mode, the autocast the model runs under (the caller's, see
        :mod:`precond.precision`) and whether grad mode is on. Two steps with
        the same signature build graphs of the same sizes for every model whose operations
        depend on the shapes of its inputs only. Used to count a graph's memory once per
        signature (see :class:`~precond.methods._saved.SavedCounts`) and to remember graphs
        without a cut for a twin backward (:class:`~precond.methods._twin_backward.UncutGraphs`).
        """
        calls = [c for c in (self._model_call, self._loss_call) if c is not None]
        modes: list[bool] = []
        trained: list[bool] = []
        device = None
        for module in self.model.modules():  # one walk for the modes and the parameters
            modes.append(module.training)
            for p in module.parameters(recurse=False):
                trained.append(p.requires_grad)
                device = device or p.device.type
        return (
            tuple(_signature((c.args, c.kwargs)) for c in calls),
            self._loss_repr is not None,
            tuple(trained),
            tuple(modes),
            self._autocast or ambient_autocast(device or "cpu"),
            torch.is_grad_enabled(),
        )

    def other_leaves(self) -> list[Tensor]:
        """Leaves of the model and loss calls that require a gradient but are not parameters.

        An input under attack, a learned temperature the loss call divides by, ...:
        ``loss.backward()`` fills their ``.grad``; the methods that take the step's gradient
        with ``torch.autograd.grad`` fill it too (one more backward pass to them, only when
        there are any), so that every method leaves them what the plain gradient does.
        """
        found: list[Tensor] = []
        for call in (self._model_call, self._loss_call):
            if call is not None:
                _leaves_requiring_grad((call.args, call.kwargs), found)
        if not found:
            return found
        own = {id(p) for p in self.model.parameters()}
        unique: dict[int, Tensor] = {}
        for t in found:
            if id(t) not in own:
                unique.setdefault(id(t), t)
        return list(unique.values())

    @property
    def batch_size(self) -> int:
        """Examples in the current batch: dimension 0 of the first tensor of the model call."""
        if self._model_call is None:
            raise ProtocolError("batch_size is known after setup_model_call()")
        n = _find_batch_size(self._model_call.args, self._model_call.kwargs)
        if n is None:
            raise ProtocolError(
                "Cannot tell the batch size: no tensor with a batch dimension among the model "
                "call's arguments."
            )
        return n

    @property
    def step(self) -> int:
        """Number of completed ``forward_and_backward`` calls."""
        return self._step

    @property
    def generator(self) -> torch.Generator:
        """The gradient maker's random generator (on the model's device), part of its state."""
        if self._generator is None:
            self._generator = torch.Generator(device=self._device())
            self._generator.manual_seed(self._seed)
        return self._generator

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def forward(self) -> tuple[Any, Tensor]:
        """Run the model and the loss (no backward).

        Returns:
            ``(output, loss)``.

        Raises:
            ValueError: If the loss is not a scalar tensor.
        """
        self._check_ready()
        call = self._model_call
        assert call is not None
        fn = uncompiled(call.fn) if self._eager_model else call.fn
        with autocast_on(self._autocast):
            output = fn(*call.args, **call.kwargs)
            self._last_output = output
            if self._loss_call is not None:
                lc = self._loss_call
                args = evaluate(lc.args, self._token, output)
                kwargs = evaluate(lc.kwargs, self._token, output)
                self._last_loss_args = (args, kwargs)
                loss = lc.fn(*args, **kwargs)
            else:
                assert self._loss_repr is not None
                self._last_loss_args = None
                loss = evaluate(self._loss_repr, self._token, output)
        if not isinstance(loss, Tensor):
            raise invalid("loss", type(loss).__name__, "The loss must be a scalar torch.Tensor")
        if loss.dim() != 0:
            raise invalid(
                "loss",
                f"tensor of shape {tuple(loss.shape)}",
                "The loss must be a scalar; use reduction='mean' or 'sum'",
            )
        if not loss.requires_grad:
            raise invalid(
                "loss",
                "tensor without grad_fn",
                "The loss does not depend on any trained parameter (is grad disabled?)",
            )
        return output, loss

    @caller_autocast
    def forward_and_backward(self) -> tuple[Any, Tensor]:
        """Run forward and every backward pass the method needs; write ``p.grad``.

        Gradients accumulate into ``p.grad`` like ``loss.backward()`` (zero them between steps).
        Under ``torch.autocast`` the model and the loss run with the caller's autocast and
        everything else (backward passes, statistics, preconditioner) without it
        (:mod:`precond.precision`).

        Returns:
            ``(output, loss)`` of this step.
        """
        self._check_ready()
        output, loss = self._forward_and_backward()
        self._step += 1
        return output, loss

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        output, loss = self.forward()
        loss.backward()
        return output, loss

    def loss_inputs(self) -> LossInputs:
        """The last forward pass's logits, targets and loss options (Fisher-type curvature).

        Returns:
            The parsed loss inputs.

        Raises:
            ProtocolError: If no forward pass ran or the logits are unknown.
        """
        if self._logits_repr is not None:
            rep = self._logits_repr
            logits = evaluate(rep.dummy, self._token, self._last_output)
            targets = evaluate(rep.targets, self._token, self._last_output)
            spec = LossSpec(kind=rep.loss_type, reduction=rep.reduction, **rep.loss_kwargs)
            return LossInputs(spec, logits, targets, self.batch_size)
        if self._loss_call is None or self._last_loss_args is None:
            raise ProtocolError(
                "Fisher-type curvature needs the logits: set the loss with setup_loss_call(...) "
                "or declare them with setup_logits_repr(dummy_y.logits, loss_type=...)."
            )
        args, kwargs = self._last_loss_args
        return parse_loss_call(self._loss_call.fn, args, kwargs, self.batch_size)

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All state needed to resume exactly: step, random generator and method state.

        Returns:
            A dict of tensors and Python scalars (``torch.save``-able).
        """
        return {
            "step": self._step,
            "seed": self._seed,
            "generator": None if self._generator is None else self._generator.get_state(),
            "method": self._method_state_dict(),
            # what the state belongs to, checked when it is loaded
            "maker": type(self).__name__,
            "model": [tuple(p.shape) for p in self.model.parameters()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ValueError: If keys are missing, or the state belongs to another method or to a
                model whose parameters have other shapes (checked before anything is loaded).
        """
        missing = {"step", "seed", "generator", "method"} - set(state)
        if missing:
            raise invalid("state", sorted(missing), "Missing keys of a precond state_dict")
        self._check_owner(state)
        self._step = int(state["step"])
        self._seed = int(state["seed"])
        self._generator = None
        if state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self._load_method_state_dict(state["method"])

    def _check_owner(self, state: Mapping[str, Any]) -> None:
        """Refuse a state saved by another method or for another architecture.

        The parameters are compared by shape, in order (their names may differ: a compiled
        or wrapped model prefixes them). States saved before these fields existed pass.
        """
        maker = state.get("maker")
        if maker is not None and maker != type(self).__name__:
            raise invalid(
                "state",
                f"a state_dict of {maker}",
                f"This is {type(self).__name__}: load a state saved by the same method",
            )
        saved = state.get("model")
        if saved is None:
            return
        theirs = [tuple(int(d) for d in shape) for shape in saved]
        named = list(self.model.named_parameters())
        mine = [tuple(p.shape) for _, p in named]
        if theirs == mine:
            return
        i = next((k for k, (a, b) in enumerate(zip(theirs, mine)) if a != b), None)
        if i is None:
            where = f"{len(theirs)} parameters saved, {len(mine)} in this model"
        else:
            where = (
                f"parameter {i} ('{named[i][0]}') saved with shape {list(theirs[i])}, "
                f"{list(mine[i])} in this model"
            )
        raise invalid(
            "state",
            "a state_dict of another model",
            f"Its parameters differ from this model's ({where}); load a state saved for the "
            "same architecture",
        )

    def _method_state_dict(self) -> dict[str, Any]:
        return {}

    def _load_method_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self.config, f.name)!r}"
            for f in dataclasses.fields(self.config)
            if f.name != "ignore_modules"
        )
        return f"{type(self).__name__}({fields})"
