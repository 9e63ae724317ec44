"""PNG plots made from a results file (matplotlib, Agg backend).

One PNG per case: for each pass, speedup vs eager PyTorch (left) and effective bandwidth as a
fraction of the copy bandwidth measured in the same run (right; on the CPU, where no fraction is
claimed, GB/s of the reference path instead; models, which have no byte model: TFLOP/s), by
shape × dtype × layout, one bar per provider.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .cases import PROVIDERS  # noqa: E402

_SHORT = {"channels_last": "cl", "nchw": "nchw"}


def _category(r: Dict[str, Any]) -> str:
    return f"{r['shape']}\n{r['dtype']} {_SHORT.get(r['layout'], r['layout'])}"


def _bars(ax, rows, metric: str, scale: float, providers: Sequence[str], categories: Sequence[str],
          baseline: Optional[float]) -> None:
    width = 0.8 / max(1, len(providers))
    index = {(c, p): r for r in rows for c, p in [(_category(r), r["provider"])]}
    for j, p in enumerate(providers):
        ys = []
        for c in categories:
            r = index.get((c, p))
            v = r.get(metric) if r else None
            ys.append(0.0 if v is None else v * scale)
        ax.bar([i + (j - (len(providers) - 1) / 2) * width for i in range(len(categories))], ys, width, label=p)
    if baseline is not None:
        ax.axhline(baseline, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=6)
    ax.tick_params(axis="y", labelsize=7)


def plot_case(case: str, rows: List[Dict[str, Any]], on_gpu: bool, device: str, path: str) -> Optional[str]:
    if not rows:
        return None
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    categories = list(dict.fromkeys(_category(r) for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    if on_gpu and any(r.get("frac_copy") is not None for r in rows):
        metric, scale, label, ref = "frac_copy", 100.0, "% of measured copy BW", 100.0
    elif any(r.get("gbps") is not None for r in rows):
        metric, scale, label, ref = "gbps", 1.0, "GB/s (minimal bytes)", None
    else:
        metric, scale, label, ref = "tflops", 1.0, "TFLOP/s (convs + matmuls)", None
    fig_w = min(40.0, 3.0 + 0.55 * len(categories) * max(1, len(providers)) / 2)
    fig, axes = plt.subplots(len(passes), 2, figsize=(2 * fig_w, 2.6 * len(passes)), squeeze=False)
    for i, pass_ in enumerate(passes):
        sel = [r for r in rows if r["pass"] == pass_]
        _bars(axes[i][0], sel, "speedup_vs_eager", 1.0, [p for p in providers if p != "eager"], categories, 1.0)
        axes[i][0].set_ylabel(f"{pass_}: x eager", fontsize=8)
        _bars(axes[i][1], sel, metric, scale, providers, categories, ref)
        axes[i][1].set_ylabel(f"{pass_}: {label}", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    axes[0][1].legend(fontsize=6, loc="upper left")
    claim = "" if on_gpu else " (CPU reference timings; no kernel claims)"
    fig.suptitle(f"{case} on {device}{claim}", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.93, bottom=0.12, hspace=0.45, wspace=0.12)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def make_plots(results: Dict[str, Any], out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    on_gpu = results["meta"].get("device_type") == "cuda"
    device = results["meta"].get("device", "")
    paths = []
    for case in dict.fromkeys(r["case"] for r in rows):
        path = plot_case(case, [r for r in rows if r["case"] == case], on_gpu, device,
                         os.path.join(out_dir, f"{case}.png"))
        if path:
            paths.append(path)
    return paths
