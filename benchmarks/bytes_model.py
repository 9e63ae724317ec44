"""The one byte-and-FLOP model table: the minimal traffic each op must move, per pass.

Effective bandwidth is ``minimal bytes ÷ measured time`` (performance.md §6): what the algorithm
must move at the very least, not what a given implementation happens to move. A kernel that
re-reads its input (two-phase norms) or materialises a temporary still only gets credit for the
minimal bytes, so ``GB/s ÷ copy GB/s`` is directly "fraction of speed-of-light".

Conventions
  * One pass over an activation = ``numel × itemsize`` bytes. Per-channel / per-group tensors
    (gates, γ, β, running stats, mean/rstd, the gate gradient) are O(C) or O(N·G) and ignored.
  * ``full`` (forward + backward) is the sum of ``fwd`` and ``bwd``; ``infer`` is the forward of an
    eval-mode op under ``torch.no_grad``.
  * Tensor names map to sizes through :func:`tensor_numel`: for convolutions ``x``/``dx`` are the
    input (N·C_in·H·W), ``out``/``dout`` the output (N·C_out·H·W) and ``weight``/``dweight`` the
    filter (C_out·C_in·k²); for every other op each named tensor has N·C·H·W elements.
  * FLOPs: add, mul, compare, exp, rsqrt, division = 1 each, fma = 2; a convolution is
    2·N·C_out·H·W·C_in·k² (dgrad and wgrad the same again each). Element-wise counts are
    approximate and only informational: these ops are memory-bound (arithmetic intensity
    ≪ the H100 ridge point of ~266 FLOP/B), so GB/s is the metric that matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

Dims = Mapping[str, int]  # n, c, h, w (+ c_out, k for convolutions)


def per_element(flops: float) -> Callable[[Dims], float]:
    """FLOPs proportional to the activation's elements (N·C·H·W, or N·C_out·H·W for a conv)."""
    def count(d: Dims) -> float:
        return flops * d["n"] * d.get("c_out", d["c"]) * d["h"] * d["w"]
    count.per_element = flops  # type: ignore[attr-defined]
    return count


def conv_plus(elementwise: float, conv_multiple: int) -> Callable[[Dims], float]:
    """``conv_multiple`` convolutions' worth of FLOPs plus an element-wise part per output element."""
    def count(d: Dims) -> float:
        out = d["n"] * d["c_out"] * d["h"] * d["w"]
        return conv_multiple * 2.0 * out * d["c"] * d["k"] * d["k"] + elementwise * out
    return count


@dataclass(frozen=True)
class PassModel:
    reads: Tuple[str, ...]
    writes: Tuple[str, ...]
    flops: Callable[[Dims], float]
    note: str


# --------------------------------------------------------------------------------------------
# The table. Each entry states the minimal traffic in its note; keep notes and tuples in step.
# --------------------------------------------------------------------------------------------
BYTE_MODEL: Dict[str, Dict[str, PassModel]] = {
    # out = up + a·skip (a: 1 or C gate values).
    "gated_skip": {
        "fwd": PassModel(("up", "skip"), ("out",), per_element(2),
                         "read up + read skip + write out = 3 passes; 2 FLOP/elt (mul, add)"),
        # d_up = dout is handed back as-is (no copy), d_skip = a·dout and d_a = Σ dout·skip are one
        # pass over dout and skip.
        "bwd": PassModel(("dout", "skip"), ("dskip",), per_element(3),
                         "read dout + read skip + write dskip = 3 passes (d_up aliases dout); "
                         "3 FLOP/elt (a·dout, dout·skip accumulate)"),
    },
    # y = act(GroupNorm(x)), act = SiLU in the benchmark cases.
    "group_norm_act": {
        "fwd": PassModel(("x",), ("out",), per_element(9),
                         "read x + write out = 2 passes (stats re-read not credited); "
                         "~9 FLOP/elt (sum, sumsq 3; x·scale+shift 2; SiLU 4)"),
        "bwd": PassModel(("x", "dout"), ("dx",), per_element(16),
                         "read x + read dout + write dx = 3 passes (x̂ and act' recomputed); "
                         "~16 FLOP/elt"),
    },
    # y = act(BatchNorm(x)) in training mode (batch statistics), act = ReLU in the cases.
    "batch_norm_act": {
        "fwd": PassModel(("x",), ("out",), per_element(6),
                         "read x + write out = 2 passes; ~6 FLOP/elt (stats 3, affine 2, ReLU 1)"),
        "bwd": PassModel(("x", "dout"), ("dx",), per_element(11),
                         "read x + read dout + write dx = 3 passes; ~11 FLOP/elt"),
    },
    # Eval-mode BatchNorm (running statistics) + act: a pure element-wise map.
    "batch_norm_act_eval": {
        "infer": PassModel(("x",), ("out",), per_element(3),
                           "read x + write out = 2 passes; 3 FLOP/elt (x·scale+shift, ReLU)"),
    },
    # y = act(GroupNorm(up + a·skip)): chain A of performance.md §6.1.
    "skip_group_norm_act": {
        "fwd": PassModel(("up", "skip"), ("out",), per_element(11),
                         "read up + read skip + write out = 3 passes (1-pass on-chip minimum; "
                         "a kernel that also saves y writes a 4th); ~11 FLOP/elt"),
        "bwd": PassModel(("dout", "up", "skip"), ("dup", "dskip"), per_element(19),
                         "read dout + read up, skip (or saved y and skip) + write dup + write dskip "
                         "= 5 passes; ~19 FLOP/elt"),
    },
    # y = act(BatchNorm(up + a·skip)), training mode.
    "skip_batch_norm_act": {
        "fwd": PassModel(("up", "skip"), ("out",), per_element(8),
                         "read up + read skip + write out = 3 passes; ~8 FLOP/elt"),
        "bwd": PassModel(("dout", "up", "skip"), ("dup", "dskip"), per_element(14),
                         "read dout + read up, skip + write dup + write dskip = 5 passes; ~14 FLOP/elt"),
    },
    # y = act(BatchNorm(x) + residual), training mode (the last BN of a ResNet block).
    "batch_norm_residual_act": {
        "fwd": PassModel(("x", "residual"), ("out",), per_element(7),
                         "read x + read residual + write out = 3 passes; ~7 FLOP/elt (stats 3, affine 2, add 1, "
                         "ReLU 1)"),
        "bwd": PassModel(("x", "residual", "dout"), ("dx", "dresidual"), per_element(12),
                         "read x + read residual (z recomputed) + read dout + write dx + write dresidual "
                         "= 5 passes; ~12 FLOP/elt"),
    },
    # y = act(GroupNorm(x)·(1 + scale) + shift), per-(n, c) scale/shift (O(N·C), ignored).
    "group_norm_scale_shift_act": {
        "fwd": PassModel(("x",), ("out",), per_element(11),
                         "read x + write out = 2 passes; ~11 FLOP/elt (GN 5, scale/shift 2, SiLU 4)"),
        "bwd": PassModel(("x", "dout"), ("dx",), per_element(18),
                         "read x + read dout + write dx = 3 passes (dscale, dshift: O(N·C) sums); ~18 FLOP/elt"),
    },
    # out = act(norm(conv_k×k(x))), no conv bias, 'same' padding, stride 1.
    "conv_norm_act": {
        "fwd": PassModel(("x", "weight"), ("out",), conv_plus(6, 1),
                         "read x + read weight + write out (conv output never materialised); "
                         "2·N·Cout·H·W·Cin·k² + ~6 FLOP per output element"),
        "bwd": PassModel(("x", "dout", "weight"), ("dx", "dweight"), conv_plus(11, 2),
                         "read x + read dout + read weight + write dx + write dweight (conv output "
                         "recomputed or fused); dgrad + wgrad = 2 convs + ~11 FLOP/out elt"),
    },
}

_CONV_INPUT = ("x", "dx")
_CONV_WEIGHT = ("weight", "dweight")


def tensor_numel(op: str, name: str, d: Dims) -> int:
    """Elements of tensor ``name`` of op ``op`` at dimensions ``d``."""
    if "c_out" in d:  # convolution
        if name in _CONV_INPUT:
            return d["n"] * d["c"] * d["h"] * d["w"]
        if name in _CONV_WEIGHT:
            return d["c_out"] * d["c"] * d["k"] * d["k"]
        return d["n"] * d["c_out"] * d["h"] * d["w"]
    return d["n"] * d["c"] * d["h"] * d["w"]


def _single(op: str, pass_: str) -> PassModel:
    try:
        return BYTE_MODEL[op][pass_]
    except KeyError:
        raise KeyError(f"no byte model for op {op!r} pass {pass_!r}") from None


def pass_components(op: str, pass_: str) -> Tuple[PassModel, ...]:
    """The table entries a pass is made of (``full`` = ``fwd`` + ``bwd``)."""
    if pass_ == "full":
        return (_single(op, "fwd"), _single(op, "bwd"))
    if pass_ == "infer" and "infer" not in BYTE_MODEL.get(op, {}):
        return (_single(op, "fwd"),)
    return (_single(op, pass_),)


def traffic(op: str, pass_: str, dims: Dims, itemsize: int) -> Tuple[int, float]:
    """``(minimal bytes, FLOPs)`` of one ``pass_`` of ``op``; activations of ``itemsize`` bytes."""
    nbytes, flops = 0, 0.0
    for part in pass_components(op, pass_):
        for name in part.reads + part.writes:
            nbytes += tensor_numel(op, name, dims) * itemsize
        flops += part.flops(dims)
    return nbytes, flops


def passes_over_activation(op: str, pass_: str) -> Optional[int]:
    """Minimal bytes as a count of activation passes (None for convolutions, whose tensors differ)."""
    parts = pass_components(op, pass_)
    if op == "conv_norm_act":
        return None
    return sum(len(p.reads) + len(p.writes) for p in parts)
