"""Views and blocks shared by Shampoo, SOAP and Muon."""

from __future__ import annotations

import pytest
import torch

from precond.methods._tensor_blocks import (
    BlockLayout,
    chunk_sizes,
    fibre_gram,
    merge_shape,
    mode_product,
    rows,
    set_rows,
)


@pytest.mark.parametrize(
    ("shape", "merge_dims", "view"),
    [
        ((128, 64, 3, 3), 1024, (128, 576)),
        ((128, 64, 3, 3), 100, (128, 64, 9)),
        ((16, 8, 3, 3), 16, (16, 8, 9)),
        ((4, 3, 2, 2), None, (4, 3, 2, 2)),
        ((1, 5), 1024, (5,)),
        ((8, 1, 3, 3), 1024, (8, 9)),
        ((7,), 1024, (7,)),
        ((1, 1), 1024, (1,)),
        ((300, 400), 16, (300, 400)),  # matrices are never merged
        ((4, 2000, 3), 1024, (4, 2000, 3)),  # a dimension larger than merge_dims stays alone
    ],
)
def test_merge_shape(shape, merge_dims, view):
    assert merge_shape(shape, merge_dims) == view


def test_chunk_sizes():
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(8, 4) == [4, 4]
    assert chunk_sizes(3, 4) == [3]
    assert chunk_sizes(1000, None) == [1000]


def test_gather_and_scatter_round_trip_with_missing_tensors():
    torch.manual_seed(0)
    shapes = [torch.Size([5, 7]), torch.Size([3]), torch.Size([4, 3, 2, 2]), torch.Size([3, 3])]
    views = [merge_shape(s, 1024) for s in shapes]
    layout = BlockLayout(views, block_size=3)
    tensors = [torch.randn(s) for s in shapes]
    batches = layout.gather(tensors, torch.float64)
    back = layout.scatter(batches, shapes)
    for a, b in zip(tensors, back):
        assert torch.equal(a.double(), b)
    assert layout.numel() == sum(t.numel() for t in tensors)
    partial = [tensors[0], None, tensors[2], None]
    batches = layout.gather(partial, torch.float32)
    back = layout.scatter(batches, shapes)
    assert back[1] is None and back[3] is None
    assert torch.equal(back[0], tensors[0]) and torch.equal(back[2], tensors[2])
    sizes = {g.shape: (g.size, b) for g, b in zip(layout.groups, batches)}
    size, batch = sizes[(3, 3)]  # blocks of the [5, 7] and [4, 12] views and the [3, 3] matrix
    assert batch.present is not None and len(batch.present) == size - 1


def test_rows_and_set_rows():
    state = torch.zeros(4, 2)
    set_rows(state, torch.tensor([1, 3]), torch.ones(2, 2))
    assert state.sum() == 4 and state[1].sum() == 2 and state[0].sum() == 0
    assert torch.equal(rows(state, torch.tensor([3])), torch.ones(1, 2))
    assert rows(state, None) is state


def test_mode_product_and_fibre_gram_match_einsum():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    m = torch.randn(2, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(mode_product(x, m, 1), torch.einsum("bijk,bjl->bilk", x, m))
    torch.testing.assert_close(fibre_gram(x, 2), torch.einsum("bijk,bijl->bkl", x, x))
    torch.testing.assert_close(fibre_gram(x, 1), torch.einsum("bijk,bilk->bjl", x, x))
    torch.testing.assert_close(fibre_gram(x, 0), torch.einsum("bijk,bljk->bil", x, x))


class Switch(torch.nn.Module):
    """Two layers of equal shape; the second is used only when asked (its grad stays None)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.use_b = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) if self.use_b else h


@pytest.mark.parametrize("name", ["shampoo", "soap", "muon"])
def test_unused_parameters_keep_no_gradient_and_their_state(name):
    import torch.nn.functional as F

    from precond import make_gradient_maker

    torch.manual_seed(0)
    model = Switch()
    gm = make_gradient_maker(name, model)
    for step in range(4):
        model.use_b = step == 2
        model.zero_grad(set_to_none=True)
        d = gm.setup_model_call(model, torch.randn(8, 4))
        gm.setup_loss_call(F.mse_loss, d, torch.randn(8, 4))
        gm.forward_and_backward()
        assert all(torch.isfinite(p.grad).all() for p in model.a.parameters())
        if step == 2:
            assert all(torch.isfinite(p.grad).all() for p in model.b.parameters())
        else:
            assert model.b.weight.grad is None and model.b.bias.grad is None
