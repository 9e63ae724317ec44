"""Check every fused op against its float64 reference and print a table of errors and timings.

``python -m fusedskip.selfcheck`` (or ``fusedskip check``). On a GPU the Triton kernels run
natively; without one they run under Triton's CPU interpreter, which this command switches on by
re-running itself with ``TRITON_INTERPRET=1`` (the variable must be set before the kernels are
defined). Interpreted timings measure the interpreter, not the kernels, and are labelled so.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

_REEXEC_FLAG = "FUSEDSKIP_SELFCHECK_CHILD"


@dataclasses.dataclass
class OpCase:
    """One fused op at one shape: ``make(dtype, device) -> (fn, tensors, module or None)``."""

    name: str
    shape: Tuple[int, ...]
    make: Callable[[torch.dtype, str], Tuple[Callable, List[torch.Tensor], Optional[nn.Module]]]


def _inputs(shape, device, dtype, *means, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) + m).to(device=device, dtype=dtype).requires_grad_()
             for m in means]


def _module_case(name, shape, build: Callable[[], nn.Module], n_inputs: int, cast_params: bool,
                 means=(0.5, -1.0)):
    """A module case. Norm modules keep fp32 parameters with low-precision input (as under AMP);
    ``cast_params`` modules (convolutions) take the input's dtype, as torch's conv requires."""
    def make(dtype, device):
        torch.manual_seed(0)
        module = build().to(device)
        if dtype == torch.float64 or cast_params:
            module = module.to(dtype)
        return module, _inputs(shape, device, dtype, *means[:n_inputs]), module
    return OpCase(name, shape, make)


def default_cases(small: bool) -> List[OpCase]:
    """Every fused op, at a small (CPU interpreter) or U-Net-sized (GPU) shape."""
    import fusedskip

    shape = (2, 8, 12, 12) if small else (8, 64, 64, 64)
    channels = shape[1]
    cases = [
        OpCase("gated_skip_add (softplus scalar)", shape,
               lambda dtype, device: _gated_skip_case(shape, dtype, device, fusedskip.GatedSkip())),
        OpCase("gated_skip_add (sigmoid per channel)", shape,
               lambda dtype, device: _gated_skip_case(shape, dtype, device,
                                                      fusedskip.GatedSkip(channels, gate="sigmoid_channel"))),
    ]
    modules = [
        ("GroupNormAct (silu)", lambda: fusedskip.GroupNormAct(4, channels, act="silu"), 1, False),
        ("BatchNormAct2d train (relu)", lambda: fusedskip.BatchNormAct2d(channels, act="relu"), 1, False),
        ("SkipNormAct group (silu)",
         lambda: fusedskip.SkipNormAct(channels, norm="group", num_groups=4, act="silu"), 2, False),
        ("SkipNormAct batch (relu)", lambda: fusedskip.SkipNormAct(channels, norm="batch", act="relu"), 2, False),
        ("ConvNormAct batch (relu)",
         lambda: fusedskip.ConvNormAct(channels, channels, 3, norm="batch", act="relu"), 1, True),
        ("ConvNormAct group (gelu)",
         lambda: fusedskip.ConvNormAct(channels, channels, 3, norm="group", num_groups=4, act="gelu"), 1, True),
    ]
    cases += [_module_case(label, shape, build, n_inputs, cast) for label, build, n_inputs, cast in modules]
    return cases


def _gated_skip_case(shape, dtype, device, module):
    module = module.to(device)
    return module, _inputs(shape, device, dtype, 0.5, -1.0), module


def _run(fn, tensors, grad):
    out = fn(*tensors)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in tensors]


def _time(fn, tensors, grad, device, repeats):
    def once():
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        out.backward(grad.to(out.dtype))
    once()  # warm-up: compilation and caches
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def check_case(case: OpCase, dtype: torch.dtype, device: str, repeats: int) -> dict:
    import fusedskip

    fn, tensors, module = case.make(dtype, device)
    ref_fn = copy.deepcopy(module).double() if module is not None else fn
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    g = torch.Generator().manual_seed(1)
    with fusedskip.use_backend("reference"):
        grad = torch.randn(ref_fn(*ref_tensors).shape, generator=g, dtype=torch.float64).to(device)
        ref_out, ref_grads = _run(ref_fn, ref_tensors, grad)
    with fusedskip.use_backend("triton"):
        out, grads = _run(fn, tensors, grad)
    params = [(p, q) for p, q in zip(module.parameters(), ref_fn.parameters())] if module is not None else []

    def err(a, b):
        a, b = a.double(), b.double()
        return (a - b).abs().max().item(), ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    out_err = err(out, ref_out)
    grad_errs = [err(a, b) for a, b in zip(grads, ref_grads)]
    grad_errs += [err(p.grad, q.grad) for p, q in params if p.grad is not None]
    worst_grad = max(grad_errs, key=lambda e: e[1]) if grad_errs else (0.0, 0.0)
    with fusedskip.use_backend("triton"):
        fused_ms = _time(fn, tensors, grad, device, repeats)
    with fusedskip.use_backend("reference"):
        ref_ms = _time(fn, tensors, grad, device, repeats)
    return dict(op=case.name, shape="x".join(map(str, case.shape)), dtype=str(dtype).replace("torch.", ""),
                out_abs=out_err[0], out_rel=out_err[1], grad_abs=worst_grad[0], grad_rel=worst_grad[1],
                fused_ms=fused_ms, reference_ms=ref_ms)


TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def run(dtypes: Sequence[torch.dtype], small: bool, repeats: int) -> List[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for case in default_cases(small):
        for dtype in dtypes:
            row = check_case(case, dtype, device, repeats)
            row["ok"] = row["out_rel"] <= TOLERANCE[row["dtype"]] and row["grad_rel"] <= TOLERANCE[row["dtype"]]
            rows.append(row)
    return rows


def format_table(rows: List[dict], interpreted: bool) -> str:
    head = (f"{'op':38s} {'shape':>13s} {'dtype':>9s} {'out err (rel)':>14s} {'grad err (rel)':>15s} "
            f"{'fused ms':>9s} {'ref ms':>9s}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:38s} {r['shape']:>13s} {r['dtype']:>9s} {r['out_rel']:14.2e} {r['grad_rel']:15.2e} "
                     f"{r['fused_ms']:9.2f} {r['reference_ms']:9.2f}  {'yes' if r['ok'] else 'NO'}")
    if interpreted:
        lines.append("fused = Triton kernels under TRITON_INTERPRET=1 on the CPU: the errors are the kernels' own; "
                     "the timings measure the interpreter, not the kernels.")
    lines.append("errors: max |fused - float64 reference| / max |reference|, forward output and worst gradient "
                 "(inputs and parameters), forward+backward timings.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedskip check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="U-Net-sized shapes (GPU); default: small shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed forward+backward repeats")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        if os.environ.get(_REEXEC_FLAG):
            raise SystemExit("fusedskip check: could not enable TRITON_INTERPRET=1")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REEXEC_FLAG: "1"})
        args = argv if argv is not None else sys.argv[1:]
        return subprocess.call([sys.executable, "-m", "fusedskip.selfcheck", *args], env=env)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if on_gpu else [])
    print(f"fusedskip check on {'GPU ' + torch.cuda.get_device_name() if on_gpu else 'CPU (Triton interpreter)'}")
    rows = run(dtypes, small=not args.full, repeats=args.repeats or (50 if on_gpu else 2))
    print(format_table(rows, interpreted=not on_gpu))
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"{len(failed)} check(s) exceeded tolerance {TOLERANCE}")
        return 1
    print(f"all {len(rows)} checks within tolerance {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
