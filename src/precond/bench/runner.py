"""The grid: methods × models × batch sizes × intervals, one subprocess per configuration.

The SGD baseline (``plain``) is measured once per model and batch size (its steps do not
depend on the interval), before the methods, and every row's ratios refer to it. Each
configuration runs ``python -m precond.bench.worker`` in a fresh process with a time-out; a
crash, a time-out or an error inside the measurement becomes a row with a ``status`` and a
``reason``, never an exception here. Rows are appended to ``results.partial.jsonl`` as they
arrive; at the end ``results.jsonl``, ``results.md`` and the figures are written.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from .. import registry
from ..validation import check_float, check_int
from .contention import is_contended, wait_until_idle
from .env import collect_environment
from .floor import (
    FACTORISATION_KINDS,
    KERNEL_QUANTILE,
    kernel_slowdown,
    pool_kernel_timings,
    quantile,
    reference_kernel_ms,
)
from .problems import get_problem
from .ratios import BASELINE, attach_ratios

__all__ = [
    "BENCH_OPTIONS",
    "BenchSpec",
    "configurations",
    "profile_misses",
    "run_bench",
    "run_worker",
    "write_outputs",
]

#: Options a method needs on the benchmark problems (merged under the user's ``--option``s).
#: Method authors add entries here when their defaults do not suit these models.
#: SMW-NG and SENG keep their preconditioner for T steps; with the default damping 1e-3 a
#: stale one multiplies gradient directions outside the span of its per-example gradients by
#: up to 1/λ, and the bench's SGD (lr 1e-3, momentum 0.9) diverges within 10-30 steps at
#: T = 10 (cnn_small and mlp512, B = 32). λ = 0.1 (the demo's value) trains at every T.
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "smw_ng": {"damping": 0.1},
    "seng": {"damping": 0.1},
}

Row = dict[str, Any]

#: Interpreter arguments that run one configuration (followed by the spec and result paths).
WORKER_ARGS = ["-m", "precond.bench.worker"]


@dataclass
class BenchSpec:
    """What to measure and how.

    Attributes:
        methods: Registry names (the SGD baseline is added if missing).
        models: Problem names (:data:`precond.bench.problems.PROBLEMS`, or ``MODULE:ATTRIBUTE``
            / ``FILE.py:ATTRIBUTE`` for your own: :func:`precond.bench.problems.load_problem`).
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
        share_kernel_timings: Time each floor kernel once per run and shape and reuse the
            timing in later configurations (faster) instead of the default: every worker
            times the kernels of its floor, and each kernel's time is a low quantile of the
            run's workers' timings (:func:`~precond.bench.floor.pool_kernel_timings`), so
            neither one slow worker nor one slow timing sets a floor.
        cold_kernels: Evict the caches before each run of a floor kernel (see
            :mod:`precond.bench.kernels`; off by default: the floor is a lower bound).
        min_time: Seconds of timed steps per configuration at least.
        retry_contended: Re-measure a configuration whose timed steps shared the cores with
            other processes, or whose worker ran slow (see :func:`slowdown`), up to this many
            times (the least contended, not slow row is kept).
        wait_idle: Before each configuration, wait up to this many seconds for the other
            processes to leave the worker's cores free (skipped while the previous
            configuration measured an idle machine).
        sample_time: Seconds of samples after which a step kind needs only three samples (two
            for rarer kinds) instead of ``repeats`` (``rare_repeats``); 0: never.
        live_memory: Also measure the peak of live tensor bytes (CPU; a short extra pass).
        malloc_env: Environment variables of the C allocator (``MALLOC_*``) for every worker,
            the SGD baseline included.
        flush_denormals: Flush denormal floats to zero in every worker on a CPU (FTZ/DAZ, set
            before the worker's thread pool starts, so that its threads inherit it). The bench
            trains on one fixed synthetic batch; a method that fits it drives the logits'
            margins past 87, the softmax's small probabilities and with them the gradients
            into denormal floats, and x86 CPUs handle those in microcode: the backward's
            matrix products of mlp512 at B=512 took 17 ms instead of 1.5, and a step 60-90 ms
            instead of 6.3, after 30-40 steps of the diagonal natural gradient. That measures
            the batch, not the method (a GPU has no such penalty). ``False`` keeps them.
        fast_forward: Skip the idle steps between the samples of the idle kind and the next
            update step (they would repeat the idle steps sampled).
        fork_server: Fork each worker from a process that imported torch once (Linux) instead
            of starting a new interpreter.
        processes: Fresh workers that measure each short configuration (see
            ``processes_below_s``); the row kept is the one with the median step time (see
            :func:`median_row`). A process's speed is a draw: the same SGD step of mlp512 at
            B=32 has per-process medians from 1.2 to 1.55 ms, so one worker's row can sit
            25% off its configuration's typical time. The further workers run in further
            passes over the short configurations, after the first pass over the grid (see
            :func:`_further_workers`).
        processes_below_s: Only configurations whose first measurement (worker start to row,
            retries included) took at most this many seconds get the further workers (``None``:
            every configuration): the choice depends on the cost of a configuration, never on
            its result.
        profile_misses: After the measurements, profile every configuration below the
            efficiency target in one more worker (:mod:`precond.bench.profile`): its row gets
            ``op_profile``, the operators and the Python time of each phase.
        remeasure_until_s: Measure slow rows again (see ``retry_contended``) only until the
            run has taken this many seconds (``None``: no limit); the rest keep their slow
            row, flagged (``remeasure`` ``"deadline"``), so that a run in a long slow stretch
            of the host still ends in time.
        further_until_s: Start the further workers (``processes``) only until the run has
            taken this many seconds (``None``: no limit); a configuration reached after that
            keeps the workers it has (its row records how many, ``processes``, and ``further``
            ``"deadline"``), so that a run on a slow host, whose passes over the grid take
            longer, leaves time for the re-measurements and profiles and ends in time.
        profile_until_s: Profile the misses (``profile_misses``) only until the run has taken
            this many seconds (``None``: no limit); the misses left get ``op_profile``
            ``{"skipped": ...}``, so that the run ends in time on a slow host, when more
            configurations miss and each profile takes longer.
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
    share_kernel_timings: bool = False
    cold_kernels: bool = False
    min_time: float = 1.0
    retry_contended: int = 0
    wait_idle: float = 0.0
    sample_time: float = 0.0
    live_memory: bool = True
    malloc_env: dict[str, str] = field(default_factory=dict)
    flush_denormals: bool = True
    fork_server: bool = True
    fast_forward: bool = True
    processes: int = 1
    processes_below_s: float | None = None
    profile_misses: bool = False
    remeasure_until_s: float | None = None
    further_until_s: float | None = None
    profile_until_s: float | None = None

    def __post_init__(self) -> None:
        check_int("processes", self.processes, minimum=1)
        if self.remeasure_until_s is not None:
            check_float("remeasure_until_s", self.remeasure_until_s, minimum=0.0)
        if self.further_until_s is not None:
            check_float("further_until_s", self.further_until_s, minimum=0.0)
        if self.profile_until_s is not None:
            check_float("profile_until_s", self.profile_until_s, minimum=0.0)
        if self.processes_below_s is not None:
            check_float("processes_below_s", self.processes_below_s, minimum=0.0)
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
        "cold_kernels": spec.cold_kernels,
        "min_time": spec.min_time,
        "sample_time": spec.sample_time,
        "live_memory": spec.live_memory,
        "fast_forward": spec.fast_forward,
        "malloc_env": dict(spec.malloc_env),
        "flush_denormals": spec.flush_denormals,
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


def worker_env(config: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process: thread counts and the allocator's settings.

    Args:
        config: The worker spec (``threads`` > 0 sets the OpenMP/MKL/OpenBLAS thread counts;
            ``malloc_env`` adds its variables).
        base: Environment to start from (default: this process's).

    Returns:
        The environment.
    """
    env = dict(os.environ if base is None else base)
    threads = int(config.get("threads") or 0)
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.update({str(k): str(v) for k, v in (config.get("malloc_env") or {}).items()})
    return env


def _stderr_tail(text: str) -> str:
    # The profiler of the live-tensor pass logs its start and stop: not worth a row's space.
    return "\n".join(line for line in text.splitlines() if not line.startswith("USDT:"))


def _collect(config: dict[str, Any], code: int, result_path: Path, stderr: str) -> Row:
    stderr = _stderr_tail(stderr)
    if code < 0:
        return _failed(config, "crashed", _signal_reason(code), stderr)
    if code != 0 or not result_path.exists():
        last = stderr.strip().splitlines()[-1:] or [f"exit code {code}"]
        return _failed(config, "crashed", f"worker failed: {last[0]}"[:400], stderr)
    row: Row = json.loads(result_path.read_text())
    return row


def run_worker(config: dict[str, Any], timeout: float) -> Row:
    """Measure one configuration in a fresh ``python -m precond.bench.worker`` process.

    Args:
        config: The worker spec.
        timeout: Seconds before the process is killed.

    Returns:
        The worker's row, or a failure row (``timeout``, ``crashed``) that says why.
    """
    env = worker_env(config)
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
        return _collect(config, proc.returncode, result_path, stderr or "")


class ForkServer:
    """Runs each configuration in a child forked from a process that imported torch once.

    A drop-in replacement of :func:`run_worker` (same call, same rows) that saves the 1-2 s of
    ``import torch`` per configuration (see :mod:`precond.bench.forkserver`). One server runs
    per worker environment (thread counts, allocator settings); it is started on first use and
    restarted if it dies. Use it as a context manager, or call :meth:`close`.
    """

    #: Interpreter arguments that start the server.
    SERVER_ARGS: ClassVar[list[str]] = ["-m", "precond.bench.forkserver"]

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] | None = None
        self._buffer = b""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server (it exits at the end of its input)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _start(self, env: dict[str, str]) -> None:
        self.close()
        self._tmp = tempfile.TemporaryDirectory(prefix="precond-bench-")
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, *self.SERVER_ARGS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self._env = env
        ready = self._read(time.monotonic() + 120.0)
        if ready is None or "ready" not in ready:
            self.close()
            raise RuntimeError("the benchmark fork server did not start")

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """One answer line, or ``None`` at the deadline or when the server has gone."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        out: dict[str, Any] = json.loads(line)
        return out

    def __call__(self, config: dict[str, Any], timeout: float) -> Row:
        """Measure one configuration (the signature of :func:`run_worker`)."""
        env = worker_env(config)
        if self._proc is None or self._proc.poll() is not None or env != self._env:
            self._start(env)
        assert self._proc is not None and self._proc.stdin is not None and self._tmp is not None
        self._count += 1
        tmp = Path(self._tmp.name)
        spec_path, result_path = tmp / f"spec{self._count}.json", tmp / f"result{self._count}.json"
        log_path = tmp / f"log{self._count}.txt"
        spec_path.write_text(json.dumps(config))
        command = {"spec": str(spec_path), "result": str(result_path), "log": str(log_path)}
        try:
            self._proc.stdin.write((json.dumps(command) + "\n").encode())
            self._proc.stdin.flush()
            started = self._read(time.monotonic() + 60.0)
            if started is None:
                raise RuntimeError("no answer")
            pid = int(started["pid"])
            try:
                done = self._read(time.monotonic() + timeout)
                if done is None:
                    _kill_group(pid)
                    done = self._read(time.monotonic() + 60.0)
                    row = _failed(
                        config, "timeout", f"timed out after {timeout:g} s", _read_text(log_path)
                    )
                    if done is None:
                        self.close()
                    return row
            except BaseException:  # interrupted: leave no worker behind
                _kill_group(pid)
                raise
            return _collect(config, int(done["returncode"]), result_path, _read_text(log_path))
        except (OSError, RuntimeError, ValueError) as exc:
            stderr = _read_text(log_path)
            self.close()
            return _failed(config, "crashed", f"fork server failed: {exc}", stderr)
        finally:
            for path in (spec_path, result_path, log_path):
                path.unlink(missing_ok=True)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _label(config: dict[str, Any]) -> str:
    label = f"{config['method']} {config['model']} B={config['batch_size']}"
    return label + ("" if config["method"] == BASELINE else f" T={config['interval']}")


def _measure_config(
    config: dict[str, Any],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    cache: dict[str, float],
    bar: Any,
    state: _RunState,
    *,
    retry_slow: bool,
) -> Row:
    """One configuration's row: a worker, or the median of ``spec.processes`` if it is short."""
    row = _measure(config, spec, worker, cache, bar, state, retry_slow=retry_slow)
    below = spec.processes_below_s
    if spec.processes > 1 and (below is None or row["runner_s"] <= below):
        more = [
            _measure(config, spec, worker, cache, bar, state, retry_slow=retry_slow)
            for _ in range(spec.processes - 1)
        ]
        row = median_row([row, *more])
    return row


def _further_workers(
    rows: list[Row],
    configs: list[dict[str, Any]],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    cache: dict[str, float],
    bar: Any,
    state: _RunState,
    deadline: float | None = None,
) -> None:
    """The further workers of the short configurations, one pass over the grid each.

    A configuration's ``spec.processes`` workers run a pass of the grid apart (minutes),
    not back to back: the host's slow stretches last from seconds to minutes, so workers
    started one after the other mostly share one, and their median with them. Spread out,
    one slow stretch can take one worker of a configuration, and the median leaves it out.
    Which configurations get further workers depends on their first measurement's duration
    (``spec.processes_below_s``), never on its result; each keeps the row of median step time
    (:func:`median_row`), SGD's rows setting the run's SGD reference again. Past
    ``deadline`` (a :func:`time.perf_counter` value) no further worker is started: the
    configurations left keep the workers they have, their rows saying how many (``processes``)
    and why (``further`` ``"deadline"``).
    """
    below = spec.processes_below_s
    if spec.processes <= 1:
        return
    short = [i for i, row in enumerate(rows) if below is None or row["runner_s"] <= below]
    if bar is not None and short:
        bar.total += len(short) * (spec.processes - 1)
        bar.refresh()
    further: dict[int, list[Row]] = {i: [] for i in short}
    cut: set[int] = set()
    for _ in range(spec.processes - 1):
        for i in short:
            if deadline is not None and time.perf_counter() > deadline:
                cut.add(i)
                if bar is not None:
                    bar.update(1)
                continue
            if bar is not None:
                bar.set_postfix_str(f"{_label(configs[i])} (again)")
            further[i].append(
                _measure(configs[i], spec, worker, cache, bar, state, retry_slow=False)
            )
            if bar is not None:
                bar.update(1)
    if cut and bar is not None:
        bar.write(
            f"  the run's time for further workers is spent: {len(cut)} configurations keep "
            f"fewer than {spec.processes} workers"
        )
    for i in short:
        env = rows[i].get("env")
        group = [rows[i], *further[i]]
        if i in cut:  # on every worker: the row kept after the run's judgement is one of them
            for w in group:
                w["further"] = "deadline"
        state.workers[i] = [dict(w) for w in group]  # median_row updates the row it keeps
        rows[i] = median_row(group)
        rows[i]["env"] = env
        state.note_sgd(configs[i], rows[i])


def _sgd_slow(rows: list[Row], configs: list[dict[str, Any]], state: _RunState) -> list[int]:
    """Judge every worker's SGD step against the run's reference; the rows still slow.

    After the passes over the grid, the reference SGD step of each model and batch size is
    the :data:`~precond.bench.floor.KERNEL_QUANTILE` quantile of the SGD steps that all the
    run's workers timed (``state.sgd_samples``). The SGD rows themselves, measured early or
    in a slow stretch of the host, are not a safe reference: when a slow stretch lasts
    through most of a run, the SGD row is slow too, and workers as slow as it pass (in a run
    of 2026-11-27, 15 of the 45 rows of mlp512 at B=32 kept a worker whose SGD step took
    1.21-1.27 ms, against 0.89 ms for the run's quantile and the SGD row's 1.24 ms).

    Every worker is judged again (:func:`is_slow`, its ``sgd_slowdown`` against the
    reference); a configuration of several workers keeps the median of those that did not
    run slow (:func:`median_row`). Returns the rows whose kept worker ran slow, to be
    measured again.
    """
    state.sgd_reference = {
        key: quantile(times, KERNEL_QUANTILE) for key, times in state.sgd_samples.items()
    }
    found = []
    for i, row in enumerate(rows):
        baseline = state.baseline(configs[i])
        group = state.workers.get(i, [row])
        for w in group:
            if w.get("status") != "ok":
                continue
            w["sgd_slowdown"] = baseline_slowdown(w, baseline)
            w["slow"] = is_slow(w, baseline, state.kernel_ms)
        if len(group) > 1:
            env = row.get("env")
            rows[i] = median_row([dict(w) for w in group])
            rows[i]["env"] = env
            state.note_sgd(configs[i], rows[i])
        if rows[i].get("slow"):
            found.append(i)
    return found


def _remeasure_slow(
    rows: list[Row],
    indices: list[int],
    configs: list[dict[str, Any]],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    cache: dict[str, float],
    state: _RunState,
    progress: bool,
    deadline: float | None = None,
) -> None:
    """Measure the configurations whose kept row ran slow again, after all the others.

    The host's slow stretches last tens of seconds (see :data:`BASELINE_SLOW_MIN_MS`): attempts
    made right after a slow one mostly fall into the same stretch, attempts minutes later
    mostly do not. Each is measured as in the run (slow workers now retried up to
    ``spec.retry_contended`` times); the new row replaces the old one if it is less bad
    (:func:`_badness`), and the kept row records ``deferred`` (``True``) and the time spent.
    SGD rows come first, then the slowest rows. Past ``deadline`` (a
    :func:`time.perf_counter` value) no configuration is started; the rows left keep their
    slow row with ``remeasure`` set to ``"deadline"``.
    """
    bar = _bar(len(indices), progress)
    # as many attempts in all as a configuration retried at once would have had
    later = replace(spec, retry_contended=spec.retry_contended - 1)
    order = sorted(indices, key=lambda i: (configs[i]["method"] != BASELINE, -_slowness(rows[i])))
    for n, i in enumerate(order):
        config, old = configs[i], rows[i]
        if deadline is not None and time.perf_counter() > deadline:
            for j in order[n:]:
                rows[j]["remeasure"] = "deadline"
            if bar is not None:
                bar.write(
                    f"  the run's time for re-measurements is spent: {len(order) - n} slow "
                    "configurations keep their slow row"
                )
            break
        if bar is not None:
            bar.set_postfix_str(f"again: {_label(config)}")
        new = _measure_config(config, later, worker, cache, bar, state, retry_slow=True)
        totals = {
            key: float(old.get(key) or 0.0) + float(new.get(key) or 0.0)
            for key in ("runner_s", "wait_s", "attempt_worker_s")
        }
        attempts = int(old.get("attempts") or 1) + int(new.get("attempts") or 1)
        kept = new if _badness(new) < _badness(old) else old
        kept.update(totals, deferred=True, attempts=attempts)
        kept["env"] = old.get("env")
        rows[i] = kept
        state.note_sgd(config, kept)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _kernel_slow(rows: list[Row], deferred: list[int], state: _RunState) -> list[int]:
    """Rows whose worker timed the floor's kernels slow against the whole run's reference.

    Only after every configuration has been measured does the run have a reference for each
    kernel (:func:`~precond.bench.floor.reference_kernel_ms`, the same times that price the
    floor). Rows over :data:`KERNEL_SLOW_LIMIT` are flagged ``slow`` (with their
    ``kernel_slowdown``) and returned, to be measured again like the other slow rows; the
    reference stays that of the first pass for the new attempts.
    """
    state.kernel_ms = reference_kernel_ms(rows)
    found = []
    for i, row in enumerate(rows):
        kernels = kernel_slowdown(row, state.kernel_ms)
        if kernels is None:
            continue
        row["kernel_slowdown"] = kernels[0]
        _note_factorisations(row, state.kernel_ms)
        if i not in deferred and is_slow(row, None, state.kernel_ms):
            row["slow"] = True
            found.append(i)
    return found


def run_bench(
    spec: BenchSpec,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    worker: Callable[[dict[str, Any], float], Row] | None = None,
    figures: bool = True,
) -> list[Row]:
    """Run the grid and write the outputs.

    Args:
        spec: The grid.
        out: Output directory (``None``: write nothing).
        progress: Show a progress bar (tqdm) on stderr.
        argv: Command line recorded in the environment.
        worker: Runs one configuration (default: a :class:`ForkServer`, or :func:`run_worker`
            without ``spec.fork_server`` or ``os.fork``; tests substitute a fake).
        figures: Also write the PNG figures.

    Returns:
        The rows, with ratios to SGD and the environment attached.
    """
    if worker is None:
        if spec.fork_server and hasattr(os, "fork"):
            with ForkServer() as server:
                return run_bench(
                    spec, out, progress=progress, argv=argv, worker=server, figures=figures
                )
        worker = run_worker
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
    state = _RunState()
    started = time.perf_counter()
    deferred: list[int] = []
    for config in configs:
        label = _label(config)
        if bar is not None:
            bar.set_postfix_str(label)
        row = _measure(config, spec, worker, cache, bar, state, retry_slow=False)
        state.note_sgd(config, row)
        row["env"] = env
        rows.append(row)
        if partial is not None:
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            if row.get("status") != "ok":
                bar.write(f"  {label}: {row.get('status')}: {row.get('reason')}")
    further_deadline = None if spec.further_until_s is None else started + spec.further_until_s
    _further_workers(rows, configs, spec, worker, cache, bar, state, further_deadline)
    if bar is not None:
        bar.close()
    # every worker judged against the run's reference SGD step; the slow rows re-measured
    deferred = _sgd_slow(rows, configs, state)
    if spec.retry_contended <= 0:
        deferred = []
    elif not spec.share_kernel_timings:
        deferred += _kernel_slow(rows, deferred, state)
    if deferred:
        deadline = None if spec.remeasure_until_s is None else started + spec.remeasure_until_s
        _remeasure_slow(rows, deferred, configs, spec, worker, cache, state, progress, deadline)
    if not spec.share_kernel_timings:
        pool_kernel_timings(rows)
    attach_ratios(rows)
    if spec.profile_misses:
        until = None if spec.profile_until_s is None else started + spec.profile_until_s
        profile_misses(rows, configs, spec, worker, progress, deadline=until)
    measured = time.perf_counter() - started
    accounting = time_accounting(rows, measured)
    meta = {"spec": asdict(spec), "env": env, "elapsed_s": measured, "time_s": accounting}
    if out_dir is not None:
        t0 = time.perf_counter()
        write_outputs(rows, out_dir, meta, figures=figures)
        accounting["outputs"] = time.perf_counter() - t0
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if partial is not None and partial.exists():
            partial.unlink()
    return rows


#: ``op_profile["skipped"]`` of a miss left unprofiled at :attr:`BenchSpec.profile_until_s`.
PROFILE_DEADLINE_REASON = "the run's time for profiles (profile_until_s) was spent"


def profile_misses(
    rows: list[Row],
    configs: list[dict[str, Any]],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    progress: bool = False,
    deadline: float | None = None,
) -> list[int]:
    """Profile the configurations below the efficiency target, one more worker each.

    Each such row gets ``op_profile`` (:func:`~precond.bench.worker.op_profile`), or
    ``{"error": ...}`` when the profiling worker failed (the row itself is kept as measured),
    and ``profile_s``, the seconds spent on it. Past ``deadline`` (a :func:`time.perf_counter`
    value) no profile is started; the misses left get ``{"skipped": reason}``.

    Args:
        rows: Rows with ratios attached, in the order of ``configs``.
        configs: The worker specs the rows were measured from.
        spec: The grid.
        worker: Runs one configuration.
        progress: Show a progress bar.
        deadline: When to stop starting profiles (``None``: never).

    Returns:
        Indices of the rows profiled (``{"skipped": ...}`` rows not included).
    """
    from .report import EFFICIENCY_TARGET

    todo = [
        i
        for i, (row, config) in enumerate(zip(rows, configs))
        if config["method"] != BASELINE
        and row.get("status") == "ok"
        and row.get("efficiency") is not None
        and float(row["efficiency"]) < EFFICIENCY_TARGET
    ]
    bar = _bar(len(todo), progress)
    for n, i in enumerate(todo):
        if deadline is not None and time.perf_counter() > deadline:
            for j in todo[n:]:
                rows[j]["op_profile"] = {"skipped": PROFILE_DEADLINE_REASON}
            if bar is not None:
                bar.write(
                    f"  the run's time for profiles is spent: {len(todo) - n} misses not profiled"
                )
            todo = todo[:n]
            break
        if bar is not None:
            bar.set_postfix_str(f"profile: {_label(configs[i])}")
        t0 = time.perf_counter()
        config = {**configs[i], "op_profile": True, "live_memory": False, "kernel_cache": {}}
        result = worker(config, spec.timeout)
        prof = result.get("op_profile") if result.get("status") == "ok" else None
        rows[i]["op_profile"] = (
            prof
            if prof is not None
            else {"error": f"{result.get('status')}: {result.get('reason')}"}
        )
        rows[i]["profile_s"] = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return todo


def time_accounting(rows: Sequence[Row], elapsed: float) -> dict[str, float]:
    """Where the wall time of a run went, in seconds.

    Args:
        rows: The rows (with the runner's ``runner_s``, ``wait_s`` and the workers'
            ``worker_s`` and ``attempt_worker_s``).
        elapsed: Wall time of the measurements.

    Returns:
        ``elapsed``; ``workers`` (inside the workers, every attempt); ``kept`` (inside the
        workers of the rows kept); ``waits`` (waiting for idle cores); ``startup`` (the rest of
        each configuration: process start, imports, reading the row); ``other`` (the runner's
        own work between configurations); ``workers_cpu`` (CPU seconds of the workers of the
        rows kept); ``profiles`` (profiling the misses, see :func:`profile_misses`);
        ``part_<name>`` per part of the workers' work
        (:data:`~precond.bench.worker.WORKER_PARTS`, rows kept only).
    """
    workers = sum(float(r.get("attempt_worker_s") or r.get("worker_s") or 0.0) for r in rows)
    kept = sum(float(r.get("worker_s") or 0.0) for r in rows)
    waits = sum(float(r.get("wait_s") or 0.0) for r in rows)
    runner = sum(float(r.get("runner_s") or 0.0) for r in rows)
    profiles = sum(float(r.get("profile_s") or 0.0) for r in rows)
    parts: dict[str, float] = {}
    for r in rows:
        for name, seconds in (r.get("parts_s") or {}).items():
            parts[f"part_{name}"] = parts.get(f"part_{name}", 0.0) + float(seconds)
    return {
        **parts,
        "elapsed": elapsed,
        "workers": workers,
        "kept": kept,
        "workers_cpu": sum(float(r.get("worker_cpu_s") or 0.0) for r in rows),
        "waits": waits,
        "startup": max(0.0, runner - waits - workers),
        "profiles": profiles,
        "other": max(0.0, elapsed - runner - profiles),
    }


@dataclass
class _RunState:
    """What the runner remembers between configurations."""

    #: Cores other processes used during the last measured configuration (None: unknown).
    last_other_cores: float | None = None
    #: The SGD rows' step times by (model, batch size), as measured so far.
    sgd_ms: dict[tuple[str, int], float] = field(default_factory=dict)
    #: Per floor kernel, the run's reference time of one run (a low quantile over its
    #: workers; empty until the first pass over the grid is done, then
    #: :func:`kernel_slowdown` judges workers against it).
    kernel_ms: dict[str, float] = field(default_factory=dict)
    #: Every worker's SGD step by (model, batch size): the step it timed in its own process,
    #: and an SGD row's own step time.
    sgd_samples: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    #: Per (model, batch size), the :data:`~precond.bench.floor.KERNEL_QUANTILE` quantile of
    #: ``sgd_samples`` (empty until the passes over the grid are done; see :func:`_sgd_slow`).
    sgd_reference: dict[tuple[str, int], float] = field(default_factory=dict)
    #: Per configuration index, every worker's row of the short configurations (their further
    #: workers; :func:`_further_workers`).
    workers: dict[int, list[Row]] = field(default_factory=dict)

    def note_sgd(self, config: dict[str, Any], row: Row) -> None:
        """Make an SGD row's step time the run's SGD reference of its model and batch size."""
        if config["method"] == BASELINE and row.get("status") == "ok":
            self.sgd_ms[(config["model"], config["batch_size"])] = float(row["time_ms"])

    def note_worker(self, config: dict[str, Any], row: Row) -> None:
        """Keep a worker's SGD step (see ``sgd_samples``)."""
        sgd = _own_sgd_ms(row)
        if sgd is not None:
            key = (config["model"], config["batch_size"])
            self.sgd_samples.setdefault(key, []).append(sgd)

    def baseline(self, config: dict[str, Any]) -> float | None:
        """The SGD step a worker of ``config`` is judged against (:func:`baseline_slowdown`).

        The run's reference once there is one; before, the SGD row measured so far (none for
        the SGD rows themselves).
        """
        key = (config["model"], config["batch_size"])
        if key in self.sgd_reference:
            return self.sgd_reference[key]
        return None if config["method"] == BASELINE else self.sgd_ms.get(key)


def _own_sgd_ms(row: Row) -> float | None:
    """The SGD step a worker timed: in the method's process, or an SGD row's own step."""
    if row.get("status") != "ok":
        return None
    sgd = row.get("sgd_in_process_ms")
    if not sgd and row.get("method") == BASELINE:
        sgd = row.get("time_ms")
    return float(sgd) if sgd else None


def _contended(row: Row, spec: BenchSpec) -> bool:
    return row.get("status") == "ok" and is_contended(row.get("other_cores"), spec.threads)


#: An idle step's forward/backward/optimizer part more than this many times the SGD step timed
#: in the same process marks a worker that ran slow while it timed the method's steps.
SLOW_LIMIT = 1.75

#: ... and by more than this many milliseconds: on steps of a fraction of a millisecond (the
#: dense grid's 3.5k-parameter MLP, SGD's step 0.3 ms) the ratio moves past the limit with
#: noise alone (14 of 63 configurations re-measured, 7 of them in every attempt).
SLOW_MIN_MS = 1.0


#: A worker whose own SGD step took more than this many times the run's reference SGD step of
#: its model and batch size ran slow (:func:`baseline_slowdown`). The reference is the SGD row
#: during the first passes over the grid and, after them, a low quantile of every worker's SGD
#: step (:func:`_sgd_slow`). In the committed CPU run of 2026-11-26 the ratio's median (against
#: the SGD row) was 0.95 and 4 of 270 rows exceeded 1.5 (1.60-1.67), all four below the
#: efficiency target with every phase slower than in the other runs. Against the quantile, in
#: the run of 2026-11-27 at 210e547, the rows of cnn_small and of mlp512 at B=128 and 512 lay
#: at 0.96-1.22; at mlp512 B=32, 30 rows lay at 0.99-1.10 and 15 at 1.36-1.42 (their SGD steps
#: 1.21-1.27 ms against 0.89 ms: the host's slow mode; 8 of the 15 missed the efficiency
#: target).
BASELINE_SLOW_LIMIT = 1.25

#: ... and by more than this many milliseconds. On the dense grid's 3.5k-parameter MLP (SGD's
#: step 0.13-0.24 ms) the host's slow mode moves the step by 0.04-0.09 ms (1.29-1.39 ×), which
#: is noise beside the dense methods' steps; at mlp512 B=32 it moves it by 0.3-0.4 ms.
BASELINE_SLOW_MIN_MS = 0.15

#: A worker that timed its floor's kernels (amortised per step like the floor) at more than
#: this many times the run's reference for the same kernels ran slow (:func:`kernel_slowdown`).
#: The host has stretches of seconds to minutes in which multithreaded LAPACK runs at about
#: one thread's speed while matrix products do not slow down: in back-to-back fresh processes
#: on the development machine, Cholesky and its inverse for K-FAC's mlp512 factors (785, 2 ×
#: 513, 2 × 512, 10) took 13.4-14.8 ms in some stretches and 21.5-22.9 ms in others, with
#: ``OMP_WAIT_POLICY``, ``OMP_PROC_BIND`` or ``GOMP_SPINCOUNT`` set or not, while a 512 × 785
#: × 785 product took 2.9-3.3 ms in both. SGD's step, which the other checks compare, has no
#: factorisation. In the committed run of 7f5abf7 the ratio's median (against the median
#: then) was 1.00; kfac's rows of mlp512 at B=32 and 128 and of cnn_small at B=128 lay at
#: 1.34-1.45 (their refresh 21 ms against a floor of 13.5 ms at mlp512). The kernels are judged
#: all together and the factorisations (:data:`~precond.bench.floor.FACTORISATION_KINDS`)
#: alone, whose slowdown the matrix products beside them dilute: in the run at a72c5c7, K-FAC's
#: and K-BFGS's cnn_small rows at B=32 timed their factorisations at 1.25-1.28 × the reference
#: (the inverse of order 2049: 71 ms against 52.4) and all their kernels at 1.22-1.24 ×, and
#: missed the target at 0.74-0.76; in the run at d2c7833, kfac mlp512 B=512 T=1 timed them at
#: 1.52 × and all its kernels at 1.25 × (efficiency 0.79).
KERNEL_SLOW_LIMIT = 1.25

#: ... and by more than this many milliseconds per step.
KERNEL_SLOW_MIN_MS = 0.5


def is_slow(
    row: Row, baseline_ms: float | None = None, kernel_ms: Mapping[str, float] | None = None
) -> bool:
    """Whether a row's worker ran slow.

    Its idle steps' forward/backward against its own SGD step (:func:`slowdown`) exceeds
    :data:`SLOW_LIMIT` by more than :data:`SLOW_MIN_MS`, or its own SGD step against the SGD
    row of the run (:func:`baseline_slowdown`, given ``baseline_ms``) exceeds
    :data:`BASELINE_SLOW_LIMIT` by more than :data:`BASELINE_SLOW_MIN_MS`, or its timings of
    the floor's kernels against the run's reference
    (:func:`~precond.bench.floor.kernel_slowdown`, given ``kernel_ms``), all of them or the
    factorisations alone, exceed :data:`KERNEL_SLOW_LIMIT` by more than
    :data:`KERNEL_SLOW_MIN_MS` per step.
    """
    kernels = kernel_slowdown(row, kernel_ms) if kernel_ms else None
    factorisations = kernel_slowdown(row, kernel_ms, FACTORISATION_KINDS) if kernel_ms else None
    checks = (
        (slowdown(row), row.get("sgd_in_process_ms"), SLOW_LIMIT, SLOW_MIN_MS),
        (
            baseline_slowdown(row, baseline_ms),
            baseline_ms,
            BASELINE_SLOW_LIMIT,
            BASELINE_SLOW_MIN_MS,
        ),
        *(
            (
                ratios[0] if ratios else None,
                ratios[1] if ratios else None,
                KERNEL_SLOW_LIMIT,
                KERNEL_SLOW_MIN_MS,
            )
            for ratios in (kernels, factorisations)
        ),
    )
    return any(
        ratio is not None
        and base is not None
        and ratio > limit
        and (ratio - 1.0) * float(base) > margin
        for ratio, base, limit, margin in checks
    )


def baseline_slowdown(row: Row, baseline_ms: float | None) -> float | None:
    """The SGD step timed in a row's worker over the run's SGD row of its model and batch.

    Every worker also times SGD's step; a worker whose SGD step ran much slower than the
    run's SGD configuration ran slow as a whole. This catches slow workers at ``T = 1`` too,
    which have no idle steps for :func:`slowdown` (Hessian-free mlp512 B=32 T=1 in a trial
    run: SGD's step 2.45 ms in its worker against 1.25 ms, every phase about 2 × slower).

    Returns:
        The ratio, or ``None`` without both times.
    """
    sgd = _own_sgd_ms(row)
    if sgd is None or not baseline_ms:
        return None
    return sgd / float(baseline_ms)


def slowdown(row: Row) -> float | None:
    """Idle steps' forward/backward time over the SGD step timed in the same worker.

    On an idle step every method runs SGD's forward and backward (no hooks, no extra passes)
    and then applies its stored preconditioner, so the ``fb`` phase is close to SGD's step (at
    most 1.61 × in two runs of the CPU grid but for one outlier at 2.75 ×). A much larger
    ratio means the worker ran slower while it timed the method's steps than when it timed
    SGD's: a host-level slowdown that the contention meter (other processes and steal time)
    does not see.

    Returns:
        The ratio, or ``None`` without idle steps or an SGD step timed in the worker.
    """
    idle = (row.get("kinds") or {}).get("idle")
    sgd = row.get("sgd_in_process_ms")
    if row.get("status") != "ok" or not idle or not sgd:
        return None
    fb = (idle.get("phases_ms") or {}).get("fb")
    return None if fb is None else float(fb) / float(sgd)


def _note_factorisations(row: Row, kernel_ms: Mapping[str, float]) -> None:
    """Record a row's ``factorisation_slowdown`` (its floor has factorisations)."""
    found = kernel_slowdown(row, kernel_ms, FACTORISATION_KINDS)
    if found is not None:
        row["factorisation_slowdown"] = found[0]


def _slowness(row: Row) -> float:
    """The largest of a row's slowdowns (0 for none)."""
    # its SGD step against the run's, its kernels (and factorisations) against the run's and
    # its idle steps against its own SGD step
    ratios = (
        row.get("sgd_slowdown"),
        row.get("kernel_slowdown"),
        row.get("factorisation_slowdown"),
        slowdown(row),
    )
    return max((float(r) for r in ratios if r is not None), default=0.0)


def _badness(row: Row) -> tuple[bool, bool, bool, float, float]:
    # Of attempts that all ran slow, the least slow is kept (see _slowness).
    return (
        row.get("status") != "ok",
        bool(row.get("contended")),
        bool(row.get("slow")),
        _slowness(row) if row.get("slow") else 0.0,
        float(row.get("other_cores") or 0.0),
    )


def _measure(
    config: dict[str, Any],
    spec: BenchSpec,
    worker: Callable[[dict[str, Any], float], Row],
    cache: dict[str, float],
    bar: Any,
    state: _RunState | None = None,
    *,
    retry_slow: bool = True,
) -> Row:
    """Measure one configuration in a worker, again while contended (or slow).

    With ``retry_slow=False`` a slow worker's row is returned at once (the caller re-measures
    the configuration later: a host's slow stretch lasts tens of seconds, through attempts
    made right after it); contended rows are measured again either way.
    """
    state = state if state is not None else _RunState()
    best: Row | None = None
    started = time.perf_counter()
    waited = 0.0
    in_workers = 0.0
    for attempt in range(1 + max(0, spec.retry_contended)):
        # The last worker measured how busy the other cores were over seconds of timing: if
        # they were free, start at once (a contended row is re-measured anyway).
        idle = state.last_other_cores is not None and not is_contended(
            state.last_other_cores, spec.threads
        )
        if spec.wait_idle > 0 and not idle:
            t0 = time.perf_counter()
            wait_until_idle(spec.threads, spec.wait_idle)
            waited += time.perf_counter() - t0
        shared = cache if spec.share_kernel_timings else {}
        row = worker({**config, "kernel_cache": shared}, spec.timeout)
        new = row.pop("kernel_cache_new", None) or {}
        if spec.share_kernel_timings:
            cache.update(new)
        in_workers += float(row.get("worker_s") or 0.0)
        state.last_other_cores = row.get("other_cores") if row.get("status") == "ok" else None
        row["contended"] = _contended(row, spec)
        ratio = slowdown(row)
        state.note_worker(config, row)
        baseline = state.baseline(config)
        row["slow"] = is_slow(row, baseline, state.kernel_ms)
        row["sgd_slowdown"] = baseline_slowdown(row, baseline)
        kernels = kernel_slowdown(row, state.kernel_ms) if state.kernel_ms else None
        if kernels is not None:
            row["kernel_slowdown"] = kernels[0]
            _note_factorisations(row, state.kernel_ms)
        if best is None or _badness(row) < _badness(best):
            best = row
        if not (best["contended"] or best["slow"]):
            break
        if not retry_slow and not best["contended"]:
            break  # slow, not contended: measured again at the end of the run
        if bar is not None and attempt < spec.retry_contended:
            why = (
                f"contended ({row.get('other_cores', 0):.2f} other cores busy)"
                if row["contended"]
                else f"slow worker (idle steps' forward/backward {ratio or 0:.2f} × its SGD step, "
                f"its SGD step {row['sgd_slowdown'] or 0:.2f} × the run's, its floor's kernels "
                f"{row.get('kernel_slowdown') or 0:.2f} × the run's, its factorisations "
                f"{row.get('factorisation_slowdown') or 0:.2f} ×)"
            )
            bar.write(f"  {why}: again")
    assert best is not None
    best["attempts"] = attempt + 1
    best["wait_s"] = waited
    best["attempt_worker_s"] = in_workers
    best["runner_s"] = time.perf_counter() - started
    return best


def median_row(rows: Sequence[Row]) -> Row:
    """Of rows measuring one configuration in separate workers, the one of median step time.

    Rows that are not ``ok`` count only when none is, and rows flagged ``slow`` only when all
    ``ok`` rows are (a slow worker's row is never kept beside one that did not run slow); of
    an even number of rows the slower of the middle two is kept (a conservative median). The
    kept row records every worker's step time (``process_times_ms``, in the order measured;
    ``None`` for a failed one) and the time spent on all of them (``runner_s``, ``wait_s``,
    ``attempt_worker_s`` summed).

    Args:
        rows: At least one row.

    Returns:
        The kept row (the same object, updated).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    ok = sorted([r for r in ok if not r.get("slow")] or ok, key=lambda r: float(r["time_ms"]))
    kept = ok[len(ok) // 2] if ok else rows[0]
    kept["processes"] = len(rows)
    kept["process_times_ms"] = [r.get("time_ms") if r.get("status") == "ok" else None for r in rows]
    for key in ("runner_s", "wait_s", "attempt_worker_s"):
        kept[key] = sum(float(r.get(key) or 0.0) for r in rows)
    return kept


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
