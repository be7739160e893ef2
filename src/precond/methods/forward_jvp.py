r"""Jacobian-vector products ``J v`` by forward-mode differentiation of a replayed model call.

The GGN product ``G v = Jᵀ (∇²_z L) J v`` needs ``J v``, the derivative of the logits ``z`` in
the direction ``v`` of the parameters. Reverse mode gets it as the derivative of ``(Jᵀu)·v`` in
``u`` (a double vector-Jacobian product through the graph of ``Jᵀu``); forward mode carries the
tangent ``v`` through the layers with the values (dual tensors), one first-order pass.

:class:`ModelReplay` re-runs the curvature step's model call with
``torch.func.functional_call``, the trained parameters replaced by dual tensors whose tangents
are ``v``, so that the replay computes the same function as the step's forward:

* buffers are cloned once per batch and the replay reads and writes the clones: BatchNorm in
  train mode normalises with the batch's statistics (as the step did) and the model's running
  statistics are not updated a second time;
* every replay runs under ``torch.random.fork_rng`` from the random state recorded when the
  step's forward started (CPU, and the device's on CUDA): dropout draws the step's masks, and
  the model's random stream after the step is the one without replays.

A model whose call cannot be replayed (an operator without a forward-mode rule, a call that is
not the module itself) raises at the first product; the caller falls back to reverse mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from ..precision import AutocastRegion, autocast_on

__all__ = ["ModelReplay", "RngState", "capture_rng"]


@dataclass
class RngState:
    """The random state when a forward pass started: the CPU generator's and the device's."""

    cpu: Tensor
    device: torch.device
    accelerator: Tensor | None


def capture_rng(device: torch.device) -> RngState:
    """Record the default generators' state (no host sync beyond copying the state)."""
    acc = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), device, acc)


class ModelReplay:
    """``J v`` of the logits by forward-mode differentiation of the step's model call.

    Args:
        model: The module the step called.
        args: The call's positional arguments.
        kwargs: The call's keyword arguments.
        params: The parameters ``v`` is a tangent of (trained at this step).
        logits_of: Maps the model's output to the tensor the loss reads.
        rng: The random state recorded when the step's forward started.
        shape: Shape of the step's logits (a replay returning another shape is refused).
        autocast: The caller's autocast regions the step's model call ran under (replayed
            under the same, :mod:`precond.precision`).
    """

    def __init__(
        self,
        model: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        params: list[nn.Parameter],
        logits_of: Callable[[Any], Tensor],
        rng: RngState,
        shape: torch.Size,
        autocast: tuple[AutocastRegion, ...] = (),
    ) -> None:
        self.model = model
        self.autocast = autocast
        self.args = args
        self.kwargs = kwargs
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise ValueError("a preconditioned parameter is not a parameter of the called model")
        self.names = [names[id(p)] for p in params]
        self.params = params
        self.logits_of = logits_of
        self.rng = rng
        self.shape = shape
        # One private copy per batch: the replays update these, never the model's own buffers.
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}

    def jvp(self, tangents: list[Tensor]) -> Tensor:
        """``J v`` for the parameters' tangents ``v`` (logits-shaped, the logits' dtype)."""
        rng = self.rng
        cuda = rng.accelerator is not None
        devices = [rng.device] if cuda else []
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            forward_ad.dual_level(),
            autocast_on(self.autocast),
        ):
            torch.set_rng_state(rng.cpu)
            if rng.accelerator is not None:
                torch.cuda.set_rng_state(rng.accelerator, rng.device)
            values: dict[str, Tensor] = dict(self.buffers)
            for name, p, t in zip(self.names, self.params, tangents):
                values[name] = forward_ad.make_dual(p.detach(), t.to(p.dtype).view_as(p))
            output = functional_call(self.model, values, self.args, self.kwargs, strict=False)
            z = self.logits_of(output)
            if not isinstance(z, Tensor) or z.shape != self.shape:
                raise RuntimeError("the replayed model call does not give the step's logits")
            primal, tangent = forward_ad.unpack_dual(z)
            if tangent is None:
                return torch.zeros_like(primal)
            return tangent
