"""Benchmarks: model shapes, random-weight engines, baselines, the physical bound, and the harness scripts."""
