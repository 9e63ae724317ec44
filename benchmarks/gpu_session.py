"""``python -m benchmarks gpu-session OUT_DIR``: everything a short GPU window should produce, in
one command with one time budget (default 450 s, under the 8 minutes a 15-minute window leaves
after start-up), written into ``OUT_DIR``:

  env.json        device, driver, torch / triton / CUDA versions, commit (first, always)
  copy.json       copy ceiling: ``Tensor.copy_`` and a Triton SM copy kernel; the larger is used
  tests.txt       native-Triton tests of every kernel (the op test files, ``-x``)
  check.txt       ``python -m fusedskip.selfcheck --full`` (U-Net shapes)
  headline.json   each op fwd/bwd at two U-Net shapes and the AddUNet train step, bf16
                  channels_last, for fusedskip, eager and torch.compile, timed with CUDA events
  headline-graphs.json  the same rows replayed in CUDA graphs
  summary.json    what each step did, how long it took, what the budget skipped

Steps run in that order; each gets at most what is left of the budget (subprocesses are killed
at their share), and once the budget is spent the remaining steps and benchmark rows are
skipped and listed, never overrun. Needs nothing beyond torch and triton (no registry).

``--dry-run`` rehearses the same code path on the CPU: tiny shapes, kernels on Triton's
interpreter, the test step only collects, the check runs at small shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

HEADLINE_OPS = ("gated_skip", "gn_silu", "bn_relu", "skip_gn_silu", "skip_bn_relu", "conv_bn_relu", "conv_gn_silu")
HEADLINE_SHAPES = {"op": [(16, 128, 64, 64), (16, 64, 256, 256)], "model": [(8, 3, 256, 256, 32)]}
DRY_SHAPES = {"op": [(1, 32, 8, 8)], "model": [(2, 3, 16, 16, 8)]}
TEST_FILES = ("tests/test_gated_skip.py", "tests/test_group_norm_act.py", "tests/test_batch_norm_act.py",
              "tests/test_skip_norm_act.py", "tests/test_conv_norm_act.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _write(out: str, name: str, data: Any) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")


def _subprocess(cmd: Sequence[str], log: str, timeout: float, env: Dict[str, str]) -> Dict[str, Any]:
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=max(1.0, timeout)).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu-session] killed after its {timeout:.0f} s share of the budget\n")
            rc = "timeout"
    return {"rc": rc, "seconds": round(time.monotonic() - started, 1), "log": os.path.basename(log)}


# --------------------------------------------------------------------------------------------
def _triton_copy(block: int) -> Callable:
    """``copy(dst, src)`` through a Triton kernel on the SMs (``copy_`` may use a copy engine)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
        """dst[i] = src[i] for a flat buffer; grid (cdiv(numel, BLOCK),), one BLOCK slice per program;
        src_ptr/dst_ptr: contiguous buffers of ``numel`` elements."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    def copy(dst, src):
        copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block)
    return copy


def step_copy(timer, dry: bool) -> Dict[str, Any]:
    from .timing import copy_bandwidth_of
    nbytes = (1 << 20) if dry else (1 << 30)
    out = {"copy_": copy_bandwidth_of(timer, lambda dst, src: dst.copy_(src), nbytes)}
    try:
        out["triton"] = copy_bandwidth_of(timer, _triton_copy(1 << 16 if dry else 4096), nbytes)
    except Exception as exc:
        out["triton"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["gbps"] = max(v["gbps"] for v in out.values() if isinstance(v, dict) and "gbps" in v)
    return out


# --------------------------------------------------------------------------------------------
def headline_specs(dry: bool, compile_: bool) -> List[Any]:
    """fusedskip and eager rows first (ops, then AddUNet), torch.compile rows last: when the
    budget runs out it is compilation that gets skipped."""
    from .engine import Spec
    shapes = DRY_SHAPES if dry else HEADLINE_SHAPES
    plain, compiled = [], []
    for provider in ("fusedskip", "eager") + (("compile",) if compile_ else ()):
        target = compiled if provider == "compile" else plain
        for case in HEADLINE_OPS:
            for shape in shapes["op"]:
                target += [Spec(case, tuple(shape), "bf16", "channels_last", provider, p) for p in ("fwd", "bwd")]
    for provider in ("fusedskip", "eager") + (("compile",) if compile_ else ()):
        target = compiled if provider == "compile" else plain
        target += [Spec("addunet", tuple(s), "bf16", "channels_last", provider, "train") for s in shapes["model"]]
    return plain + compiled


def step_bench(out: str, budget: Budget, timer, device, dry: bool, compile_: bool, copy_gbps: Optional[float],
               meta: Dict[str, Any]) -> Dict[str, Any]:
    from . import report
    from .cases import Unavailable
    from .engine import Bench
    bench = Bench(device, timer, measure_memory=not dry, interpreted_kernels=dry)
    rows: Dict[str, List[Dict[str, Any]]] = {"events": [], "graphs": []}
    skipped: List[Dict[str, Any]] = []
    for spec in headline_specs(dry, compile_):
        if budget.left() < 5:
            skipped.append({"case": spec.case, "provider": spec.provider, "reason": f"time budget ({spec.id})"})
            continue
        for method in ("events", "graphs"):
            timer.cuda_graphs = method == "graphs" and timer.cuda
            try:
                rows[method].append(bench.run(spec))  # the same built provider: compiled once
            except Unavailable as exc:
                skipped.append({"case": spec.case, "provider": spec.provider, "reason": str(exc)})
                break
    bench.release()
    summary = {}
    for method, name in (("events", "headline"), ("graphs", "headline-graphs")):
        report.finalize(rows[method], copy_gbps)
        results = {"meta": {**meta, "timer": {"method": method}}, "copy": None, "rows": rows[method],
                   "skipped": skipped}
        report.write_json(results, os.path.join(out, name + ".json"))
        summary[name] = {"rows": len(rows[method]), "errors": sum(r["status"] != "ok" for r in rows[method])}
    summary["skipped"] = len(skipped)
    return summary


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu-session", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--budget-s", type=float, default=450.0, help="global time budget in seconds (default 450)")
    p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny shapes, Triton interpreter")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--skip", default="", help="comma list of steps to leave out: copy,tests,check,bench")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusedskip's kernels are decorated
    import torch

    from . import report
    from .timing import Timer
    os.makedirs(args.out, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    meta = report.environment(device)
    meta.update(session="gpu-session", dry_run=args.dry_run, budget_s=args.budget_s)
    _write(args.out, "env.json", meta)
    timer = Timer(device, rep_ms=30.0 if cuda else 1.0, warmup_ms=10.0 if cuda else 0.0, warmup_runs=2 if cuda else 1,
                  min_runs=10 if cuda else 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    steps: Dict[str, Any] = {}
    copy_gbps = None

    def run_step(name: str, share: float, fn: Callable[[float], Any]) -> None:
        if name in skip:
            steps[name] = {"status": "skipped", "reason": "--skip"}
            return
        if budget.left() < 5:
            steps[name] = {"status": "skipped", "reason": "time budget spent"}
            return
        started = time.monotonic()
        try:
            steps[name] = {"status": "done", "result": fn(min(share, budget.left()))}
        except Exception as exc:
            steps[name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        steps[name]["seconds"] = round(time.monotonic() - started, 1)
        _write(args.out, "summary.json", {"meta": meta, "steps": steps, "budget_left_s": round(budget.left(), 1)})

    def copy(_share):
        nonlocal copy_gbps
        result = step_copy(timer, args.dry_run)
        _write(args.out, "copy.json", result)
        copy_gbps = result["gbps"]
        return {"gbps": copy_gbps}

    def tests(share):
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TEST_FILES]
        if args.dry_run:
            cmd.append("--collect-only")
        return _subprocess(cmd, os.path.join(args.out, "tests.txt"), share, env)

    def check(share):
        cmd = [sys.executable, "-m", "fusedskip.selfcheck"] + ([] if args.dry_run else ["--full"])
        return _subprocess(cmd, os.path.join(args.out, "check.txt"), share, env)

    def bench(_share):
        return step_bench(args.out, budget, timer, device, args.dry_run, not args.no_compile, copy_gbps, meta)

    run_step("copy", 30, copy)
    run_step("tests", 120 if not args.dry_run else 60, tests)
    run_step("check", 60 if not args.dry_run else 120, check)
    run_step("bench", budget.left(), bench)
    _write(args.out, "summary.json", {"meta": meta, "steps": steps, "budget_left_s": round(budget.left(), 1)})
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in steps.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(v["status"] != "error" for v in steps.values()) else 1
