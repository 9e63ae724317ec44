"""pytest-benchmark suite: whole models (AddUNet, converted third-party U-Nets), train and infer."""
from benchmarks.suite import run_benchmark

BENCH_KIND = "model"


def test_model(benchmark, bench_session, bench_copy_gbps, bench_spec):
    run_benchmark(benchmark, bench_session, bench_spec, bench_copy_gbps)
