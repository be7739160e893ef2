"""Benchmark problems: every model runs, and every parameter has a capture adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from precond import PreconditioningConfig, make_gradient_maker
from precond.bench.problems import PROBLEMS, get_problem
from precond.capture import find_layers
from precond.models import MLPMixer, ViT, WideResNet

FULL = ["mlp2048", "resnet18", "wrn28_10", "vit_tiny", "mixer"]
SMALL = [name for name in PROBLEMS if name not in FULL]
# Factor inverses of the wide conv layers take seconds: a plain step checks those models.
KFAC_STEP = {"mlp_tiny", "vit_small", "mixer_small"}


def _check_adapters(model):
    part = find_layers(model, PreconditioningConfig(), needs_adapter=True, method="test")
    covered = {id(p) for layer in part.layers for p in layer.params}
    assert covered == {id(p) for p in model.parameters()}
    assert not part.fallback and not part.plain


@pytest.mark.parametrize("name", SMALL)
def test_small_problems_take_a_step(name):
    problem = get_problem(name)
    torch.manual_seed(0)
    model = problem.model_fn()
    _check_adapters(model)
    x, t = problem.batch(3)
    assert x.shape == (3, *problem.input_shape)
    assert model(x).shape == (3, problem.num_classes)
    method = "kfac" if name in KFAC_STEP else "plain"
    gm = make_gradient_maker(method, model, **problem.options)
    d = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, d, t)
    gm.forward_and_backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_problems_are_fully_supported(name):
    problem = get_problem(name)
    model = problem.model_fn()
    _check_adapters(model)
    x, _ = problem.batch(2)
    with torch.no_grad():
        assert model(x).shape == (2, problem.num_classes)


def test_full_size_parameter_counts():
    # ViT-Tiny and the Mixer at their published widths (counted without allocating them).
    with torch.device("meta"):
        assert sum(p.numel() for p in ViT(32, 4, 192, 12, 3, 768).parameters()) == pytest.approx(
            5.36e6, rel=0.01
        )
        assert sum(p.numel() for p in WideResNet(28, 10).parameters()) == pytest.approx(
            36.5e6, rel=0.01
        )
        assert sum(p.numel() for p in MLPMixer().parameters()) == pytest.approx(4.36e6, rel=0.01)


def test_model_errors():
    with pytest.raises(ValueError, match=r"Invalid depth: 12\. Must be 6n \+ 4"):
        WideResNet(12)
    with pytest.raises(ValueError, match=r"Invalid patch: 5\. Must divide image_size=32"):
        MLPMixer(32, 5)
    with pytest.raises(ValueError, match=r"Invalid patch: 5\. Must divide image_size=32"):
        ViT(32, 5)
    with pytest.raises(ValueError, match=r"Invalid heads: 5\. Must divide dim=192"):
        ViT(32, 4, 192, 1, 5)
