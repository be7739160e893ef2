"""``precond bench`` and ``python -m precond.bench``.

Presets (``--grid``) fill every option; explicit options override them:

* ``cpu``: the committed CPU results: every registered method except the dense-curvature ones
  (``DENSE_METHODS``) on ``mlp512`` and ``cnn_small``,
  ``B ∈ {32, 128, 512}``, ``T ∈ {1, 10, 100}``, 2 threads; configurations measured within
  3 s are measured in three fresh workers, a pass over the grid apart (the row of median
  step time is kept).
* ``cpu-dense``: the dense-curvature methods (full/layer/unit-wise natural gradient, Newton)
  with ``plain`` and ``kfac`` for reference, on ``mlp_small`` (3.5k parameters).
* ``smoke``: ``plain`` and ``kfac`` on ``mlp_tiny``, ``B=8``, ``T=1``, few steps (CI).
* ``cpu-zoo``: the small variants of every ASDL model on a CPU.
* ``asdl``: the ASDL study's models at full size (for a GPU: add ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import registry
from .problems import PROBLEMS

__all__ = ["GRIDS", "add_bench_parser", "build_parser", "main", "spec_from_args"]

#: Methods whose curvature is a dense matrix over a layer or the whole model (O(d_in·d_out)²
#: memory per layer, or a d_in³ factorisation per output unit): they exist for small models, so
#: the ``cpu`` grid leaves them to the ``cpu-dense`` grid on a small MLP instead of recording
#: only out-of-memory rows (or spending minutes per configuration) on MLP-512.
DENSE_METHODS = ("natural_gradient", "ng_full", "ng_layer", "ng_unit", "ng_emp", "newton")

#: glibc's allocator for the CPU grids' workers: every block from the heap (no mmap) and freed
#: memory kept (no trimming), as a caching allocator would. Under glibc's defaults each step
#: maps, faults in and unmaps its large activations again, and how often depends on the
#: allocation history of the process: the same SGD step of cnn_small at B=512 took 111-154 ms
#: (median per fresh process) under the defaults and 75-80 ms with this (2 threads).
#: ``--malloc-env none`` measures under the defaults.
STEADY_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}

GRIDS: dict[str, dict[str, Any]] = {
    "cpu": {
        "methods": "scalable",  # every registered method but DENSE_METHODS
        "models": ["mlp512", "cnn_small"],
        "batch_sizes": [32, 128, 512],
        "intervals": [1, 10, 100],
        "threads": 2,
        "warmup": 3,
        "repeats": 7,
        "rare_repeats": 3,
        "max_steps": 40,
        "timeout": 600.0,
        "retry_contended": 2,
        "wait_idle": 30.0,
        "sample_time": 5.0,
        "min_time": 0.5,
        "malloc_env": STEADY_MALLOC,
        "processes": 3,
        "processes_below_s": 3.0,
        "profile_misses": True,
        # the first passes take about 22 min: past 25 min no slow row is measured again, so
        # that the run (profiles of the misses included) stays within 30 min
        "remeasure_until_s": 1500.0,
        # the further workers of the short configurations start only until 24 min: on a
        # normal host their passes end by then (the grid's passes took about 23 min); on a
        # host 1.8 x slow for SGD's step they ran until 29.9 min (13f1322), leaving no time
        # to measure slow rows again or to profile the misses, and the run ended at 30 min
        "further_until_s": 1440.0,
        # and past 27 min no miss is profiled: on a host twice as slow as usual a run at
        # 58e2f52 measured for 28.9 min, then profiled 69 misses for 3.0 more (31.9 min); at
        # f434307 (host 1.8 x slow) profiles until 28 min ended the run at 28.0 min, 29.6
        # with the 1.4-minute install: 27 leaves a minute for the last profile and the install
        "profile_until_s": 1620.0,
        "out": "benchmarks/results/cpu",
    },
    "smoke": {
        "methods": ["plain", "kfac"],
        "models": ["mlp_tiny"],
        "batch_sizes": [8],
        "intervals": [1],
        "threads": 1,
        "warmup": 1,
        "repeats": 3,
        "rare_repeats": 1,
        "max_steps": 5,
        "timeout": 120.0,
        "kernel_min_time": 0.002,
        "share_kernel_timings": True,
        "min_time": 0.0,
        "out": "bench-out/smoke",
    },
    "cpu-dense": {
        "methods": ["plain", "kfac", *DENSE_METHODS],
        "models": ["mlp_small"],
        "batch_sizes": [32, 128, 512],
        "intervals": [1, 10, 100],
        "threads": 2,
        "warmup": 3,
        "repeats": 7,
        "rare_repeats": 3,
        "max_steps": 40,
        "timeout": 300.0,
        "retry_contended": 2,
        "wait_idle": 30.0,
        "sample_time": 5.0,
        "min_time": 0.5,
        "malloc_env": STEADY_MALLOC,
        "out": "benchmarks/results/cpu-dense",
    },
    "cpu-zoo": {
        "methods": None,
        "models": [
            "mlp512",
            "cnn_small",
            "resnet18_small",
            "wrn16_2_small",
            "vit_small",
            "mixer_small",
        ],
        "batch_sizes": [32, 128],
        "intervals": [1, 10, 100],
        "threads": 2,
        "warmup": 3,
        "repeats": 5,
        "rare_repeats": 2,
        "max_steps": 30,
        "timeout": 900.0,
        "out": "benchmarks/results/cpu-zoo",
    },
    "asdl": {
        "methods": None,
        "models": ["mlp512", "mlp2048", "resnet18", "wrn28_10", "vit_tiny", "mixer"],
        "batch_sizes": [32, 128, 512, 2048],
        "intervals": [1, 10, 100],
        "threads": 0,
        "warmup": 5,
        "repeats": 10,
        "rare_repeats": 3,
        "max_steps": 50,
        "timeout": 1800.0,
        "out": "benchmarks/results/asdl",
    },
}

_SPEC_KEYS = (
    "methods",
    "models",
    "batch_sizes",
    "intervals",
    "device",
    "threads",
    "warmup",
    "repeats",
    "rare_repeats",
    "max_steps",
    "budget_s",
    "timeout",
    "seed",
    "kernel_min_time",
    "share_kernel_timings",
    "cold_kernels",
    "retry_contended",
    "wait_idle",
    "min_time",
    "sample_time",
    "live_memory",
    "malloc_env",
    "flush_denormals",
    "fork_server",
    "fast_forward",
    "processes",
    "processes_below_s",
    "profile_misses",
    "remeasure_until_s",
    "further_until_s",
    "profile_until_s",
)


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(v) for v in text.split(",") if v.strip()]

    return parse


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu", help="preset (default: cpu)")
    p.add_argument("--methods", type=_csv(str), help="comma-separated registry names, or 'all'")
    p.add_argument(
        "--models",
        type=_csv(str),
        help=f"comma-separated; known: {', '.join(PROBLEMS)}; or your own model as "
        "MODULE:ATTRIBUTE or FILE.py:ATTRIBUTE naming a precond.bench.Problem (or a function "
        "returning one)",
    )
    p.add_argument("--batch-sizes", type=_csv(int), help="comma-separated batch sizes B")
    p.add_argument("--intervals", type=_csv(int), help="comma-separated update intervals T")
    p.add_argument("--repeats", type=int, help="timed samples of the most frequent step kind")
    p.add_argument("--rare-repeats", type=int, help="timed samples of update steps when T > 1")
    p.add_argument("--warmup", type=int, help="untimed steps per configuration")
    p.add_argument("--max-steps", type=int, help="timed steps after which one update suffices")
    p.add_argument("--budget", dest="budget_s", type=float, help="seconds of timed steps at most")
    p.add_argument("--min-time", type=float, help="seconds of timed steps at least (default 1)")
    p.add_argument(
        "--sample-time",
        type=float,
        help="seconds of samples after which a step kind needs only 3 samples (2 if rare)",
    )
    p.add_argument("--timeout", type=float, help="seconds per configuration before it is killed")
    p.add_argument("--threads", type=int, help="intra-op threads per worker (0: torch default)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int)
    p.add_argument("--kernel-min-time", type=float, help="seconds spent timing each floor kernel")
    p.add_argument(
        "--share-kernel-timings",
        action="store_true",
        default=None,
        help="time each floor kernel once per run and shape and reuse it in later "
        "configurations (faster) instead of in every worker (a low quantile over the workers)",
    )
    p.add_argument(
        "--cold-kernels",
        action="store_true",
        default=None,
        help="evict the caches before each run of a floor kernel (inputs read from memory)",
    )
    p.add_argument(
        "--retry-contended",
        type=int,
        help="re-measure configurations whose cores other processes used, up to N times",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="measure each short configuration (see --processes-below) in N fresh workers, "
        "one per pass over them, and keep the row of median step time",
    )
    p.add_argument(
        "--processes-below",
        dest="processes_below_s",
        type=float,
        metavar="SECONDS",
        help="with --processes: only configurations whose first measurement took at most "
        "SECONDS (default: every configuration)",
    )
    p.add_argument(
        "--profile-misses",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the measurements, profile each configuration below the efficiency target "
        "in one more worker: operators and Python time per phase, in the rows and the report "
        "(default: on for the cpu grid)",
    )
    p.add_argument(
        "--remeasure-until",
        dest="remeasure_until_s",
        type=float,
        metavar="SECONDS",
        help="measure slow configurations again only until the run has taken SECONDS "
        "(default: no limit; the cpu grid's 1500)",
    )
    p.add_argument(
        "--further-until",
        dest="further_until_s",
        type=float,
        metavar="SECONDS",
        help="start the further workers of short configurations (--processes) only until the "
        "run has taken SECONDS; the rest keep the workers they have (default: no limit; the "
        "cpu grid's 1440)",
    )
    p.add_argument(
        "--profile-until",
        dest="profile_until_s",
        type=float,
        metavar="SECONDS",
        help="profile the misses only until the run has taken SECONDS (default: no limit; "
        "the cpu grid's 1620)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        metavar="SECONDS",
        help="before each configuration, wait up to SECONDS for the cores to be free",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="config option of a method (JSON value), e.g. kfac.damping=0.01; repeatable",
    )
    p.add_argument(
        "--no-live-memory",
        dest="live_memory",
        action="store_false",
        default=None,
        help="skip the live-tensor memory pass",
    )
    p.add_argument(
        "--malloc-env",
        action="append",
        metavar="NAME=VALUE",
        help="environment variable of the C allocator for every worker (repeatable); "
        "'none' clears the preset's",
    )
    p.add_argument(
        "--keep-denormals",
        dest="flush_denormals",
        action="store_false",
        default=None,
        help="keep denormal floats on a CPU (default: flushed to zero in every worker; a model "
        "that fits the synthetic batch otherwise times the CPU's denormal penalty)",
    )
    p.add_argument(
        "--fresh-processes",
        dest="fork_server",
        action="store_false",
        default=None,
        help="start every worker as a new interpreter instead of forking it",
    )
    p.add_argument(
        "--no-fast-forward",
        dest="fast_forward",
        action="store_false",
        default=None,
        help="run every idle step up to the next update step instead of skipping those after "
        "the idle samples",
    )
    p.add_argument("--out", help="output directory (default: the preset's)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--render",
        metavar="DIR",
        help="only re-render results.md and the figures from DIR/results.jsonl",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="print a markdown comparison of two runs' results (efficiency per configuration, "
        "targets met in each, the spread of the change) and exit",
    )


def _parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(
                f"Invalid option: {item!r}. Use METHOD.KEY=VALUE, e.g. kfac.damping=0.01."
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[name] = value
    return out


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if item.strip().lower() == "none":
            out.clear()
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"Invalid malloc env: {item!r}. Use NAME=VALUE, e.g. MALLOC_ARENA_MAX=2."
            )
        out[name.strip()] = value.strip()
    return out


def spec_from_args(args: argparse.Namespace) -> tuple[Any, str]:
    """The :class:`~precond.bench.runner.BenchSpec` and output directory of parsed arguments.

    Args:
        args: Parsed arguments.

    Returns:
        ``(spec, out_dir)``.

    Raises:
        ValueError: For unknown methods, models or malformed options.
    """
    from .runner import BenchSpec

    preset = dict(GRIDS[args.grid])
    values: dict[str, Any] = {}
    for key in _SPEC_KEYS:
        given = getattr(args, key, None)
        values[key] = given if given is not None else preset.get(key)
    if values["methods"] in (None, ["all"]):
        values["methods"] = list(registry.methods())
    elif values["methods"] == "scalable":
        values["methods"] = [m for m in registry.methods() if m not in DENSE_METHODS]
    if isinstance(values.get("malloc_env"), list):
        values["malloc_env"] = _parse_env(values["malloc_env"])
    values = {k: v for k, v in values.items() if v is not None}
    spec = BenchSpec(**values, options=_parse_options(args.option))
    return spec, args.out or preset["out"]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .runner import run_bench, write_outputs

    argv = getattr(args, "argv", None)
    if argv is None:
        argv = (
            ["precond", *sys.argv[1:]]
            if sys.argv[1:2] == ["bench"]
            else ["precond", "bench", "(from Python)"]
        )
    if args.compare:
        from .compare import compare_rows, load_rows, render_comparison

        before, after = (load_rows(d) for d in args.compare)
        envs = {
            d: next((r.get("env") for r in rows if r.get("env")), None)
            for d, rows in zip(args.compare, (before, after))
        }
        names = (str(args.compare[0]), str(args.compare[1]))
        print(render_comparison(compare_rows(before, after), names, envs=envs), end="")
        return 0
    if args.render:
        rows = [
            json.loads(line)
            for line in Path(args.render, "results.jsonl").read_text().splitlines()
            if line
        ]
        meta_path = Path(args.render, "meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        from .floor import pool_kernel_timings
        from .ratios import attach_ratios

        if meta.get("spec", {}).get("share_kernel_timings") is False:
            pool_kernel_timings(rows)  # from each row's own worker timings: reproducible
        attach_ratios(rows)
        for path in write_outputs(rows, args.render, meta, figures=not args.no_figures):
            print(path)
        return 0
    spec, out = spec_from_args(args)
    previous = signal.signal(signal.SIGTERM, _terminate)  # clean up the worker on kill
    try:
        rows = run_bench(
            spec, out, progress=not args.no_progress, argv=argv, figures=not args.no_figures
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = sum(r.get("status") == "ok" for r in rows)
    print(f"precond bench: {ok}/{len(rows)} configurations measured; results in {out}/")
    print(
        f"  {out}/results.md, {out}/results.jsonl"
        + ("" if args.no_figures else f", {out}/poster.png, {out}/targets.png")
    )
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``precond``'s parser.

    Args:
        sub: The sub-parsers object of the ``precond`` parser.

    Returns:
        The ``bench`` parser.
    """
    p = sub.add_parser(
        "bench",
        help="time and memory of each method relative to SGD, and its cost floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m precond.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m precond.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m precond.bench``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    args.argv = ["python", "-m", "precond.bench", *args_list]
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"precond bench: error: {exc}", file=sys.stderr)
        return 2
