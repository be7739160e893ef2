"""Memory numbers are only meaningful if a step frees what it allocated: no statistics survive."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from precond import make_gradient_maker
from precond.bench.problems import get_problem
from precond.capture.stats import LayerStats


def _alive() -> int:
    gc.collect()
    return sum(type(o) is LayerStats for o in gc.get_objects())


def test_curvature_steps_do_not_accumulate_layer_statistics():
    # The last step's statistics may live until the next step (its output is kept), older
    # ones must not: a leak would make every peak depend on the number of steps measured.
    problem = get_problem("mlp_tiny")
    model = problem.model_fn()
    x, t = problem.batch(4)
    gm = make_gradient_maker("kfac", model)
    counts = []
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        counts.append(_alive())
    assert counts[-1] == counts[1] <= len(gm.layers), counts
    assert torch.isfinite(next(model.parameters()).grad).all()
