"""Benchmarks that need hardware this suite does not assume (run by make targets, not by pytest)."""
