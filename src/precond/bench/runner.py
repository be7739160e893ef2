"""The grid: methods × models × batch sizes × intervals, one subprocess per configuration.

The SGD baseline (``plain``) is measured once per model and batch size (its steps do not
depend on the interval), before the methods, and every row's ratios refer to it. Each
configuration runs ``python -m precond.bench.worker`` in a fresh process with a time-out; a
crash, a time-out or an error inside the measurement becomes a row with a ``status`` and a
``reason``, never an exception here. Rows are appended to ``results.partial.jsonl`` as they
arrive; at the end ``results.jsonl``, ``results.md`` and the figures are written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from .contention import is_contended, wait_until_idle
from .env import collect_environment
from .problems import get_problem
from .ratios import BASELINE, attach_ratios

__all__ = [
    "BENCH_OPTIONS",
    "BenchSpec",
    "configurations",
    "run_bench",
    "run_worker",
    "write_outputs",
]

#: Options a method needs on the benchmark problems (merged under the user's ``--option``s).
#: Method authors add entries here when their defaults do not suit these models.
BENCH_OPTIONS: dict[str, dict[str, Any]] = {}

Row = dict[str, Any]

#: Interpreter arguments that run one configuration (followed by the spec and result paths).
WORKER_ARGS = ["-m", "precond.bench.worker"]


@dataclass
class BenchSpec:
    """What to measure and how.

    Attributes:
        methods: Registry names (the SGD baseline is added if missing).
        models: Problem names (:data:`precond.bench.problems.PROBLEMS`).
        batch_sizes: Batch sizes ``B``.
        intervals: Curvature/preconditioner update intervals ``T``.
        device: ``"cpu"`` or ``"cuda"``.
        threads: Intra-op threads per worker (0: torch's default).
        warmup: Untimed steps per configuration.
        repeats: Timed samples of the most frequent step kind.
        rare_repeats: Timed samples of rarer step kinds (update steps when ``T > 1``).
        max_steps: Timed steps after which one sample per kind is enough.
        budget_s: Seconds of timed steps per configuration at most.
        timeout: Seconds per configuration (whole subprocess) before it is killed.
        seed: Seed of models and data.
        options: Per-method config options (``{"kfac": {"damping": 0.01}}``).
        kernel_min_time: Seconds spent timing each floor kernel.
        min_time: Seconds of timed steps per configuration at least.
        retry_contended: Re-measure a configuration whose timed steps shared the cores with
            other processes up to this many times (the least contended row is kept).
        wait_idle: Before each configuration, wait up to this many seconds for the other
            processes to leave the worker's cores free.
    """

    methods: list[str]
    models: list[str]
    batch_sizes: list[int]
    intervals: list[int]
    device: str = "cpu"
    threads: int = 0
    warmup: int = 3
    repeats: int = 7
    rare_repeats: int = 3
    max_steps: int = 40
    budget_s: float = 120.0
    timeout: float = 600.0
    seed: int = 0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel_min_time: float = 0.02
    min_time: float = 1.0
    retry_contended: int = 0
    wait_idle: float = 0.0

    def __post_init__(self) -> None:
        for m in self.methods:
            registry.method_info(m)  # raises for unknown names
        for p in self.models:
            get_problem(p)


def configurations(spec: BenchSpec) -> list[dict[str, Any]]:
    """Worker specs of the grid: per model and batch size, the baseline first.

    Args:
        spec: The grid.

    Returns:
        One worker spec per configuration.
    """
    methods = [m for m in spec.methods if m != BASELINE]
    common = {
        "device": spec.device,
        "threads": spec.threads,
        "warmup": spec.warmup,
        "repeats": spec.repeats,
        "rare_repeats": spec.rare_repeats,
        "max_steps": spec.max_steps,
        "budget_s": spec.budget_s,
        "seed": spec.seed,
        "kernel_min_time": spec.kernel_min_time,
        "min_time": spec.min_time,
    }
    out = []
    for model in spec.models:
        for b in spec.batch_sizes:
            base = {"method": BASELINE, "model": model, "batch_size": b, "interval": 1}
            out.append({**common, **base, "options": _options(spec, BASELINE)})
            for method in methods:
                for t in spec.intervals:
                    cfg = {"method": method, "model": model, "batch_size": b, "interval": t}
                    out.append({**common, **cfg, "options": _options(spec, method)})
    return out


def _options(spec: BenchSpec, method: str) -> dict[str, Any]:
    return {**BENCH_OPTIONS.get(method, {}), **spec.options.get(method, {})}


def _failed(config: dict[str, Any], status: str, reason: str, stderr: str = "") -> Row:
    keys = ("method", "model", "batch_size", "interval", "device", "threads")
    row = {k: config.get(k) for k in keys}
    row.update(status=status, reason=reason)
    if stderr:
        row["stderr_tail"] = stderr[-1500:]
    return row


def _signal_reason(code: int) -> str:
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory?)" if -code == signal.SIGKILL else ""
    return f"worker killed by {name}{hint}"


def run_worker(config: dict[str, Any], timeout: float) -> Row:
    """Measure one configuration in a fresh ``python -m precond.bench.worker`` process.

    Args:
        config: The worker spec.
        timeout: Seconds before the process is killed.

    Returns:
        The worker's row, or a failure row (``timeout``, ``crashed``) that says why.
    """
    env = dict(os.environ)
    threads = int(config.get("threads") or 0)
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    with tempfile.TemporaryDirectory(prefix="precond-bench-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(config))
        cmd = [sys.executable, *WORKER_ARGS, str(spec_path), str(result_path)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            return _failed(config, "timeout", f"timed out after {timeout:g} s", stderr or "")
        except BaseException:  # interrupted: leave no worker behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if proc.returncode < 0:
            return _failed(config, "crashed", _signal_reason(proc.returncode), stderr or "")
        if proc.returncode != 0 or not result_path.exists():
            last = (stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return _failed(config, "crashed", f"worker failed: {last[0]}"[:400], stderr or "")
        row: Row = json.loads(result_path.read_text())
        return row


def run_bench(
    spec: BenchSpec,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    worker: Callable[[dict[str, Any], float], Row] = run_worker,
    figures: bool = True,
) -> list[Row]:
    """Run the grid and write the outputs.

    Args:
        spec: The grid.
        out: Output directory (``None``: write nothing).
        progress: Show a progress bar (tqdm) on stderr.
        argv: Command line recorded in the environment.
        worker: Runs one configuration (tests substitute a fake).
        figures: Also write the PNG figures.

    Returns:
        The rows, with ratios to SGD and the environment attached.
    """
    configs = configurations(spec)
    env = collect_environment(spec.device, spec.threads, argv)
    out_dir = Path(out) if out is not None else None
    partial = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "results.partial.jsonl"
        partial.write_text("")
    bar = _bar(len(configs), progress)
    cache: dict[str, float] = {}
    rows: list[Row] = []
    started = time.perf_counter()
    for config in configs:
        label = f"{config['method']} {config['model']} B={config['batch_size']}"
        label += "" if config["method"] == BASELINE else f" T={config['interval']}"
        if bar is not None:
            bar.set_postfix_str(label)
        row = _measure(config, spec, worker, cache, bar)
        row["env"] = env
        rows.append(row)
        if partial is not None:
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            if row.get("status") != "ok":
                bar.write(f"  {label}: {row.get('status')}: {row.get('reason')}")
    if bar is not None:
        bar.close()
    attach_ratios(rows)
    meta = {"spec": asdict(spec), "env": env, "elapsed_s": time.perf_counter() - started}
    if out_dir is not None:
        write_outputs(rows, out_dir, meta, figures=figures)
        if partial is not None and partial.exists():
            partial.unlink()
    return rows


def _contended(row: Row, spec: BenchSpec) -> bool:
    return row.get("status") == "ok" and is_contended(row.get("other_cores"), spec.threads)


def _measure(
    config: dict[str, Any],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    cache: dict[str, float],
    bar: Any,
) -> Row:
    best: Row | None = None
    for attempt in range(1 + max(0, spec.retry_contended)):
        if spec.wait_idle > 0:
            wait_until_idle(spec.threads, spec.wait_idle)
        row = worker({**config, "kernel_cache": cache}, spec.timeout)
        cache.update(row.pop("kernel_cache_new", None) or {})
        row["contended"] = _contended(row, spec)
        if best is None or (
            row.get("status") == "ok"
            and (row.get("other_cores") or 0.0) < (best.get("other_cores") or 0.0)
        ):
            best = row
        if not best["contended"]:
            break
        if bar is not None and attempt < spec.retry_contended:
            bar.write(f"  contended ({row.get('other_cores', 0):.2f} other cores busy): again")
    assert best is not None
    best["attempts"] = attempt + 1
    return best


def write_outputs(
    rows: list[Row], out_dir: str | Path, meta: dict[str, Any], *, figures: bool = True
) -> list[Path]:
    """Write ``results.jsonl``, ``results.md`` and (optionally) the figures.

    Args:
        rows: Rows with ratios attached.
        out_dir: Directory.
        meta: ``spec``, ``env`` and ``elapsed_s`` of the run (for the report's header).
        figures: Write the PNG figures.

    Returns:
        The files written.
    """
    from .report import render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.jsonl", out / "results.md", out / "meta.json"]
    with written[0].open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    written[1].write_text(render_markdown(rows, meta))
    written[2].write_text(json.dumps(meta, indent=1, default=str) + "\n")
    if figures:
        from .figures import write_figures

        written += write_figures(rows, out)
    return written


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the bench extra
        return None
    return tqdm(total=total, desc="precond bench", unit="config", dynamic_ncols=True)
