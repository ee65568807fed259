"""Benchmarks: `python -m bench` (see README "Performance"). Not part of `make test`."""
