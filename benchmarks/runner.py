"""``python -m benchmarks``: time every case against its baselines, print the table and the
targets, write JSON + CSV + plots under ``benchmarks/results/<device-slug>/``."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import report, targets
from .cases import CASES, COMPILE_PROVIDERS, DTYPES, LAYOUTS, PROVIDERS, SIZES, Unavailable
from .engine import CPU_PROVIDERS, NO_CUDA_MESSAGE, Bench, expand, max_autotune_options
from .timing import Timer, copy_bandwidth


def _csv(value: Optional[str], allowed: Sequence[str], what: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time fusedskip's fused ops and models against the reference path, eager PyTorch and "
                    "torch.compile. Sub-commands: run (default), compare A.json B.json, plot R.json, "
                    "show R.json, list.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick shape set (default)")
    size.add_argument("--full", action="store_true", help="the full shape set")
    size.add_argument("--size", choices=SIZES, help="shape set by name (tiny: the test run's)")
    p.add_argument("--cases", help=f"comma list of cases (default all): {','.join(CASES)}")
    p.add_argument("--providers", help=f"comma list (default: all on CUDA, {','.join(CPU_PROVIDERS)} on CPU): "
                                       f"{','.join(PROVIDERS)}")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--dtypes", help="comma list: fp32,bf16 (default both)")
    p.add_argument("--layouts", help="comma list: nchw,channels_last (default both)")
    p.add_argument("--passes", help="comma list: fwd,bwd,full,infer,train (default each case's)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each call in a CUDA graph (removes launch overhead; every provider alike)")
    p.add_argument("--rep-ms", type=float, help="timed milliseconds per row (default 100 on CUDA, 20 on CPU)")
    p.add_argument("--warmup-ms", type=float, help="warm-up milliseconds per row (default 25 on CUDA, 5 on CPU)")
    p.add_argument("--warmup-runs", type=int, default=3, help="minimum warm-up calls per row (default 3)")
    p.add_argument("--min-runs", type=int, help="minimum timed calls per row (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads for CPU timings (default 1: stable on a shared machine)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--name", help="file stem (default <size>-<UTC timestamp>)")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing <out>/<name>.json (rows with the same key are replaced): "
                        "split a long run into several invocations, e.g. one per --cases subset")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if any row failed")
    return p


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("full" if args.full else "quick")
    if not cuda:
        print(NO_CUDA_MESSAGE)
        if size in ("quick", "full"):
            size = "cpu"
    providers = _csv(args.providers, PROVIDERS, "providers") or list(PROVIDERS if cuda else CPU_PROVIDERS)
    if args.no_compile:
        providers = [p for p in providers if p not in COMPILE_PROVIDERS]
    dtypes = _csv(args.dtypes, tuple(DTYPES), "dtypes") or list(DTYPES)
    layouts = _csv(args.layouts, LAYOUTS, "layouts") or list(LAYOUTS)
    passes = _csv(args.passes, ("fwd", "bwd", "full", "infer", "train"), "passes")
    cases = _csv(args.cases, tuple(CASES), "cases")

    if not cuda:
        torch.set_num_threads(max(1, args.cpu_threads))
    if cuda:
        torch.backends.cudnn.benchmark = True  # algorithm search happens in the (untimed) warm-up
    timer = Timer(device, rep_ms=args.rep_ms or (100.0 if cuda else 20.0),
                  warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if cuda else 5.0),
                  warmup_runs=max(1, args.warmup_runs), min_runs=args.min_runs or (10 if cuda else 5),
                  cuda_graphs=args.cuda_graphs)
    meta = report.environment(device)
    meta.update(size=size, argv=list(sys.argv[1:] if argv is None else argv), providers=providers, dtypes=dtypes,
                layouts=layouts, timer={"method": "cuda-events" if cuda else "perf_counter",
                                        "rep_ms": timer.rep_ms, "warmup_ms": timer.warmup_ms,
                                        "warmup_runs": timer.warmup_runs,
                                        "min_runs": timer.min_runs, "flush_bytes": timer.flush_bytes,
                                        "cuda_graphs": timer.cuda_graphs},
                compile_max_autotune_options={k: str(v) for k, v in max_autotune_options().items()}
                if any(p in COMPILE_PROVIDERS for p in providers) else None,
                claims="kernel timings on CUDA" if cuda else "none: CPU reference/eager timings only")
    copy = None
    if cuda:
        copy = copy_bandwidth(timer)
        print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write counted; median of "
              f"{copy['timing']['runs']} copies of {copy['bytes'] / 2 / 2**20:.0f} MiB)")
    meta["copy_gbps"] = copy["gbps"] if copy else None

    specs = expand(size, cases, providers, dtypes, layouts, passes)
    bench = Bench(device, timer, measure_memory=not args.no_memory)
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    unavailable: Dict[tuple, str] = {}
    for name in dict.fromkeys(s.case for s in specs):
        reason = CASES[name].available()
        if reason:
            unavailable[(name, None)] = reason
            skipped.append({"case": name, "provider": None, "reason": reason})
    try:
        from tqdm import tqdm
        progress = tqdm(specs, desc="benchmarks", unit="row", file=sys.stderr, disable=None, leave=False)
    except ImportError:
        progress = specs
    for spec in progress:
        if (spec.case, None) in unavailable or (spec.case, spec.provider) in unavailable:
            continue
        try:
            rows.append(bench.run(spec))
        except Unavailable as exc:
            unavailable[(spec.case, spec.provider)] = str(exc)
            skipped.append({"case": spec.case, "provider": spec.provider, "reason": str(exc)})
    bench.release()

    report.finalize(rows, meta["copy_gbps"])
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    results = {"meta": meta, "copy": copy, "rows": rows, "skipped": skipped}

    out_dir = args.out or os.path.join(report.RESULTS_DIR, report.device_slug(meta["device"]))
    stem = args.name or f"{size}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    json_path, csv_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".csv")
    if args.merge and os.path.exists(json_path):
        results = report.merge(report.read_results(json_path), results)
        print(f"merged into {json_path}: {len(results['rows'])} rows")
    results["targets"] = targets.evaluate(results["rows"], results["meta"])
    report.write_json(results, json_path)
    report.write_csv(results, csv_path)
    plot_dir = os.path.join(out_dir, stem + "-plots")
    plot_paths: List[str] = []
    if not args.no_plots:
        try:
            from .plots import make_plots
        except ImportError as exc:  # e.g. a GPU machine without matplotlib: results still written
            print(f"no plots: {exc}")
        else:
            plot_paths = make_plots(report.read_results(json_path), plot_dir)  # plots come from the file

    show(results, say_no_cuda=False)  # already said before timing
    print(f"\nwrote {json_path}\n      {csv_path}" + (f"\n      {len(plot_paths)} plots in {plot_dir}"
                                                       if plot_paths else ""))
    errors = [r for r in results["rows"] if r["status"] != "ok"]
    return 1 if (args.strict and errors) else 0


def show(results: Dict[str, Any], say_no_cuda: bool = True) -> None:
    meta = results["meta"]
    print(f"\nfusedskip benchmarks: {meta['device']} | driver {meta.get('driver') or '-'} | torch {meta['torch']} | "
          f"triton {meta.get('triton')} | commit {meta['git_commit']}{'+dirty' if meta.get('git_dirty') else ''} | "
          f"{meta['timestamp']} | size {meta.get('size')}")
    if meta.get("device_type") != "cuda":
        if say_no_cuda:
            print(NO_CUDA_MESSAGE)
    elif meta.get("copy_gbps"):
        print(f"copy bandwidth (the '% copy' denominator): {meta['copy_gbps']:.0f} GB/s")
    rows = results["rows"]
    if rows:
        print()
        print(report.results_table(rows))
    errors = [r for r in rows if r["status"] != "ok"]
    if errors:
        print(f"\n{len(errors)} row(s) failed; the first: {errors[0]['case']}/{errors[0]['provider']}/"
              f"{errors[0]['pass']}: {errors[0]['error']}")
    notes = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault((r["case"], r["provider"]), r["note"])
    if notes:
        print("\nnotes:")
        for (case, provider), note in notes.items():
            print(f"  {case} / {provider}: {note}")
    if results.get("skipped"):
        print("\nskipped (until available):")
        print(report.skipped_table(results["skipped"]))
    entries = results.get("targets") or targets.evaluate(rows, meta)
    print("\ntargets (H100; from measured rows only):")
    print(targets.targets_table(entries))
