"""Benchmark harness: ``precond bench`` (also ``python -m precond.bench``).

How much slower and larger a step of each method is than an SGD step, across batch sizes and
update intervals, and how close each method comes to its cost floor (the work its math
requires, timed kernel by kernel on the same machine). See ``benchmarks/README.md``.
"""

from __future__ import annotations

from .floor import amortised_floor, memory_floor_mb, phase_costs
from .memory import MemoryProbe
from .problems import PROBLEMS, Problem, get_problem
from .ratios import attach_ratios
from .runner import BenchSpec, run_bench

__all__ = [
    "PROBLEMS",
    "BenchSpec",
    "MemoryProbe",
    "Problem",
    "amortised_floor",
    "attach_ratios",
    "get_problem",
    "memory_floor_mb",
    "phase_costs",
    "run_bench",
]
