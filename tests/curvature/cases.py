"""Curvature test problems as data: one entry per (layer kind, loss) combination.

Each case: ``model`` (builds a float64 model), ``data`` (returns ``x, t``), ``loss`` (a loss
function precond knows), ``kwargs`` (loss options besides ``reduction``) and ``skip`` (curvature
types undefined for the case, e.g. the exact Fisher with class weights). Every case runs with
``reduction="mean"`` and ``"sum"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N = 4


class Seq3d(nn.Module):
    """Linear layers on [N, T, d] inputs; logits flattened to [N·T, C] or moved to [N, C, T]."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 3, layout: str = "flat") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, c)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(torch.tanh(self.fc1(x)))
        if self.layout == "flat":
            return z.reshape(-1, z.shape[-1])
        if self.layout == "nct":
            return z.movedim(-1, 1)
        return z


class EmbLayerNorm(nn.Module):
    """Embedding (with padding_idx) → Linear on 3-D inputs → LayerNorm → Linear → [N·T, C]."""

    def __init__(self, vocab: int = 6, d: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=1)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.out(self.norm(torch.tanh(self.fc(self.emb(x)))))
        return z.reshape(-1, z.shape[-1])


def _cls(n: int, c: int, shape: tuple[int, ...] = ()) -> Tensor:
    return torch.randint(0, c, (n, *shape))


def _with_ignored(t: Tensor) -> Tensor:
    t = t.clone()
    t.view(-1)[::3] = -100
    return t


def _tokens() -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 6, (N, 3))
    x[0, 0] = 1  # padding token
    return x, _with_ignored(_cls(N * 3, 3))


def _mlp(d: int, h: int, c: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h, bias=bias), nn.Tanh(), nn.Linear(h, c))


def _conv_head(conv: nn.Module, norm: nn.Module | None, flat: int, out: int) -> nn.Module:
    mods = [conv] + ([norm] if norm is not None else []) + [nn.Tanh(), nn.Flatten()]
    return nn.Sequential(*mods, nn.Linear(flat, out))


def _rmsnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3))


CASES: list[dict] = [
    dict(
        id="mlp-ce",
        model=lambda: _mlp(5, 4, 3),
        data=lambda: (torch.randn(N, 5), _cls(N, 3)),
        loss=F.cross_entropy,
    ),
    dict(
        id="mlp-mse",
        model=lambda: _mlp(5, 4, 2),
        data=lambda: (torch.randn(N, 5), torch.randn(N, 2)),
        loss=F.mse_loss,
    ),
    dict(
        id="mlp-bce",
        model=lambda: _mlp(5, 4, 3),
        data=lambda: (torch.randn(N, 5), torch.randint(0, 2, (N, 3)).double()),
        loss=F.binary_cross_entropy_with_logits,
    ),
    dict(
        id="mlp_nobias-ce_smooth",
        model=lambda: _mlp(5, 4, 3, bias=False),
        data=lambda: (torch.randn(N, 5), _cls(N, 3)),
        loss=F.cross_entropy,
        kwargs=dict(label_smoothing=0.1),
    ),
    dict(
        id="mlp-ce_weighted_smooth",
        model=lambda: _mlp(5, 4, 3),
        data=lambda: (torch.randn(N, 5), _with_ignored(_cls(N, 3))),
        loss=F.cross_entropy,
        kwargs=dict(weight=torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64), label_smoothing=0.2),
        skip=("fisher_exact", "fisher_mc"),
    ),
    dict(
        id="linear3d-ce_ignore_smooth",
        model=lambda: Seq3d(layout="flat"),
        data=lambda: (torch.randn(N, 3, 4), _with_ignored(_cls(N * 3, 3))),
        loss=F.cross_entropy,
        kwargs=dict(label_smoothing=0.1),
    ),
    dict(
        id="linear3d-ce_nct_ignore",
        model=lambda: Seq3d(layout="nct"),
        data=lambda: (torch.randn(N, 3, 4), _with_ignored(_cls(N, 3, (3,)))),
        loss=F.cross_entropy,
    ),
    dict(
        id="linear3d-mse",
        model=lambda: Seq3d(layout="ntc", c=2),
        data=lambda: (torch.randn(N, 3, 4), torch.randn(N, 3, 2)),
        loss=F.mse_loss,
    ),
    dict(
        id="embedding_layernorm-ce_ignore",
        model=EmbLayerNorm,
        data=_tokens,
        loss=F.cross_entropy,
    ),
    dict(
        id="conv2d-ce",
        model=lambda: _conv_head(nn.Conv2d(2, 3, 3, padding=1), None, 3 * 16, 3),
        data=lambda: (torch.randn(N, 2, 4, 4), _cls(N, 3)),
        loss=F.cross_entropy,
    ),
    dict(
        id="conv2d_stride_dil_groups-mse",
        model=lambda: _conv_head(
            nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
            None,
            4 * 3 * 5,
            2,
        ),
        data=lambda: (torch.randn(N, 4, 5, 5), torch.randn(N, 2)),
        loss=F.mse_loss,
    ),
    dict(
        id="conv1d-bce",
        model=lambda: _conv_head(
            nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), None, 4 * 3, 2
        ),
        data=lambda: (torch.randn(N, 3, 7), torch.randint(0, 2, (N, 2)).double()),
        loss=F.binary_cross_entropy_with_logits,
    ),
    dict(
        id="batchnorm2d_eval-ce",
        model=lambda: _conv_head(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), 3 * 9, 3).eval(),
        data=lambda: (torch.randn(N, 2, 4, 4), _cls(N, 3)),
        loss=F.cross_entropy,
    ),
    dict(
        id="batchnorm1d_eval-mse",
        model=lambda: nn.Sequential(
            nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)
        ).eval(),
        data=lambda: (torch.randn(N, 4), torch.randn(N, 2)),
        loss=F.mse_loss,
    ),
    dict(
        id="groupnorm-bce",
        model=lambda: _conv_head(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), 4 * 4, 2),
        data=lambda: (torch.randn(N, 2, 3, 3), torch.randint(0, 2, (N, 2)).double()),
        loss=F.binary_cross_entropy_with_logits,
    ),
    dict(
        id="rmsnorm-ce",
        model=_rmsnorm_mlp,
        data=lambda: (torch.randn(N, 4), _cls(N, 3)),
        loss=F.cross_entropy,
    ),
]

REDUCTIONS = ("mean", "sum")


def make(case: dict, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """Build the model and data of a case in float64 (eval-mode BatchNorm gets random stats)."""
    torch.manual_seed(seed)
    model = case["model"]().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x, t = case["data"]()
    if x.is_floating_point():
        x = x.double()
    return model, x, t


PAIRS = [(c, r) for c in CASES for r in REDUCTIONS]
PAIR_IDS = [f"{c['id']}-{r}" for c, r in PAIRS]
