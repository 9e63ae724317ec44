"""``@triton.jit`` helpers shared by the kernels: program prologues and per-channel parameters.

Each is called once per program, before any tile loop. Under TRITON_INTERPRET=1 every jit-helper
call costs about half a millisecond, noise next to a program's tiles but not next to one tile's
work: loads, offsets and arithmetic inside the loops stay written out in the kernels. Compiled,
the helpers inline and cost nothing.

Every prologue promotes the program ids to int64 when ``INT64`` (tensors whose element offsets
can exceed int32), so all index arithmetic derived from them is int64 too.
"""
import triton
import triton.language as tl


@triton.jit
def tile_program(S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """One [BLOCK_S, BLOCK_C] tile per program on the grid (N · S-blocks, C-blocks), as
    ``launch.tile_grid``: ``(n, s, c, c_mask, mask)`` with s and c the tile's spatial and channel
    indices and ``mask`` the [BLOCK_S, BLOCK_C] in-bounds mask."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    n = pid // num_s_blocks
    s = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (s < S)[:, None] & c_mask[None, :]
    return n, s, c, c_mask, mask


@triton.jit
def chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """One S-chunk of one sample and channel block per program on the grid (N · chunks, C-blocks),
    as ``launch.reduce_plan``: ``(row, n, s_begin, c, c_mask)``. ``row = n · num_chunks + chunk``
    is also the program's row of [N · chunks, C] partial buffers."""
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        row = row.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    n = row // num_chunks
    s_begin = (row % num_chunks) * S_PER_PROG
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    return row, n, s_begin, c, c_mask


@triton.jit
def row_program(C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """One row of tiles and one channel block per program on the grid (rows, C-blocks), for
    reductions whose tiles run across samples: ``(row, c, c_mask)``."""
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        row = row.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    return row, c, c_mask


@triton.jit
def acc_scalar(hi, lo, ACC_FP64: tl.constexpr):
    """A host float sent as an fp32 (hi, lo) pair (``launch.split_fp64``) in the accumulation
    dtype: hi alone in fp32 (fp32 work never sees an fp64 scalar), hi + lo (~48 bits) in fp64."""
    if ACC_FP64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def load_affine(w_ptr, b_ptr, c, c_mask, w_sc, b_sc,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    """(γ, β) of channels ``c`` in the accumulation dtype; 1 and 0 when the norm has none
    (multiplying by 1 and adding 0 are exact, so callers need no second code path)."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if HAS_WEIGHT:
        gam = tl.load(w_ptr + c * w_sc, mask=c_mask, other=0.0).to(acc_ty)
    else:
        gam = tl.full([BLOCK_C], 1.0, acc_ty)
    if HAS_BIAS:
        bet = tl.load(b_ptr + c * b_sc, mask=c_mask, other=0.0).to(acc_ty)
    else:
        bet = tl.zeros([BLOCK_C], dtype=acc_ty)
    return gam, bet


@triton.jit
def merge_partials(mean, m2, cnt):
    """Chan's merge of the rows (axis 0) of [R, BLOCK_C] partial (mean, M2, count) in one step,
    in the delta form: μ = μ_ref + Σ nᵢ(μᵢ − μ_ref) / n, M2 = Σ M2ᵢ + Σ nᵢ(μᵢ − μ)², n = Σ nᵢ,
    with μ_ref the mean of the first non-empty row. Exact for equal means (a constant channel
    merges to its value, so it normalises to exactly β), unlike Σ nᵢμᵢ / n, whose rounding the
    norm multiplies by 1/√eps. Empty rows weigh nothing; NaN/Inf partials propagate. Plain sums,
    not ``tl.reduce`` with a combine function (the interpreter runs those element by element)."""
    r = tl.arange(0, mean.shape[0])[:, None]
    filled = cnt > 0
    first = tl.min(tl.where(filled, r, mean.shape[0]), axis=0)
    ref = tl.sum(tl.where(r == first[None, :], mean, 0.0), axis=0)
    n = tl.sum(cnt, axis=0)
    mu = ref + tl.sum(tl.where(filled, cnt * (mean - ref[None, :]), 0.0), axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(filled, mean - mu[None, :], 0.0)
    return mu, tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0), n
