"""Multi-task training methods for joint training (AddUNet: denoising + classification).

One interface for loss weighting and gradient manipulation::

    from fusedskip.mtl import make_mtl_method

    method = make_mtl_method("pcgrad", model.shared_parameters(),
                             task_parameters=[model.denoise_head.parameters(),
                                              model.classifier.parameters()])
    optimizer = torch.optim.AdamW([*model.parameters(), *method.extra_parameters()], lr=...)
    for epoch in ...:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            losses = [loss_den, loss_cls]            # or {"den": ..., "cls": ...}
            method.backward(losses)                  # fills .grad of every listed parameter
            optimizer.step()
            log(method.last_weights)
        method.epoch_end()                           # DWA; no-op for the others

Methods (``available_methods()``):

=================  =============================================================================
``fixed``          ``L_den + lam * L_cls`` (``lam=1.0``) or any ``weights=[...]``
``equal``          ``sum_t L_t``
``uncertainty``    Kendall, Gal, Cipolla, CVPR 2018; learned log-variances (``extra_parameters``)
``dwa``            Liu, Johns, Davison (MTAN), CVPR 2019; T = 2, last two epochs' mean losses
``pcgrad``         Yu et al., NeurIPS 2020; seeded random projection order
``cagrad``         Liu et al., NeurIPS 2021; c = 0.5, exact dual over the simplex (T <= 16)
``imtl_g``         Liu et al., ICLR 2021 (IMTL-G closed form)
``gradvac``        Wang et al., ICLR 2021; per-pair EMA target similarity, beta = 0.01
``acg``            Ji et al., Pattern Recognition 2025, as intended: GradVac correction -> IMTL-G
``acg_released``   the same paper's released code: shared = mean of raw gradients, heads x IMTL-G
=================  =============================================================================

Gradient methods work from one T x T Gram matrix of the shared-parameter gradients, formed as a
sum of per-parameter contributions, and produce weights w with combined gradient
``sum_t w_t g_t`` (see :mod:`fusedskip.mtl.gram` for each method's Gram-matrix derivation);
task-specific parameters get their own task's gradient unchanged (except ``acg_released``,
which reproduces the released scaling). ``reduction="sum"`` (default) keeps the combined
gradient on the scale of ``grad sum_t L_t``; ``"mean"`` on that of ``grad mean_t L_t``.

Parameters listed in neither ``shared_parameters`` nor ``task_parameters`` receive no gradient
from a gradient method (list every trainable parameter somewhere); loss-weighting methods
backpropagate one total loss and so reach every parameter.

DDP (DistributedDataParallel) contract
--------------------------------------
*Loss weighting* (fixed, equal, uncertainty, dwa): call ``method.backward(losses)`` as you would
``loss.backward()`` under DDP; DDP averages the model's gradients. The method averages the
gradients of its own parameters (uncertainty's log-variances) over ranks itself, and
``epoch_end()`` averages DWA's epoch losses over ranks. Give every rank the same number of
batches (DistributedSampler with ``drop_last``), as DDP itself requires.

*Gradient methods* need the global-batch per-task gradients, and the Gram of rank-averaged
gradients is not the average of per-rank Grams. ``backward`` therefore

1. computes each task's gradients locally with ``torch.autograd.grad`` (DDP's reducer is not
   involved),
2. averages them over ranks (``dist.all_reduce`` SUM / world size, bucketed), so every rank
   holds the global-batch gradient of every task (communication: T times DDP's),
3. forms the Gram from the averaged gradients and broadcasts it from the first rank, so every
   rank computes bit-identical weights and method state,
4. writes ``.grad = sum_t w_t g_t`` (identical on all ranks) and the heads' averaged gradients.

So the forward and ``backward`` must run without DDP's own gradient synchronisation: wrap them
in ``with method.ddp_context(ddp_model):`` (= ``ddp_model.no_sync()`` for gradient methods, a
null context for loss weighting), or use the bare module with parameters broadcast at start.
Per-rank losses must be means over equally sized local batches (then the global-batch loss is
the mean of the rank losses, which is what DDP's gradient averaging assumes as well).
SyncBatchNorm still synchronises in the forward under ``no_sync``. Auto-detection uses
``torch.distributed.is_initialized()``; pass ``distributed=False`` to opt out and
``process_group=`` to use a subgroup. NCCL needs the parameters on the GPU (the Gram is
broadcast on the parameters' device).

Cross-task modules (:mod:`fusedskip.mtl.kem`): ``KEM``, ``StableKEM`` (SGW-based MTL, ACCV 2024),
the dense ``CrossTaskAttention`` baseline, and ``CrossTaskFusion(kind, dim, **options)``, the
one-argument hook between a network's per-task branches.
"""
from .gram import (
                   acg_weights,
                   cagrad_dual,
                   cagrad_weights,
                   gradvac_coefficients,
                   gram_from_grads,
                   imtl_g_weights,
                   pcgrad_coefficients,
                   task_orders,
)
from .kem import (
                   CROSS_TASK_KINDS,
                   KEM,
                   CrossTaskAttention,
                   CrossTaskFusion,
                   StableKEM,
                   simplex_etf,
                   topk_attention,
)
from .methods import (
                   ACG,
                   DWA,
                   IMTLG,
                   ACGReleased,
                   CAGrad,
                   EqualWeighting,
                   FixedWeighting,
                   GradientMethod,
                   GradVac,
                   LossWeighting,
                   MTLMethod,
                   PCGrad,
                   UncertaintyWeighting,
                   available_methods,
                   layer_groups,
                   make_mtl_method,
)

__all__ = [
    "make_mtl_method", "available_methods", "layer_groups",
    "MTLMethod", "LossWeighting", "GradientMethod",
    "FixedWeighting", "EqualWeighting", "UncertaintyWeighting", "DWA",
    "PCGrad", "CAGrad", "IMTLG", "GradVac", "ACG", "ACGReleased",
    "gram_from_grads", "pcgrad_coefficients", "gradvac_coefficients", "imtl_g_weights",
    "cagrad_dual", "cagrad_weights", "acg_weights", "task_orders",
    "KEM", "StableKEM", "CrossTaskAttention", "CrossTaskFusion", "CROSS_TASK_KINDS", "simplex_etf", "topk_attention",
]
