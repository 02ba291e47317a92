"""Benchmark suites for scripts/bench.py (one module per suite) and their shared timing helpers."""
