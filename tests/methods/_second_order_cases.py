"""Small problems with dense float64 oracles shared by the Hessian/GGN method tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.helpers import flat_params
from torch import nn
from torch.func import functional_call, hessian


def dense_hessian(model, loss_fn, x, t):
    """Hessian of ``loss_fn(model(x), t)`` in parameter order (torch.func)."""
    names = [k for k, _ in flat_params(model)]
    params = {k: v.detach() for k, v in flat_params(model)}
    sizes = [params[k].numel() for k in names]

    def f(flat):
        chunks = torch.split(flat, sizes)
        p = {k: c.view_as(params[k]) for k, c in zip(names, chunks)}
        return loss_fn(functional_call(model, p, (x,)), t)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return hessian(f)(flat)


def plain_grad(model, loss_fn, x, t):
    model.zero_grad()
    loss_fn(model(x), t).backward()
    return torch.cat([p.grad.reshape(-1) for _, p in flat_params(model)])


def run_step(gm, model, x, t, loss_fn=F.mse_loss):
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss_fn, d, t)
    model.zero_grad()
    return gm.forward_and_backward()


def regression(n=40, d_in=4, d_out=2, seed=0):
    """Linear regression with MSE: the loss is quadratic and H = GGN = 2/(N d_out) XᵀX ⊗ I."""
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out)
    scales = torch.logspace(-1, 0, d_in)
    x = torch.randn(n, d_in) * scales
    t = torch.randn(n, d_out)
    return model, x, t


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, t = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return model, x, t
