"""Command line: ``precond list | demo | bench`` (also ``python -m precond``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import registry

__all__ = ["main"]

# Demo hyper-parameters per method: SGD learning rate and config options. Methods missing here
# run with lr=0.05 and their defaults.
DEMO_SETTINGS: dict[str, tuple[float, dict[str, Any]]] = {
    "plain": (0.05, {}),
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
        f"{args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9"
    )
    rows = []
    for method in methods:
        lr, options = DEMO_SETTINGS.get(method, (0.05, {}))
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
            options=options,
            seed=args.seed,
            on_step=tick,
        )
        if bar is not None:
            bar.close()
        rows.append((method, lr, result))
        print(
            f"  {method:<12} train loss {result.train_loss[-1]:.4f}  "
            f"test acc {100 * result.test_accuracy[-1]:.1f}%  {result.ms_per_step:.2f} ms/step"
        )
    base = next((r for m, _, r in rows if m == "plain"), None)
    print()
    print("| method | lr | final train loss | test accuracy | ms/step | time vs plain |")
    print("|---|---|---|---|---|---|")
    for method, lr, r in rows:
        rel = f"{r.ms_per_step / base.ms_per_step:.2f}x" if base else "-"
        status = " (diverged)" if r.diverged else ""
        print(
            f"| {method} | {lr:g} | {r.train_loss[-1]:.4f}{status} | "
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
    p_demo.add_argument("--epochs", type=int, default=5)
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
