"""The performance targets from the issues, checked against measured rows only.

Each target names the rows it is judged on; its value is the worst such row (every qualifying
shape must meet it) with the geometric mean beside it. A target with no qualifying measured
row is "unmeasured" — never assumed. The targets are stated for an H100; on another GPU they are
evaluated but marked as indicative, and on the CPU nothing is claimed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

LARGE_TENSOR_MB = 64.0


@dataclass(frozen=True)
class Target:
    name: str
    text: str
    cases: Tuple[str, ...]
    pass_: str
    metric: str                       # a row column, or "speedup_vs_best_compile" / "peak_vs_eager"
    threshold: float
    higher_is_better: bool = True
    min_act_mb: float = 0.0
    dtype: Optional[str] = None
    layout: Optional[str] = None
    shape: Optional[str] = None


TARGETS: Tuple[Target, ...] = (
    Target("gated_skip_fwd_bw", "gated skip forward >= 95% of copy bandwidth (tensors >= 64 MB)",
           ("gated_skip",), "fwd", "frac_copy", 0.95, min_act_mb=LARGE_TENSOR_MB),
    Target("norm_act_fwd_bw", "norm+act forward >= 90% of copy bandwidth (tensors >= 64 MB)",
           ("gn_silu", "bn_relu"), "fwd", "frac_copy", 0.90, min_act_mb=LARGE_TENSOR_MB),
    Target("norm_act_bwd_bw", "norm+act backward >= 80% of copy bandwidth (tensors >= 64 MB)",
           ("gn_silu", "bn_relu"), "bwd", "frac_copy", 0.80, min_act_mb=LARGE_TENSOR_MB),
    Target("skip_gn_silu_vs_eager", "skip->GroupNorm->SiLU fwd+bwd >= 3x eager (every shape)",
           ("skip_gn_silu",), "full", "speedup_vs_eager", 3.0),
    Target("skip_gn_silu_vs_compile", "skip->GroupNorm->SiLU fwd+bwd >= 1.3x torch.compile (best mode, every shape)",
           ("skip_gn_silu",), "full", "speedup_vs_best_compile", 1.3),
    Target("addunet_vs_eager", "AddUNet train step bf16 channels_last 16x3x256x256 w64 >= 1.5x eager",
           ("addunet",), "train", "speedup_vs_eager", 1.5, dtype="bf16", layout="channels_last",
           shape="16x3x256x256/w64"),
    Target("addunet_vs_compile", "AddUNet train step (same) >= 1.2x torch.compile (best mode)",
           ("addunet",), "train", "speedup_vs_best_compile", 1.2, dtype="bf16", layout="channels_last",
           shape="16x3x256x256/w64"),
    Target("addunet_memory", "AddUNet train step (same) peak memory <= 0.6x eager",
           ("addunet",), "train", "peak_vs_eager", 0.6, higher_is_better=False, dtype="bf16",
           layout="channels_last", shape="16x3x256x256/w64"),
)


def _groups(rows: Sequence[Dict[str, Any]]) -> Dict[tuple, Dict[str, Dict[str, Any]]]:
    out: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["case"], r["pass"], r["shape"], r["dtype"], r["layout"]), {})[r["provider"]] = r
    return out


def _metric(target: Target, fused: Dict[str, Any], group: Dict[str, Dict[str, Any]]) -> Optional[float]:
    def ok(p):
        r = group.get(p)
        return r if r and r.get("status") == "ok" and r.get("median_ms") else None
    if target.metric == "speedup_vs_best_compile":
        compiled = [ok(p)["median_ms"] for p in ("compile", "compile-max-autotune") if ok(p)]
        return min(compiled) / fused["median_ms"] if compiled else None
    if target.metric == "peak_vs_eager":
        eager = ok("eager")
        if not eager or not eager.get("peak_mb") or fused.get("peak_mb") is None:
            return None
        return fused["peak_mb"] / eager["peak_mb"]
    v = fused.get(target.metric)
    return None if v is None else float(v)


def evaluate(rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    on_gpu = meta.get("device_type") == "cuda"
    is_h100 = "H100" in str(meta.get("device", "")).upper()
    results = []
    groups = _groups(rows)
    for t in TARGETS:
        entry: Dict[str, Any] = {"target": t.name, "text": t.text, "threshold": t.threshold,
                                 "value": None, "geomean": None, "rows": 0, "worst": None,
                                 "status": "unmeasured", "note": ""}
        if not on_gpu:
            entry["note"] = "no CUDA device: no kernel timings claimed"
            results.append(entry)
            continue
        values: List[Tuple[float, str]] = []
        for (case, pass_, shape, dtype, layout), group in groups.items():
            if case not in t.cases or pass_ != t.pass_:
                continue
            if (t.dtype and dtype != t.dtype) or (t.layout and layout != t.layout) or (t.shape and shape != t.shape):
                continue
            fused = group.get("fusedskip")
            if not fused or fused.get("status") != "ok" or not fused.get("median_ms"):
                continue
            if t.min_act_mb and (fused.get("act_mb") or 0.0) < t.min_act_mb:
                continue
            v = _metric(t, fused, group)
            if v is not None and math.isfinite(v) and v > 0:
                values.append((v, f"{case}/{shape}/{dtype}/{layout}"))
        if not values:
            entry["note"] = "no qualifying fusedskip row (and baseline) measured in this run"
            results.append(entry)
            continue
        worst = min(values) if t.higher_is_better else max(values)
        met = worst[0] >= t.threshold if t.higher_is_better else worst[0] <= t.threshold
        entry.update(value=worst[0], worst=worst[1], rows=len(values),
                     geomean=math.exp(sum(math.log(v) for v, _ in values) / len(values)),
                     status="met" if met else "missed")
        if not is_h100:
            entry["note"] = f"targets are stated for H100; measured on {meta.get('device')} (indicative)"
        results.append(entry)
    return results


def _show(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if metric == "frac_copy" else f"{v:.2f}x"


def targets_table(entries: Sequence[Dict[str, Any]]) -> str:
    from .report import format_table
    by_name = {t.name: t for t in TARGETS}
    body = []
    for e in entries:
        t = by_name[e["target"]]
        body.append((e["status"], e["text"], _show(e["value"], t.metric), _show(e["geomean"], t.metric),
                     str(e["rows"]), e["worst"] or "-", e["note"]))
    return format_table(("status", "target", "worst", "geomean", "rows", "worst row", "note"), body)
