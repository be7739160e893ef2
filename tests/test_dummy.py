from __future__ import annotations

import pytest
import torch

from precond.dummy import Dummy, DummyError, contains_dummy, evaluate


def test_records_attribute_index_call_and_arithmetic():
    tok = object()
    y = Dummy(tok)
    expr = (y.logits[0].view(-1, y.logits[0].size(-1)) * 2 + 1) / 4
    out = {"a": 1}

    class Out:
        logits = (torch.arange(6.0).reshape(1, 2, 3),)

    val = evaluate(expr, tok, Out())
    assert torch.equal(val, (torch.arange(6.0).reshape(2, 3) * 2 + 1) / 4)
    assert repr(y.logits[0]) == "y.logits[0]"
    assert contains_dummy({"k": [1, (y,)]})
    assert not contains_dummy({"k": [1, (out,)]})


def test_reflected_ops_and_neg():
    tok = object()
    y = Dummy(tok)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(evaluate(1 - y, tok, t), 1 - t)
    assert torch.equal(evaluate(-y, tok, t), -t)
    assert torch.equal(evaluate(2**y, tok, t), 2**t)


def test_nested_dummy_in_arguments():
    tok = object()
    y = Dummy(tok)
    t = torch.randn(2, 3, 4)
    assert evaluate(y.view(-1, y.size(-1)), tok, t).shape == (6, 4)
    assert evaluate([y[0], {"b": y.sum()}], tok, t)[1]["b"] == t.sum()


def test_misuse_raises_clear_errors():
    tok = object()
    y = Dummy(tok)
    with pytest.raises(DummyError, match="Cannot unpack"):
        a, b = y
    with pytest.raises(DummyError, match="no truth value"):
        bool(y)
    with pytest.raises(DummyError, match="Cannot set attribute"):
        y.foo = 1
    with pytest.raises(DummyError, match=r"The dummy y.missing does not fit the model output"):
        evaluate(y.missing, tok, torch.zeros(1))
    with pytest.raises(DummyError, match=r"earlier setup_model_call"):
        evaluate(Dummy(object()), tok, torch.zeros(1))
