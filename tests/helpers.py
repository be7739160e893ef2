"""Shared test utilities: tiny models per layer kind and torch.func oracles."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_grads_oracle(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor
) -> dict[str, Tensor]:
    """∇_θ ℓ_n for every example n (vmap of grad; ℓ_n = loss_fn on the single example)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_n(p, xn, tn):
        out = functional_call(model, (p, buffers), (xn.unsqueeze(0),))
        return loss_fn(out, tn.unsqueeze(0))

    return vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, t)


class TwiceLinear(nn.Module):
    """One Linear module called twice (weight shared across calls)."""

    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class SeqModel(nn.Module):
    """Embedding → Linear on 3-D inputs → LayerNorm → Linear to per-position logits."""

    def __init__(
        self, vocab: int = 7, d: int = 5, classes: int = 4, padding_idx: int | None = None
    ):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(torch.tanh(self.fc(self.emb(x)))))


class ConvBN(nn.Module):
    """Conv → BatchNorm → ReLU → Conv(groups) → GroupNorm → pool → Linear."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.gn(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def zoo() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Tensor, Tensor]], str]]:
    """Small models of every supported layer kind: (model_fn, data_fn(n), task)."""

    def mlp_data(n: int) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 6), torch.randint(0, 3, (n,))

    def img_data(n: int) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 2, 6, 6), torch.randint(0, 3, (n,))

    def seq_data(n: int) -> tuple[Tensor, Tensor]:
        return torch.randint(0, 7, (n, 5)), torch.randint(0, 4, (n, 5))

    return {
        "mlp": (
            lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
            mlp_data,
            "cls",
        ),
        "cnn_bn": (ConvBN, img_data, "cls"),
        "seq": (SeqModel, seq_data, "seq"),
    }


def flat_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in model.named_parameters() if v.requires_grad]


def dense_ggn(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor
) -> Tensor:
    """GGN ``Jᵀ (∇²_z L) J`` of ``loss_fn(model(x), t)`` in torch.func's parameter order."""
    from torch.func import functional_call, hessian, jacrev

    names = [k for k, _ in flat_params(model)]
    params = {k: v.detach() for k, v in flat_params(model)}

    def out_fn(p):
        return functional_call(model, p, (x,))

    out = out_fn(params)
    jac = jacrev(out_fn)(params)
    j = torch.cat([jac[k].reshape(out.numel(), -1) for k in names], dim=1)
    h = hessian(lambda z: loss_fn(z, t))(out.detach()).reshape(out.numel(), out.numel())
    return j.T @ h @ j


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for _, p in flat_params(model)])


def denormals_supported() -> bool:
    """Whether this CPU can flush denormal floats (leaves them kept)."""
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    return bool(supported)


def inverse_each(m: Tensor) -> Tensor:
    """The inverse of every matrix of a batch ``[..., n, n]``, one LAPACK call per matrix.

    A batched ``torch.linalg.inv`` of two or more matrices of order about 200 or more hangs on
    the tested CPU build once the thread count has been set (DESIGN.md §8), and the bench tests
    set it: ground truths invert one matrix at a time.
    """
    flat = m.reshape(-1, *m.shape[-2:])
    return torch.stack([torch.linalg.inv(x) for x in flat]).reshape(m.shape)
