"""Benchmark harness: ``precond bench``."""
