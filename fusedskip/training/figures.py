"""Figures of a training run (matplotlib, Agg backend): samples, gates, curves."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: torch.Tensor):
    img = img.detach().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_samples_figure(path: str, rows_by_model: Dict[str, list], title: str = "") -> None:
    """Grid: noisy, then each model's denoised output, then clean, for a few images."""
    plt = _pyplot()
    labels = list(rows_by_model)
    first = rows_by_model[labels[0]]
    n = len(first)
    lines = ["noisy"] + [f"denoised: {m}" for m in labels] + ["clean"]
    fig, axes = plt.subplots(len(lines), n, figsize=(1.3 * n + 1.6, 1.35 * len(lines)), squeeze=False)
    for c in range(n):
        _show(axes[0][c], first[c][0])
        for r, m in enumerate(labels, start=1):
            noisy, out, clean, label, pred = rows_by_model[m][c]
            _show(axes[r][c], out)
            if pred is not None:
                axes[r][c].set_xlabel(f"pred {pred}", fontsize=7, color="green" if pred == label else "red", labelpad=1)
        _show(axes[-1][c], first[c][2])
        if first[c][3] is not None:
            axes[-1][c].set_xlabel(f"label {first[c][3]}", fontsize=7, labelpad=1)
    for r, name in enumerate(lines):
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_gates_figure(path: str, gate_histories: Dict[str, List[List[Any]]], title: str = "") -> None:
    """Gate of each skip (shallowest = skip 1) over training; one panel per run, shared y-axis.

    ``gate_histories[run]`` = per-epoch lists of gate values (entry 0 = initial gates);
    per-channel gates are shown as their mean.
    """
    plt = _pyplot()
    runs = [r for r in gate_histories if gate_histories[r]]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.3), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        hist = gate_histories[run]
        L = len(hist[0])
        cmap = plt.get_cmap("viridis")
        for k in range(L):
            ys = [_gate_scalar(h[k]) for h in hist]
            ax.plot(range(len(hist)), ys, marker="o", ms=3, color=cmap(k / max(L - 1, 1)),
                    label=f"skip {k + 1}" + (" (shallowest)" if k == 0 else " (deepest)" if k == L - 1 else ""))
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gate a = softplus(β)")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gate_scalar(value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (list, tuple)):
        return float(np.mean(value))
    return float(value)


def save_curves_figure(path: str, histories: Dict[str, Dict[str, Any]]) -> None:
    """Training losses and validation PSNR (and accuracy) per epoch, one line per run."""
    plt = _pyplot()
    keys = [("train_den_loss", "denoising loss (train)"), ("val_psnr", "validation PSNR (dB)"),
            ("val_accuracy", "validation accuracy")]
    keys = [k for k in keys if any(any(e.get(k[0]) is not None for e in h["epochs"]) for h in histories.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    colours = {run: f"C{i}" for i, run in enumerate(histories)}  # one colour per run in every panel
    for ax, (key, label) in zip(axes[0], keys):
        for run, h in histories.items():
            xs = [e["epoch"] for e in h["epochs"] if e.get(key) is not None]
            ys = [e[key] for e in h["epochs"] if e.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=run, color=colours[run])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "train_den_loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def _fmt_gates(gates: List[Any]) -> str:
    return "[" + " ".join("—" if g is None else f"{_gate_scalar(g):.3f}" for g in gates) + "]"

