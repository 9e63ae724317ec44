"""The one timing engine: every number the suites and the runner report comes from here.

GPU (``torch.cuda`` available):
  * a pair of CUDA events around every call, median / p20 / p80 over many calls;
  * warm-up first (at least ``warmup_runs`` calls and ``warmup_ms``), so Triton autotuning,
    torch.compile / max-autotune compilation and cuDNN algorithm search are never timed;
  * inputs rotate through as many input sets as it takes to exceed ``flush_bytes`` (default twice
    the device's L2, 50 MB on H100), so no call reads its inputs from a cache the previous call
    warmed;
  * optionally (``cuda_graphs=True``) one call per input set is captured in a CUDA graph and the
    graph is replayed, removing launch overhead; per-call time = replay time ÷ calls per graph.
CPU: ``time.perf_counter`` around every call (the ops are synchronous there), no rotation.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

H100_L2_BYTES = 50 * 1024 ** 2


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    mean_ms: float
    runs: int
    method: str            # "cuda-events", "cuda-graph" or "perf_counter"
    input_sets: int
    note: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarize(times_ms: List[float], method: str, input_sets: int, note: str = "") -> Timing:
    arr = np.asarray(times_ms, dtype=np.float64)
    p20, p50, p80 = np.percentile(arr, [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80), float(arr.mean()), int(arr.size), method, input_sets, note)


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or H100_L2_BYTES)


def sets_needed(set_bytes: int, flush_bytes: int, max_sets: int = 256) -> int:
    """Input sets to rotate through so that together they exceed ``flush_bytes``."""
    if flush_bytes <= 0 or set_bytes <= 0:
        return 1
    return int(min(max_sets, max(1, math.ceil(flush_bytes / set_bytes) + (1 if set_bytes < flush_bytes else 0))))


class Timer:
    """Times ``step(i)`` (one call on input set ``i``) the same way for every provider."""

    def __init__(self, device: torch.device, *, warmup_ms: float = 25.0, warmup_runs: int = 3,
                 rep_ms: float = 100.0, min_runs: int = 10, max_runs: int = 2000,
                 flush_bytes: Optional[int] = None, cuda_graphs: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.warmup_ms, self.warmup_runs = warmup_ms, warmup_runs
        self.rep_ms, self.min_runs, self.max_runs = rep_ms, min_runs, max_runs
        self.flush_bytes = (2 * l2_cache_bytes(self.device) if self.cuda else 0) if flush_bytes is None else flush_bytes
        self.cuda_graphs = cuda_graphs and self.cuda

    # ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warmup(self, step: Callable[[int], Any], n_sets: int) -> float:
        """Warm-up calls (compilation, autotuning, allocator growth), cycling the input sets:
        at least ``warmup_runs`` calls and ``warmup_ms``. Returns the median ms of the calls
        after the first (an estimate that sizes the timed run)."""
        start = time.perf_counter()
        times: List[float] = []
        while True:
            t0 = time.perf_counter()
            step(len(times) % n_sets)
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if (len(times) >= self.warmup_runs and (time.perf_counter() - start) * 1e3 >= self.warmup_ms) \
                    or len(times) >= 1000:
                later = sorted(times[1:] or times)
                return later[len(later) // 2]

    def runs_for(self, est_ms: float) -> int:
        if not est_ms or not math.isfinite(est_ms) or est_ms <= 0:
            return self.min_runs
        return int(min(self.max_runs, max(self.min_runs, self.rep_ms / est_ms)))

    def measure(self, step: Callable[[int], Any], n_sets: int = 1) -> Timing:
        est = self.warmup(step, n_sets)
        if not self.cuda:
            return self._measure_cpu(step, n_sets, est)
        note = ""
        if self.cuda_graphs:
            try:
                return self._measure_graph(step, n_sets)
            except Exception as exc:  # capture is not possible for every provider
                note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); timed with events"
                self.sync()
        return self._measure_events(step, n_sets, note)

    # ---------------------------------------------------------------------------------------
    def _measure_cpu(self, step, n_sets, est_ms) -> Timing:
        times = []
        for r in range(self.runs_for(est_ms)):
            t0 = time.perf_counter()
            step(r % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times, "perf_counter", n_sets)

    def _measure_events(self, step, n_sets, note="") -> Timing:
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        # Estimate the per-call GPU time back to back, then size the run.
        probe = max(5, n_sets)
        a, b = ev(), ev()
        a.record()
        for j in range(probe):
            step(j % n_sets)
        b.record()
        self.sync()
        runs = self.runs_for(a.elapsed_time(b) / probe)
        starts, ends = [ev() for _ in range(runs)], [ev() for _ in range(runs)]
        for r in range(runs):
            starts[r].record()
            step(r % n_sets)
            ends[r].record()
        self.sync()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events", n_sets, note)

    def _measure_graph(self, step, n_sets) -> Timing:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(2):
                for i in range(n_sets):
                    step(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n_sets):
                step(i)
        graph.replay()
        self.sync()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            graph.replay()
        b.record()
        self.sync()
        runs = self.runs_for(a.elapsed_time(b) / 3)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for r in range(runs):
            starts[r].record()
            graph.replay()
            ends[r].record()
        self.sync()
        times = [s.elapsed_time(e) / n_sets for s, e in zip(starts, ends)]
        del graph
        return summarize(times, "cuda-graph", n_sets, f"{n_sets} calls per graph replay")


# -------------------------------------------------------------------------------------------
def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached CUDA blocks (and with ``collect``, run the garbage collector first: slow,
    ~0.3 s with torch loaded, so only when a provider is dropped). Nothing to do on the CPU."""
    if torch.device(device).type != "cuda":
        return
    if collect:
        gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def peak_memory(step: Callable[[int], Any], device: torch.device) -> Optional[Dict[str, float]]:
    """Peak CUDA memory of one (already warmed-up) call: ``max_memory_allocated`` after a reset.

    ``peak_mb`` is the absolute peak while the call runs (its inputs, the module's parameters and
    everything the call allocates); ``peak_extra_mb`` subtracts what was allocated before the
    call (the working memory: saved activations, outputs, gradients, workspaces).
    None on the CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    mib = 1024.0 ** 2
    return {"peak_mb": peak / mib, "peak_extra_mb": (peak - before) / mib}


def copy_bandwidth(timer: Timer, nbytes: int = 1 << 30) -> Dict[str, Any]:
    """Device-to-device copy bandwidth with the same timer: ``dst.copy_(src)`` on ``nbytes``
    tensors, counting read + write (2 × nbytes) per copy. The practical memory ceiling the
    "fraction of copy" column divides by."""
    return copy_bandwidth_of(timer, lambda dst, src: dst.copy_(src), nbytes)


def copy_bandwidth_of(timer: Timer, copy: Callable[[torch.Tensor, torch.Tensor], Any],
                      nbytes: int = 1 << 30) -> Dict[str, Any]:
    """Bandwidth of ``copy(dst, src)`` on two ``nbytes`` fp32 tensors, read + write counted."""
    numel = nbytes // 4
    buffers = {"src": torch.randn(numel, device=timer.device)}
    buffers["dst"] = torch.empty_like(buffers["src"])

    def step(i: int) -> Any:
        return copy(buffers["dst"], buffers["src"])

    timing = timer.measure(step, sets_needed(2 * nbytes, timer.flush_bytes))
    moved = 2 * numel * 4
    gbps = moved / (timing.median_ms * 1e-3) / 1e9
    buffers.clear()
    free_memory(timer.device)
    return {"bytes": moved, "gbps": gbps, "timing": timing.as_dict()}
