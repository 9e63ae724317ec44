"""pytest-benchmark suite: every fused op case × shape × dtype × layout × provider × pass."""
from benchmarks.suite import run_benchmark

BENCH_KIND = "op"


def test_op(benchmark, bench_session, bench_copy_gbps, bench_spec):
    run_benchmark(benchmark, bench_session, bench_spec, bench_copy_gbps)
