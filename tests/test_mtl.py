"""Tests for fusedskip.mtl: hand-computed cases, Gram route vs flattened gradients, .grad
contents, determinism, and DDP (2 gloo processes) vs a single process on the global batch."""
from __future__ import annotations

import copy
import io
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fusedskip.mtl import (
    available_methods,
    cagrad_dual,
    cagrad_weights,
    gradvac_coefficients,
    imtl_g_weights,
    layer_groups,
    make_mtl_method,
    pcgrad_coefficients,
    task_orders,
)

D64 = torch.float64
SQ2 = math.sqrt(2.0)
GRADIENT_METHODS = ("pcgrad", "cagrad", "imtl_g", "gradvac", "acg", "acg_released")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def linear_case(vectors, name, **options):
    """A shared parameter theta with L_t = <v_t, theta>, so grad L_t = v_t exactly."""
    V = torch.tensor(vectors, dtype=D64)
    theta = nn.Parameter(torch.zeros(V.shape[1], dtype=D64))
    method = make_mtl_method(name, [theta], task_parameters=[[] for _ in range(len(V))], **options)

    def step():
        theta.grad = None
        method.backward([V[t] @ theta for t in range(len(V))])
        return theta.grad.clone()

    return V, theta, method, step


class Net(nn.Module):
    """Small trunk + per-task heads (regression head and classification heads)."""

    def __init__(self, num_tasks=2, dtype=D64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1)] + [nn.Linear(6, 3) for _ in range(num_tasks - 1)])
        self.to(dtype)

    def forward(self, x):
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def make_batch(n=8, num_tasks=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D64)
    ys = [torch.randn(n, 1, generator=g, dtype=D64)] + \
        [torch.randint(0, 3, (n,), generator=g) for _ in range(num_tasks - 1)]
    return x, ys


def task_losses(outs, ys):
    return [F.mse_loss(outs[0], ys[0])] + [F.cross_entropy(o, y) for o, y in zip(outs[1:], ys[1:])]


def flat_task_grads(net, x, ys):
    """Naive route: per-task gradients of the trunk flattened and concatenated, plus head grads."""
    losses = task_losses(net(x), ys)
    shared = list(net.trunk.parameters())
    V, heads = [], []
    for t, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, shared + list(net.heads[t].parameters()), retain_graph=True)
        V.append(torch.cat([g.reshape(-1) for g in gs[:len(shared)]]))
        heads.append([g.clone() for g in gs[len(shared):]])
    return torch.stack(V), heads


def unflatten(vec, params):
    out, i = [], 0
    for p in params:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


# Naive vector implementations written from the papers' algorithms (independent of the Gram code).

def naive_pcgrad(V, orders):
    out = []
    for i in range(len(V)):
        g = V[i].clone()
        for j in orders[i]:
            d = g @ V[j]
            if d < 0:
                g = g - d / (V[j] @ V[j]) * V[j]
        out.append(g)
    return torch.stack(out).sum(0)


def naive_gradvac_vectors(V, ema, beta, orders):
    out = []
    for i in range(len(V)):
        g = V[i].clone()
        for j in orders[i]:
            phi = (g @ V[j]) / (g.norm() * V[j].norm())
            target = ema[i, j]
            if phi < target:
                g = g + V[j] * g.norm() * (target * (1 - phi ** 2).sqrt() - phi * (1 - target ** 2).sqrt()) / (
                    V[j].norm() * (1 - target ** 2).sqrt())
            ema[i, j] = (1 - beta) * target + beta * phi
        out.append(g)
    return torch.stack(out)


def naive_imtl(V):
    u = V / V.norm(dim=1, keepdim=True)
    D = V[0] - V[1:]
    U = u[0] - u[1:]
    rest = V[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])
    return alpha @ V, alpha


def naive_cagrad(V, c=0.5):
    """The authors' ``cagrad`` (rescale=1), dual solved by ternary search (T=2) or SLSQP."""
    T = len(V)
    GG = V @ V.T
    g0_norm = (GG.mean() + 1e-8).sqrt()
    b = torch.full((T,), 1.0 / T, dtype=D64)
    cc = c * g0_norm + 1e-8

    def obj(w):
        return float(w @ GG @ b + cc * (w @ GG @ w + 1e-8).sqrt())

    if T == 2:
        lo, hi = 0.0, 1.0
        for _ in range(200):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if obj(torch.tensor([m1, 1 - m1], dtype=D64)) < obj(torch.tensor([m2, 1 - m2], dtype=D64)):
                hi = m2
            else:
                lo = m1
        w = torch.tensor([lo, 1 - lo], dtype=D64)
    else:
        optimize = pytest.importorskip("scipy.optimize")
        res = optimize.minimize(lambda x: obj(torch.tensor(x)), b.numpy(), bounds=[(0, 1)] * T, method="SLSQP",
                                constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
                                options={"ftol": 1e-15, "maxiter": 1000})
        w = torch.tensor(res.x, dtype=D64)
    gw = w @ V
    g = V.mean(0) + cc / (gw.norm() + 1e-8) * gw
    return g / (1 + c ** 2)


# ----------------------------------------------------------------------------------------------
# factory and validation
# ----------------------------------------------------------------------------------------------

def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        make_mtl_method("mgda", [nn.Parameter(torch.zeros(2))], task_parameters=[[], []])
    for name in available_methods():
        assert name in str(exc.value)
    assert set(available_methods()) == {"fixed", "equal", "uncertainty", "dwa", *GRADIENT_METHODS}


def test_names_aliases_and_option_errors():
    p = nn.Parameter(torch.zeros(2))
    assert make_mtl_method("IMTL-G", [p], task_parameters=[[], []]).name == "imtl_g"
    assert make_mtl_method("uw", [p]).name == "uncertainty"
    with pytest.raises(TypeError):
        make_mtl_method("pcgrad", [p], task_parameters=[[], []], cc=0.5)  # typo'd option
    with pytest.raises(ValueError, match="task_parameters"):
        make_mtl_method("pcgrad", [p])
    with pytest.raises(ValueError, match="more than one"):
        make_mtl_method("pcgrad", [p], task_parameters=[[p], []])
    m = make_mtl_method("equal", [p], num_tasks=2)
    with pytest.raises(ValueError, match="expected 2 losses"):
        m.backward([p.sum()])


# ----------------------------------------------------------------------------------------------
# loss weighting
# ----------------------------------------------------------------------------------------------

def test_fixed_and_equal_weights():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=D64))
    m = make_mtl_method("fixed", [p], lam=0.3)
    total = m.backward([p[0] ** 2, 3 * p[1]])
    assert total.item() == pytest.approx(1 + 0.3 * 6)
    torch.testing.assert_close(p.grad, torch.tensor([2.0, 0.9], dtype=D64))
    torch.testing.assert_close(m.last_weights, torch.tensor([1.0, 0.3]))
    m = make_mtl_method("fixed", [p], weights=[0.5, 2.0, 1.0])
    assert m.num_tasks == 3
    p.grad = None
    make_mtl_method("equal", [p]).backward({"den": p[0] ** 2, "cls": 3 * p[1]})
    torch.testing.assert_close(p.grad, torch.tensor([2.0, 3.0], dtype=D64))


def test_uncertainty_weighting_formula():
    p = nn.Parameter(torch.tensor(1.0, dtype=D64))
    m = make_mtl_method("uncertainty", [p], dtype=D64)
    assert m.extra_parameters() == [m.log_vars]
    torch.testing.assert_close(m.log_vars.detach(), torch.tensor([-0.5, -0.5], dtype=D64))
    losses = [2.0 * p, 3.0 * p]  # values 2 and 3, d/dp = 2 and 3
    total = m.backward(losses)
    e = math.exp(0.5)  # exp(-s) at s = -0.5
    assert total.item() == pytest.approx(0.5 * e * 2 + 0.5 * e * 3 + 0.5 * (-0.5) * 2)
    # d/ds_t = -0.5 exp(-s_t) L_t + 0.5 ; d/dp = sum_t 0.5 exp(-s_t) dL_t/dp
    torch.testing.assert_close(m.log_vars.grad, torch.tensor([-0.5 * e * 2 + 0.5, -0.5 * e * 3 + 0.5], dtype=D64))
    assert p.grad.item() == pytest.approx(0.5 * e * 2 + 0.5 * e * 3)
    torch.testing.assert_close(m.last_weights, torch.tensor([0.5 * e, 0.5 * e], dtype=D64))
    # Kendall's classification form: exp(-s) L + 0.5 s
    m2 = make_mtl_method("uncertainty", [p], task_kinds=["regression", "classification"], init=0.0, dtype=D64)
    assert m2.total_loss([torch.tensor(2.0, dtype=D64), torch.tensor(3.0, dtype=D64)]).item() == pytest.approx(1 + 3)
    # the optimiser sees the log-variances
    opt = torch.optim.SGD(m.extra_parameters(), lr=0.1)
    before = m.log_vars.detach().clone()
    opt.step()
    assert not torch.equal(before, m.log_vars.detach())


def test_dwa_weights_from_loss_history():
    p = nn.Parameter(torch.tensor(1.0, dtype=D64))
    m = make_mtl_method("dwa", [p])
    torch.testing.assert_close(m.last_weights, torch.ones(2))
    m.epoch_end([1.0, 2.0])
    torch.testing.assert_close(m.last_weights, torch.ones(2))  # one epoch of history: still 1
    m.epoch_end([0.5, 2.0])  # r = (0.5, 1.0), T = 2
    e1, e2 = math.exp(0.5 / 2), math.exp(1.0 / 2)
    expected = torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    torch.testing.assert_close(m.last_weights, expected)
    total = m.backward([3 * p, 5 * p])
    assert total.item() == pytest.approx(float(3 * expected[0] + 5 * expected[1]), rel=1e-6)
    assert p.grad.item() == pytest.approx(float(3 * expected[0] + 5 * expected[1]), rel=1e-6)
    # epoch_end() without arguments averages the losses seen by backward this epoch
    m.backward([torch.tensor(2.0, dtype=D64) * p, torch.tensor(1.0, dtype=D64) * p])  # epoch mean (2.5, 3.0)
    m.epoch_end()
    r = torch.tensor([2.5 / 0.5, 3.0 / 2.0], dtype=D64)
    torch.testing.assert_close(m.last_weights.double(), 2 * torch.softmax(r / 2, 0), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# gradient methods: hand-computed 2-D cases
# ----------------------------------------------------------------------------------------------

def test_pcgrad_hand_computed():
    # conflicting: g1.g2 = -1. g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    V, theta, m, step = linear_case([[1.0, 0.0], [-1.0, 1.0]], "pcgrad")
    torch.testing.assert_close(step(), torch.tensor([0.5, 1.5], dtype=D64))
    torch.testing.assert_close(m.last_weights.double(), torch.tensor([2.0, 1.5], dtype=D64))  # 2 g1 + 1.5 g2
    C = pcgrad_coefficients(V @ V.T)  # rows: the projected gradients in the basis g1, g2
    torch.testing.assert_close(C @ V, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=D64))
    # no conflict: plain sum; reduction="mean": plain mean
    _, _, _, step = linear_case([[1.0, 0.0], [1.0, 1.0]], "pcgrad")
    torch.testing.assert_close(step(), torch.tensor([2.0, 1.0], dtype=D64))
    _, _, _, step = linear_case([[1.0, 0.0], [-1.0, 1.0]], "pcgrad", reduction="mean")
    torch.testing.assert_close(step(), torch.tensor([0.25, 0.75], dtype=D64))


def test_pcgrad_three_tasks_random_order_is_seeded():
    vectors = [[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.5, -1.0, 0.3]]
    results = {}
    for seed in range(12):
        V, theta, m, step = linear_case(vectors, "pcgrad", seed=seed)
        got = [step() for _ in range(3)]
        gen = torch.Generator().manual_seed(seed)
        for g in got:  # replay the documented draw order with an identical generator
            torch.testing.assert_close(g, naive_pcgrad(V, task_orders(3, gen)))
        results[seed] = got[0]
        _, _, _, step2 = linear_case(vectors, "pcgrad", seed=seed)
        assert torch.equal(step2(), got[0])  # same seed, same result (bitwise)
    assert len({tuple(v.tolist()) for v in results.values()}) > 1  # the order matters here


def test_cagrad_hand_computed_and_primal_optimality():
    # orthogonal unit gradients: w = (1/2, 1/2) by symmetry, |g0| = 1/sqrt2, lambda = c|g0|/|g_w| = c,
    # d = (1 + c) g0 = (0.75, 0.75), / (1 + c^2) = (0.6, 0.6); reduction "sum" doubles it
    _, _, m, step = linear_case([[1.0, 0.0], [0.0, 1.0]], "cagrad")
    torch.testing.assert_close(step(), torch.tensor([1.2, 1.2], dtype=D64))
    _, _, m, step = linear_case([[1.0, 0.0], [0.0, 1.0]], "cagrad", reduction="mean", rescale=0)
    torch.testing.assert_close(step(), torch.tensor([0.75, 0.75], dtype=D64))
    # c = 0: plain mean
    _, _, m, step = linear_case([[1.0, 0.0], [-1.0, 3.0]], "cagrad", c=0.0, reduction="mean")
    torch.testing.assert_close(step(), torch.tensor([0.0, 1.5], dtype=D64))
    # in 2-D, d (rescale=0) maximises min_i <g_i, d> over the circle |d - g0| = c|g0|: brute force
    gen = torch.Generator().manual_seed(3)
    theta_grid = torch.linspace(0, 2 * math.pi, 20001, dtype=D64)
    circle = torch.stack([theta_grid.cos(), theta_grid.sin()], 1)
    for trial in range(18):
        T = 2 + trial % 3
        V = torch.randn(T, 2, generator=gen, dtype=D64) * (0.2 + 3 * torch.rand(T, 1, generator=gen, dtype=D64))
        weights, _ = cagrad_weights(V @ V.T, 0.5, rescale=0)
        d = weights @ V
        g0 = V.mean(0)
        radius = 0.5 * g0.norm()
        assert float((d - g0).norm()) == pytest.approx(float(radius), rel=1e-9, abs=1e-12)
        best = ((g0 + radius * circle) @ V.T).min(1).values.max()
        assert float((V @ d).min()) >= float(best) - 1e-6 * float(V.norm())


def test_cagrad_dual_is_exact_against_slsqp():
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(5)
    for trial in range(12):
        T, n = [(2, 1), (3, 2), (3, 6), (4, 3), (5, 8), (4, 2)][trial % 6]
        V = torch.randn(T, n, generator=gen, dtype=D64)
        if trial % 4 == 0:
            V[1] = 2.0 * V[0]  # collinear gradients (degenerate faces)
        G = V @ V.T
        c = 0.5 * float(G.mean()) ** 0.5
        w = cagrad_dual(G, c)
        assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0)

        def obj(x):
            x = torch.as_tensor(x, dtype=D64)
            return float(x @ G.mean(1) + c * max(float(x @ G @ x), 0.0) ** 0.5)

        starts = [torch.full((T,), 1.0 / T, dtype=D64), torch.eye(T, dtype=D64)[0]]
        best = min(optimize.minimize(obj, s.numpy(), bounds=[(0, 1)] * T, method="SLSQP",
                                     constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
                                     options={"ftol": 1e-15, "maxiter": 500}).fun for s in starts)
        assert obj(w) <= best + 1e-10


def test_imtl_g_hand_computed_and_equal_projections():
    # g1 = (1,0), g2 = (1,1): g = (1, a2) with g.u1 = 1 = g.u2 = (1 + a2)/sqrt2 -> a2 = sqrt2 - 1
    _, _, m, step = linear_case([[1.0, 0.0], [1.0, 1.0]], "imtl_g", reduction="mean")
    torch.testing.assert_close(step(), torch.tensor([1.0, SQ2 - 1], dtype=D64))
    torch.testing.assert_close(m.last_weights.double(), torch.tensor([2 - SQ2, SQ2 - 1], dtype=D64))
    _, _, m, step = linear_case([[1.0, 0.0], [1.0, 1.0]], "imtl_g")  # default "sum": x T
    torch.testing.assert_close(step(), torch.tensor([2.0, 2 * (SQ2 - 1)], dtype=D64))
    gen = torch.Generator().manual_seed(7)
    for T in (2, 3, 4):
        V = torch.randn(T, 6, generator=gen, dtype=D64) * torch.tensor([1.0, 10.0, 0.1, 3.0][:T], dtype=D64)[:, None]
        alpha = imtl_g_weights(V @ V.T)
        g = alpha @ V
        proj = (V / V.norm(dim=1, keepdim=True)) @ g
        torch.testing.assert_close(proj, proj[0].expand(T))  # equal projections on all unit gradients
        assert float(alpha.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(g, naive_imtl(V)[0])
    # a task with a zero gradient has no direction: it is left out, the others weighted as usual
    torch.testing.assert_close(imtl_g_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D64)),
                               torch.tensor([1.0, 0.0], dtype=D64))
    V = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=D64)
    torch.testing.assert_close(imtl_g_weights(V @ V.T), torch.tensor([2 - SQ2, 0.0, SQ2 - 1], dtype=D64))


def test_gradvac_target_similarity_and_ema():
    # step 1, phi_hat = 0: the correction is PCGrad's projection; cos(g1, g2) = -1/sqrt2
    V, theta, m, step = linear_case([[1.0, 0.0], [-1.0, 1.0]], "gradvac", beta=0.01)
    torch.testing.assert_close(step(), torch.tensor([0.5, 1.5], dtype=D64))
    phi = -1 / SQ2
    torch.testing.assert_close(m.ema[0], torch.tensor([[0.0, 0.01 * phi], [0.01 * phi, 0.0]], dtype=D64))
    # step 2: phi < phi_hat = 0.01 phi -> corrected so that cos(g_i', g_j) equals that target exactly
    target = 0.01 * phi
    step()
    C = m.last_info["coefficients"][0]
    corrected = C @ V
    for i, j in ((0, 1), (1, 0)):
        cos = corrected[i] @ V[j] / (corrected[i].norm() * V[j].norm())
        assert float(cos) == pytest.approx(target, abs=1e-12)
    assert float(m.ema[0, 0, 1]) == pytest.approx(0.99 * target + 0.01 * phi)
    # similarity above target: no correction, plain sum; EMA still moves towards phi
    V, theta, m, step = linear_case([[1.0, 0.0], [1.0, 1.0]], "gradvac", beta=0.5)
    torch.testing.assert_close(step(), torch.tensor([2.0, 1.0], dtype=D64))
    assert float(m.ema[0, 0, 1]) == pytest.approx(0.5 / SQ2)
    # pure function agrees with the naive vector implementation over several steps (3 tasks, shuffled)
    V = torch.tensor([[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.5, -1.0, 0.3]], dtype=D64)
    ema, ema_ref = torch.zeros(3, 3, dtype=D64), torch.zeros(3, 3, dtype=D64)
    gen, gen_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(4):
        C, ema = gradvac_coefficients(V @ V.T, ema, 0.3, gen)
        ref = naive_gradvac_vectors(V, ema_ref, 0.3, task_orders(3, gen_ref))
        torch.testing.assert_close(C @ V, ref)
        torch.testing.assert_close(ema, ema_ref)


def test_acg_intended_hand_computed():
    # GradVac step (phi_hat = 0): g1' = (0.5, 0.5) = g1 + g2/2, g2' = (0, 1) = g1 + g2.
    # IMTL-G on (g1', g2'): g = (a1/2, 1 - a1/2); g.u1' = 1/sqrt2 = g.u2' = 1 - a1/2 -> a1 = 2 - sqrt2
    _, _, m, step = linear_case([[1.0, 0.0], [-1.0, 1.0]], "acg", reduction="mean")
    torch.testing.assert_close(step(), torch.tensor([1 - 1 / SQ2, 1 / SQ2], dtype=D64))
    a1, a2 = 2 - SQ2, SQ2 - 1
    torch.testing.assert_close(m.last_info["alpha"][0], torch.tensor([a1, a2], dtype=D64))
    torch.testing.assert_close(m.last_weights.double(), torch.tensor([1.0, a1 / 2 + a2], dtype=D64))
    _, _, m, step = linear_case([[1.0, 0.0], [-1.0, 1.0]], "acg")  # "sum"
    torch.testing.assert_close(step(), torch.tensor([2 - SQ2, SQ2], dtype=D64))


def test_acg_released_behaviour():
    # shared theta in R^2, head a (task 0) and b (task 1): L0 = v0.theta + k0 a, L1 = v1.theta + k1 b
    v0, v1, k0, k1 = torch.tensor([1.0, 0.0], dtype=D64), torch.tensor([-1.0, 1.0], dtype=D64), 2.0, 0.5
    theta = nn.Parameter(torch.zeros(2, dtype=D64))
    a, b = nn.Parameter(torch.zeros((), dtype=D64)), nn.Parameter(torch.zeros((), dtype=D64))
    m = make_mtl_method("acg_released", [theta], task_parameters=[[a], [b]])
    assert m.reduction == "mean"
    m.backward([v0 @ theta + k0 * a, v1 @ theta + k1 * b])
    torch.testing.assert_close(theta.grad, (v0 + v1) / 2)  # the correction is a no-op in the release
    # released IMTL-G (2 tasks) on the full vectors g0 = (v0, k0, 0), g1 = (v1, 0, k1)
    g0, g1 = torch.cat([v0, torch.tensor([k0, 0.0], dtype=D64)]), torch.cat([v1, torch.tensor([0.0, k1], dtype=D64)])
    U = g0 / g0.norm() - g1 / g1.norm()
    alpha1 = (g0 @ U) / ((g0 - g1) @ U)
    alpha0 = 1 - alpha1
    assert a.grad.item() == pytest.approx(float(alpha0 * k0))
    assert b.grad.item() == pytest.approx(float(alpha1 * k1))
    full = alpha0 * g0 + alpha1 * g1
    assert float(full @ g0 / g0.norm()) == pytest.approx(float(full @ g1 / g1.norm()))
    torch.testing.assert_close(m.last_head_scales.double(), torch.stack([alpha0, alpha1]).float().double())


# ----------------------------------------------------------------------------------------------
# Gram route == naive flattened route; exact .grad contents
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,num_tasks", [(n, T) for n in GRADIENT_METHODS for T in (2, 3)
                                            if (n, T) != ("acg_released", 3)])  # the release is 2-task
def test_gram_route_matches_flattened_route(name, num_tasks):
    torch.manual_seed(0)
    net = Net(num_tasks)
    x, ys = make_batch(num_tasks=num_tasks)
    shared = list(net.trunk.parameters())
    m = make_mtl_method(name, shared, task_parameters=[h.parameters() for h in net.heads], seed=3)
    gen = torch.Generator().manual_seed(3)
    ema = torch.zeros(num_tasks, num_tasks, dtype=D64)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):  # several steps: EMA state and generator draws must stay in step
        V, head_grads = flat_task_grads(net, x, ys)
        if name == "pcgrad":
            expected = naive_pcgrad(V, task_orders(num_tasks, gen))
        elif name == "gradvac":
            expected = naive_gradvac_vectors(V, ema, 0.01, task_orders(num_tasks, gen)).sum(0)
        elif name == "imtl_g":
            expected = num_tasks * naive_imtl(V)[0]
        elif name == "cagrad":
            expected = num_tasks * naive_cagrad(V)
        elif name == "acg":
            corrected = naive_gradvac_vectors(V, ema, 0.01, task_orders(num_tasks, gen))
            expected = num_tasks * naive_imtl(corrected)[0]
        else:  # acg_released
            expected = V.mean(0)
            full = [torch.cat([V[t]] + [g.reshape(-1) for g in head_grads[t]]) for t in range(2)]
            full = [torch.cat([full[0], torch.zeros(sum(g.numel() for g in head_grads[1]), dtype=D64)]),
                    torch.cat([full[1][:V.shape[1]], torch.zeros(sum(g.numel() for g in head_grads[0]), dtype=D64),
                               full[1][V.shape[1]:]])]
            alpha = naive_imtl(torch.stack(full))[1]
            head_grads = [[alpha[t] * g for g in head_grads[t]] for t in range(2)]
        opt.zero_grad(set_to_none=True)
        m.backward(task_losses(net(x), ys))
        tol = dict(rtol=1e-5, atol=1e-7) if name == "cagrad" else dict(rtol=1e-9, atol=1e-11)
        for p, e in zip(shared, unflatten(expected, shared)):
            torch.testing.assert_close(p.grad, e, **tol)
        for t, head in enumerate(net.heads):
            for p, e in zip(head.parameters(), head_grads[t]):
                torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
        opt.step()


def test_grad_semantics_heads_unlisted_and_accumulation():
    torch.manual_seed(0)
    net = Net(2)
    extra = nn.Linear(6, 1).double()  # used in the loss but listed nowhere
    x, ys = make_batch()
    m = make_mtl_method("pcgrad", net.trunk.parameters(), task_parameters=[net.heads[0].parameters(), []])
    outs = net(x)
    losses = task_losses(outs, ys)
    losses[1] = losses[1] + extra(net.trunk(x)).mean()
    own = torch.autograd.grad(losses[0], list(net.heads[0].parameters()), retain_graph=True)
    pre = [torch.ones_like(p) for p in net.heads[0].parameters()]
    for p, g in zip(net.heads[0].parameters(), pre):
        p.grad = g.clone()
    m.backward(losses)
    for p, g, g0 in zip(net.heads[0].parameters(), own, pre):
        torch.testing.assert_close(p.grad, g + g0, rtol=0, atol=0)  # own gradient, unchanged, accumulated
    assert all(p.grad is None for p in net.heads[1].parameters())  # not listed: untouched
    assert all(p.grad is None for p in extra.parameters())
    assert all(p.grad is not None for p in net.trunk.parameters())


def test_per_layer_groups_match_blockwise_gradvac():
    torch.manual_seed(0)
    net = Net(2)
    x, ys = make_batch()
    shared = list(net.trunk.parameters())
    groups = layer_groups(net.trunk)
    assert len(groups) == 2
    m = make_mtl_method("gradvac", shared, task_parameters=[h.parameters() for h in net.heads], groups=groups,
                        beta=0.2)
    emas = [torch.zeros(2, 2, dtype=D64) for _ in groups]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):
        V, _ = flat_task_grads(net, x, ys)
        blocks = torch.split(V, [sum(p.numel() for p in g) for g in groups], dim=1)
        expected = torch.cat([naive_gradvac_vectors(B, e, 0.2, task_orders(2, None)).sum(0)
                              for B, e in zip(blocks, emas)])
        opt.zero_grad(set_to_none=True)
        m.backward(task_losses(net(x), ys))
        assert m.last_weights.shape == (2, 2)
        for p, e in zip(shared, unflatten(expected, shared)):
            torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-11)
        opt.step()
    p_groups = make_mtl_method("imtl_g", shared, task_parameters=[[], []], groups="parameter")
    assert p_groups.num_groups == len(shared)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "acg", "cagrad"])
def test_determinism_and_state_dict(name):
    def run(seed, steps=3):
        torch.manual_seed(0)
        net = Net(3)
        x, ys = make_batch(num_tasks=3)
        m = make_mtl_method(name, net.trunk.parameters(), task_parameters=[h.parameters() for h in net.heads],
                            seed=seed)
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        grads = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            m.backward(task_losses(net(x), ys))
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            opt.step()
        return grads, m

    a, m = run(11)
    b, _ = run(11)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # same seed: bitwise identical
    # state round trip: a fresh method loaded with the state continues identically
    _, fresh = run(99, steps=0)
    fresh.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        X = torch.randn(3, 4, generator=gen, dtype=D64)
        G = X @ X.T
        w1, h1 = m.compute_weights(G)
        w2, h2 = fresh.compute_weights(G)
        assert torch.equal(w1, w2) and torch.equal(h1, h2)


@pytest.mark.parametrize("name", available_methods())
def test_state_dict_survives_weights_only_checkpoint(name):
    torch.manual_seed(0)
    net = Net(2)
    x, ys = make_batch()
    kw = dict(task_parameters=[h.parameters() for h in net.heads])

    def build():
        return make_mtl_method(name, net.trunk.parameters(), **kw)

    m = build()
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        m.backward(task_losses(net(x), ys))
        m.epoch_end()
    m.backward(task_losses(net(x), ys))  # mid-epoch state (DWA's running sums)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = build()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    m.epoch_end()
    fresh.epoch_end()
    for a, b in zip(m.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        else:
            assert a == b


def test_scale_invariance_and_nonfinite_gradients():
    V = [[1.0, 0.0, 0.5], [-1.0, 1.0, 0.0], [0.2, -1.0, 1.0]]
    for name in GRADIENT_METHODS:
        Vt, theta, m, step = linear_case(V, name)
        g = step()
        _, theta2, m2, _ = linear_case(V, name)
        m2.backward([1024.0 * (Vt[t] @ theta2) for t in range(3)])
        torch.testing.assert_close(theta2.grad / 1024.0, g, rtol=1e-10, atol=1e-12)
    Vt, theta, m, step = linear_case(V, "gradvac")
    step()
    ema = m.ema.clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        theta.grad = None
        m.backward([Vt[0] @ theta * float("inf"), Vt[1] @ theta, Vt[2] @ theta])
    assert not torch.isfinite(theta.grad).all()
    assert torch.equal(m.ema, ema)


# ----------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == 1 process on the global batch
# ----------------------------------------------------------------------------------------------

DDP_CASES = [(name, 2) for name in available_methods()] + [("pcgrad", 3), ("gradvac", 3), ("cagrad", 3)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for name, T in DDP_CASES:
            _ddp_case(rank, world, name, T)
    finally:
        dist.destroy_process_group()


def _ddp_case(rank, world, name, T):
    torch.manual_seed(0)
    net_d = Net(T)
    torch.manual_seed(0)
    net_r = Net(T)
    x, ys = make_batch(n=4 * world, num_tasks=T, seed=2)
    lo, hi = 4 * rank, 4 * (rank + 1)
    xl, ysl = x[lo:hi], [y[lo:hi] for y in ys]
    ddp = nn.parallel.DistributedDataParallel(net_d)

    def build(net, **kw):
        task_params = [h.parameters() for h in net.heads]
        extra = dict(dtype=D64) if name == "uncertainty" else {}
        return make_mtl_method(name, net.trunk.parameters(), task_parameters=task_params, num_tasks=T, **extra, **kw)

    m_d = build(net_d)               # auto: synchronises over the 2 ranks
    m_r = build(net_r, distributed=False)  # single-process reference on the global batch
    opt_d = torch.optim.SGD([*net_d.parameters(), *m_d.extra_parameters()], lr=0.3)
    opt_r = torch.optim.SGD([*net_r.parameters(), *m_r.extra_parameters()], lr=0.3)
    for step in range(3):
        opt_d.zero_grad(set_to_none=True)
        opt_r.zero_grad(set_to_none=True)
        with m_d.ddp_context(ddp):
            m_d.backward(task_losses(ddp(xl), ysl))
        m_r.backward(task_losses(net_r(x), ys))
        params_d = [*net_d.parameters(), *m_d.extra_parameters()]
        params_r = [*net_r.parameters(), *m_r.extra_parameters()]
        for pd, pr in zip(params_d, params_r):
            torch.testing.assert_close(pd.grad, pr.grad, rtol=1e-9, atol=1e-12,
                                       msg=lambda s: f"{name} T={T} step {step} rank {rank}: {s}")
        # every rank computed bit-identical weights
        w = m_d.last_weights.reshape(-1).double()
        gathered = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(gathered, w)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: weights differ across ranks"
        torch.testing.assert_close(w, m_r.last_weights.reshape(-1).double(), rtol=1e-9, atol=1e-12)
        if step == 0 and name in ("imtl_g", "cagrad", "acg"):
            # sensitivity check: weights from the rank's own half batch are not the global ones
            net_l = copy.deepcopy(net_r)
            net_l.load_state_dict(net_d.state_dict())
            m_l = build(net_l, distributed=False)
            m_l.backward(task_losses(net_l(xl), ysl))
            assert not torch.allclose(m_l.last_weights.double(), m_r.last_weights.double(), rtol=1e-3)
        opt_d.step()
        opt_r.step()
        m_d.epoch_end()  # DWA: each step is an "epoch" here, so weights move from step 2 on
        m_r.epoch_end()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_single_process():
    # "fork" where available: the children inherit the imported torch (a spawned child spends
    # ~10 s importing torch and DDP's lazy imports on a small CI machine); FUSEDSKIP_TEST_START_METHOD=spawn
    # runs the same test in fresh interpreters.
    method = os.environ.get("FUSEDSKIP_TEST_START_METHOD")
    if method is None:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        nn.parallel.DistributedDataParallel  # noqa: B018  (resolve lazy imports before forking)
        import torch.distributed.algorithms.join  # noqa: F401
    mp.start_processes(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True, start_method=method)
