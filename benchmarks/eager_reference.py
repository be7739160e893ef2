"""How close can any eager PyTorch implementation come to the cost floor? A hand-written bound.

The harness's floor (``precond bench``) adds up kernel times measured alone, with warm caches
and without the cost of launching each operator from Python. This script writes out the
shortest eager step of a method that we can think of, with none of the library's machinery
(no hooks, no checks for non-finite numbers, no bookkeeping, the update fused with
``torch._foreach`` where possible), and times it in one process against the library's step,
in alternating blocks (the same model, batch, optimizer and options as a benchmark worker).

Dividing the floor of a committed result by the two times gives the efficiency of each. When
the hand-written step itself stays below the 0.8 target, the target is out of reach of eager
PyTorch on that machine and configuration, whatever the library does; the remaining gap
between the two steps is what the library could still remove.

Methods written out, each with a curvature update and refresh every step (``T = 1``):
``adahessian`` and ``sophia`` (GNB) on any model; ``ng_diag`` (the diagonal Monte-Carlo Fisher)
and ``smw_ng`` (the empirical Fisher through the Gram matrix) on models whose trained layers are
all ``Linear`` in a ``Sequential`` (``mlp512``).

    python benchmarks/eager_reference.py --results benchmarks/results/cpu/results.jsonl \
        --model mlp512 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from precond.bench.problems import get_problem
from precond.bench.runner import BENCH_OPTIONS
from precond.bench.worker import MomentumSGD, _make_step, configure_cpu
from precond.methods.probes import rademacher_like
from precond.registry import make_gradient_maker

Step = Callable[[], None]


def _library_step(method: str, model_name: str, batch: int) -> Step:
    problem = get_problem(model_name)
    torch.manual_seed(0)
    model = problem.model_fn()
    x, t = problem.batch(batch, torch.device("cpu"), 0)
    options = {**problem.options, **BENCH_OPTIONS.get(method, {}), "curvature_upd_interval": 1}
    gm = make_gradient_maker(method, model, **options)
    return _make_step(gm, model, MomentumSGD(model.parameters(), lr=1e-3), x, t)


def _setup(
    model_name: str, batch: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, MomentumSGD, torch.Generator]:
    """The worker's model, batch and optimizer, and a generator for the written-out steps."""
    problem = get_problem(model_name)
    torch.manual_seed(0)
    model = problem.model_fn()
    x, t = problem.batch(batch, torch.device("cpu"), 0)
    return model, x, t, MomentumSGD(model.parameters(), lr=1e-3), torch.Generator().manual_seed(0)


def _adahessian_step(model_name: str, batch: int) -> Step:
    """AdaHessian (Yao et al. 2021) at its defaults: one Rademacher probe, no smoothing."""
    model, x, t, opt, gen = _setup(model_name, batch)
    params = opt.params
    scratch: list[torch.Tensor] = []
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    d = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-4
    eps_t, zero = torch.full((), eps), torch.zeros(())
    k = [0]

    def step() -> None:
        k[0] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        z = rademacher_like(params, gen, scratch=scratch)
        hz = list(torch.autograd.grad(grads, params, z))
        torch._foreach_mul_(hz, hz)  # (z ⊙ Hz)² = (Hz)²
        torch._foreach_lerp_(v, hz, 1.0 - beta2)
        bc2 = (1.0 - beta2 ** k[0]) ** -0.5
        for di, vi in zip(d, v):  # eps + sqrt(v / (1 - beta2^k)): two passes
            torch.sqrt(vi, out=di)
            torch.add(eps_t, di, alpha=bc2, out=di)
        g = [gi.detach() for gi in grads]
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        scale = 1.0 / (1.0 - beta1 ** k[0])
        for p, mi, di, gi in zip(params, m, d, g):
            torch.addcdiv(zero, mi, di, value=scale, out=gi)  # scale · m / d in one pass
            p.grad = gi
        opt.step()

    return step


def _sophia_step(model_name: str, batch: int) -> Step:
    """Sophia-G (Liu et al. 2023) at its defaults: GNB estimate from one set of sampled labels."""
    model, x, t, opt, gen = _setup(model_name, batch)
    params = opt.params
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    d = [torch.zeros_like(p) for p in params]
    beta1, beta2, rho, eps = 0.965, 0.99, 0.04, 1e-12
    classes = get_problem(model_name).num_classes

    def step() -> None:
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, t).backward(retain_graph=True)
        with torch.no_grad():
            probs = torch.softmax(logits, 1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            vec = (probs - F.one_hot(y, classes).to(probs.dtype)) / batch
        est = list(torch.autograd.grad(logits, params, vec))
        torch._foreach_mul_(est, est)
        torch._foreach_lerp_(h, est, (1.0 - beta2) * batch)  # ĥ = B · ĝ ⊙ ĝ
        for di, hi in zip(d, h):
            torch.mul(hi, rho, out=di)
        torch._foreach_clamp_min_(d, eps)
        g = [p.grad for p in params]
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        for mi, di, gi in zip(m, d, g):
            torch.div(mi, di, out=gi).clamp_(-1.0, 1.0)
        opt.step()

    return step


def _linear_forward(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The output of a ``Sequential`` and each ``Linear``'s input and output."""
    if not isinstance(model, torch.nn.Sequential) or any(
        p.requires_grad and not isinstance(m, torch.nn.Linear)
        for m in model
        for p in m.parameters(recurse=False)
    ):
        raise ValueError(
            f"model: the written-out ng_diag and smw_ng need a Sequential whose trained layers "
            f"are all Linear; got {type(model).__name__}"
        )
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    h = x
    for module in model:
        if isinstance(module, torch.nn.Linear):
            inputs.append(h.detach())
            h = module(h)
            outputs.append(h)
        else:
            h = module(h)
    return h, inputs, outputs


def _ng_diag_step(model_name: str, batch: int) -> Step:
    """Diagonal natural gradient, Monte-Carlo Fisher (one label per example), damping 1e-3.

    ``F = (1/N) Σ_n (∇ℓ_n(y_n))²`` of the mean loss with sampled labels ``y_n``: the sampled
    cotangent is scaled by ``1/√N`` so that ``F = Σ_n g_n² (ã_n²)ᵀ`` needs no further scaling.
    """
    model, x, t, opt, gen = _setup(model_name, batch)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    lam = 1e-3
    classes = get_problem(model_name).num_classes

    def step() -> None:
        opt.zero_grad()
        logits, inputs, outputs = _linear_forward(model, x)
        F.cross_entropy(logits, t).backward(retain_graph=True)
        with torch.no_grad():
            probs = torch.softmax(logits, 1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            vec = (probs - F.one_hot(y, classes).to(probs.dtype)) * batch**-0.5
        gz = torch.autograd.grad(logits, outputs, vec)
        with torch.no_grad():
            for layer, a, g in zip(linears, inputs, gz):
                g2 = g.square()
                fw = torch.mm(g2.T, a.square()).add_(lam)
                layer.weight.grad.div_(fw)
                layer.bias.grad.div_(g2.sum(0).add_(lam))
        opt.step()

    return step


def _smw_ng_step(model_name: str, batch: int) -> Step:
    """SMW-NG (empirical Fisher, one ``N × N`` system for all layers) at the bench's damping 0.1.

    ``U``'s rows are ``√N g_n ã_nᵀ`` per layer (``g_n`` the output gradients of the mean loss),
    so ``U Uᵀ = N Σ_l (G_l G_lᵀ) ⊙ (A_l A_lᵀ + 1)`` and ``Δ = (g − Uᵀ (λI + UUᵀ)⁻¹ U g) / λ``.
    """
    model, x, t, opt, _ = _setup(model_name, batch)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    params = [p for m in linears for p in (m.weight, m.bias)]
    lam = 0.1
    eye = torch.eye(batch)

    def step() -> None:
        opt.zero_grad()
        logits, inputs, outputs = _linear_forward(model, x)
        loss = F.cross_entropy(logits, t)
        grads = torch.autograd.grad(loss, params + outputs)
        with torch.no_grad():
            gs = [g * batch**0.5 for g in grads[len(params) :]]
            gram = eye * lam
            for a, g in zip(inputs, gs):
                gram.addcmul_(g @ g.T, torch.addmm(torch.ones(()), a, a.T))
            chol = torch.linalg.cholesky(gram)
            u = torch.zeros(batch)
            for i, (a, g) in enumerate(zip(inputs, gs)):
                gw, gb = grads[2 * i], grads[2 * i + 1]
                u += (g @ gw).mul_(a).sum(1) + g @ gb
            xs = torch.cholesky_solve(u.unsqueeze(1), chol)
            for i, (layer, a, g) in enumerate(zip(linears, inputs, gs)):
                gx = g * xs
                gw, gb = grads[2 * i], grads[2 * i + 1]
                layer.weight.grad = gw.addmm_(gx.T, a, beta=1 / lam, alpha=-1 / lam)
                layer.bias.grad = (gb - gx.sum(0)).div_(lam)
        opt.step()

    return step


WRITTEN_OUT = {
    "adahessian": _adahessian_step,
    "sophia": _sophia_step,
    "ng_diag": _ng_diag_step,
    "smw_ng": _smw_ng_step,
}


def _alternate(steps: dict[str, Step], rounds: int, per_block: int) -> dict[str, float]:
    """Median ms per step of each, timed in alternating blocks after a warm-up."""
    for fn in steps.values():
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            for _ in range(per_block):
                fn()
            times[name].append((time.perf_counter() - t0) / per_block * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _row(results: Path, method: str, model: str, batch: int) -> dict | None:
    """The row of ``method`` at ``T = 1`` (SGD's row for ``plain``) in a results.jsonl."""
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if (row.get("method"), row.get("model"), row.get("batch_size"), row.get("interval")) == (
            method,
            model,
            batch,
            1,
        ):
            return row
    return None


def main() -> None:
    """Time the library's and the written-out step of each method; print their efficiencies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(WRITTEN_OUT), choices=list(WRITTEN_OUT))
    ap.add_argument("--model", default="mlp512")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--results", type=Path, help="results.jsonl with the floors (T = 1)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--per-block", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    configure_cpu(args.threads, flush_denormals=True)  # as in the bench's workers
    sgd = _library_step("plain", args.model, args.batch_size)
    for method in args.methods:
        ms = _alternate(
            {
                "sgd": sgd,
                "library": _library_step(method, args.model, args.batch_size),
                "written out": WRITTEN_OUT[method](args.model, args.batch_size),
            },
            args.rounds,
            args.per_block,
        )
        line = f"{method} {args.model} B={args.batch_size} T=1: " + ", ".join(
            f"{name} {v:.3f} ms" for name, v in ms.items()
        )
        row = sgd_row = None
        if args.results is not None:
            row = _row(args.results, method, args.model, args.batch_size)
            sgd_row = _row(args.results, "plain", args.model, args.batch_size)
        if row is not None and row.get("floor_ms"):
            floor = row["floor_ms"]
            line += f"; floor {floor:.3f} ms: efficiency library {floor / ms['library']:.2f}, "
            line += f"written out {floor / ms['written out']:.2f}"
            if sgd_row is not None and sgd_row.get("time_ms"):
                # the host's speed moves between the run and now: the floor scaled by SGD's
                # step here over SGD's step in the run (first order: everything moves alike)
                scaled = floor * ms["sgd"] / sgd_row["time_ms"]
                line += f" (floor × SGD here / SGD in the run = {scaled:.3f} ms: library "
                eff_lib, eff_out = scaled / ms["library"], scaled / ms["written out"]
                line += f"{eff_lib:.2f}, written out {eff_out:.2f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
