"""Activation functions and their derivatives as Triton jit functions, selected by a constexpr id.

Kernels compute ``act(z)`` in the forward and ``act'(z)`` in the backward from a recomputed
pre-activation ``z`` (nothing but the input and fp32 statistics is saved). The ids are the
values of :data:`fusedskip.activations.ACTIVATION_IDS`.
"""
import triton
import triton.language as tl

IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
SILU = tl.constexpr(3)
GELU = tl.constexpr(4)       # exact: x·Φ(x) with erf
GELU_TANH = tl.constexpr(5)  # tanh approximation, nn.GELU(approximate="tanh")
RELU6 = tl.constexpr(6)
HARDSWISH = tl.constexpr(7)
HARDSIGMOID = tl.constexpr(8)
SIGMOID = tl.constexpr(9)
MISH = tl.constexpr(10)      # z·tanh(softplus(z))
ELU = tl.constexpr(11)       # alpha passed in ``slope``
PRELU = tl.constexpr(12)     # LeakyReLU with a learned slope: ``slope`` is a per-channel tile (or scalar)

# Globals read inside @triton.jit functions must be tl.constexpr: the compiler rejects plain
# Python floats (the interpreter does not, so only a GPU compile catches it).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    """tanh(x) elementwise, as 2·sigmoid(2x) − 1: core tl ops only (libdevice paths moved between
    Triton versions). A device helper: no grid, no pointers."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softplus(x):
    """log(1 + e^x) elementwise without overflow: max(x, 0) + log(1 + e^−|x|) (torch's threshold 20
    gives the same in fp32). A device helper: no grid, no pointers."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def activation(z, ACT: tl.constexpr, slope):
    """act(z) for the activation ``ACT``; ``slope`` is LeakyReLU's negative slope (ELU's alpha), or
    for PRELU the learned slope: a scalar or a tile broadcast over ``z`` (per channel)."""
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)  # NaN propagates, as F.relu
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == PRELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == SILU:
        return z * tl.sigmoid(z)
    elif ACT == GELU:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif ACT == GELU_TANH:
        # Tensor operands first: under the interpreter `constexpr * tensor` wraps the tensor in a
        # constexpr (tensor * constexpr is fine in both modes).
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACT == RELU6:
        return tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))  # NaN propagates, as F.relu6
    elif ACT == HARDSWISH:
        return z * tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 6.0, z + 3.0)) / 6.0
    elif ACT == HARDSIGMOID:
        return tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 1.0, z / 6.0 + 0.5))
    elif ACT == SIGMOID:
        return tl.sigmoid(z)
    elif ACT == MISH:
        return z * _tanh(_softplus(z))
    elif ACT == ELU:
        return tl.where(z > 0, z, (tl.exp(tl.minimum(z, 0.0)) - 1.0) * slope)
    else:
        return z


@triton.jit
def activation_grad(z, ACT: tl.constexpr, slope):
    """d act(z) / dz, matching PyTorch's conventions (ReLU'(0) = 0, LeakyReLU'(0) = PReLU'(0) = slope).
    PRELU's slope gradient, Σ dy·min(z, 0), is the caller's reduction (:func:`prelu_slope_grad`)."""
    if ACT == RELU:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, 1.0, slope)
    elif ACT == PRELU:
        return tl.where(z > 0, 1.0, slope)
    elif ACT == SILU:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT1_2))
        return cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == GELU_TANH:
        inner = (z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI  # tensor first (see activation)
        t = _tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_TANH_C))
    elif ACT == RELU6:
        return tl.where((z > 0) & (z < 6.0), 1.0, 0.0)  # torch: 0 at both kinks
    elif ACT == HARDSWISH:
        return tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 1.0, z / 3.0 + 0.5))
    elif ACT == HARDSIGMOID:
        return tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)
    elif ACT == SIGMOID:
        sig = tl.sigmoid(z)
        return sig * (1.0 - sig)
    elif ACT == MISH:
        t = _tanh(_softplus(z))
        return t + z * tl.sigmoid(z) * (1.0 - t * t)
    elif ACT == ELU:
        return tl.where(z > 0, 1.0, tl.exp(tl.minimum(z, 0.0)) * slope)
    else:
        # 1 everywhere, also where z is ±Inf/NaN (z·0 + 1 would give NaN there: dβ = Σ dy must hold).
        return tl.full(z.shape, 1.0, z.dtype)


@triton.jit
def prelu_slope_grad(dy, z):
    """The per-element term of PReLU's slope gradient, dy·z where z ≤ 0 (torch: x > 0 ? 0 : x·dy);
    the caller sums it per channel (or over everything for a single slope)."""
    return tl.where(z > 0, 0.0, z * dy)


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) partial statistics; empty partials are safe."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1e-30), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w_b
    m2 = m2_a + m2_b + delta * delta * n_a * w_b
    return mean, m2, n
