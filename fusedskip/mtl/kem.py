"""Cross-task feature exchange between the branches of a multi-task network.

* :class:`KEM` — the knowledge extraction module of "SGW-based Multi-Task Learning in Vision Tasks"
  (Zhang, Chen et al., ACCV 2024, arXiv 2410.03778) as reconstructed from a third-party review:
  a few learned memory slots R (a Shared Global Workspace, Goyal et al., ICLR 2022) *retrieve* the
  top-k tokens of all tasks, are updated, and every task *writes* them back into its features::

      F = concat_t F_t                                            all tasks' tokens, [B, T·N, C]
      Retrieve  R̂  = softmax(topk_mask(R W_q (F W_k)ᵀ / √d)) F W_v   per slot: its k best tokens
                R' = update(R, R̂ W_r)                               residual + LayerNorm + MLP
      Write     F̂_t = softmax(F_t W_q' (R' W_k')ᵀ / √d) R' W_v'       dense over the K slots
      Broadcast F_t ← F_t + F̂_t W_o                                 back to each task's decoder

  Cost O(T·N·K·d): the K × T·N score matrix is the largest attention tensor; no T·N × T·N tensor
  is ever formed (tested).
* :class:`StableKEM` — the same with a fixed simplex equiangular tight frame (neural collapse):
  ``M = √(K/(K−1)) · U (I_K − 11ᵀ/K)``, either the space the tokens are projected into before the
  slots select them (default) or the slots' fixed query directions.
* :class:`CrossTaskAttention` — the dense baseline: every task's tokens attend to all tasks'
  tokens, O((T·N)² d), same interface and width.
* :class:`CrossTaskFusion` — one argument (``kind``) picks any of them or ``"none"``; the hook a
  multi-task network calls between its per-task branches.

Every module takes a sequence of T task features, each ``[B, C, H, W]`` or tokens ``[B, N, C]``
(one batch size and channel count; token counts may differ between tasks) and returns a list of
tensors of the same shapes. The paper's equations are known only second-hand and no code is
public: every choice below (slots, k, heads, mask before/after the softmax, slot update, ETF use)
is an argument. Pure PyTorch: the attention uses ``F.scaled_dot_product_attention`` wherever the
weights are a plain (masked) softmax.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_MODES = ("before", "after")
SLOT_UPDATES = ("mlp", "residual", "none")
SLOT_INITS = ("normal", "identity")
ETF_MODES = ("project", "slot_keys")
CROSS_TASK_KINDS = ("none", "kem", "stable_kem", "cross_attention")


# --------------------------------------------------------------------------------------------
# Simplex ETF
# --------------------------------------------------------------------------------------------
def simplex_etf(dim: int, num_vectors: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """A simplex equiangular tight frame: ``num_vectors`` (K) unit columns in ``dim`` dimensions
    with pairwise cosine −1/(K−1), ``M = √(K/(K−1)) · U (I_K − 11ᵀ/K)``, shape [dim, K].

    U (dim × K) has orthonormal columns from the QR factorisation of a Gaussian drawn from its own
    generator seeded with ``seed`` (the global RNG is untouched, so the frame is reproducible).
    The simplex spans K − 1 dimensions, so ``dim = K − 1`` is allowed: there U is a partial
    isometry with ``UᵀU = I_K − 11ᵀ/K`` (orthonormal basis of 1^⊥, rotated into ``dim``).
    """
    if not isinstance(num_vectors, int) or num_vectors < 2:
        raise ValueError(f"num_vectors (K) must be an int >= 2 for a simplex ETF (undefined for K < 2), "
                         f"got {num_vectors!r}")
    if not isinstance(dim, int) or dim < num_vectors - 1:
        raise ValueError(f"dim must be an int >= num_vectors - 1 = {num_vectors - 1} (a K-vertex simplex spans "
                         f"K - 1 dimensions), got {dim!r}")
    k = num_vectors
    gen = torch.Generator().manual_seed(int(seed))
    centre = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    if dim >= k:
        u, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    else:  # dim == K - 1: basis V of 1^⊥ (K × (K−1)), random rotation W into dim; U = W Vᵀ
        v, _ = torch.linalg.qr(centre[:, : k - 1])
        w, _ = torch.linalg.qr(torch.randn(dim, k - 1, generator=gen, dtype=torch.float64))
        u = w @ v.T
    return (math.sqrt(k / (k - 1)) * u @ centre).to(dtype)


# --------------------------------------------------------------------------------------------
# Top-k attention (Retrieve) and its reference
# --------------------------------------------------------------------------------------------
def _check_topk_args(q: Tensor, k: Tensor, v: Tensor, topk: int, mask: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point 4-D tensor [B, heads, L, d], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v must share [B, heads] and k, v their length: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= k.shape[2]:
        raise ValueError(f"topk must be an int in [1, number of tokens = {k.shape[2]}], got {topk!r}")
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")


def topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, mask: str = "before",
                   scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Each query attends to its ``topk`` highest-scoring keys only; returns (out, indices).

    q [B, h, Lq, d], k [B, h, Lk, d], v [B, h, Lk, dv] → out [B, h, Lq, dv], indices [B, h, Lq, topk]
    (``torch.topk`` order). ``mask="before"``: softmax over the kept scores (an exact k-sparse
    softmax, via ``F.scaled_dot_product_attention`` with a boolean mask); ``"after"``: softmax over
    all Lk scores, then the others are zeroed without renormalising (the SGW code's choice; the
    kept weights sum to < 1 and the normaliser still passes gradient to every key).

    The largest tensors are Lq × Lk (scores and mask): with Lq = K slots this is O(K · Lk).
    For ``"before"`` the selection scores are computed without autograd and the differentiable
    path is recomputed inside SDPA; either way unselected keys' values get exactly zero gradient.
    """
    _check_topk_args(q, k, v, topk, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.set_grad_enabled(mask == "after" and torch.is_grad_enabled()):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, h, Lq, Lk]: the largest tensor
    with torch.no_grad():
        indices = torch.topk(scores.detach(), topk, dim=-1, sorted=True).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, indices, True)
    if mask == "before":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    else:
        out = torch.matmul(torch.softmax(scores, dim=-1) * keep, v)
    return out, indices


def topk_attention_reference(q: Tensor, k: Tensor, v: Tensor, topk: int, mask: str = "before",
                             scale: Optional[float] = None) -> Tensor:
    """Straightforward float64 reference of :func:`topk_attention` (threshold at the k-th score)."""
    _check_topk_args(q, k, v, topk, mask)
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = q @ k.transpose(-1, -2) * scale
    kth = scores.sort(dim=-1, descending=True).values[..., topk - 1: topk]
    keep = scores >= kth
    if mask == "before":
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    else:
        weights = torch.softmax(scores, dim=-1) * keep
    return weights @ v


# --------------------------------------------------------------------------------------------
# Shared plumbing: task features <-> tokens, validation
# --------------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _task_tokens(features, dim: int) -> list[Tensor]:
    """Validate T task features and return them as [B, N_t, C] token views."""
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) < 1:
        raise TypeError("features must be a list or tuple of per-task tensors ([B, C, H, W] or [B, N, C]), "
                        f"got {type(features).__name__}")
    tokens = []
    for t, f in enumerate(features):
        name = f"features[{t}]"
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(f, 'dtype', type(f).__name__)}")
        if f.dim() == 4:
            if f.shape[1] != dim:
                raise ValueError(f"{name} must have {dim} channels ([B, C, H, W] with C = dim), got {tuple(f.shape)}")
            tok = f.flatten(2).transpose(1, 2)
        elif f.dim() == 3:
            if f.shape[2] != dim:
                raise ValueError(f"{name} must have {dim} channels ([B, N, C] with C = dim), got {tuple(f.shape)}")
            tok = f
        else:
            raise ValueError(f"{name} must be [B, C, H, W] or [B, N, C], got shape {tuple(f.shape)}")
        if tok.shape[1] < 1 or tok.shape[0] < 1:
            raise ValueError(f"{name} must have at least one sample and one token, got {tuple(f.shape)}")
        first = features[0]
        if t and (f.shape[0] != first.shape[0] or f.dtype != first.dtype or f.device != first.device):
            raise ValueError(f"{name} disagrees with features[0]: batch {f.shape[0]} vs {first.shape[0]}, "
                             f"dtype {f.dtype} vs {first.dtype}, device {f.device} vs {first.device}")
        tokens.append(tok)
    return tokens


def _untokenise(delta: Tensor, like: Tensor) -> Tensor:
    """Residual update of one task: ``like + delta`` in ``like``'s shape ([B, C, H, W] or [B, N, C])."""
    if like.dim() == 4:
        delta = delta.transpose(1, 2).reshape(like.shape)
    return like + delta


class _MultiHead(nn.Module):
    """Q/K/V/out projections of one attention (``heads`` × ``head_dim``) between width-``dim``
    streams; ``key_dim`` when the keys are computed from another width."""

    def __init__(self, dim: int, heads: int, head_dim: int, key_dim: Optional[int] = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(dim, inner, bias=bias)
        self.k = nn.Linear(key_dim or dim, inner, bias=bias)
        self.v = nn.Linear(dim, inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=bias)

    def split(self, x: Tensor) -> Tensor:  # [B, L, h·d] -> [B, h, L, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:  # [B, h, L, d] -> [B, L, h·d]
        return x.transpose(1, 2).flatten(2)

    def attend(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Dense SDPA of ``queries`` over ``keys`` (= values), projected back to ``dim``."""
        q, k, v = self.split(self.q(queries)), self.split(self.k(keys)), self.split(self.v(keys))
        return self.out(self.merge(F.scaled_dot_product_attention(q, k, v)))


def _heads(dim: int, heads: int, head_dim: Optional[int]) -> int:
    _positive_int("dim", dim)
    _positive_int("heads", heads)
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless head_dim is given")
        return dim // heads
    return _positive_int("head_dim", head_dim)


# --------------------------------------------------------------------------------------------
# KEM
# --------------------------------------------------------------------------------------------
class KEM(nn.Module):
    """Knowledge extraction module: K memory slots retrieve the top-k tokens of all tasks, are
    updated, and are written back into every task's features (module docstring for the equations).

    Args:
        dim: channels C of every task feature.
        num_slots: K memory slots (the bottleneck).
        topk: tokens each slot keeps per head: an int (≤ total tokens T·N at run time), a float in
            (0, 1] (that fraction of T·N, rounded up: fits any insertion stage) or ``None`` (all).
        heads, head_dim: attention heads and width per head (default ``dim // heads``); the same
            for retrieve and write.
        mask: ``"before"`` the softmax (exact k-sparse softmax, default) or ``"after"`` it
            without renormalising (as the SGW code).
        slot_update: ``"mlp"`` (R₁ = LN(R + R̂W_r), R' = LN(R₁ + MLP(R₁)), SGW's order),
            ``"residual"`` (R' = R + R̂W_r) or ``"none"`` (R' = R̂W_r).
        mlp_ratio: hidden width of the slot MLP relative to ``dim``.
        slot_init: ``"normal"`` (N(0, 1)) or ``"identity"`` (SGW: slot i = e_i, needs dim ≥ K).
        pre_norm: LayerNorm the task tokens before every projection (the residual stays raw).
        zero_init: zero the broadcast projection W_o so the module starts as the identity.
        bias: biases in the projections.
    """

    def __init__(self, dim: int, num_slots: int = 8, topk: Optional[int] = 16, heads: int = 1,
                 head_dim: Optional[int] = None, mask: str = "before", slot_update: str = "mlp",
                 mlp_ratio: float = 2.0, slot_init: str = "normal", pre_norm: bool = True,
                 zero_init: bool = False, bias: bool = False):
        super().__init__()
        self.head_dim = _heads(dim, heads, head_dim)
        self.dim, self.heads = dim, heads
        self.num_slots = _positive_int("num_slots", num_slots)
        if isinstance(topk, float) and not 0.0 < topk <= 1.0:
            raise ValueError(f"topk as a float is a fraction of the tokens and must lie in (0, 1], got {topk!r}")
        self.topk = topk if topk is None or isinstance(topk, float) else _positive_int("topk", topk)
        self.mask = _choice("mask", mask, MASK_MODES)
        self.slot_update = _choice("slot_update", slot_update, SLOT_UPDATES)
        _choice("slot_init", slot_init, SLOT_INITS)
        if slot_init == "identity" and dim < num_slots:
            raise ValueError(f"slot_init='identity' needs dim >= num_slots, got dim={dim}, num_slots={num_slots}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.slots = nn.Parameter(torch.eye(num_slots, dim) if slot_init == "identity" else torch.randn(num_slots, dim))
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.retrieve = _MultiHead(dim, heads, self.head_dim, key_dim=self._key_dim(), bias=bias)
        if slot_update == "mlp":
            hidden = max(1, int(round(dim * mlp_ratio)))
            self.slot_norm1, self.slot_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.slot_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.write = _MultiHead(dim, heads, self.head_dim, bias=bias)
        if zero_init:
            nn.init.zeros_(self.write.out.weight)
            if self.write.out.bias is not None:
                nn.init.zeros_(self.write.out.bias)

    def tokens_kept(self, total: int) -> int:
        """k for ``total`` = T·N tokens: ``topk`` itself, all for None, ⌈topk·T·N⌉ for a fraction."""
        if self.topk is None:
            return total
        if isinstance(self.topk, float):
            return max(1, math.ceil(self.topk * total - 1e-9))
        return self.topk

    # hooks StableKEM overrides -----------------------------------------------------------------
    def _key_dim(self) -> int:
        return self.dim

    def _retrieve_qkv(self, slots: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slot queries and token keys/values, each [B, h, L, d]."""
        r = self.retrieve
        return r.split(r.q(slots)), r.split(r.k(tokens)), r.split(r.v(tokens))

    # the three steps ---------------------------------------------------------------------------
    def retrieve_step(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Slots attend to their top-k tokens and are updated: (R' [B, K, C], indices [B, h, K, k])."""
        total = tokens.shape[1]
        topk = self.tokens_kept(total)
        if topk > total:
            raise ValueError(f"topk ({topk}) must not exceed the number of tokens of all tasks together "
                             f"(T·N = {total}); lower topk or insert the module at a larger stage")
        slots = self.slots.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        q, k, v = self._retrieve_qkv(slots, tokens)
        read, indices = topk_attention(q, k, v, topk, self.mask)
        read = self.retrieve.out(self.retrieve.merge(read))
        if self.slot_update == "none":
            return read, indices
        if self.slot_update == "residual":
            return slots + read, indices
        r1 = self.slot_norm1(slots + read)
        return self.slot_norm2(r1 + self.slot_mlp(r1)), indices

    def write_step(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """Each token reads the K updated slots (dense softmax over K): F̂ W_o, [B, N, C]."""
        return self.write.attend(tokens, memory)

    def forward(self, features: Sequence[Tensor], return_info: bool = False):
        """``features``: T tensors [B, C, H, W] or [B, N, C]. Returns the T updated tensors (same
        shapes); with ``return_info`` also ``{"slots": R' [B, K, C], "indices": [B, h, K, k],
        "task_tokens": [N_1, …, N_T]}`` (indices into the concatenated tokens, task by task)."""
        raw = _task_tokens(features, self.dim)
        normed = [self.norm(t) for t in raw]
        memory, indices = self.retrieve_step(torch.cat(normed, dim=1))
        outs = [_untokenise(self.write_step(t, memory), f) for t, f in zip(normed, features)]
        if return_info:
            return outs, {"slots": memory, "indices": indices, "task_tokens": [t.shape[1] for t in raw]}
        return outs

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_slots={self.num_slots}, topk={self.topk}, heads={self.heads}, "
                f"head_dim={self.head_dim}, mask={self.mask!r}, slot_update={self.slot_update!r}")


class StableKEM(KEM):
    """KEM with a fixed simplex ETF (a buffer, never trained), ``M = √(K/(K−1)) · U (I_K − 11ᵀ/K)``
    of shape [etf_dim, K_e], K_e = ``etf_size`` (default ``num_slots``).

    ``etf_mode="project"`` (default; "before input to KEM, we projected the features into ETF
    space"): the slots *select* tokens in ETF space — keys come from
    ``Z = normalize(F W_p) M`` ([T·N, K_e], each token's cosines with the K_e frame vectors),
    while values stay the (normed) features, so only the choice of tokens is stabilised.
    ``etf_mode="slot_keys"``: the slots' retrieve queries are fixed, maximally separated ETF
    directions (K_e = K, etf_dim = head_dim, shared by the heads, scaled by √head_dim so that
    a slot's score is ``M[:, j]ᵀ k``); the slots' learned contents are still what is written back.

    Args (besides :class:`KEM`'s): etf_mode, etf_dim (default ``dim`` for project, ``head_dim``
    for slot_keys), etf_size (project only), etf_seed.
    """

    def __init__(self, dim: int, num_slots: int = 8, topk: Optional[int] = 16, *, etf_mode: str = "project",
                 etf_dim: Optional[int] = None, etf_size: Optional[int] = None, etf_seed: int = 0, **kwargs):
        self.etf_mode = _choice("etf_mode", etf_mode, ETF_MODES)
        heads = kwargs.get("heads", 1)
        head_dim = _heads(dim, heads, kwargs.get("head_dim"))
        if etf_mode == "slot_keys":
            if etf_size not in (None, num_slots):
                raise ValueError(f"etf_size must equal num_slots ({num_slots}) for etf_mode='slot_keys', "
                                 f"got {etf_size}")
            if etf_dim not in (None, head_dim):
                raise ValueError(f"etf_dim must equal head_dim ({head_dim}) for etf_mode='slot_keys', got {etf_dim}")
            etf_dim, etf_size = head_dim, num_slots
        etf_dim = dim if etf_dim is None else etf_dim
        etf_size = num_slots if etf_size is None else etf_size
        if not isinstance(etf_size, int) or etf_size < 2:
            raise ValueError(f"etf_size (K) must be an int >= 2 for a simplex ETF, got {etf_size!r}"
                             + (" (etf_mode='slot_keys' uses num_slots)" if etf_mode == "slot_keys" else ""))
        if not isinstance(etf_dim, int) or etf_dim < etf_size - 1:
            what = "head_dim (dim // heads)" if etf_mode == "slot_keys" else "etf_dim"
            raise ValueError(f"{what} must be >= K - 1 = {etf_size - 1} for a {etf_size}-vector simplex ETF, "
                             f"got {etf_dim!r}")
        if etf_mode == "slot_keys" and kwargs.get("slot_update") == "none":
            raise ValueError("slot_update='none' with etf_mode='slot_keys' would leave the slots unused "
                             "(the frame is the queries): use 'mlp' or 'residual'")
        self.etf_dim, self.etf_size = etf_dim, etf_size
        super().__init__(dim, num_slots, topk, **kwargs)
        self.register_buffer("etf", simplex_etf(etf_dim, etf_size, seed=etf_seed))
        if etf_mode == "project":
            self.etf_proj = nn.Linear(dim, etf_dim, bias=False)
        else:
            del self.retrieve.q  # the queries are the frame itself

    def _key_dim(self) -> int:
        return self.etf_size if self.etf_mode == "project" else self.dim

    def etf_coordinates(self, tokens: Tensor) -> Tensor:
        """Z = normalize(F W_p) M: each token's cosines with the frame vectors, [B, L, K_e]."""
        return F.normalize(self.etf_proj(tokens), dim=-1) @ self.etf.to(tokens.dtype)

    def _retrieve_qkv(self, slots: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.retrieve
        v = r.split(r.v(tokens))
        if self.etf_mode == "project":
            return r.split(r.q(slots)), r.split(r.k(self.etf_coordinates(tokens))), v
        frame = self.etf.to(tokens.dtype).T * math.sqrt(self.head_dim)  # [K, head_dim]
        return frame.expand(tokens.shape[0], self.heads, -1, -1), r.split(r.k(tokens)), v

    def extra_repr(self) -> str:
        return super().extra_repr() + f", etf_mode={self.etf_mode!r}, etf=[{self.etf_dim}, {self.etf_size}]"


# --------------------------------------------------------------------------------------------
# Dense baseline and the one-argument hook
# --------------------------------------------------------------------------------------------
class CrossTaskAttention(nn.Module):
    """Dense cross-task attention, the baseline KEM replaces: every task's tokens attend (one
    softmax, no sparsity) to all tokens of all tasks, ``F_t ← F_t + SDPA(F_t W_q, F W_k, F W_v) W_o``
    with F = concat_t F_t; ``include_self=False`` leaves out the task's own tokens (T ≥ 2).
    Cost O((T·N)² d) per layer. Same interface, width (heads × head_dim) and pre-norm as KEM.
    """

    def __init__(self, dim: int, heads: int = 1, head_dim: Optional[int] = None, include_self: bool = True,
                 pre_norm: bool = True, zero_init: bool = False, bias: bool = False):
        super().__init__()
        self.head_dim = _heads(dim, heads, head_dim)
        self.dim, self.heads, self.include_self = dim, heads, bool(include_self)
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.attn = _MultiHead(dim, heads, self.head_dim, bias=bias)
        if zero_init:
            nn.init.zeros_(self.attn.out.weight)
            if self.attn.out.bias is not None:
                nn.init.zeros_(self.attn.out.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        normed = [self.norm(t) for t in _task_tokens(features, self.dim)]
        if not self.include_self and len(normed) < 2:
            raise ValueError(f"features must hold >= 2 tasks when include_self=False, got {len(normed)}")
        everything = torch.cat(normed, dim=1)
        outs = []
        for t, (tok, f) in enumerate(zip(normed, features)):
            keys = everything if self.include_self else torch.cat(normed[:t] + normed[t + 1:], dim=1)
            outs.append(_untokenise(self.attn.attend(tok, keys), f))
        return outs

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, include_self={self.include_self}"


class CrossTaskFusion(nn.Module):
    """The hook between a multi-task network's per-task branches: ``kind`` picks ``"none"``
    (features pass through untouched, no parameters), ``"kem"``, ``"stable_kem"`` or
    ``"cross_attention"``; ``**options`` go to that module. ``forward(list of T task features)``
    returns a list of T tensors of the same shapes.

    Its parameters mix the tasks: list them with the *shared* parameters of an MTL method.
    """

    def __init__(self, kind: Optional[str], dim: int, **options):
        super().__init__()
        kind = "none" if kind in (None, False) else kind
        self.kind = _choice("kind", kind, CROSS_TASK_KINDS)
        if kind == "none":
            if options:
                raise ValueError(f"options {sorted(options)} given but kind='none' builds no module")
            self.module = None
        else:
            cls = {"kem": KEM, "stable_kem": StableKEM, "cross_attention": CrossTaskAttention}[kind]
            self.module = cls(dim, **options)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if self.module is None:
            return list(features)
        return self.module(features)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def build_cross_task(kind: str, dim: int, options=None) -> CrossTaskFusion:
    """``CrossTaskFusion(kind, dim, **options)`` for a model's constructor: bad or unknown options
    become a ValueError naming ``cross_task_options`` and the kind (the models' one entry point)."""
    try:
        return CrossTaskFusion(kind, dim, **dict(options or {}))
    except TypeError as exc:
        raise ValueError(f"cross_task_options for {kind!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"cross_task_options for {kind!r} (dim {dim}): {exc}") from None
