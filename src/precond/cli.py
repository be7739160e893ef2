"""Command line: ``precond list | demo | bench`` (also ``python -m precond``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import registry

__all__ = ["main"]

# Demo settings per method: SGD learning rate, SGD momentum and config options, picked from a
# small grid on this demo problem (MLP 40-128-128-10 on MNIST-1D, batch 128). Methods
# that keep their own momentum (SOAP, Muon, AdaHessian, Sophia) run with momentum 0.
# Preconditioners refresh their curvature every 10 steps. K-FAC and EKFAC keep an exponential
# moving average of their factors (decay 0.95, as in Martens & Grosse 2015): from a single
# batch's factors refreshed every 10 steps, K-FAC's loss falls to about 0.5 and then climbs
# back above 2 as the model's predictions sharpen and its Fisher shrinks.
DEMO_SETTINGS: dict[str, tuple[float, float, dict[str, Any]]] = {
    "plain": (0.3, 0.9, {}),
    "kfac": (0.01, 0.9, {"damping": 0.01, "ema_decay": 0.95, "curvature_upd_interval": 10}),
    "ekfac": (0.003, 0.9, {"damping": 0.01, "ema_decay": 0.95, "curvature_upd_interval": 10}),
    "ng_diag": (0.03, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "smw_ng": (0.01, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "seng": (0.01, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "hessian_free": (0.1, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "shampoo": (0.01, 0.9, {"curvature_upd_interval": 10}),
    "soap": (0.01, 0.0, {"curvature_upd_interval": 10}),
    "psgd": (0.03, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "kbfgs": (0.1, 0.9, {"damping": 0.1, "curvature_upd_interval": 10}),
    "adahessian": (0.3, 0.0, {"damping": 0.1, "curvature_upd_interval": 10}),
    "sophia": (0.003, 0.0, {"damping": 0.001, "curvature_upd_interval": 10}),
    "muon": (0.01, 0.0, {}),
}


def _cmd_list(args: argparse.Namespace) -> int:
    infos = [registry.method_info(name) for name in registry.methods()]
    width = max(len(i.name) for i in infos)
    print(f"{'method':<{width}}  {'family':<8}  description")
    for info in infos:
        print(f"{info.name:<{width}}  {info.family:<8}  {info.description}")
    return 0


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm comes with the bench extra
        return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data import mnist1d
    from .models import MLP
    from .training import train_classifier

    torch.set_num_threads(max(1, torch.get_num_threads()))
    methods = args.methods.split(",") if args.methods else list(DEMO_SETTINGS)
    for m in methods:
        registry.method_info(m)  # validates the name
    data = mnist1d()
    print(
        f"precond demo: MLP 40-{args.width}-{args.width}-10 on MNIST-1D "
        f"({len(data.y_train)} train / {len(data.y_test)} test, generated locally), "
        f"{args.epochs} epochs, batch {args.batch_size}; every method feeds torch.optim.SGD"
    )
    rows = []
    for method in methods:
        lr, momentum, options = DEMO_SETTINGS.get(method, (0.01, 0.9, {}))
        torch.manual_seed(args.seed)
        model = MLP(40, [args.width, args.width], 10)
        steps = args.epochs * (len(data.y_train) // args.batch_size)
        bar = _progress(steps, method)

        def tick(step: int, loss: float, bar: Any = bar) -> None:
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

        result = train_classifier(
            method,
            model,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            momentum=momentum,
            options=options,
            seed=args.seed,
            on_step=tick,
        )
        if bar is not None:
            bar.close()
        rows.append((method, lr, momentum, options, result))
        print(
            f"  {method:<12} train loss {result.train_loss[-1]:.4f}  "
            f"test acc {100 * result.test_accuracy[-1]:.1f}%  {result.ms_per_step:.2f} ms/step"
        )
    base = next((r for m, *_, r in rows if m == "plain"), None)
    print()
    print(
        "| method | lr | momentum | damping | final train loss | test accuracy | ms/step "
        "| time vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, lr, momentum, options, r in rows:
        rel = f"{r.ms_per_step / base.ms_per_step:.2f}x" if base else "-"
        status = " (diverged)" if r.diverged else ""
        damping = options.get("damping", "-") if method != "plain" else "-"
        print(
            f"| {method} | {lr:g} | {momentum:g} | {damping} | {r.train_loss[-1]:.4f}{status} | "
            f"{100 * r.test_accuracy[-1]:.1f}% | {r.ms_per_step:.2f} | {rel} |"
        )
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precond", description="Gradient preconditioning with second-order information."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered methods")
    p_list.set_defaults(func=_cmd_list)
    p_demo = sub.add_parser("demo", help="train an MLP on MNIST-1D with several methods")
    p_demo.add_argument("--methods", default="", help="comma-separated registry names")
    p_demo.add_argument("--epochs", type=int, default=10)
    p_demo.add_argument("--batch-size", type=int, default=128)
    p_demo.add_argument("--width", type=int, default=128)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_cmd_demo)
    try:
        from .bench.cli import add_bench_parser
    except ImportError:  # pragma: no cover - the harness is part of the package
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``precond`` command.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"precond: error: {exc}", file=sys.stderr)
        return 2
