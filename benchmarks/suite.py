"""The pytest-benchmark side: ``pytest benchmarks/ --benchmark-only``.

Every spec the runner would time becomes one parametrized test (``test_ops.py`` for ops,
``test_models.py`` for models), built and prepared by the same engine (same cases, inputs,
input rotation, warm-up and peak-memory measurement). The engine's own timing (CUDA events on a
GPU) goes into ``extra_info`` (median/p20/p80 ms, GB/s, fraction of copy, TFLOP/s, peak MB),
next to pytest-benchmark's wall-clock statistics of the synchronised call.
With ``--benchmark-disable`` each spec runs once: a smoke test of the whole suite.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
import torch

from .cases import CASES, Unavailable
from .engine import MEMORY_PASSES, Bench, Spec, base_row
from .report import finalize
from .timing import peak_memory


def run_benchmark(benchmark: Any, bench: Bench, spec: Spec, copy_gbps: Optional[float]) -> None:
    case = CASES[spec.case]
    reason = case.available() or bench.provider_unavailable(case, spec.provider)
    if reason:
        pytest.skip(reason)
    benchmark.group = spec.group
    row: Dict[str, Any] = base_row(spec, case)
    try:
        with bench.scope(spec) as impl:
            row["note"] = impl.note
            if not benchmark.enabled:  # smoke run: one call
                prepared = bench.prepare(spec, n_sets=1)
                benchmark.pedantic(prepared.step, args=(0,), rounds=1, iterations=1)
                return
            timer = bench.timer
            if bench.measure_memory and spec.pass_ in MEMORY_PASSES:
                one = bench.prepare(spec, n_sets=1)
                timer.warmup(one.step, 1)
                row.update(peak_memory(one.step, bench.device) or {})
                del one
            prepared = bench.prepare(spec)
            timing = timer.measure(prepared.step, prepared.n_sets)
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       runs=timing.runs, input_sets=timing.input_sets, method=timing.method)
            if case.kind == "model":
                row["flops"] = bench.count_flops(spec, prepared)
            finalize([row], copy_gbps)  # GB/s, fraction of copy, TFLOP/s
            counter = {"k": 0}
            n_sets = prepared.n_sets

            def call() -> None:
                prepared.step(counter["k"] % n_sets)
                counter["k"] += 1
                timer.sync()

            benchmark.pedantic(call, rounds=max(1, min(timing.runs, 50)), iterations=1, warmup_rounds=1)
    except Unavailable as exc:
        pytest.skip(str(exc))
    finally:
        # Speedups need the other providers' rows: pytest-benchmark's grouped table shows them.
        benchmark.extra_info.update({k: v for k, v in row.items()
                                     if v not in (None, "") and not k.startswith("speedup_")})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
