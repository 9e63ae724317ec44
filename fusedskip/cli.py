"""The ``fusedskip`` command: ``train``, ``eval``, ``demo``, ``check``, ``bench``.

    fusedskip demo [--out runs/demo]         selfcheck, then a single-task and a multi-task AddUNet
                                             on the bundled digits: metrics, gates, figures, report
    fusedskip train [options]                train (see ``fusedskip train --help``); torchrun:
                                             ``torchrun --nproc_per_node=N -m fusedskip.train ...``
    fusedskip eval CHECKPOINT [options]      PSNR / SSIM / accuracy with seeded noise, gate overrides
    fusedskip check [options]                fused kernels vs reference: errors and timings
    fusedskip bench [options]                the benchmarks (source checkout only)

Bad input ends with ``fusedskip <command>: error: <message>`` and exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

COMMANDS = ("train", "eval", "demo", "check", "bench")


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------
def _float_list(text: str) -> List[Optional[float]]:
    out: List[Optional[float]] = []
    for x in text.replace(",", " ").split():
        out.append(None if x.lower() in ("none", "-", "_") else float(x))
    if not out:
        raise argparse.ArgumentTypeError("expected one or more numbers")
    return out


def build_eval_parser(prog: str = "fusedskip eval") -> argparse.ArgumentParser:
    from .data import DATASETS
    from .metrics import SSIM_IMPLEMENTATIONS
    from .train import add_data_arguments

    p = argparse.ArgumentParser(prog=prog, description="Evaluate a trained AddUNet: per-image PSNR and SSIM "
                                "(11×11 Gaussian window, σ 1.5) averaged over images, accuracy; seeded noise.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (best.pt / last.pt) or a run directory")
    add_data_arguments(p, train=False)
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--sigma", type=float, nargs="+", default=[15.0, 25.0, 50.0], help="noise levels (0-255 scale)")
    p.add_argument("--seed", type=int, default=1234, help="evaluation noise seed")
    p.add_argument("--gate-scale", type=_float_list, metavar="'S [S ...]'",
                   help="scale the gates at inference: one value, or one per skip (shallowest first; 'none' = keep)")
    p.add_argument("--gate-value", type=_float_list, metavar="'V [V ...]'",
                   help="replace the gates at inference: one value, or one per skip (shallowest first; 'none' = keep)")
    p.add_argument("--ablate-skips", action="store_true", help="also evaluate with each skip's gate set to 0 in turn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, by load average)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--ssim-impl", default="skimage", choices=SSIM_IMPLEMENTATIONS)
    p.add_argument("--quantize", action="store_true", help="8-bit outputs before the metrics (KAIR protocol)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    p.add_argument("--figure", help="write a noisy / denoised / clean sample grid (PNG) here")
    p.set_defaults(datasets=DATASETS)
    return p


def cmd_eval(argv: Sequence[str], prog: str = "fusedskip eval") -> int:
    from . import backend
    from .data import DATASETS, DataError, Noise, load_dataset
    from .train import (
        UsageError,
        configure_threads,
        evaluate,
        load_checkpoint,
        model_from_checkpoint,
        resolve_device,
        sample_images,
        save_samples_figure,
        write_json,
    )

    parser = build_eval_parser(prog)
    args = parser.parse_args(argv)
    if args.dataset is not None and args.dataset.lower().replace("_", "-") not in DATASETS + ("fashionmnist", "cifar-10"):
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    if args.gate_scale and args.gate_value:
        parser.error("--gate-scale and --gate-value exclude each other")
    if any(s < 0 for s in args.sigma):
        parser.error("--sigma values must be >= 0")
    try:
        for path in (args.json_out, args.figure):
            if path:
                _check_output_file(path)
        backend.set_backend(args.backend)
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt)
        train_cfg = ckpt.get("config") or {}
        name = args.dataset or train_cfg.get("dataset", "digits")
        same = args.dataset is None or name == train_cfg.get("dataset")
        size = args.size if args.size is not None else (train_cfg.get("size") if same else None)
        channels = args.channels
        if channels is None and same:
            channels = train_cfg.get("channels")
        try:
            data = load_dataset(name, args.root or (train_cfg.get("root") if same else None), args.download, size,
                                channels, seed=train_cfg.get("seed", 0) if same else 0)
        except DataError as exc:
            raise UsageError(str(exc)) from None
        if data.channels != model.in_channels:
            raise UsageError(f"the checkpoint's model takes {model.in_channels}-channel images but {data.name} has "
                             f"{data.channels}; pass --channels {model.in_channels} to convert the images")
        images = getattr(data, args.split)  # evaluate() pads to the model's size multiple and crops back
        device = resolve_device(args.device)
        if device.type == "cpu":
            configure_threads(args.threads)
        model.to(device).eval()
        gates = model.gates()
        n_skips = model.depth
        override = args.gate_value or args.gate_scale
        if override is not None:
            if model.fusion == "concat":
                raise UsageError("this checkpoint's model has concatenative skips: there are no gates to override")
            if len(override) not in (1, n_skips):
                raise UsageError(f"give one gate value or one per skip ({n_skips}), got {len(override)}")
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")

    kind = "value" if args.gate_value else "scale"
    override_kw = {kind: override if override is None or len(override) > 1 else override[0]} if override else None
    results: Dict[str, Any] = {"checkpoint": ckpt["_path"], "dataset": data.describe(), "split": args.split,
                               "model_config": model.config, "gates": gates, "seed": args.seed,
                               "gate_override": {kind: override} if override else None, "metrics": {}}
    limit = args.max_images
    print(f"{ckpt['_path']}: {model.config['name']} {model.variant} depth {model.depth} widths {model.widths}, "
          f"{model.num_classes or 'no'} classes; {data.describe()}; split {args.split}")
    if model.fusion != "concat":
        print("gates per skip (shallowest first): " + " ".join(_fmt_gate(g) for g in gates))

    def run(noise, over=None):
        if over is None:
            return evaluate(model, images, noise, seed=args.seed, batch_size=args.batch_size, device=device,
                            ssim_impl=args.ssim_impl, quantize=args.quantize, limit=limit)
        with model.override_gates(**over):
            return evaluate(model, images, noise, seed=args.seed, batch_size=args.batch_size, device=device,
                            ssim_impl=args.ssim_impl, quantize=args.quantize, limit=limit)

    header = f"{'σ':>5s} {'PSNR (dB)':>10s} {'noisy PSNR':>11s} {'SSIM':>7s} {'accuracy':>9s}  images"
    print(header)
    for sigma in args.sigma:
        m = run(Noise(sigma), override_kw)
        results["metrics"][f"sigma_{sigma:g}"] = m
        acc = f"{m['accuracy']:9.4f}" if "accuracy" in m else f"{'—':>9s}"
        print(f"{sigma:5g} {m['psnr']:10.2f} {m['input_psnr']:11.2f} {m.get('ssim', math.nan):7.4f} {acc}  {m['n_images']}")
    if args.ablate_skips and model.fusion != "concat":
        sigma = args.sigma[0] if len(args.sigma) == 1 else (25.0 if 25.0 in args.sigma else args.sigma[0])
        base = results["metrics"][f"sigma_{sigma:g}"]["psnr"]
        results["ablation"] = {"sigma": sigma, "psnr": base, "per_skip": []}
        print(f"skip ablation at σ={sigma:g} (gate set to 0, others as evaluated above):")
        for k in range(model.depth):
            values: List[Optional[float]] = [None] * model.depth
            values[k] = 0.0
            m = run(Noise(sigma), {"value": values})
            results["ablation"]["per_skip"].append({"skip": k + 1, "psnr": m["psnr"], "drop_db": base - m["psnr"]})
            print(f"  skip {k + 1}: PSNR {m['psnr']:.2f} dB (drop {base - m['psnr']:+.2f})")
    if args.json_out:
        write_json(results, args.json_out)
        print(f"wrote {args.json_out}")
    if args.figure:
        sigma = args.sigma[0]
        rows = sample_images(model, images, Noise(sigma), args.seed, device)
        save_samples_figure(args.figure, {os.path.basename(os.path.dirname(ckpt['_path'])) or "model": rows},
                            f"{data.name} {args.split}, σ={sigma:g}")
        print(f"wrote {args.figure}")
    return 0


def _check_output_file(path: str) -> None:
    from .train import UsageError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path!r}: folder {folder!r} is not writable")


def _fmt_gate(g) -> str:
    if g is None:
        return "—"
    if isinstance(g, list):
        return f"mean {sum(g) / len(g):.3f} (per channel)"
    return f"{g:.3f}"


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
def build_demo_parser(prog: str = "fusedskip demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Self-check, then train a single-task and a multi-task "
                                "AddUNet on scikit-learn's digits (offline) and compare PSNR, SSIM, accuracy and "
                                "the learned skip gates.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (figures, report.md, report.json, runs)")
    p.add_argument("--epochs", type=int, help="epochs per model (default: 6 on CPU, 30 on a GPU)")
    p.add_argument("--width", type=int, help="feature width (default: 16 on CPU, 64 on a GPU)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--sigma", type=float, default=25.0, help="training and reporting noise level (0-255 scale)")
    p.add_argument("--method", default="fixed", help="multi-task method of the multi-task model")
    p.add_argument("--lambda-cls", type=float, default=1.0, help="λ in L_den + λ·L_cls")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=1, help="repeat both runs with this many seeds (gate comparison)")
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, by load average)")
    p.add_argument("--no-selfcheck", action="store_true", help="skip `fusedskip check`")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_demo(argv: Sequence[str], prog: str = "fusedskip demo") -> int:
    t_start = time.time()
    parser = build_demo_parser(prog)
    args = parser.parse_args(argv)
    import torch

    from .train import UsageError, check_method_name, ensure_writable_dir, mtl_method_names

    if not check_method_name(args.method):
        parser.error(f"unknown method {args.method!r}; choose from {', '.join(mtl_method_names())}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    try:
        out = ensure_writable_dir(args.out)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    on_gpu = torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda")
    epochs = args.epochs or (30 if on_gpu else 6)
    width = args.width or (64 if on_gpu else 16)
    report: Dict[str, Any] = {"device": "GPU " + torch.cuda.get_device_name() if on_gpu else "CPU",
                              "command": "fusedskip demo " + " ".join(argv)}

    # 1. selfcheck ---------------------------------------------------------------------------------
    report["selfcheck"] = _demo_selfcheck(args.no_selfcheck)

    # 2. the two trainings ---------------------------------------------------------------------------
    from . import backend
    from .data import Noise, load_dataset
    from .train import Interrupted, evaluate, run_training

    print(f"\n== training on scikit-learn digits (16×16, σ={args.sigma:g}): single-task vs multi-task AddUNet, "
          f"width {width}, depth {args.depth}, {epochs} epochs each, backend "
          f"{'triton (fused kernels)' if on_gpu and backend.get_backend() != 'reference' else backend.get_backend() + ' (reference PyTorch path)'}")
    data = load_dataset("digits", size=16, seed=0, limit=args.limit)
    base = {"dataset": "digits", "size": 16, "epochs": epochs, "batch_size": args.batch_size, "lr": args.lr,
            "sigma": args.sigma, "eval_sigmas": sorted({15.0, 25.0, 50.0, args.sigma}), "overwrite": True,
            "progress": not args.no_progress, "device": args.device, "figures": False,
            "model": {"width": width, "depth": args.depth}, "limit": args.limit, "threads": args.threads}
    runs: Dict[str, List[Dict[str, Any]]] = {"single-task": [], "multi-task": []}
    try:
        for seed in range(args.seeds):
            suffix = f"_seed{seed}" if args.seeds > 1 else ""
            for label, extra in (("single-task", {"task": "denoise"}),
                                 ("multi-task", {"task": "joint", "method": args.method, "lambda_cls": args.lambda_cls})):
                cfg = dict(base, seed=seed, out=os.path.join(out, label.replace("-", "_") + suffix), **extra)
                t0 = time.time()
                result = run_training(cfg, label=label + (f" seed {seed}" if args.seeds > 1 else ""))
                result["seconds"] = time.time() - t0
                runs[label].append(result)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    except Interrupted:
        return 130

    # 3. measurements ----------------------------------------------------------------------------
    noise = Noise(args.sigma)
    device = next(runs["single-task"][0]["_model"].parameters()).device
    for label in runs:
        for r in runs[label]:
            model = r["_model"]
            base_psnr = r["test"][f"sigma_{args.sigma:g}"]["psnr"]
            ablation = []
            for k in range(model.depth):
                values: List[Optional[float]] = [None] * model.depth
                values[k] = 0.0
                model.eval()
                with model.override_gates(value=values):
                    m = evaluate(model, data.test, noise, seed=1234, device=device, with_ssim=False)
                ablation.append(base_psnr - m["psnr"])
            r["ablation_drop_db"] = ablation
    finding = gate_finding(runs, args.sigma)
    report.update(_demo_summary(runs, args, epochs, width, finding))
    report["seconds_total"] = time.time() - t_start

    # 4. figures and report ---------------------------------------------------------------------------
    _demo_figures(out, runs, data, noise, device, report)
    _print_demo(report)
    from .train import write_json

    write_json(report, os.path.join(out, "report.json"))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(_demo_markdown(report))
    print(f"\nwrote {out}/report.md, report.json, samples.png, gates.png, curves.png "
          f"({report['seconds_total']:.0f} s in all)")
    return 0


def _demo_selfcheck(skip: bool) -> Dict[str, Any]:
    if skip:
        return {"status": "skipped (--no-selfcheck)"}
    import importlib
    import importlib.util

    if importlib.util.find_spec("fusedskip.selfcheck") is None:
        print("fusedskip.selfcheck is not available in this installation: skipping the kernel check")
        return {"status": "unavailable"}
    print("== fusedskip check: fused kernels vs the float64 reference")
    t0 = time.time()
    try:
        selfcheck = importlib.import_module("fusedskip.selfcheck")
        code = selfcheck.main([])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # the demo goes on; the report says what happened
        print(f"selfcheck failed to run: {type(exc).__name__}: {exc}")
        return {"status": f"error: {type(exc).__name__}: {exc}", "seconds": time.time() - t0}
    sys.stdout.flush()
    status = "passed" if code == 0 else f"FAILED (exit status {code})"
    return {"status": status, "exit_code": code, "seconds": time.time() - t0}


def _scalar(g) -> float:
    if g is None:
        return math.nan
    if isinstance(g, list):
        return sum(g) / len(g)
    return float(g)


def gate_finding(runs: Dict[str, List[Dict[str, Any]]], sigma: float) -> Dict[str, Any]:
    """Compare the per-skip gates of single-task and multi-task training (means over seeds).

    The paper's claim ("shallow skips favor reconstruction, while deeper features support
    discrimination") predicts that multi-task training tilts the gate profile towards the shallow
    skips relative to single-task training: the ratio a_MT/a_ST is larger at skip 1 than at
    skip L, equivalently the shallow/deep gate ratio a_1/a_L is larger under multi-task training.
    """
    import statistics

    def mean_gates(label):
        per_seed = [[_scalar(g) for g in r["final_gates"]] for r in runs[label]]
        return [statistics.fmean(col) for col in zip(*per_seed)], per_seed

    st, st_seeds = mean_gates("single-task")
    mt, mt_seeds = mean_gates("multi-task")
    L = len(st)
    ratio = [m / s for m, s in zip(mt, st)]
    change_pct = [100.0 * (r - 1.0) for r in ratio]
    tilt_st = st[0] / st[-1]
    tilt_mt = mt[0] / mt[-1]
    seed_tilts = [(m[0] / m[-1]) / (s[0] / s[-1]) for m, s in zip(mt_seeds, st_seeds)]
    supported = tilt_mt > tilt_st
    consistent = all((t > 1.0) == supported for t in seed_tilts)
    shallow_half = ratio[: max(L // 2, 1)]
    deep_half = ratio[L - max(L // 2, 1):]
    abl_st = [statistics.fmean(col) for col in zip(*[r["ablation_drop_db"] for r in runs["single-task"]])]
    abl_mt = [statistics.fmean(col) for col in zip(*[r["ablation_drop_db"] for r in runs["multi-task"]])]
    n = len(runs["single-task"])
    verdict = "yes" if supported else "no"
    text = (f"Shallow gates favour reconstruction under multi-task training: {verdict} (measured, "
            f"{n} seed{'s' if n > 1 else ''}{'' if n == 1 else ', ' + ('consistent' if consistent else 'NOT consistent') + ' across seeds'}). "
            f"Shallow/deep gate ratio a1/a{L}: multi-task {tilt_mt:.3f} vs single-task {tilt_st:.3f}; "
            f"multi-task vs single-task gate change per skip (shallowest first): "
            + ", ".join(f"{c:+.1f}%" for c in change_pct) + ". "
            "Removing a skip at inference (gate 0) costs, shallowest first, single-task "
            + " / ".join(f"{d:.2f}" for d in abl_st) + " dB and multi-task " + " / ".join(f"{d:.2f}" for d in abl_mt)
            + f" dB at σ={sigma:g}.")
    return {"supported": supported, "consistent_across_seeds": consistent, "seeds": n,
            "gates_single_task": st, "gates_multi_task": mt, "ratio_multi_over_single": ratio,
            "change_percent": change_pct, "shallow_deep_ratio_single_task": tilt_st,
            "shallow_deep_ratio_multi_task": tilt_mt, "per_seed_tilt_ratio": seed_tilts,
            "mean_ratio_shallow_half": sum(shallow_half) / len(shallow_half),
            "mean_ratio_deep_half": sum(deep_half) / len(deep_half),
            "ablation_drop_db_single_task": abl_st, "ablation_drop_db_multi_task": abl_mt, "statement": text,
            "caveat": "A short run on 16×16 digits; gate differences of a few percent between single runs are "
                      "within run-to-run variation: use --seeds N (and more --epochs) before drawing conclusions."}


def _demo_summary(runs, args, epochs, width, finding) -> Dict[str, Any]:
    import statistics

    summary: Dict[str, Any] = {"settings": {"dataset": "scikit-learn digits 16×16", "sigma": args.sigma,
                                            "epochs": epochs, "width": width, "depth": args.depth,
                                            "batch_size": args.batch_size, "lr": args.lr, "method": args.method,
                                            "lambda_cls": args.lambda_cls, "seeds": args.seeds},
                               "models": {}, "gate_finding": finding}
    for label, rs in runs.items():
        keys = rs[0]["test"].keys()
        test = {}
        for k in keys:
            test[k] = {m: statistics.fmean(r["test"][k][m] for r in rs)
                       for m in rs[0]["test"][k] if isinstance(rs[0]["test"][k][m], (int, float))}
        summary["models"][label] = {
            "test": test, "final_gates": [r["final_gates"] for r in rs],
            "gate_history": [[r["history"].get("initial_gates")] + [e["gates"] for e in r["history"]["epochs"]] for r in rs],
            "train_seconds": [r["seconds"] for r in rs], "parameters": rs[0]["parameters"],
            "run_dirs": [r["config"]["out"] for r in rs], "ablation_drop_db": [r["ablation_drop_db"] for r in rs],
        }
    return summary


def _demo_figures(out, runs, data, noise, device, report) -> None:
    from .train import sample_images, save_curves_figure, save_gates_figure, save_samples_figure

    try:
        rows = {label: sample_images(rs[0]["_model"], data.test, noise, 1234, device, n=10) for label, rs in runs.items()}
        save_samples_figure(os.path.join(out, "samples.png"), rows,
                            f"digits test images, σ={noise.sigma_min:g}: noisy / single-task / multi-task / clean")
        hist = {f"{label} (seed 0)": report["models"][label]["gate_history"][0] for label in runs}
        save_gates_figure(os.path.join(out, "gates.png"), hist,
                          "learned skip gates over training (skip 1 = shallowest)")
        save_curves_figure(os.path.join(out, "curves.png"), {label: rs[0]["history"] for label, rs in runs.items()})
        report["figures"] = ["samples.png", "gates.png", "curves.png"]
    except Exception as exc:
        print(f"warning: could not draw the figures ({type(exc).__name__}: {exc})")
        report["figures"] = []


def _print_demo(report: Dict[str, Any]) -> None:
    s = report["settings"]
    print(f"\n== results: digits 16×16, σ={s['sigma']:g}, width {s['width']}, depth {s['depth']}, "
          f"{s['epochs']} epochs, {s['seeds']} seed(s); self-check: {report['selfcheck']['status']}")
    print(f"{'model':12s} {'σ':>4s} {'PSNR (dB)':>10s} {'noisy':>7s} {'SSIM':>7s} {'accuracy':>9s}")
    for label, m in report["models"].items():
        for k, v in m["test"].items():
            acc = f"{v['accuracy']:9.4f}" if "accuracy" in v else f"{'—':>9s}"
            print(f"{label:12s} {k.split('_')[1]:>4s} {v['psnr']:10.2f} {v['input_psnr']:7.2f} {v['ssim']:7.4f} {acc}")
    f = report["gate_finding"]
    L = len(f["gates_single_task"])
    print("gates per skip (skip 1 = shallowest):")
    print(f"  {'':12s} " + " ".join(f"{'skip ' + str(k + 1):>8s}" for k in range(L)))
    print(f"  {'single-task':12s} " + " ".join(f"{g:8.3f}" for g in f["gates_single_task"]))
    print(f"  {'multi-task':12s} " + " ".join(f"{g:8.3f}" for g in f["gates_multi_task"]))
    print(f"  {'MT / ST':12s} " + " ".join(f"{g:8.3f}" for g in f["ratio_multi_over_single"]))
    print(f["statement"])
    print(f"({f['caveat']})")


def _demo_markdown(report: Dict[str, Any]) -> str:
    s = report["settings"]
    f = report["gate_finding"]
    L = len(f["gates_single_task"])
    lines = ["# fusedskip demo: single-task vs multi-task AddUNet", "",
             f"Device: {report['device']}. Self-check: {report['selfcheck']['status']}. "
             f"Total time {report['seconds_total']:.0f} s.", "",
             f"Data: scikit-learn digits (1797 images, 8×8 resized to 16×16, split 70/10/20), Gaussian noise "
             f"σ = {s['sigma']:g} (0–255 scale), evaluation noise seeded per image. Model: AddUNet paper form "
             f"(stem, {s['depth']} subtractive encoder blocks at width {s['width']}, gated additive skips "
             f"a = softplus(β), conv-BN-ReLU ×2 blocks, 1×1 head; classifier = GAP + linear on the deepest "
             f"encoder state). {s['epochs']} epochs, batch {s['batch_size']}, Adam lr {s['lr']:g}, cosine schedule; "
             f"multi-task loss via method `{s['method']}` (L_den + {s['lambda_cls']:g}·L_cls for `fixed`); "
             f"{s['seeds']} seed(s).", "",
             "## Test metrics (per-image PSNR averaged; SSIM 11×11 Gaussian σ 1.5; data range 1)", "",
             "| model | σ | PSNR (dB) | noisy input PSNR | SSIM | accuracy |", "|---|---|---|---|---|---|"]
    for label, m in report["models"].items():
        for k, v in m["test"].items():
            acc = f"{v['accuracy']:.4f}" if "accuracy" in v else "—"
            lines.append(f"| {label} | {k.split('_')[1]} | {v['psnr']:.2f} | {v['input_psnr']:.2f} | {v['ssim']:.4f} | {acc} |")
    lines += ["", "## Learned skip gates (skip 1 = shallowest)", "",
              "| | " + " | ".join(f"skip {k + 1}" for k in range(L)) + " |", "|---" * (L + 1) + "|",
              "| single-task | " + " | ".join(f"{g:.3f}" for g in f["gates_single_task"]) + " |",
              "| multi-task | " + " | ".join(f"{g:.3f}" for g in f["gates_multi_task"]) + " |",
              "| multi / single | " + " | ".join(f"{g:.3f}" for g in f["ratio_multi_over_single"]) + " |",
              "| PSNR drop without the skip, single-task (dB) | " + " | ".join(f"{d:.2f}" for d in f["ablation_drop_db_single_task"]) + " |",
              "| PSNR drop without the skip, multi-task (dB) | " + " | ".join(f"{d:.2f}" for d in f["ablation_drop_db_multi_task"]) + " |",
              "", "## Finding", "", f["statement"], "", f"Caveat: {f['caveat']}", "",
              "Figures: `samples.png` (noisy / denoised by each model / clean), `gates.png` (gates over training, "
              "single-task beside multi-task), `curves.png` (losses, validation PSNR and accuracy).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# check / bench
# ----------------------------------------------------------------------------------------------
def cmd_check(argv: Sequence[str]) -> int:
    import importlib
    import importlib.util

    if importlib.util.find_spec("fusedskip.selfcheck") is None:
        sys.stderr.write("fusedskip check: error: fusedskip.selfcheck is not part of this installation\n")
        return 2
    selfcheck = importlib.import_module("fusedskip.selfcheck")
    code = selfcheck.main(list(argv))
    return int(code or 0)


def source_root() -> Optional[str]:
    """The source checkout holding this package and a ``benchmarks/`` folder, if any."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "benchmarks")
    if os.path.isfile(os.path.join(bench, "__main__.py")) or os.path.isfile(os.path.join(bench, "__init__.py")):
        return root
    return None


def cmd_bench(argv: Sequence[str]) -> int:
    root = source_root()
    if root is None:
        sys.stderr.write("fusedskip bench: error: the benchmarks ship with the source checkout only (a benchmarks/ "
                         "folder beside the fusedskip package): clone the repository and run `fusedskip bench` or "
                         "`python -m benchmarks` there\n")
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=root, env=env)


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fusedskip", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options (see fusedskip COMMAND --help)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"fusedskip {__version__}")
        return 0
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    try:
        if ns.command == "train":
            from .train import main as train_main

            return train_main(rest, prog="fusedskip train")
        if ns.command == "eval":
            return cmd_eval(rest)
        if ns.command == "demo":
            return cmd_demo(rest)
        if ns.command == "check":
            return cmd_check(rest)
        return cmd_bench(rest)
    except KeyboardInterrupt:
        sys.stderr.write(f"fusedskip {ns.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
