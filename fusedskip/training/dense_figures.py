"""Figures of a dense multi-task run: per-task curves and sample predictions."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from .figures import _pyplot, _show


def save_dense_curves(path: str, history: Dict[str, Any], tasks: Sequence, name: str) -> None:
    """Training loss of every task (log scale) and each task's primary validation metric."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.2), squeeze=False)
    epochs = history["epochs"]
    for i, t in enumerate(tasks):
        xs = [e["epoch"] for e in epochs]
        axes[0][0].plot(xs, [e.get(f"train_{t.name}_loss") for e in epochs], marker="o", ms=3, color=f"C{i}",
                        label=t.name)
        key = f"val_{t.name}_{t.primary}"
        pts = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
        if pts:
            axes[0][1].plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=f"{t.name} {t.primary}")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title(f"training losses ({name})", fontsize=9)
    axes[0][1].set_title("validation, primary metric per task", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def save_dense_samples(path: str, problem, model, device, n: int = 6) -> None:
    """Rows: input, then each dense task's prediction (segment: class map; denoise: image;
    depth: map); classification predictions in the input row's labels."""
    from .evaluation import unwrap

    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        split = problem.data.test
        idx = torch.arange(min(n, len(split)))
        clean, targets = split.get(idx)
        inputs = problem.val_noise.eval_noisy(clean, idx.tolist(), problem.cfg["eval_seed"]) \
            if problem.noisy_input else clean
        outputs = {k: v.float().cpu() for k, v in net(inputs.to(device)).items()}
    finally:
        net.train(was_training)
    dense = [t for t in problem.tasks if t.kind != "classify"]
    plt = _pyplot()
    fig, axes = plt.subplots(1 + len(dense), len(idx), figsize=(1.4 * len(idx) + 1.4, 1.45 * (1 + len(dense))),
                             squeeze=False)
    for c in range(len(idx)):
        _show(axes[0][c], inputs[c])
        preds = [f"{t.name[-5:]} {int(outputs[t.name][c].argmax())}" for t in problem.tasks if t.kind == "classify"]
        axes[0][c].set_xlabel("\n".join(preds), fontsize=6, labelpad=1)
        for r, t in enumerate(dense, start=1):
            out = outputs[t.name][c]
            if t.kind == "segment":
                axes[r][c].imshow(out.argmax(0).numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
                axes[r][c].set_xticks([])
                axes[r][c].set_yticks([])
            else:
                _show(axes[r][c], out if t.kind == "denoise" else out / out.abs().max().clamp_min(1e-6))
    for r, label in enumerate(["input"] + [t.name for t in dense]):
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
