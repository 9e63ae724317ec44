"""Environment metadata, derived metrics (GB/s, fraction of copy, TFLOP/s, speedups), the
terminal table and the JSON / CSV files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from .engine import ROW_FIELDS

SCHEMA = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
META_CSV_FIELDS = ("device", "driver", "torch", "triton", "git_commit", "git_dirty", "timestamp")


def _run(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> Dict[str, Any]:
    commit = _run(["git", "rev-parse", "--short", "HEAD"], REPO_ROOT)
    status = _run(["git", "status", "--porcelain"], REPO_ROOT)
    dirty = None
    if status is not None:
        changed = [line for line in status.splitlines() if "benchmarks/results/" not in line]
        dirty = bool(changed)
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def driver_version() -> Optional[str]:
    """The NVIDIA driver version (nvidia-smi, else NVML); failing both, the CUDA version the
    driver supports, from libcuda."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        import ctypes
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except Exception:
        pass
    return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def device_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def environment(device: torch.device) -> Dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    meta: Dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "driver": driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import fusedskip
        meta["fusedskip"] = fusedskip.__version__
    except Exception:
        meta["fusedskip"] = None
    meta.update(git_info())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 1e9, 1),
            l2_mb=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1) or None,
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        meta["cpu_threads"] = torch.get_num_threads()
        meta["cpu_model"] = _cpu_model()
    return meta


# --------------------------------------------------------------------------------------------
def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def finalize(rows: List[Dict[str, Any]], copy_gbps: Optional[float] = None) -> List[Dict[str, Any]]:
    """Fill GB/s, fraction of the copy bandwidth measured in the same run (``copy_gbps``, kept
    per row so merged files stay right), TFLOP/s and the speedups (baseline median ÷ this row's
    median) in place; returns ``rows``."""
    groups: Dict[tuple, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if copy_gbps is not None and r.get("copy_gbps") is None:
            r["copy_gbps"] = copy_gbps
        groups[(r["case"], r["pass"], r["shape"], r["dtype"], r["layout"])][r["provider"]] = r
    for by_provider in groups.values():
        flops = next((r["flops"] for r in by_provider.values() if r.get("flops")), None)
        med = {p: r["median_ms"] for p, r in by_provider.items() if r["status"] == "ok" and r.get("median_ms")}
        for p, r in by_provider.items():
            if r.get("flops") is None and flops is not None:
                r["flops"] = flops
            if r["status"] != "ok" or not r.get("median_ms"):
                continue
            seconds = r["median_ms"] * 1e-3
            if r.get("bytes"):
                r["gbps"] = r["bytes"] / seconds / 1e9
                r["frac_copy"] = _ratio(r["gbps"], r.get("copy_gbps"))
            if r.get("flops"):
                r["tflops"] = r["flops"] / seconds / 1e12
            for base, column in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile"),
                                 ("compile-max-autotune", "speedup_vs_compile_max_autotune"),
                                 ("reference", "speedup_vs_reference")):
                r[column] = _ratio(med.get(base), r["median_ms"])
    return rows


def row_key(r: Dict[str, Any]) -> tuple:
    return (r["case"], r["pass"], r["shape"], r["dtype"], r["layout"], r["provider"])


def merge(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``new`` on top of ``old`` (same device): rows of ``new`` replace rows with the same key.
    Lets a long run be split into several invocations (``--merge``) and still give one file."""
    if old["meta"].get("device") != new["meta"].get("device"):
        raise ValueError(f"cannot merge results of {old['meta'].get('device')!r} into {new['meta'].get('device')!r}")
    keys = {row_key(r) for r in new["rows"]}
    rows = [r for r in old["rows"] if row_key(r) not in keys] + new["rows"]
    for r in rows:  # recomputed over the merged rows
        for k in ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_compile_max_autotune", "speedup_vs_reference"):
            r[k] = None
    finalize(rows)
    touched = {r["case"] for r in new["rows"]} | {s["case"] for s in new.get("skipped", [])}
    skipped = [s for s in old.get("skipped", []) if s["case"] not in touched] + list(new.get("skipped", []))
    history = old["meta"].get("merged", []) + [{k: old["meta"].get(k) for k in
                                                ("timestamp", "git_commit", "git_dirty", "argv", "copy_gbps")}]
    meta = {**new["meta"], "merged": history}
    return {**new, "meta": meta, "rows": rows, "skipped": skipped}


# --------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def format_table(headers: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    body = [list(map(str, r)) for r in body]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 7 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def results_table(rows: Sequence[Dict[str, Any]]) -> str:
    headers = ("case", "pass", "shape", "dtype", "layout", "provider", "status",
               "median ms", "p20-p80 ms", "GB/s", "% copy", "TFLOP/s", "peak MB",
               "x eager", "x compile", "x max-at")
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append((
            r["case"], r["pass"], r["shape"], r["dtype"], "cl" if r["layout"] == "channels_last" else r["layout"],
            r["provider"], r["status"] if ok else f"{r['status']}: {r.get('error', '')[:60]}",
            _fmt(r.get("median_ms"), ".4g"),
            f"{_fmt(r.get('p20_ms'), '.4g')}-{_fmt(r.get('p80_ms'), '.4g')}" if ok else "-",
            _fmt(r.get("gbps"), ".1f"),
            _fmt(None if r.get("frac_copy") is None else 100 * r["frac_copy"], ".1f"),
            _fmt(r.get("tflops"), ".3g"), _fmt(r.get("peak_mb"), ".1f"),
            _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_compile"), ".2f"),
            _fmt(r.get("speedup_vs_compile_max_autotune"), ".2f"),
        ))
    return format_table(headers, body)


def skipped_table(skipped: Sequence[Dict[str, Any]]) -> str:
    return format_table(("case", "provider", "reason"),
                        [(s["case"], s.get("provider") or "*", s["reason"]) for s in skipped])


# --------------------------------------------------------------------------------------------
def write_json(results: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = [{k: v for k, v in r.items() if k != "traceback"} for r in results["rows"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**results, "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def write_csv(results: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = results["meta"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(META_CSV_FIELDS) + list(ROW_FIELDS))
        for r in results["rows"]:
            writer.writerow([meta.get(k) for k in META_CSV_FIELDS] +
                            ["" if r.get(k) is None else r.get(k) for k in ROW_FIELDS])


def read_results(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise ValueError(f"{path} is not a fusedskip benchmark results file")
    return data
