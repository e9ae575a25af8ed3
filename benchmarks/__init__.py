"""Reproducible performance runs (not tests): `make bench` runs `python -m benchmarks.run`."""
