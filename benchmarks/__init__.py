"""Benchmarks of optax_splitlbi (scripts, never run by CI): ``python -m benchmarks.run_all``."""
