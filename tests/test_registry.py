from __future__ import annotations

import pytest
from torch import nn

import precond
from precond.registry import make_gradient_maker, register_method


def test_methods_lists_plain_first():
    ms = precond.methods()
    assert next(iter(ms)) == "plain"
    assert all(isinstance(v, str) and v for v in ms.values())


def test_make_gradient_maker_errors():
    with pytest.raises(ValueError, match=r"Invalid method: 'nope'. Registered: \("):
        make_gradient_maker("nope", nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"Invalid option: 'dampign'. PreconditioningConfig accepts"
    ):
        make_gradient_maker("plain", nn.Linear(2, 2), dampign=1.0)
    gm = make_gradient_maker("plain", nn.Linear(2, 2), damping=0.5)
    assert gm.config.damping == 0.5


def test_register_twice_raises():
    with pytest.raises(ValueError, match=r"Invalid name: 'plain'. It is already registered"):
        register_method("plain", "x")(precond.GradientMaker)
