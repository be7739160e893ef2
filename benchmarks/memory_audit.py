"""How much of a method's peak memory is the allocator's, not the method's.

Runs the same configurations under several worker set-ups and compares, per configuration, the
resident-set peak growth (what ``results.md`` reports as *peak*) with the peak of live tensor
bytes (the live-tensor pass), each divided by its memory floor (SGD's peak under the same
set-up + the state and transients of the method's ``cost_model()``)::

    python benchmarks/memory_audit.py --models mlp512,cnn_small --batch-sizes 128 \\
        --intervals 1,10 --out /tmp/audit

Set-ups (``--variants``): ``default`` (the harness's: forked workers, glibc's defaults),
``fresh`` (a new interpreter per configuration, to check that forking does not change the
readings), ``mmap`` (``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072``: every
block of 128 kB or more is its own mapping, returned to the system when freed) and
``mmap_arena`` (the same and ``MALLOC_ARENA_MAX=1``). Timing settings are reduced: only memory
is compared. The conclusions are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from precond.bench.cli import DENSE_METHODS
from precond.bench.runner import BenchSpec, run_bench, run_worker

MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fresh": {"fork_server": False},
    "mmap": {"malloc_env": MMAP},
    "mmap_arena": {"malloc_env": {**MMAP, "MALLOC_ARENA_MAX": "1"}},
}
#: Timing reduced to what a memory reading needs (the warm-up and at least one update step).
QUICK = {
    "threads": 2,
    "warmup": 3,
    "repeats": 3,
    "rare_repeats": 1,
    "max_steps": 12,
    "min_time": 0.3,
    "sample_time": 1.0,
    "kernel_min_time": 0.002,
}


def _csv(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Rows per variant (read back from ``--out`` where a variant was run before)."""
    from precond import registry

    methods = _csv(args.methods) if args.methods else list(registry.methods())
    methods = [m for m in methods if m not in DENSE_METHODS or args.methods]
    out: dict[str, list[dict[str, Any]]] = {}
    for name in _csv(args.variants):
        folder = Path(args.out, name)
        done = folder / "results.jsonl"
        if done.exists() and not args.rerun:
            out[name] = [json.loads(line) for line in done.read_text().splitlines() if line]
            continue
        variant = dict(VARIANTS[name])
        fork = variant.pop("fork_server", True)
        spec = BenchSpec(
            methods=methods,
            models=_csv(args.models),
            batch_sizes=[int(b) for b in _csv(args.batch_sizes)],
            intervals=[int(t) for t in _csv(args.intervals)],
            fork_server=fork,
            **QUICK,
            **variant,
        )
        rows = run_bench(
            spec,
            folder,
            progress=False,
            figures=False,
            worker=None if fork else run_worker,
        )
        out[name] = rows
    return out


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: per configuration, RSS and live peaks over their floors in every variant."""
    names = list(results)
    keyed: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for name, rows in results.items():
        for r in rows:
            key = (r["model"], r["batch_size"], r["method"], r["interval"])
            keyed.setdefault(key, {})[name] = r
    head = ["method", "model", "B", "T", "state+trans MB"]
    for n in names:
        head += [f"{n}: RSS growth", f"{n}: RSS/floor"]
    head += ["live growth", "live end", "live/floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, b, method, t), per in keyed.items():
        first = next(iter(per.values()))
        declared = (first.get("state_mb") or 0.0) + (first.get("transient_mb") or 0.0)
        cells = [method, model, str(b), "–" if method == "plain" else str(t), f"{declared:.1f}"]
        for n in names:
            r = per.get(n, {})
            cells += [_f(r.get("growth_mb"), 1), _f(r.get("mem_over_floor"))]
        live = per.get("default") or first
        cells += [
            _f(live.get("live_growth_mb"), 1),
            _f(live.get("live_end_mb"), 1),
            _f(live.get("live_over_floor")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{float(v):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="", help="comma-separated (default: the cpu grid's)")
    p.add_argument("--models", default="mlp512,cnn_small")
    p.add_argument("--batch-sizes", default="128")
    p.add_argument("--intervals", default="1,10")
    p.add_argument("--variants", default="default,fresh,mmap,mmap_arena")
    p.add_argument("--out", default="/tmp/precond-memory-audit")
    p.add_argument("--rerun", action="store_true", help="re-measure variants already in --out")
    args = p.parse_args(argv)
    results = run(args)
    text = table(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "audit.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
