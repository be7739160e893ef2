"""Cost models price the im2col patches of a convolution wherever the statistics need them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.methods.cost import CostModel, Phase, add_patches


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def _elementwise(cm: CostModel) -> list[int]:
    return [
        op.shape[0] for op in cm.ops if op.phase is Phase.CURVATURE and op.kind == "elementwise"
    ]


@pytest.mark.parametrize(
    "method", ["kfac", "ekfac", "kbfgs", "ng_diag", "ng_layer", "smw_ng", "seng"]
)
def test_statistics_of_a_convolution_price_forming_its_patches(method):
    # 8 examples × 36 positions × 27 patch entries (3 channels × 3 × 3) for the convolution;
    # the linear head's inputs are a view (one position): nothing for it.
    model = _conv_net()
    x, t = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    gm = make_gradient_maker(method, model)
    dummy = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy, t)
    gm.forward_and_backward()
    assert _elementwise(gm.cost_model()).count(8 * 36 * 27) == 1


def test_patches_only_for_inputs_that_are_copied_out():
    cm = CostModel()

    class Layer:  # a linear layer on a sequence: canonical inputs are a view
        adapter = make_gradient_maker("kfac", nn.Linear(3, 2)).layers[0].adapter
        module = nn.Linear(3, 2)
        shape = (1, 2, 4)

    add_patches(cm, Layer(), examples=8, positions=5)
    assert cm.ops == []
    conv = make_gradient_maker("kfac", _conv_net()).layers[0]
    add_patches(cm, conv, examples=8, positions=1)  # no shared positions
    assert cm.ops == []
    add_patches(cm, conv, examples=8, positions=36)
    assert _elementwise(cm) == [8 * 36 * 27]
