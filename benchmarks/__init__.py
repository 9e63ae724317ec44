"""fusedskip benchmarks: one case table, one byte model, one timing engine.

* :mod:`benchmarks.cases` / :mod:`benchmarks.models` — the cases (op or model, passes, shapes,
  fused module and eager equivalent), declared once;
* :mod:`benchmarks.bytes_model` — minimal bytes and FLOPs per op and pass;
* :mod:`benchmarks.timing` — CUDA-event / CUDA-graph / perf_counter timing, L2-defeating input
  rotation, peak memory, copy bandwidth;
* :mod:`benchmarks.engine` — specs → prepared steps → rows, shared by the runner and the
  pytest-benchmark suite (``benchmarks/test_ops.py``, ``benchmarks/test_models.py``);
* :mod:`benchmarks.report`, :mod:`benchmarks.targets`, :mod:`benchmarks.plots`,
  :mod:`benchmarks.compare` — table, JSON/CSV, targets, PNGs, regression check.

Run ``python -m benchmarks --quick`` (or ``--full``), ``python -m benchmarks compare A.json B.json``,
``pytest benchmarks/ --benchmark-only``.
"""
