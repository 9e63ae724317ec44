"""Multi-task training methods: loss weighting and gradient manipulation behind one interface.

See :mod:`fusedskip.mtl` for the overview, usage and the DDP contract.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import gram as _g
from .distributed import all_reduce_mean, broadcast_from_first, resolve_process_group

__all__ = [
    "MTLMethod", "LossWeighting", "GradientMethod",
    "FixedWeighting", "EqualWeighting", "UncertaintyWeighting", "DWA",
    "PCGrad", "CAGrad", "IMTLG", "GradVac", "ACG", "ACGReleased",
    "make_mtl_method", "available_methods", "layer_groups",
]

Tensor = torch.Tensor
Losses = Union[Sequence[Tensor], Mapping[str, Tensor]]


def _param_list(params, what: str) -> list[nn.Parameter]:
    if params is None:
        return []
    if isinstance(params, torch.Tensor):
        params = [params]
    out, seen = [], set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what} must hold tensors (parameters), got {type(p).__name__}")
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            out.append(p)
    return out


def layer_groups(module: nn.Module) -> list[list[nn.Parameter]]:
    """Per-layer parameter groups of ``module``: one group per submodule that owns parameters.

    Pass as ``groups=`` to a gradient method for per-layer granularity (LibMTL's GradVac
    ``all_layer``); parameters are listed without recursion, so every parameter is in exactly
    one group.
    """
    groups = []
    for m in module.modules():
        ps = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if ps:
            groups.append(ps)
    return groups


class MTLMethod:
    """Base class. ``backward(losses)`` populates ``.grad`` (accumulating, like ``Tensor.backward``).

    Args:
        shared_parameters: parameters shared by all tasks (the trunk). Those with
            ``requires_grad=False`` are ignored.
        task_parameters: one iterable of parameters per task (the heads), or a dict
            ``name -> iterable`` (which also fixes the task names and order). Required by the
            gradient methods (use ``[]`` for a task without own parameters).
        num_tasks: number of tasks; inferred from ``task_parameters`` or ``task_names``,
            default 2.
        task_names: names for dict-valued ``losses``; otherwise taken from the first dict.
        distributed: ``None`` (auto: synchronise when torch.distributed is initialised with
            more than one rank), ``True`` (require it) or ``False`` (never, e.g. a reference
            computation inside a distributed job).
        process_group: group to synchronise over (default: WORLD).
    """

    name = "base"
    gradient_method = False

    def __init__(self, shared_parameters, task_parameters=None, *, num_tasks: Optional[int] = None,
                 task_names: Optional[Sequence[str]] = None, distributed: Optional[bool] = None,
                 process_group=None):
        self.shared_parameters = _param_list(shared_parameters, "shared_parameters")
        if isinstance(task_parameters, Mapping):
            if task_names is not None and list(task_names) != list(task_parameters.keys()):
                raise ValueError("task_names disagree with the keys of task_parameters")
            task_names = list(task_parameters.keys())
            task_parameters = list(task_parameters.values())
        if task_parameters is not None:
            task_parameters = [_param_list(ps, f"task_parameters[{t}]") for t, ps in enumerate(task_parameters)]
        sizes = {len(x) for x in (task_parameters, task_names) if x is not None}
        if num_tasks is not None:
            sizes.add(int(num_tasks))
        if len(sizes) > 1:
            raise ValueError(f"inconsistent number of tasks: {sorted(sizes)} (num_tasks, task_parameters, task_names)")
        self.num_tasks = sizes.pop() if sizes else 2
        if self.num_tasks < 1:
            raise ValueError("num_tasks must be >= 1")
        self.task_names = list(task_names) if task_names is not None else None
        self.task_parameters = task_parameters
        ids = [id(p) for p in self.shared_parameters]
        for ps in task_parameters or []:
            ids += [id(p) for p in ps]
        if len(ids) != len(set(ids)):
            raise ValueError("a parameter appears in more than one of shared_parameters / task_parameters[t]")
        self.distributed = distributed
        self.process_group = process_group
        self.last_weights: Optional[Tensor] = None
        self.last_info: dict[str, Any] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _sync(self):
        return resolve_process_group(self.distributed, self.process_group)

    def _loss_list(self, losses: Losses) -> list[Tensor]:
        if isinstance(losses, Mapping):
            if self.task_names is None:
                if len(losses) != self.num_tasks:
                    raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
                self.task_names = list(losses.keys())
            if set(losses.keys()) != set(self.task_names):
                raise ValueError(f"loss keys {sorted(losses)} != task names {sorted(self.task_names)}")
            out = [losses[k] for k in self.task_names]
        else:
            out = list(losses)
        if len(out) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(out)}")
        for t, loss in enumerate(out):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss {t} must be a scalar tensor")
        return [loss.reshape(()) for loss in out]

    # -- public API ------------------------------------------------------------------------------
    def backward(self, losses: Losses, *, scaler=None, retain_graph: bool = False) -> Tensor:
        """Populate ``.grad`` of all parameters from the T task losses; returns the detached
        weighted total (for logging). ``scaler``: a ``torch.amp.GradScaler`` whose scale is
        applied before differentiation (then call ``scaler.step(optimizer)`` as usual)."""
        raise NotImplementedError

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters owned by the method (uncertainty weighting's log-variances): add them to
        the optimiser."""
        return []

    def epoch_end(self, avg_losses: Optional[Losses] = None) -> None:
        """Called once per epoch (DWA uses it; a no-op elsewhere)."""

    def ddp_context(self, module: nn.Module):
        """Context to wrap forward *and* ``backward`` in under DDP: ``module.no_sync()`` for the
        gradient methods (which average per-task gradients themselves), nothing otherwise."""
        if self.gradient_method and isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"last_weights": self.last_weights, "task_names": self.task_names}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_weights = state.get("last_weights")
        if state.get("task_names") is not None:
            self.task_names = list(state["task_names"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks}, shared={len(self.shared_parameters)} tensors)"


# ============================================================================================
# Loss weighting
# ============================================================================================

class LossWeighting(MTLMethod):
    """Methods that only reweight the losses: one ``backward`` of ``total = sum_t w_t L_t (+ terms)``.

    Under DDP call ``backward`` normally (DDP averages the model's gradients); the method
    averages the gradients of its own parameters (``extra_parameters``) itself.
    """

    def total_loss(self, losses: Losses) -> Tensor:
        """The differentiable weighted objective (if you want to call ``.backward`` yourself; then
        call :meth:`sync_extra_grads` under DDP)."""
        return self._total(self._loss_list(losses))

    def _total(self, losses: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def backward(self, losses: Losses, *, scaler=None, retain_graph: bool = False) -> Tensor:
        total = self._total(self._loss_list(losses))
        (scaler.scale(total) if scaler is not None else total).backward(retain_graph=retain_graph)
        self.sync_extra_grads()
        return total.detach()

    def sync_extra_grads(self) -> None:
        """Average the gradients of :meth:`extra_parameters` over ranks (no-op without DDP)."""
        extra = [p for p in self.extra_parameters() if p.grad is not None]
        active, group = self._sync()
        if active and extra:
            for p, g in zip(extra, all_reduce_mean([p.grad for p in extra], group)):
                p.grad.copy_(g)


class FixedWeighting(LossWeighting):
    """Fixed weights: ``L = sum_t w_t L_t``. Default ``w = [1, lam, ..., lam]``, i.e. the
    AddUNet objective ``L = L_den + lambda * L_cls`` for tasks (denoise, classify)."""

    name = "fixed"

    def __init__(self, shared_parameters=None, task_parameters=None, *, weights: Optional[Sequence[float]] = None,
                 lam: float = 1.0, **kw):
        if weights is not None and kw.get("num_tasks") is None and task_parameters is None \
                and kw.get("task_names") is None:
            kw["num_tasks"] = len(weights)
        super().__init__(shared_parameters, task_parameters, **kw)
        if weights is None:
            weights = [1.0] + [float(lam)] * (self.num_tasks - 1)
        if len(weights) != self.num_tasks:
            raise ValueError(f"weights must have {self.num_tasks} entries, got {len(weights)}")
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.last_weights = self.weights.float()

    def _total(self, losses):
        return sum(float(w) * loss for w, loss in zip(self.weights, losses))


class EqualWeighting(FixedWeighting):
    """Equal weights: ``L = sum_t L_t`` (LibMTL's EW)."""

    name = "equal"

    def __init__(self, shared_parameters=None, task_parameters=None, **kw):
        MTLMethod.__init__(self, shared_parameters, task_parameters, **kw)
        self.weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self.last_weights = self.weights.float()


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics" (Kendall, Gal, Cipolla; CVPR 2018).

    With learned ``s_t = log sigma_t^2`` (an ``nn.Parameter`` per task, initial ``init``):
    ``L = sum_t f_t exp(-s_t) L_t + 0.5 s_t``, where f_t = 0.5 for a "regression" task
    (Gaussian likelihood: L/(2 sigma^2) + log sigma) and 1 for a "classification" task (scaled
    softmax: L/sigma^2 + log sigma). Default: every task uses the regression form with init
    -0.5, which is what MTAN, LibMTL and Net-Opt-MTL implement. Add
    :meth:`extra_parameters` to the optimiser (no weight decay). ``last_weights`` are the
    effective loss weights ``f_t exp(-s_t)``.
    """

    name = "uncertainty"

    def __init__(self, shared_parameters=None, task_parameters=None, *, init: Union[float, Sequence[float]] = -0.5,
                 task_kinds: Optional[Sequence[str]] = None, device=None, dtype=torch.float32, **kw):
        super().__init__(shared_parameters, task_parameters, **kw)
        T = self.num_tasks
        kinds = list(task_kinds) if task_kinds is not None else ["regression"] * T
        if len(kinds) != T or any(k not in ("regression", "classification") for k in kinds):
            raise ValueError(f"task_kinds must be {T} of 'regression'/'classification', got {kinds}")
        self.task_kinds = kinds
        if device is None:
            device = self.shared_parameters[0].device if self.shared_parameters else "cpu"
        init_t = torch.as_tensor(init, dtype=dtype).expand(T).clone() if not isinstance(init, Sequence) \
            else torch.tensor([float(x) for x in init], dtype=dtype)
        self.log_vars = nn.Parameter(init_t.to(device))
        self._factors = torch.tensor([0.5 if k == "regression" else 1.0 for k in kinds], dtype=dtype, device=device)
        self.last_weights = (self._factors * torch.exp(-self.log_vars.detach())).cpu()

    def extra_parameters(self):
        return [self.log_vars]

    def _total(self, losses):
        s = self.log_vars
        w = self._factors.to(s.device) * torch.exp(-s)
        self.last_weights = w.detach().cpu()
        total = sum(w[t].to(loss.dtype) * loss for t, loss in enumerate(losses))
        return total + 0.5 * s.sum().to(total.dtype)

    def state_dict(self):
        st = super().state_dict()
        st["log_vars"] = self.log_vars.detach().clone()
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])


class DWA(LossWeighting):
    """Dynamic Weight Average, "End-to-End Multi-Task Learning with Attention" (Liu, Johns,
    Davison; CVPR 2019), Eq. (7).

    ``w_t(e) = T exp(r_t(e-1) / tau) / sum_i exp(r_i(e-1) / tau)`` with
    ``r_t(e-1) = L_t(e-1) / L_t(e-2)`` the ratio of the last two epochs' average losses,
    ``tau = 2``; ``w = 1`` until two epochs have been recorded. ``L = sum_t w_t L_t``.

    Call :meth:`epoch_end` once per epoch: without arguments it uses the average of the
    (unweighted) losses passed to ``backward`` during the epoch, averaged over all ranks under
    DDP; or pass the per-task averages yourself (they are averaged over ranks too, which is a
    no-op if they already agree). (Net-Opt-MTL's trainer multiplies by 3 for 2 tasks: a bug;
    here the factor is T.)
    """

    name = "dwa"

    def __init__(self, shared_parameters=None, task_parameters=None, *, temperature: float = 2.0, **kw):
        super().__init__(shared_parameters, task_parameters, **kw)
        self.temperature = float(temperature)
        self.history: list[Tensor] = []  # last two epochs' average losses, float64 CPU
        self._sum: Optional[Tensor] = None
        self._count = 0
        self.weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self.last_weights = self.weights.float()

    def _total(self, losses):
        with torch.no_grad():
            vec = torch.stack([loss.detach().to(torch.float64) for loss in losses])
            self._sum = vec if self._sum is None else self._sum + vec.to(self._sum.device)
            self._count += 1
        return sum(float(w) * loss for w, loss in zip(self.weights, losses))

    def epoch_end(self, avg_losses: Optional[Losses] = None) -> None:
        active, group = self._sync()
        if avg_losses is None:
            if self._sum is None:
                raise RuntimeError("DWA.epoch_end(): no losses recorded this epoch and none given")
            count = torch.tensor([float(self._count)], dtype=torch.float64, device=self._sum.device)
            stats = torch.cat([self._sum, count])
            if active:
                stats = all_reduce_mean([stats], group)[0]  # mean of sums / mean of counts = global mean
            avg = (stats[:-1] / stats[-1]).cpu()
        else:
            if isinstance(avg_losses, Mapping):
                names = self.task_names or list(avg_losses.keys())
                avg_losses = [avg_losses[k] for k in names]
            avg = torch.tensor([float(x) for x in avg_losses], dtype=torch.float64)
            if len(avg) != self.num_tasks:
                raise ValueError(f"expected {self.num_tasks} average losses, got {len(avg)}")
            if active:
                dev = self._sum.device if self._sum is not None else (
                    self.shared_parameters[0].device if self.shared_parameters else "cpu")
                avg = all_reduce_mean([avg.to(dev)], group)[0].cpu()
        self._sum, self._count = None, 0
        self.history = (self.history + [avg])[-2:]
        self.weights = self.compute_weights(self.history, self.temperature)
        self.last_weights = self.weights.float()

    @staticmethod
    def compute_weights(history: Sequence[Tensor], temperature: float = 2.0) -> Tensor:
        """DWA weights from the average losses of the previous epochs (oldest first)."""
        T = len(history[-1]) if history else 0
        if len(history) < 2:
            return torch.ones(T, dtype=torch.float64)
        ratio = torch.as_tensor(history[-1], dtype=torch.float64) / torch.as_tensor(history[-2], dtype=torch.float64)
        return T * torch.softmax(ratio / temperature, dim=0)

    def state_dict(self):
        st = super().state_dict()
        st.update(history=[h.clone() for h in self.history], weights=self.weights.clone(),
                  epoch_sum=None if self._sum is None else self._sum.detach().cpu().clone(), epoch_count=self._count)
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.history = [torch.as_tensor(h, dtype=torch.float64) for h in state["history"]]
        self.weights = torch.as_tensor(state["weights"], dtype=torch.float64)
        self.last_weights = self.weights.float()
        epoch_sum = state.get("epoch_sum")
        if epoch_sum is not None:
            dev = self.shared_parameters[0].device if self.shared_parameters else "cpu"
            epoch_sum = torch.as_tensor(epoch_sum, dtype=torch.float64).to(dev)
        self._sum, self._count = epoch_sum, int(state.get("epoch_count", 0))


# ============================================================================================
# Gradient manipulation
# ============================================================================================

class GradientMethod(MTLMethod):
    """Gradient-manipulation methods on the shared parameters, computed from one Gram matrix.

    ``backward(losses)``:

    1. per task t, ``torch.autograd.grad(L_t, shared + task_parameters[t])`` (T backward passes
       through the trunk; the graph is retained until the last one);
    2. under torch.distributed (auto-detected), every task's gradients (shared and head) are
       averaged over ranks (bucketed all-reduce), so they are the global-batch gradients;
    3. the T x T Gram ``G[i, j] = <g_i, g_j>`` per parameter group is accumulated as a sum of
       per-parameter contributions (never a ``[T, num_params]`` matrix), broadcast from the
       first rank so all ranks agree bit for bit, and moved to the CPU;
    4. the method maps G to weights w (one per task; per group with ``groups``);
    5. ``p.grad += sum_t w_t g_t[p]`` for every shared parameter p, and
       ``p.grad += g_t[p]`` for task t's own parameters (``ACGReleased`` scales them).

    Options common to all gradient methods:
        reduction: "sum" (default) scales the combined shared gradient like ``grad sum_t L_t``
            (what ``equal`` gives: no conflict -> plain sum), "mean" like ``grad mean_t L_t``.
            ``last_weights`` are on the chosen scale.
        groups: None (whole model, default), "parameter" (every parameter tensor its own
            group) or a list of parameter lists partitioning ``shared_parameters`` (e.g.
            :func:`layer_groups`); each group gets its own Gram, weights and state.
        seed: seed of the method's ``torch.Generator`` (random task orders).

    If the Gram is not finite (inf/NaN gradients, e.g. a GradScaler overflow) the plain sum
    (or mean) is written, so the non-finite values reach ``.grad`` and GradScaler skips the
    step, and the method's state is left untouched.

    The weights are invariant to a common scale of the losses, so passing a GradScaler
    (``scaler=``) is exact. Memory: T copies of the shared parameters' gradients live until
    they are combined.
    """

    gradient_method = True
    native_reduction = "sum"  # scale of the weights the method's paper defines
    default_reduction_is_native = False  # default reduction: "sum", or the native one if True
    needs_head_norms = False

    def __init__(self, shared_parameters, task_parameters=None, *, reduction: Optional[str] = None,
                 groups=None, seed: int = 0, bucket_cap_mb: float = 25.0, **kw):
        if task_parameters is None:
            raise ValueError(f"{type(self).__name__} needs task_parameters: one list of parameters per task "
                             "(use [] for a task without own parameters)")
        super().__init__(shared_parameters, task_parameters, **kw)
        if not self.shared_parameters:
            raise ValueError("shared_parameters is empty")
        if reduction is None:
            reduction = self.native_reduction if self.default_reduction_is_native else "sum"
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        T = self.num_tasks
        if reduction == self.native_reduction:
            self._factor = 1.0
        elif reduction == "sum":
            self._factor = float(T)
        else:
            self._factor = 1.0 / T
        self.group_index, self.num_groups = self._build_groups(groups)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        self.last_head_scales: Optional[Tensor] = None
        self._warned_nonfinite = False

    def _build_groups(self, groups):
        P = len(self.shared_parameters)
        if groups is None or groups == "whole":
            return [0] * P, 1
        if groups == "parameter":
            return list(range(P)), P
        if isinstance(groups, str):
            raise ValueError(f"groups must be None, 'whole', 'parameter' or a list of parameter lists, got {groups!r}")
        pos = {id(p): i for i, p in enumerate(self.shared_parameters)}
        index = [-1] * P
        k = 0
        for grp in groups:
            members = [p for p in grp if isinstance(p, torch.Tensor) and p.requires_grad]
            if not members:
                continue
            for p in members:
                i = pos.get(id(p))
                if i is None:
                    raise ValueError("groups contain a parameter that is not in shared_parameters")
                if index[i] != -1:
                    raise ValueError("a shared parameter appears in more than one group")
                index[i] = k
            k += 1
        if -1 in index:
            raise ValueError(f"{index.count(-1)} shared parameters are in no group")
        return index, k

    # -- the part each method defines ------------------------------------------------------------
    def _group_weights(self, G: Tensor, k: int) -> Tensor:
        """Native-scale weights (T,) for group k from its Gram (float64 CPU); may update state."""
        raise NotImplementedError

    def _head_scales(self, G_total: Tensor, head_sq: Optional[Tensor]) -> Optional[Tensor]:
        """Native-scale factors for each task's own parameters; None (default): heads get their
        task's gradient unchanged, whatever the reduction."""
        return None

    # -- the shared machinery ----------------------------------------------------------------------
    def compute_weights(self, G: Tensor, head_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Weights from Gram matrices: ``G`` is ``[T, T]`` or ``[num_groups, T, T]``.

        Returns ``(W [num_groups, T], head_scales [T])`` on the chosen ``reduction`` scale and
        advances the method's state (EMA, generator) exactly as ``backward`` would.
        """
        G = torch.as_tensor(G, dtype=torch.float64).cpu()
        if G.dim() == 2:
            G = G[None]
        if G.shape[0] != self.num_groups or G.shape[1:] != (self.num_tasks, self.num_tasks):
            raise ValueError(f"expected Gram of shape [{self.num_groups}, {self.num_tasks}, {self.num_tasks}], "
                             f"got {tuple(G.shape)}")
        self.last_info = {}
        W = torch.stack([self._group_weights(0.5 * (G[k] + G[k].T), k) for k in range(self.num_groups)])
        heads = self._head_scales(G.sum(0), head_sq)
        heads = torch.ones(self.num_tasks, dtype=torch.float64) if heads is None else heads * self._factor
        return W * self._factor, heads

    def backward(self, losses: Losses, *, scaler=None, retain_graph: bool = False) -> Tensor:
        L = self._loss_list(losses)
        if scaler is not None:
            L = [scaler.scale(loss) for loss in L]
        T, shared, P = self.num_tasks, self.shared_parameters, len(self.shared_parameters)
        heads = self.task_parameters

        # 1. per-task gradients of the shared parameters and of the task's own parameters
        g_shared: list[list[Optional[Tensor]]] = []
        g_heads: list[list[Optional[Tensor]]] = []
        last = max([t for t in range(T) if L[t].requires_grad], default=-1)
        for t in range(T):
            inputs = shared + heads[t]
            if L[t].requires_grad:
                gs = list(torch.autograd.grad(L[t], inputs, retain_graph=retain_graph or t != last, allow_unused=True))
            else:
                gs = [None] * len(inputs)
            g_shared.append(gs[:P])
            g_heads.append(gs[P:])

        # 2. global-batch gradients under DDP
        active, group = self._sync()
        if active:
            for t in range(T):
                params = shared + heads[t]
                full = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_shared[t] + g_heads[t], params)]
                avg = all_reduce_mean(full, group, self.bucket_bytes)
                g_shared[t], g_heads[t] = avg[:P], avg[P:]

        # 3. Gram (and the heads' squared norms if the method uses them), identical on all ranks
        device = shared[0].device
        G = _g.gram_from_grads(g_shared, self.group_index, self.num_groups, device=device)
        head_sq = None
        if self.needs_head_norms:
            head_sq = torch.zeros(T, dtype=torch.float64, device=device)
            for t in range(T):
                for g in g_heads[t]:
                    if g is not None:
                        gf = g.reshape(-1).float() if g.dtype in (torch.float16, torch.bfloat16) else g.reshape(-1)
                        head_sq[t] += torch.dot(gf, gf).to(torch.float64).to(device)
        if active:
            packed = torch.cat([G.reshape(-1)] + ([head_sq] if head_sq is not None else []))
            broadcast_from_first(packed, group)
            G = packed[:G.numel()].reshape(G.shape)
            if head_sq is not None:
                head_sq = packed[G.numel():]
        G = G.cpu()
        head_sq = head_sq.cpu() if head_sq is not None else None

        # 4. weights
        finite = bool(torch.isfinite(G).all()) and (head_sq is None or bool(torch.isfinite(head_sq).all()))
        if finite:
            W, head_scales = self.compute_weights(G, head_sq)
        else:
            if not self._warned_nonfinite:
                warnings.warn(f"{self.name}: non-finite task gradients; writing the plain {self.reduction} "
                              "of the task gradients and leaving the method state unchanged", RuntimeWarning)
                self._warned_nonfinite = True
            base = 1.0 if self.reduction == "sum" else 1.0 / T
            W = torch.full((self.num_groups, T), base, dtype=torch.float64)
            head_scales = torch.ones(T, dtype=torch.float64)
            self.last_info = {"nonfinite": True}

        # 5. write .grad (freeing each task gradient once used)
        for p_idx, param in enumerate(shared):
            k = self.group_index[p_idx]
            acc = None
            for t in range(T):
                g = g_shared[t][p_idx]
                if g is None:
                    continue
                wt = float(W[k, t])
                acc = g * wt if acc is None else acc.add_(g, alpha=wt)
                g_shared[t][p_idx] = None
            if acc is not None:
                _accumulate_grad(param, acc)
        for t in range(T):
            s = float(head_scales[t])
            for param, g in zip(heads[t], g_heads[t]):
                if g is not None:
                    _accumulate_grad(param, g if s == 1.0 else g * s)

        self.last_weights = (W[0] if self.num_groups == 1 else W).float()
        self.last_head_scales = head_scales.float()
        w_mean = W.mean(0)
        with torch.no_grad():
            total = sum(float(w_mean[t]) * L[t].detach() for t in range(T))
            if scaler is not None:
                total = total / scaler.get_scale()
        return total

    def state_dict(self):
        st = super().state_dict()
        st.update(generator=self.generator.get_state(), last_head_scales=self.last_head_scales)
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.last_head_scales = state.get("last_head_scales")

    def __repr__(self):
        return (f"{type(self).__name__}(num_tasks={self.num_tasks}, shared={len(self.shared_parameters)} tensors, "
                f"groups={self.num_groups}, reduction={self.reduction!r})")


def _accumulate_grad(param: Tensor, g: Tensor) -> None:
    g = g.detach()
    if param.grad is None:
        if g.stride() != param.stride() or g.dtype != param.dtype:
            g = torch.empty_like(param).copy_(g)
        param.grad = g
    else:
        param.grad.add_(g)


class PCGrad(GradientMethod):
    """PCGrad, "Gradient Surgery for Multi-Task Learning" (Yu, Kumar, Gupta, Levine, Hausman,
    Finn; NeurIPS 2020).

    Each task gradient is projected onto the normal plane of every other task gradient it
    conflicts with (negative inner product), the others visited in random order (seeded
    ``torch.Generator``; one permutation per task, see :func:`fusedskip.mtl.gram.task_orders`);
    the projected gradients are summed (native "sum" scale). Weights: column sums of the
    coefficient matrix of :func:`fusedskip.mtl.gram.pcgrad_coefficients`.
    """

    name = "pcgrad"

    def _group_weights(self, G, k):
        C = _g.pcgrad_coefficients(G, self.generator)
        self.last_info.setdefault("coefficients", []).append(C)
        return C.sum(0)


class CAGrad(GradientMethod):
    """CAGrad, "Conflict-Averse Gradient Descent for Multi-task Learning" (Liu, Liu, Jin, Stone,
    Liu; NeurIPS 2021).

    ``d = g_0 + (c |g_0| / |g_w|) g_w`` where g_0 is the mean gradient and w solves the dual
    ``min_{w in simplex} <g_w, g_0> + c |g_0| |g_w|`` exactly (:func:`fusedskip.mtl.gram.cagrad_dual`,
    any T <= 16); ``rescale=1`` (default, as in the authors' experiments) divides by 1 + c^2.
    Native scale is the mean; with the default ``reduction="sum"`` d is multiplied by T, as the
    authors' MTAN trainers do ("to match the sum loss"). ``c`` defaults to 0.5.
    """

    name = "cagrad"
    native_reduction = "mean"

    def __init__(self, shared_parameters, task_parameters=None, *, c: float = 0.5, rescale: int = 1, **kw):
        super().__init__(shared_parameters, task_parameters, **kw)
        if c < 0:
            raise ValueError("c must be >= 0")
        if rescale not in (0, 1, 2):
            raise ValueError("rescale must be 0, 1 or 2")
        self.c, self.rescale = float(c), int(rescale)

    def _group_weights(self, G, k):
        weights, w = _g.cagrad_weights(G, self.c, self.rescale)
        self.last_info.setdefault("dual", []).append(w)
        return weights


class IMTLG(GradientMethod):
    """IMTL-G, the gradient part of "Towards Impartial Multi-task Learning" (Liu, Li, Kuang, Xue,
    Chen, Yang, Liao, Zhang; ICLR 2021).

    Weights alpha (sum 1, unclipped) such that the combined gradient has equal projections on
    every unit task gradient (closed form, :func:`fusedskip.mtl.gram.imtl_g_weights`). Applied to
    the shared *parameters* (the paper differentiates w.r.t. the shared representation; LibMTL
    also uses parameters). Native scale: mean (sum alpha = 1); default ``reduction="sum"``
    multiplies by T.
    """

    name = "imtl_g"
    native_reduction = "mean"

    def _group_weights(self, G, k):
        alpha = _g.imtl_g_weights(G)
        self.last_info.setdefault("alpha", []).append(alpha)
        return alpha


class _EMAState:
    """Per-group, per-ordered-pair EMA of target cosine similarities (GradVac's phi_hat)."""

    def _init_ema(self, beta: float, shuffle: bool):
        if not 0.0 <= beta <= 1.0:
            raise ValueError("beta must be in [0, 1]")
        self.beta, self.shuffle = float(beta), bool(shuffle)
        self.ema = torch.zeros(self.num_groups, self.num_tasks, self.num_tasks, dtype=torch.float64)

    def state_dict(self):
        st = super().state_dict()
        st["ema"] = self.ema.clone()
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ema = torch.as_tensor(state["ema"], dtype=torch.float64).clone()


class GradVac(_EMAState, GradientMethod):
    """Gradient Vaccine, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models" (Wang, Tsvetkov, Firat, Cao; ICLR 2021).

    Each task gradient is corrected towards every other task gradient whose cosine similarity is
    below the pair's EMA target ``phi_hat`` (updated with ``beta``, default 0.01, persistent
    across steps, one per ordered task pair and parameter group) so that the similarity
    becomes the target; corrected gradients are summed (native "sum" scale). ``shuffle``
    visits the other tasks in random (seeded) order, as LibMTL does. Whole-model by default;
    ``groups=layer_groups(trunk)`` gives per-layer granularity.
    """

    name = "gradvac"

    def __init__(self, shared_parameters, task_parameters=None, *, beta: float = 0.01, shuffle: bool = True, **kw):
        super().__init__(shared_parameters, task_parameters, **kw)
        self._init_ema(beta, shuffle)

    def _group_weights(self, G, k):
        C, self.ema[k] = _g.gradvac_coefficients(G, self.ema[k], self.beta, self.generator if self.shuffle else None)
        self.last_info.setdefault("coefficients", []).append(C)
        return C.sum(0)


class ACG(_EMAState, GradientMethod):
    """Adaptive correcting gradient as the paper intends it: "Variable multi-scale attention fusion
    network and adaptive correcting gradient optimization for multi-task learning" (Ji, Sun,
    Meng, Pang, Tian; Pattern Recognition 162, 111423, 2025).

    (1) conflicts: GradVac correction of each task gradient (per-pair EMA target, ``beta``
    default 0.01 as in GradVac, persistent across steps, denominator |g_j|); (2) dominance:
    IMTL-G weights alpha of the corrected gradients; (3) shared gradient
    ``sum_t alpha_t g'_t``; task-specific parameters get their own task's gradient. This is a
    reconstruction (the paper's equations are not public; see papers.md section 3.3). Native
    scale: mean (sum alpha = 1); default ``reduction="sum"`` multiplies by T.
    ``last_info["alpha"]`` holds the IMTL-G weights of the corrected gradients.
    """

    name = "acg"
    native_reduction = "mean"

    def __init__(self, shared_parameters, task_parameters=None, *, beta: float = 0.01, shuffle: bool = True, **kw):
        super().__init__(shared_parameters, task_parameters, **kw)
        self._init_ema(beta, shuffle)

    def _group_weights(self, G, k):
        w, alpha, self.ema[k] = _g.acg_weights(G, self.ema[k], self.beta, self.generator if self.shuffle else None)
        self.last_info.setdefault("alpha", []).append(alpha)
        return w


class ACGReleased(GradientMethod):
    """The adaptive correcting gradient as released (github.com/SyqxhSt/Net-Opt-MTL, HEAD dcd25369,
    ``gradvac_imtl.py`` + ``multi_task_trainer_AdaCorr``), reproduced behaviour for behaviour.

    The released GradVac-style correction never writes its result back, so it has no effect
    and is not simulated. What the code does: shared parameters get the plain *mean* of the
    raw task gradients; each task's own parameters get ``alpha_t * grad L_t`` with alpha the
    IMTL-G weights (unclipped) computed from the *full* gradient vectors, i.e. from the Gram
    of the shared part plus each task's squared head-gradient norm on the diagonal (task t's
    gradient is zero on other tasks' heads). The released code handles 2 tasks; for T > 2 the
    general IMTL-G closed form is used. Default ``reduction`` is "mean" (the released scale);
    "sum" multiplies shared and head gradients by T. ``last_weights`` are the shared weights
    (1/T each), ``last_head_scales`` the heads' alpha.
    """

    name = "acg_released"
    native_reduction = "mean"
    default_reduction_is_native = True
    needs_head_norms = True

    def _group_weights(self, G, k):
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)

    def _head_scales(self, G_total, head_sq):
        G_full = G_total.clone()
        if head_sq is not None:
            G_full += torch.diag(head_sq)
        alpha = _g.imtl_g_weights(G_full)
        self.last_info["alpha"] = alpha
        return alpha


# ============================================================================================
# Factory
# ============================================================================================

_METHODS = {
    "fixed": FixedWeighting,
    "equal": EqualWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "gradvac": GradVac,
    "acg": ACG,
    "acg_released": ACGReleased,
}
_ALIASES = {"uw": "uncertainty", "imtl": "imtl_g", "ew": "equal", "sum": "equal"}


def available_methods() -> tuple[str, ...]:
    """Canonical method names accepted by :func:`make_mtl_method`."""
    return tuple(_METHODS)


def make_mtl_method(name: str, shared_parameters, task_parameters=None, **options) -> MTLMethod:
    """Build a multi-task method by name.

    Names: fixed, equal, uncertainty, dwa, pcgrad, cagrad, imtl_g, gradvac, acg, acg_released
    (aliases: uw, imtl, ew, sum; case and '-' vs '_' are ignored). ``options`` go to the
    method's constructor (e.g. ``lam``/``weights`` for fixed, ``init``/``task_kinds`` for
    uncertainty, ``temperature`` for dwa, ``c``/``rescale`` for cagrad, ``beta``/``shuffle``
    for gradvac/acg, and ``reduction``, ``groups``, ``seed`` for the gradient methods, plus the
    common ``num_tasks``, ``task_names``, ``distributed``, ``process_group``). Unknown names
    raise ValueError listing the valid ones; unknown options raise TypeError.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise ValueError(f"unknown MTL method {name!r}; valid methods: {', '.join(_METHODS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in _ALIASES.items())})")
    return _METHODS[key](shared_parameters, task_parameters, **options)
