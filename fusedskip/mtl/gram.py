"""Gram-matrix form of the gradient-manipulation methods.

Every gradient method here maps the T task gradients g_1..g_T of the shared parameters to a
combined gradient that is a linear combination ``sum_t w_t g_t``. All inner products the
methods need (norms, cosines, projections) are entries of the T x T Gram matrix
``G[i, j] = <g_i, g_j>``, so each method is computed on ``G`` alone and returns the
coefficients ``w``; nobody materialises a ``[T, num_params]`` matrix.

Intermediate "modified" gradients (PCGrad's projected g_i^PC, GradVac's corrected g_i^PT) stay
in span{g_1..g_T}; they are kept as rows of a T x T coefficient matrix ``C`` (modified g_i =
sum_k C[i, k] g_k), whose inner products are ``C G C^T``.

Everything here runs on small float64 CPU tensors. Functions are pure apart from the explicit
state they take and return (GradVac's EMA) and the torch.Generator they draw from.

Weights returned by these functions are on each method's *native* scale; the method classes in
:mod:`fusedskip.mtl.methods` rescale them (``reduction``).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch

__all__ = [
    "gram_from_grads", "pcgrad_coefficients", "gradvac_coefficients", "imtl_g_weights",
    "cagrad_dual", "cagrad_weights", "acg_weights", "task_orders",
]

Tensor = torch.Tensor


def _as_gram(G: Tensor) -> Tensor:
    G = torch.as_tensor(G, dtype=torch.float64).cpu()
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram matrix must be T x T, got shape {tuple(G.shape)}")
    return 0.5 * (G + G.T)


def gram_from_grads(grads: Sequence[Sequence[Optional[Tensor]]], group_index: Sequence[int],
                    num_groups: int, device: Optional[torch.device] = None) -> Tensor:
    """Gram matrices of per-task gradients, one per parameter group, as float64.

    ``grads[t][p]`` is task t's gradient for parameter p (``None`` = zero); ``group_index[p]``
    the group parameter p belongs to. Returns ``[num_groups, T, T]`` on ``device`` (the
    gradients' device by default). The Gram is the sum over parameters of per-parameter
    contributions ``<g_i[p], g_j[p]>``, each a ``torch.dot`` of two flattened gradients of one
    parameter (fp16/bf16 upcast to fp32, one parameter at a time): no ``[T, num_params]``
    matrix is formed, and no matmul is used, so TF32 settings cannot degrade the inner
    products. Per-pair partial dots stay on the device; one reduction per entry at the end.
    """
    T = len(grads)
    P = len(group_index)
    if device is None:
        device = next((g.device for row in grads for g in row if g is not None), torch.device("cpu"))
    partial: dict = {}
    for p in range(P):
        flats = {}
        for t in range(T):
            g = grads[t][p]
            if g is not None:
                g = g.reshape(-1)
                flats[t] = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
        present = sorted(flats)
        k = group_index[p]
        for a, i in enumerate(present):
            for j in present[a:]:
                dot = torch.dot(flats[i], flats[j]).to(device=device, dtype=torch.float64)
                partial.setdefault((k, i, j), []).append(dot)
    acc = torch.zeros(num_groups, T, T, dtype=torch.float64, device=device)
    for (k, i, j), parts in partial.items():
        total = torch.stack(parts).sum()
        acc[k, i, j] = total
        acc[k, j, i] = total
    return acc


def task_orders(num_tasks: int, generator: Optional[torch.Generator]) -> list[list[int]]:
    """For each task i, the order in which the other tasks j != i are visited.

    Draw order (documented so that reference implementations can replay it): for i = 0..T-1,
    one ``torch.randperm(T - 1, generator=generator)`` permutes the others ``[j for j != i]``
    in increasing order; nothing is drawn when T <= 2 (a single order). With
    ``generator=None`` the order is increasing j (no draws).
    """
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        if generator is not None and num_tasks > 2:
            perm = torch.randperm(num_tasks - 1, generator=generator).tolist()
            others = [others[k] for k in perm]
        orders.append(others)
    return orders


def _is_zero(sq_norm: float, scale: float) -> bool:
    """A squared norm indistinguishable from 0 (relative to the largest one, ``scale``)."""
    return not sq_norm > 1e-30 * scale + 1e-300


def pcgrad_coefficients(G: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """PCGrad, "Gradient Surgery for Multi-Task Learning" (Yu et al., NeurIPS 2020), Alg. 1.

    For each task i: g_i^PC = g_i; for every other task j in random order, if
    <g_i^PC, g_j> < 0 then g_i^PC -= <g_i^PC, g_j> / |g_j|^2 * g_j (projection onto the normal
    plane of the *original* g_j). Combined gradient: sum_i g_i^PC.

    Gram form: row i of ``C`` holds g_i^PC's coefficients; <g_i^PC, g_j> = (C[i] G)[j]; the
    projection subtracts ``dot / G[j, j]`` from ``C[i, j]``. Returns ``C`` (T x T); the
    combined-gradient weights are ``C.sum(0)`` (sum scale, as in the paper).
    """
    G = _as_gram(G)
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64)
    scale = float(G.diagonal().max()) if T else 0.0
    for i, order in enumerate(task_orders(T, generator)):
        for j in order:
            gjj = float(G[j, j])
            if _is_zero(gjj, scale):
                continue
            dot = float(C[i] @ G[:, j])
            if dot < 0.0:
                C[i, j] -= dot / gjj
    return C


def gradvac_coefficients(G: Tensor, ema: Tensor, beta: float = 0.01,
                         generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Gradient Vaccine, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models" (Wang, Tsvetkov, Firat, Cao; ICLR 2021), Alg. 2.

    Per ordered pair (i, j) an EMA target similarity phi_hat[i, j] (initially 0). For each task
    i: g_i' = g_i; for each j != i (random order if a generator is given):
    phi = cos(g_i', g_j); if phi < phi_hat[i, j]:
    g_i' += g_j * |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)),
    which makes cos(g_i', g_j) = phi_hat exactly; then (always)
    phi_hat[i, j] = (1 - beta) phi_hat[i, j] + beta * phi. Combined gradient: sum_i g_i'.
    (With phi_hat = 0 the correction is PCGrad's projection.) The EMA uses the similarity
    measured before the correction, as LibMTL's GradVac does.

    Gram form: |g_i'|^2 = C[i] G C[i]^T and <g_i', g_j> = (C[i] G)[j]; the correction adds to
    ``C[i, j]``. Pairs where either gradient is zero are skipped (EMA unchanged).

    Returns ``(C, new_ema)``; ``ema`` is not modified. Weights: ``C.sum(0)`` (sum scale).
    """
    G = _as_gram(G)
    T = G.shape[0]
    ema = torch.as_tensor(ema, dtype=torch.float64).cpu().clone()
    if ema.shape != (T, T):
        raise ValueError(f"GradVac EMA must be {T} x {T}, got {tuple(ema.shape)}")
    C = torch.eye(T, dtype=torch.float64)
    scale = float(G.diagonal().max()) if T else 0.0
    for i, order in enumerate(task_orders(T, generator)):
        for j in order:
            gjj = float(G[j, j])
            cgc = float(C[i] @ G @ C[i])
            if _is_zero(gjj, scale) or _is_zero(cgc, scale):
                continue
            ni, nj = math.sqrt(cgc), math.sqrt(gjj)
            phi = min(1.0, max(-1.0, float(C[i] @ G[:, j]) / (ni * nj)))
            target = float(ema[i, j])
            if phi < target:
                denom = nj * math.sqrt(max(1.0 - target * target, 1e-300))
                coef = ni * (target * math.sqrt(1.0 - phi * phi) - phi * math.sqrt(1.0 - target * target)) / denom
                C[i, j] += coef
            ema[i, j] = (1.0 - beta) * target + beta * phi
    return C, ema


def imtl_g_weights(G: Tensor) -> Tensor:
    """IMTL-G, "Towards Impartial Multi-task Learning" (Liu et al., ICLR 2021), Sec. 3.2.

    Finds alpha with sum(alpha) = 1 such that g = sum_t alpha_t g_t has equal projections on
    all unit task gradients u_t = g_t / |g_t|. Closed form of the paper, with
    D = [g_1 - g_2, ..., g_1 - g_T], U = [u_1 - u_2, ..., u_1 - u_T] (rows):
    alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum(alpha_{2:T}). Not clipped (weights
    can be negative, as in the paper and LibMTL).

    Gram form: with M[a, b] = <g_a, u_b> = G[a, b] / |g_b|,
    (D U^T)[i, j] = M[1, 1] - M[1, j] - M[i, 1] + M[i, j] and (g_1 U^T)[j] = M[1, 1] - M[1, j].
    Tasks with a zero gradient have no direction u_t; they are left out (weight 0) and the
    others weighted among themselves (all zero: 1/T each). A singular D U^T (e.g. duplicated
    task gradients) falls back to the minimum-norm least-squares solution. Returns alpha (T,),
    native scale sum(alpha) = 1.
    """
    G = _as_gram(G)
    T = G.shape[0]
    scale = float(G.diagonal().max()) if T else 0.0
    active = [t for t in range(T) if not _is_zero(float(G[t, t]), scale)]
    if len(active) < T:
        alpha = torch.zeros(T, dtype=torch.float64)
        if not active:
            return alpha + 1.0 / T
        alpha[active] = imtl_g_weights(G[active][:, active])
        return alpha
    if T == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = G.diagonal().sqrt()
    M = G / norms[None, :]
    A = M[0, 0] - M[0, 1:][None, :] - M[1:, 0][:, None] + M[1:, 1:]
    b = M[0, 0] - M[0, 1:]
    svals = torch.linalg.svdvals(A)
    if float(svals.min()) > 1e-12 * float(svals.max()):
        rest = torch.linalg.solve(A.T, b)
    else:
        rest = torch.linalg.lstsq(A.T, b[:, None], driver="gelsd").solution[:, 0]
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


def cagrad_dual(G: Tensor, c: float) -> Tensor:
    """Exact solution of CAGrad's dual: min_{w in simplex} w^T G b + c sqrt(w^T G w), b = 1/T.

    With g_w = sum_i w_i g_i and g_0 = mean_i g_i this is min_w <g_w, g_0> + c |g_w| over the
    convex hull of the task gradients. The problem lives in the (at most T-dimensional) span of
    the gradients: take isometric coordinates x_i (rows of X with X X^T = G, from an
    eigendecomposition). The objective f(y) = <g_0, y> + c|y| is convex, so its minimiser over
    the hull lies in the relative interior of some face S (a set of affinely independent
    points); there it is the minimiser over the face's affine hull, which has a closed form:
    with y_p the hull's point nearest the origin, h = |y_p| and p the projection of g_0 onto the
    hull's direction space, the minimiser is y = y_p - p h / sqrt(c^2 - |p|^2) if |p| < c (none
    otherwise). Every face (2^T - 1 of them) is tried, infeasible candidates (negative
    barycentric weights) dropped, and the feasible one with the smallest objective wins
    (vertices are always feasible). Exact up to rounding; supports T <= 16.
    """
    G = _as_gram(G)
    T = G.shape[0]
    if T > 16:
        raise ValueError(f"cagrad_dual enumerates the 2^T - 1 faces of the simplex; T = {T} > 16 is not supported")
    evals, evecs = torch.linalg.eigh(G)
    top = float(evals.max()) if T else 0.0
    keep = evals > max(top, 0.0) * 1e-13 * T
    X = evecs[:, keep] * evals[keep].sqrt()  # rows: isometric coordinates of the task gradients
    r = X.shape[1]
    g0 = X.mean(0)
    v = G.mean(1)  # v_i = <g_i, g_0>
    scale = math.sqrt(max(top, 0.0)) + 1e-300

    def objective(w: Tensor) -> float:
        return float(v @ w) + c * math.sqrt(max(float(w @ G @ w), 0.0))

    best_w, best_f = None, math.inf
    for i in range(T):  # vertices
        w = torch.zeros(T, dtype=torch.float64)
        w[i] = 1.0
        f = objective(w)
        if f < best_f:
            best_w, best_f = w, f
    if c > 0 and r > 0:
        for size in range(2, min(T, r + 1) + 1):
            for S in itertools.combinations(range(T), size):
                XS = X[list(S)]
                E = XS[1:] - XS[0]  # (size-1, r): directions of the face's affine hull
                U, s, Vh = torch.linalg.svd(E, full_matrices=False)
                if float(s.min()) <= 1e-9 * scale:
                    continue  # affinely dependent: covered by smaller faces
                x0 = XS[0]
                y_p = x0 - Vh.T @ (Vh @ x0)
                p = Vh.T @ (Vh @ g0)
                pn = float(p.norm())
                if pn >= c:
                    continue  # unbounded below along -p on the affine hull: optimum is on a subface
                y = y_p - p * (float(y_p.norm()) / math.sqrt(c * c - pn * pn))
                z = U @ ((Vh @ (y - x0)) / s)  # barycentric weights of S[1:]
                wS = torch.cat([(1.0 - z.sum()).reshape(1), z])
                if float(wS.min()) < -1e-9:
                    continue
                w = torch.zeros(T, dtype=torch.float64)
                w[list(S)] = wS.clamp_min(0.0)
                w = w / w.sum()
                f = objective(w)
                if f < best_f:
                    best_w, best_f = w, f
    return best_w


def cagrad_weights(G: Tensor, c: float = 0.5, rescale: int = 1) -> tuple[Tensor, Tensor]:
    """CAGrad, "Conflict-Averse Gradient Descent for Multi-task Learning" (Liu, Liu, Jin, Stone,
    Liu; NeurIPS 2021), as in the authors' code (``cagrad(grads, alpha, rescale)``).

    d = g_0 + (c |g_0| / |g_w|) g_w with w the dual solution (:func:`cagrad_dual` with
    c |g_0|) and g_0 the mean gradient; rescale=1 divides by (1 + c^2), rescale=2 by (1 + c),
    rescale=0 not at all. d maximises min_i <g_i, d> over the ball |d - g_0| <= c|g_0|.
    If |g_w| = 0 (0 is in the convex hull of the gradients) the direction is undefined and d = g_0.

    Returns (weights on the native mean scale, i.e. d = sum_t weights_t g_t, and the dual w).
    """
    G = _as_gram(G)
    T = G.shape[0]
    g0_sq = max(float(G.mean()), 0.0)
    radius = c * math.sqrt(g0_sq)
    w = cagrad_dual(G, radius)
    gw_sq = max(float(w @ G @ w), 0.0)
    gw_norm = math.sqrt(gw_sq)
    lam = radius / gw_norm if gw_norm > 1e-15 * math.sqrt(g0_sq + 1e-300) and gw_norm > 0 else 0.0
    weights = torch.full((T,), 1.0 / T, dtype=torch.float64) + lam * w
    if rescale == 1:
        weights = weights / (1.0 + c * c)
    elif rescale == 2:
        weights = weights / (1.0 + c)
    elif rescale != 0:
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
    return weights, w


def acg_weights(G: Tensor, ema: Tensor, beta: float = 0.01,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Adaptive correcting gradient as intended (Ji et al., Pattern Recognition 162, 111423,
    2025; reconstruction of ``gradvac_imtl.py`` in github.com/SyqxhSt/Net-Opt-MTL).

    (1) conflicts: GradVac correction of every task gradient (:func:`gradvac_coefficients`,
    per-pair persistent EMA, denominator |g_j|); (2) dominance: IMTL-G weights alpha of the
    corrected gradients (Gram ``C G C^T``); (3) combined gradient sum_t alpha_t g'_t, i.e.
    weights ``C^T alpha`` on the raw gradients (native scale: sum(alpha) = 1).

    Returns (weights, alpha, new_ema).
    """
    C, new_ema = gradvac_coefficients(G, ema, beta, generator)
    Gc = C @ _as_gram(G) @ C.T
    alpha = imtl_g_weights(Gc)
    return C.T @ alpha, alpha, new_ema
