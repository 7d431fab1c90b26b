"""Benchmarks (the package is being built from scripts/benchmark.py on the bench branch)."""
