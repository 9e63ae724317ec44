"""``python -m benchmarks account``: what every op and the AddUNet train step cost, measured on
the CPU, fused (fusedskip on its Triton kernels) against eager PyTorch, and what that predicts
for an H100 / H200.

Two worker processes measure, the parent combines (:func:`main`):

``interp`` (``TRITON_INTERPRET=1``) runs every subject once per pass with the kernels interpreted
  and counts (:mod:`benchmarks.instrument`): Triton launches and the bytes each loads and stores
  per tensor; ATen ops that launch a kernel and their bytes (one read of each input and one
  write of each output); bytes autograd saves for backward. Fused traffic is the Triton bytes
  (exact, masked lanes excluded) plus the bytes of the torch ops the launchers run around them.
``host`` (``TRITON_INTERPRET=0``, :class:`~benchmarks.instrument.MockDriver`) times each subject's
  host side: the fused path runs Triton's real ``JITFunction.run`` / ``Autotuner.run`` (binding,
  specialisation, cache lookup, grid) up to the C launcher, which a stub replaces; launchers plan
  their grids for a 132-SM GPU, so the programs per launch are the GPU path's. Eager runs the same
  modules' plain-torch equivalents on the same tiny CPU tensors, in the same process, one thread.

Why host time on tiny CPU tensors is a fair proxy: at these sizes both paths spend their time in
Python, the dispatcher and autograd, which run identically for CUDA tensors; the CPU kernels of
the eager ops (a few µs each on 4 K elements) stand in for ``cudaLaunchKernel`` (2–4 µs), and
the fused path, whose launches the stub skips, is charged :data:`DRIVER_LAUNCH_US` per Triton
launch in the prediction. Both paths do the same torch work on tensors of the same size.

Prediction per row and GPU: ``max(bytes ÷ copy bandwidth, LAUNCH_US × launches, host µs)``,
bytes scaled from the accounting shape (fp32) to each prediction shape in bf16 by element count;
a lower bound of the time a kernel sequence can take (performance.md §1, §8).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Constants of the prediction (performance.md §1, §9).
GPUS = {"H100": {"copy_gbps": 3000.0, "note": "measured device-to-device copy, H100 SXM (~90% of 3.35 TB/s)"},
        "H200": {"copy_gbps": 4300.0, "note": "measured PyTorch copy on this workplace's H200"}}
LAUNCH_US = 3.0         # [E] back-to-back kernel-to-kernel time of a launch-bound stream
DRIVER_LAUNCH_US = 2.0  # [E] host cost of one Triton C launcher call + cuLaunchKernel (not run by the stub)
SM_COUNT = 132

OP_CASES = ("gated_skip", "gn_silu", "bn_relu", "bn_relu_eval", "skip_gn_silu", "skip_bn_relu", "bn_residual_relu",
            "gn_scale_shift_silu",
            "conv_bn_relu", "conv_gn_silu")
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "addunet_bn_relu": {},                                                   # gated skip, conv-BN-ReLU
    "addunet_skip_bn_relu": {"fusion": "gated_norm_act"},                    # skip -> BN -> ReLU fused
    "addunet_gn_silu": {"norm": "group", "act": "silu", "stem_act": "silu", "fusion": "gated_norm_act"},
}
OP_SHAPE = (2, 32, 8, 8)
MODEL_SHAPE = (2, 3, 8, 8, 32)     # N, C_in, H, W, width (depth 4, paper variant: constant width)
PREDICT_SHAPES = {"op": ((16, 128, 64, 64), (16, 64, 256, 256)), "model": ((16, 3, 256, 256, 32),)}
LAYOUT = "channels_last"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "accounting")


# --------------------------------------------------------------------------------------------
# Subjects: one op case or model config, built fused and eager, with a step per pass
# --------------------------------------------------------------------------------------------
def subject_names() -> List[str]:
    return list(OP_CASES) + list(MODEL_CONFIGS)


def passes_of(name: str) -> Tuple[str, ...]:
    if name in MODEL_CONFIGS:
        return ("train",)
    return ("infer",) if name == "bn_relu_eval" else ("fwd", "bwd")


def build(name: str, provider: str, shape=None):
    """(impl fn, module, inputs, params, labels) of ``name`` for ``provider`` (fusedskip|eager),
    float32, channels_last, on the CPU; the same seed for both providers."""
    import torch

    from .cases import CASES, to_layout
    torch.manual_seed(0)
    if name in MODEL_CONFIGS:
        import fusedskip

        from .models import plain_torch_copy
        n, c, h, w, width = shape or MODEL_SHAPE
        model = fusedskip.AddUNet(in_channels=c, width=width, depth=4, **MODEL_CONFIGS[name])
        if provider == "eager":
            model = plain_torch_copy(model, torch.randn(2, c, 8, 8))
        model = model.to(memory_format=torch.channels_last)
        x = to_layout(torch.randn(n, c, h, w), LAYOUT)
        return model, model, (x,), [p for p in model.parameters() if p.requires_grad], ("x",)
    case = CASES[name]
    shape = shape or OP_SHAPE
    build_fn = case.build_fused if provider == "fusedskip" else case.build_eager
    impl = build_fn(shape, torch.float32, LAYOUT, "cpu")
    inputs = case.inputs(shape, torch.float32, LAYOUT, "cpu", True)
    names = ("up", "skip") if len(inputs) == 2 else ("x",)
    return impl.fn, impl.module, inputs, impl.params, names


def backend_scope(provider: str):
    if provider != "fusedskip":
        return contextlib.nullcontext()
    import fusedskip
    return fusedskip.use_backend("triton")


def make_steps(name: str, fn, module, inputs, params) -> Dict[str, Callable[[], Any]]:
    """The callables of each pass: ``fwd`` (training forward), ``bwd`` (backward of a retained
    forward; the forward is built once outside), ``full`` (both), ``infer``, ``train``."""
    import torch

    from .models import scalar_loss
    wrt = [t for t in inputs if t.requires_grad] + list(params)
    steps: Dict[str, Callable[[], Any]] = {}
    if name in MODEL_CONFIGS:
        module.train()
        steps["train"] = lambda: torch.autograd.grad(scalar_loss(fn(*inputs)), params, allow_unused=True)
        return steps
    if name == "bn_relu_eval":
        module.eval()

        def infer():
            with torch.no_grad():
                return fn(*inputs)
        steps["infer"] = infer
        return steps
    module.train()
    probe = fn(*inputs)
    dout = torch.randn_like(probe)
    steps["fwd"] = lambda: fn(*inputs)
    steps["full"] = lambda: torch.autograd.grad(fn(*inputs), wrt, dout, allow_unused=True)
    steps["dout"] = lambda: dout  # type: ignore[assignment]
    steps["wrt"] = lambda: wrt    # type: ignore[assignment]
    return steps


# --------------------------------------------------------------------------------------------
# Worker: interpreter (launches, bytes, saved)
# --------------------------------------------------------------------------------------------
def _resolve(launches, names: Dict[int, str], act_bytes: int) -> Dict[str, Any]:
    """Per-tensor passes and temporaries of a list of interpreted launches."""
    reads: Counter = Counter()
    writes: Counter = Counter()
    large_tmp_writes = 0
    for launch in launches:
        for key, nbytes in launch.reads.items():
            reads[names.get(key) or f"tmp:{launch.args[key][0]}"] += nbytes
        for key, nbytes in launch.writes.items():
            label = names.get(key)
            if label is None:
                label = f"tmp:{launch.args[key][0]}"
                if launch.args[key][1] >= act_bytes // 2:
                    large_tmp_writes += nbytes
            writes[label] += nbytes
    return {"reads": {k: v / act_bytes for k, v in sorted(reads.items())},
            "writes": {k: v / act_bytes for k, v in sorted(writes.items())},
            "large_tmp_writes": large_tmp_writes}


def measure_interp(name: str, provider: str, pass_: str, shape=None) -> Dict[str, Any]:
    """Launches, bytes per launch and per tensor, and saved-for-backward bytes of one pass.
    Needs ``TRITON_INTERPRET=1`` before fusedskip is imported (the fused provider)."""
    import torch

    from . import instrument as ins
    ins.install_interpreter_counters()
    fn, module, inputs, params, in_names = build(name, provider, shape)
    if name in MODEL_CONFIGS:  # one feature map of the model's width
        n, _, h, w, width = shape or MODEL_SHAPE
        act_bytes = n * width * h * w * inputs[0].element_size()
    else:
        act_bytes = inputs[0].numel() * inputs[0].element_size()
    names = {ins.storage_key(t): n for t, n in zip(inputs, in_names)}
    names.update({ins.storage_key(p): "param" for p in params})
    if module is not None:
        names.update({ins.storage_key(b): "buffer" for b in module.buffers()})
    saved = None
    with backend_scope(provider):
        steps = make_steps(name, fn, module, inputs, params)
        counter = ins.OpCounter()
        if pass_ == "bwd":
            with ins.SavedBytes(params) as keep:
                out = fn(*inputs)
            saved = keep.bytes
            names[ins.storage_key(out)] = "out"
            dout = steps["dout"]()
            names[ins.storage_key(dout)] = "dout"
            with ins.LOG.recording() as launches, counter:
                grads = torch.autograd.grad(out, steps["wrt"](), dout, allow_unused=True)
            input_ids = [id(i) for i in inputs]
            for g, t in zip(grads, steps["wrt"]()):
                if g is not None and id(t) in input_ids:
                    names.setdefault(ins.storage_key(g), "d" + in_names[input_ids.index(id(t))])
        else:
            with ins.LOG.recording() as launches, counter, ins.SavedBytes(params) as keep:
                out = steps[pass_]()
            saved = keep.bytes if pass_ in ("fwd", "train") else None
            if isinstance(out, torch.Tensor):
                names[ins.storage_key(out)] = "out"
    launches = list(launches)
    triton_bytes = sum(launch.bytes for launch in launches)
    torch_bytes = sum(op.bytes for op in counter.ops)
    row = {"triton_launches": len(launches), "torch_ops": len(counter.ops),
           "launches": len(launches) + len(counter.ops),
           "kernels": dict(Counter(launch.kernel for launch in launches)),
           "torch_op_names": dict(Counter(op.name for op in counter.ops)),
           "launch_bytes": [launch.bytes for launch in launches],
           "bytes_triton": triton_bytes, "bytes_torch": torch_bytes, "bytes": triton_bytes + torch_bytes,
           "act_bytes": act_bytes, "saved_bytes": saved}
    row.update(_resolve(launches, names, act_bytes))
    return row


# --------------------------------------------------------------------------------------------
# Worker: host time behind the mock driver
# --------------------------------------------------------------------------------------------
def time_host(step: Callable[[], Any], target_ms: float = 60.0, blocks: int = 7) -> Dict[str, float]:
    """Median µs per call over ``blocks`` blocks of back-to-back calls (p20, p80 across blocks)."""
    import numpy as np
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    step()
    est = max(time.perf_counter() - t0, 1e-6)
    per_block = max(3, int(target_ms / 1e3 / blocks / est))
    means = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            step()
        means.append((time.perf_counter() - t0) / per_block * 1e6)
    p20, p50, p80 = np.percentile(means, [20, 50, 80])
    return {"host_us": float(p50), "host_p20_us": float(p20), "host_p80_us": float(p80),
            "host_calls": per_block * blocks}


def measure_host(name: str, provider: str, target_ms: float = 60.0) -> Dict[str, Dict[str, Any]]:
    """Host µs per call of each timed pass (``fwd``/``full``, ``infer`` or ``train``), and for the
    fused provider the Triton launches with their programs. Needs the mock driver installed."""
    from . import instrument as ins
    fn, module, inputs, params, _ = build(name, provider)
    out: Dict[str, Dict[str, Any]] = {}
    with backend_scope(provider):
        steps = make_steps(name, fn, module, inputs, params)
        for pass_ in [p for p in ("fwd", "full", "infer", "train") if p in steps]:
            row = time_host(steps[pass_], target_ms)
            with ins.LOG.recording() as launches:
                steps[pass_]()
            row["triton_launches_host"] = len(launches)
            out[pass_] = row
    if provider == "fusedskip" and name in OP_CASES:  # the grids at U-Net shapes (nothing is computed)
        for shape in PREDICT_SHAPES["op"]:
            fn, module, inputs, params, _ = build(name, provider, shape)
            with backend_scope(provider):
                steps = make_steps(name, fn, module, inputs, params)
                for pass_ in out:
                    with ins.LOG.recording() as launches:
                        steps[pass_]()
                    out[pass_].setdefault("programs", {})[_shape_label(shape)] = [x.programs for x in launches]
    return out


def worker(kind: str, names: Sequence[str], path: str, target_ms: float) -> int:
    import torch
    torch.set_num_threads(1)
    if kind == "host":
        from . import instrument as ins
        ins.install_mock_driver()
        import fusedskip  # noqa: F401  (kernels decorated with real JITFunctions)
        from fusedskip import backend
        backend.interpreter_active = lambda: True  # let backend 'triton' accept CPU tensors
        replaced = ins.emulate_sm_count(SM_COUNT)
    results: Dict[str, Any] = {"meta": {}, "subjects": {}}
    if kind == "host":
        results["meta"]["target_programs_replaced"] = replaced
    for name in names:
        entry: Dict[str, Any] = {}
        for provider in ("fusedskip", "eager"):
            try:
                if kind == "host":
                    entry[provider] = measure_host(name, provider, target_ms)
                else:
                    entry[provider] = {p: measure_interp(name, provider, p) for p in passes_of(name)}
            except Exception as exc:  # one broken op must not hide the others
                entry[provider] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["subjects"][name] = entry
        print(f"[{kind}] {name} done", file=sys.stderr, flush=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


def _spawn(kind: str, names: Sequence[str], path: str, target_ms: float) -> Dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1" if kind == "interp" else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks", "account", "--worker", kind, "--worker-out", path,
           "--cases", ",".join(names), "--host-ms", str(target_ms)]
    subprocess.run(cmd, cwd=_root(), env=env, check=True)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Combine: rows, predictions, targets
# --------------------------------------------------------------------------------------------
def _numel(shape: Sequence[int], kind: str) -> int:
    if kind == "model":
        n, c, h, w, width = shape
        return n * width * h * w
    n, c, h, w = shape
    return n * c * h * w


def _shape_label(shape: Sequence[int]) -> str:
    from .cases import shape_label
    return shape_label(shape)


def predict(row: Dict[str, Any], kind: str, acct_shape: Sequence[int]) -> Dict[str, Any]:
    """Predicted µs on each GPU and prediction shape, and which term bounds it."""
    out: Dict[str, Any] = {}
    host = row.get("host_us")
    if host is not None and row["provider"] == "fusedskip":
        host += DRIVER_LAUNCH_US * (row.get("triton_launches") or 0)
    for gpu, spec in GPUS.items():
        for shape in PREDICT_SHAPES[kind]:
            terms = {"launch": LAUNCH_US * (row.get("launches") or 0), "host": host or 0.0}
            if row.get("bytes") is not None:
                scale = _numel(shape, kind) / _numel(acct_shape, kind) * 0.5  # fp32 -> bf16
                terms["bytes"] = row["bytes"] * scale / (spec["copy_gbps"] * 1e3)
            bound = max(terms, key=terms.get)
            out[f"{gpu}@{_shape_label(shape)}"] = {"us": terms[bound], "bound": bound,
                                                   **{f"{k}_us": v for k, v in terms.items()}}
    return out


def combine(interp: Dict[str, Any], host: Dict[str, Any], names: Sequence[str]) -> List[Dict[str, Any]]:
    from . import bytes_model
    from .cases import CASES
    rows: List[Dict[str, Any]] = []
    for name in names:
        kind = "model" if name in MODEL_CONFIGS else "op"
        acct_shape = MODEL_SHAPE if kind == "model" else OP_SHAPE
        for provider in ("fusedskip", "eager"):
            counts = interp["subjects"].get(name, {}).get(provider, {})
            times = host["subjects"].get(name, {}).get(provider, {})
            error = counts.get("error") or times.get("error")
            passes = list(passes_of(name)) + (["full"] if "fwd" in passes_of(name) else [])
            for pass_ in passes:
                row: Dict[str, Any] = {"case": name, "kind": kind, "pass": pass_, "shape": _shape_label(acct_shape),
                                       "dtype": "fp32", "layout": LAYOUT, "provider": provider,
                                       "status": "error" if error else "ok", "error": error or ""}
                if not error:
                    if pass_ == "full":
                        c = _sum_counts(counts["fwd"], counts["bwd"])
                    else:
                        c = dict(counts[pass_])
                    row.update(c)
                    row.update(times.get(pass_, {}))
                    if pass_ == "bwd" and "full" in times and "fwd" in times:
                        row["host_us"] = times["full"]["host_us"] - times["fwd"]["host_us"]
                    if row.get("host_us") is not None:  # the comparison tooling's timing columns
                        row.update(median_ms=row["host_us"] / 1e3, p20_ms=row.get("host_p20_us", row["host_us"]) / 1e3,
                                   p80_ms=row.get("host_p80_us", row["host_us"]) / 1e3)
                    row["passes"] = row["bytes"] / row["act_bytes"]
                    if kind == "op":
                        case = CASES[name]
                        row["min_bytes"] = bytes_model.traffic(case.byte_model, pass_, case.dims(acct_shape), 4)[0]
                        row["min_passes"] = bytes_model.passes_over_activation(case.byte_model, pass_)
                    if pass_ == "bwd" and times.get("full", {}).get("programs"):
                        fwd = times["fwd"]["programs"]
                        row["programs"] = {k: v[len(fwd[k]):] for k, v in times["full"]["programs"].items()}
                    row["predicted"] = predict(row, kind, acct_shape)
                rows.append(row)
    _ratios(rows)
    return rows


def _sum_counts(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in ("triton_launches", "torch_ops", "launches", "bytes_triton", "bytes_torch", "bytes", "large_tmp_writes"):
        out[k] = a[k] + b[k]
    out["act_bytes"] = a["act_bytes"]
    out["saved_bytes"] = a.get("saved_bytes")
    for k in ("kernels", "torch_op_names", "reads", "writes"):
        merged: Counter = Counter(a[k])
        merged.update(b[k])
        out[k] = dict(merged)
    out["launch_bytes"] = a["launch_bytes"] + b["launch_bytes"]
    return out


def _ratios(rows: List[Dict[str, Any]]) -> None:
    eager = {(r["case"], r["pass"]): r for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        e = eager.get((r["case"], r["pass"]))
        if r["provider"] != "fusedskip" or r["status"] != "ok" or e is None:
            continue
        for k in ("host_us", "launches", "bytes", "saved_bytes"):
            if r.get(k) is not None and e.get(k):
                r[f"{k}_vs_eager"] = r[k] / e[k]


# Targets of issue 10, judged on the rows (met / missed by how much).
def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    fused = {(r["case"], r["pass"]): r for r in rows if r["provider"] == "fusedskip" and r["status"] == "ok"}
    out = []

    def add(text, values, threshold, higher_is_worse=True):
        values = [(v, k) for v, k in values if v is not None]
        if not values:
            out.append({"target": text, "status": "unmeasured", "worst": None, "where": "", "threshold": threshold})
            return
        worst = max(values) if higher_is_worse else min(values)
        met = worst[0] <= threshold if higher_is_worse else worst[0] >= threshold
        out.append({"target": text, "status": "met" if met else "missed", "worst": worst[0], "where": worst[1],
                    "threshold": threshold})

    ops = [k for k in fused if k[0] in OP_CASES]
    add("host µs per op call, fwd+bwd <= 1.0x eager",
        [(fused[k].get("host_us_vs_eager"), k[0]) for k in ops if k[1] == "full"], 1.0)
    add("AddUNet train step host time <= 1.0x eager",
        [(fused[k].get("host_us_vs_eager"), k[0]) for k in fused if k[0] in MODEL_CONFIGS], 1.0)
    for pass_, minimum in (("fwd", 2), ("bwd", 3)):
        add(f"GroupNorm+act {pass_} bulk passes = the {minimum}-pass minimum",
            [(fused[k]["passes"], k[0]) for k in fused if k[0] == "gn_silu" and k[1] == pass_], minimum + 0.05)
    add("launches per op <= eager's", [(fused[k].get("launches_vs_eager"), f"{k[0]}/{k[1]}") for k in ops], 1.0)
    add("launches of skip->norm->act <= 0.6x eager's",
        [(fused[k].get("launches_vs_eager"), f"{k[0]}/{k[1]}") for k in ops if k[0].startswith("skip_")], 0.6)
    add("saved-for-backward bytes, AddUNet with SiLU blocks <= 0.7x eager",
        [(fused[k].get("saved_bytes_vs_eager"), k[0]) for k in fused if k[0] == "addunet_gn_silu"], 0.7)
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def _programs(programs: Optional[Dict[str, List[int]]]) -> str:
    """Programs per launch at each prediction shape: range, and launches with fewer than one per SM."""
    if not programs:
        return "-"
    return "; ".join(f"{min(p)}–{max(p)}, {sum(x < SM_COUNT for x in p)}/{len(p)} < {SM_COUNT}"
                     for p in programs.values() if p)


def markdown(results: Dict[str, Any]) -> str:
    meta, rows = results["meta"], results["rows"]
    by = {(r["case"], r["pass"], r["provider"]): r for r in rows}
    pa, pb = [f"H100@{_shape_label(s)}" for s in PREDICT_SHAPES["op"]]
    lines = [f"# Performance accounting, commit {meta['git_commit']}{'+dirty' if meta.get('git_dirty') else ''}",
             "",
             f"Measured on the CPU ({meta.get('cpu_model')}, {meta['torch']}, triton {meta['triton']}), "
             f"{meta['timestamp']}; regenerate with `{meta['command']}`. "
             f"Ops at {_shape_label(OP_SHAPE)}, AddUNet at {_shape_label(MODEL_SHAPE)} (depth 4), fp32 "
             f"{LAYOUT}. Host µs: tiny CPU tensors, kernels behind a mock driver (±30% on a shared machine). "
             "Launches = Triton launches + ATen ops that launch a kernel. Passes = bytes moved ÷ one activation "
             "(fused: measured loads/stores of the interpreted kernels; eager: one read of every input and one "
             "write of every output per ATen op) against the minimum of `bytes_model.py`. Saved: bytes autograd "
             "keeps for backward ÷ one activation. Predicted: max(bytes ÷ copy, "
             f"{LAUNCH_US} µs × launches, host µs + {DRIVER_LAUNCH_US} µs per Triton launch) in bf16, "
             f"H100 copy {GPUS['H100']['copy_gbps']:.0f} GB/s; bound in brackets. Fused / eager.",
             "",
             f"| case | pass | host µs | launches | passes (min) | fused programs per launch at {pa[5:]}; {pb[5:]} | "
             f"saved (act.) | "
             f"pred. µs {pa} | pred. µs {pb} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] != "fusedskip":
            continue
        e = by.get((r["case"], r["pass"], "eager"), {})
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['pass']} | error: {r['error'][:80]} | | | | | | |")
            continue

        def pair(key, spec=".3g", scale=1.0):
            a, b = r.get(key), e.get(key)
            return f"{_f(None if a is None else a * scale, spec)} / {_f(None if b is None else b * scale, spec)}"

        def pred(col):
            a, b = r["predicted"].get(col), (e.get("predicted") or {}).get(col)
            if not a:
                return "-"
            return f"{a['us']:.0f} ({a['bound']}) / " + (f"{b['us']:.0f} ({b['bound']})" if b else "-")
        saved = "-" if r["pass"] not in ("fwd", "train") else pair("saved_bytes", ".2f", 1.0 / r["act_bytes"])
        progs = _programs(r.get("programs"))
        minp = "" if r.get("min_passes") is None else f" ({r['min_passes']})"
        cols = r["predicted"]
        model_col = next((k for k in cols if k.startswith("H100@")), None)
        lines.append(f"| {r['case']} | {r['pass']} | {pair('host_us', '.0f')} | {pair('launches', '.0f')} | "
                     f"{pair('passes', '.2f')}{minp} | {progs} | {saved} | "
                     f"{pred(pa) if r['kind'] == 'op' else pred(model_col)} | "
                     f"{pred(pb) if r['kind'] == 'op' else '-'} |")
    lines += ["", "## Targets (issue 10)", "", "| status | target | worst | where |", "|---|---|---|---|"]
    for t in results["targets"]:
        worst = _f(t["worst"], ".2f")
        lines.append(f"| {t['status']} | {t['target']} | {worst} (target {t['threshold']}) | {t['where']} |")
    lines += ["", "## Fused forward traffic per tensor (passes over one activation)", "",
              "| case | pass | reads | writes | activation-sized temporaries written |", "|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] == "fusedskip" and r["status"] == "ok" and r["kind"] == "op" and r["pass"] != "full":
            rd = ", ".join(f"{k} {v:.2f}" for k, v in r["reads"].items() if v >= 0.01)
            wr = ", ".join(f"{k} {v:.2f}" for k, v in r["writes"].items() if v >= 0.01)
            lines.append(f"| {r['case']} | {r['pass']} | {rd} | {wr} | {r['large_tmp_writes'] / r['act_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks account", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help=f"comma list (default all): {','.join(subject_names())}")
    p.add_argument("--out", default=RESULTS, help="folder for <commit>.json and <commit>.md (default %(default)s)")
    p.add_argument("--name", help="file stem (default: the commit, +dirty for a modified tree)")
    p.add_argument("--host-ms", type=float, default=60.0, help="timed milliseconds per host row (default 60)")
    p.add_argument("--render", metavar="JSON", help="print (and write beside it) the markdown of a results file")
    p.add_argument("--worker", choices=("interp", "host"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else subject_names()
    unknown = [n for n in names if n not in subject_names()]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {subject_names()}")
    if args.worker:
        return worker(args.worker, names, args.worker_out, args.host_ms)
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            text = markdown(json.load(f))
        with open(os.path.splitext(args.render)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
        return 0
    import tempfile

    import torch

    from . import report
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        interp = _spawn("interp", names, os.path.join(tmp, "interp.json"), args.host_ms)
        host = _spawn("host", names, os.path.join(tmp, "host.json"), args.host_ms)
    meta = report.environment(torch.device("cpu"))
    meta.update(kind="accounting", command="python -m benchmarks account" + (f" --cases {args.cases}" if args.cases
                                                                              else ""),
                constants={"gpus": GPUS, "launch_us": LAUNCH_US, "driver_launch_us": DRIVER_LAUNCH_US,
                           "sm_count": SM_COUNT, "op_shape": OP_SHAPE, "model_shape": MODEL_SHAPE,
                           "predict_shapes": PREDICT_SHAPES, "layout": LAYOUT},
                host_meta=host.get("meta"), elapsed_s=round(time.perf_counter() - started, 1))
    rows = combine(interp, host, names)
    results = {"meta": meta, "rows": rows, "skipped": []}
    results["targets"] = targets(rows)
    stem = args.name or f"{meta['git_commit']}{'-dirty' if meta.get('git_dirty') else ''}"
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, stem + ".json"), os.path.join(args.out, stem + ".md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    text = markdown(results)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"wrote {json_path}\n      {md_path}")
    bad = [r for r in rows if r["status"] != "ok"]
    return 1 if bad else 0
