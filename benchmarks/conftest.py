"""pytest-benchmark suite set-up: options, the session's Bench, and one test per spec.

    pytest benchmarks/ --benchmark-only                       # quick shapes on CUDA (cpu shapes on CPU)
    pytest benchmarks/ --benchmark-only --bench-size full --bench-cases gn_silu,skip_gn_silu
    pytest benchmarks/ --benchmark-disable --bench-size tiny  # every spec once (smoke test)

The suite only runs when asked for (``--benchmark-only`` or a path inside benchmarks/ on the
command line), so a plain ``pytest`` from the repository root does not start timing runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from benchmarks.cases import COMPILE_PROVIDERS, DTYPES, LAYOUTS, PROVIDERS, SIZES
from benchmarks.engine import CPU_PROVIDERS, NO_CUDA_MESSAGE, Bench, Spec, expand
from benchmarks.timing import Timer, copy_bandwidth

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    g = parser.getgroup("fusedskip-benchmarks", "fusedskip benchmark suite")
    g.addoption("--bench-size", choices=SIZES, default=None,
                help="shape set (default: quick on CUDA, cpu on the CPU)")
    g.addoption("--bench-cases", default=None, help="comma list of cases (default all)")
    g.addoption("--bench-providers", default=None,
                help=f"comma list (default: all on CUDA, {','.join(CPU_PROVIDERS)} on CPU)")
    g.addoption("--bench-dtypes", default=None, help="comma list of fp32,bf16")
    g.addoption("--bench-layouts", default=None, help="comma list of nchw,channels_last")
    g.addoption("--bench-passes", default=None, help="comma list of fwd,bwd,full,infer,train")
    g.addoption("--bench-no-compile", action="store_true", default=False, help="leave out torch.compile")
    g.addoption("--bench-cuda-graphs", action="store_true", default=False, help="time CUDA graph replays")


def _opt(config, name: str, default=None):
    try:
        return config.getoption(name, default=default)
    except ValueError:
        return default


def _list(config, name: str) -> Optional[List[str]]:
    value = _opt(config, name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def selected_specs(config, kind: str) -> List[Spec]:
    cuda = torch.cuda.is_available()
    size = _opt(config, "--bench-size") or ("quick" if cuda else "cpu")
    providers = _list(config, "--bench-providers") or list(PROVIDERS if cuda else CPU_PROVIDERS)
    if _opt(config, "--bench-no-compile", False):
        providers = [p for p in providers if p not in COMPILE_PROVIDERS]
    return expand(size, _list(config, "--bench-cases"), providers,
                  _list(config, "--bench-dtypes") or list(DTYPES), _list(config, "--bench-layouts") or list(LAYOUTS),
                  _list(config, "--bench-passes"), kind=kind)


def pytest_report_header(config):
    if not _explicitly_requested(config):
        return None
    if not torch.cuda.is_available():
        return f"fusedskip benchmarks: {NO_CUDA_MESSAGE}"
    return f"fusedskip benchmarks: {torch.cuda.get_device_name()} (CUDA events, inputs rotated past L2)"


def pytest_generate_tests(metafunc):
    if "bench_spec" not in metafunc.fixturenames:
        return
    specs = selected_specs(metafunc.config, getattr(metafunc.module, "BENCH_KIND", "op"))
    metafunc.parametrize("bench_spec", specs, ids=[s.id for s in specs])


def _explicitly_requested(config) -> bool:
    if _opt(config, "benchmark_only", False):
        return True
    base = Path(str(config.invocation_params.dir))
    for arg in config.invocation_params.args:
        if str(arg).startswith("-"):
            continue
        path = Path(str(arg).split("::")[0])
        path = (path if path.is_absolute() else base / path).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _explicitly_requested(config):
        return
    skip = pytest.mark.skip(reason="benchmark suite: run `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_session(request):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True
    timer = Timer(device, rep_ms=100.0 if cuda else 20.0, warmup_ms=25.0 if cuda else 5.0,
                  min_runs=10 if cuda else 5, cuda_graphs=bool(_opt(request.config, "--bench-cuda-graphs", False)))
    bench = Bench(device, timer)
    enabled = not _opt(request.config, "benchmark_disable", False)
    bench.copy_gbps = copy_bandwidth(timer)["gbps"] if (cuda and enabled) else None
    yield bench
    bench.release()


@pytest.fixture
def bench_copy_gbps(bench_session):
    return getattr(bench_session, "copy_gbps", None)


os.environ.setdefault("MPLBACKEND", "Agg")
