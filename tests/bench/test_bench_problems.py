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


# ---- problems of your own: MODULE:ATTRIBUTE and FILE.py:ATTRIBUTE ---------------------------
OWN = """
import torch
from torch import nn
from precond.bench import Problem

def problem():
    return Problem(
        name="tagger",
        model_fn=lambda: nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 6, 5)),
        input_shape=(6,),
        num_classes=5,
        description="embedding 50x8, 6 tokens, linear head",
        inputs=lambda b, g: torch.randint(0, 50, (b, 6), generator=g),
    )

FIXED = problem()
NOT_A_PROBLEM = 3

def returns_a_model():
    return nn.Linear(2, 2)

def fails():
    raise RuntimeError("no GPU here")
"""


@pytest.fixture
def own_file(tmp_path, monkeypatch):
    path = tmp_path / "my_bench.py"
    path.write_text(OWN)
    monkeypatch.chdir(tmp_path)
    return path


def test_own_problem_from_a_file_by_function_and_by_object(own_file):
    from precond.bench.problems import describe, load_problem

    for name in ("my_bench.py:problem", f"{own_file}:FIXED"):
        problem = get_problem(name)
        assert problem.name == "tagger" and load_problem(name) is problem  # loaded once
        x, t = problem.batch(4, seed=3)
        assert x.dtype == torch.int64 and x.shape == (4, 6) and t.shape == (4,)
        again, _ = problem.batch(4, seed=3)
        assert torch.equal(x, again)
        torch.manual_seed(0)
        model = problem.model_fn()
        gm = make_gradient_maker("kfac", model, **problem.options)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert describe(name) == "embedding 50x8, 6 tokens, linear head"


def test_own_problem_from_a_module(own_file, monkeypatch):
    monkeypatch.syspath_prepend(str(own_file.parent))
    assert get_problem("my_bench:problem").num_classes == 5


@pytest.mark.parametrize(
    "name,message",
    [
        ("nope", r"Invalid model: 'nope'\. Known: .*or your own as MODULE:ATTRIBUTE"),
        ("missing.py:problem", r"Invalid model: 'missing.py:problem'\. No such file: .*missing"),
        ("no_such_module_xyz:problem", r"Cannot import 'no_such_module_xyz'"),
        ("my_bench.py:absent", r"my_bench.py has no attribute 'absent'"),
        ("my_bench.py:NOT_A_PROBLEM", r"NOT_A_PROBLEM is a int: use a Problem or a function"),
        ("my_bench.py:returns_a_model", r"returns_a_model\(\) returned a Linear, not a precond"),
        ("my_bench.py:fails", r"fails\(\) failed: RuntimeError: no GPU here"),
        ("my_bench.py:", r"Invalid model: 'my_bench.py:'"),
    ],
)
def test_own_problem_errors_name_the_model_and_the_cause(own_file, name, message):
    with pytest.raises(ValueError, match=message):
        get_problem(name)


def test_a_broken_file_says_where_it_failed(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise ImportError('needs timm')\n")
    with pytest.raises(ValueError, match=r"Loading .*broken.py failed: ImportError: needs timm"):
        get_problem(f"{bad}:problem")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("input_shape", (3, 0), r"Invalid input_shape: \(3, 0\)\. Use a tuple of positive"),
        ("num_classes", 1, r"Invalid num_classes: 1\. Use an integer of at least 2"),
        ("num_classes", 2.0, r"Invalid num_classes: 2\.0"),
        ("model_fn", "mlp", r"Invalid model_fn: 'mlp'"),
        ("inputs", 3, r"Invalid inputs: 3"),
    ],
)
def test_problem_fields_are_checked(field, value, message):
    from precond.bench.problems import Problem

    kwargs = {"name": "p", "model_fn": lambda: torch.nn.Linear(3, 2), "input_shape": (3,),
              "num_classes": 2, "description": "d"}  # fmt: skip
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        Problem(**kwargs)


def test_inputs_of_the_wrong_batch_size_are_an_error():
    from precond.bench.problems import Problem

    p = Problem("p", lambda: torch.nn.Linear(3, 2), (3,), 2, "d", inputs=lambda b, g: torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid inputs: \(3,\)\. Problem 'p': return a tensor"):
        p.batch(4)
