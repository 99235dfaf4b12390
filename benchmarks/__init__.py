"""Benchmarks that compare lowrank_geom's strategies with real baselines: ``python -m benchmarks <suite>``."""
