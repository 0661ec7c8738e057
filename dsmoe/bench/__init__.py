"""Latency and throughput benchmarks: ``dsmoe.bench.throughput.run_benchmark(BenchSettings(...))`` or
``dsmoe bench``. This package imports nothing, so the command line starts fast."""
