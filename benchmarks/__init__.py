"""Benchmarks of mindtrace-jobs against raw drivers and peers, side by side in one run: python -m benchmarks."""
