"""Latency and throughput benchmarks: ``run_benchmark(BenchSettings(...))`` or ``dsmoe bench``."""

from dsmoe.bench.throughput import BenchSettings, run_benchmark

__all__ = ["BenchSettings", "run_benchmark"]
