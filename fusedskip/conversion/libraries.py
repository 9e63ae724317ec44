"""Per-library block rules: blocks whose forward calls norms and activations by attribute.

Each rule applies to one exact class and first checks that the class's forward is the source
fusedskip was written against (a digest of the source text, see ``core.source_digest``); a
different version is left as it is, with that reason in the report. Rules are only built for
libraries already imported (a model cannot hold a library's classes otherwise), so fusedskip
never imports torchvision, smp, MONAI or diffusers itself.

What each library gets (the concatenative skips are reported, never changed implicitly):

=====================  ===================================================================
torchvision ResNet     stem bn1 + relu (FusedIdentity in ``relu``); BasicBlock bn1 + relu,
(and smp's encoder)    Bottleneck bn1/bn2 + relu (class swapped: ``relu`` is called twice);
                       bn2/bn3 + residual add + relu in one op (``residual=``); downsample
                       ``Sequential(conv, bn)`` by the generic rule (conv-norm).
smp Unet               decoder ``Conv2dReLU`` (a Sequential) by the generic rule;
                       ``UnetDecoderBlock``: concat ``[up, skip]`` reported.
smp EfficientNet       ``MBConvBlock`` _bn0/_bn1 + Swish (class swapped: ``_swish`` is shared);
(native encoder)       _bn2 with the residual add (or alone where the block has no skip);
                       ``EfficientNetEncoder`` stem _bn0 (+ head _bn1 of extract_features).
smp DeepLabV3(+)       ``ASPPPooling`` (pool -> conv -> BN -> ReLU) by the graph matcher.
MONAI                  ``Convolution``/``ADN`` are Sequentials: the generic rule (incl. N -> D -> A
                       with dropout); ``UpCat`` concat ``[skip, up]`` reported, or replaced by a
                       gated additive skip with ``concat_to_add=True``; ``SkipConnection(cat)``
                       reported.
diffusers              ``ResnetBlock2D`` norm1 + norm2 with SiLU (class swapped); for
                       ``time_embedding_norm="scale_shift"`` norm2 takes scale/shift too;
                       ``UNet2DModel`` conv_norm_out + conv_act; up
                       blocks' concat ``[hidden, skip]`` reported; attention group_norm and
                       Transformer2DModel's input norm stay (no activation follows, see GN_ALONE).
timm                   BatchNormAct2d / GroupNormAct / GroupNorm1Act (generic, core).
=====================  ===================================================================
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Dict, Optional, Sequence

from torch import nn

from .core import Context, _Refuse, describe, join

# Source digests of the forwards each rule was written against (installed versions: torchvision
# 0.29, segmentation-models-pytorch 0.6.0, diffusers 0.42.1, MONAI 1.6.1).
KNOWN = {
    "torchvision.BasicBlock": {"forward": {"72d57681375eb6a6"}},
    "torchvision.Bottleneck": {"forward": {"8f62269c180d5440"}},
    "torchvision.ResNet": {"forward": {"e121ec56fd382554"}, "_forward_impl": {"16ebf135d7b9e93f"}},
    "smp.ResNetEncoder": {"forward": {"2bb1b04c9bc311de"}},
    "smp.MBConvBlock": {"forward": {"4e55712e8646defb"}},
    "smp.EfficientNetEncoder": {"forward": {"509f650c21b50a21"}, "extract_features": {"3abe4c1e17df7f8f"}},
    "diffusers.ResnetBlock2D": {"forward": {"29921b9248daadf1"}},
    "diffusers.UNet2DModel": {"forward": {"25f9a02e5ce52f05"}},
    "monai.UpCat": {"forward": {"6c69fe7e528dc736"}},
}

RESIDUAL_NOTE = " + the residual add after it (residual=)"
GN_ALONE = ("Fusing it alone (act='identity') would be exact but saves nothing: with no activation to absorb, "
            "fused and torch's GroupNorm move the same bytes (benchmarks/results/accounting: 2.06 vs 2.05 "
            "passes forward), so it stays torch's GroupNorm")
NOT_ADDITIVE = ("fusedskip never turns concatenation into addition implicitly (that changes the "
                "architecture); ")


def _loaded(module_name: str):
    return sys.modules.get(module_name)


# --------------------------------------------------------------------------------------------
# Shared rule bodies
# --------------------------------------------------------------------------------------------
def _block_usable(ctx: Context, block: nn.Module, path: str, known: dict, norm_names: Sequence[str]) -> bool:
    """Verify the forward (and no instance forward); otherwise leave the block's norms with the reason."""
    reason = ctx.verify_forward(type(block), known)
    if reason is None and "forward" in block.__dict__:
        reason = f"{type(block).__name__} at {path or '<root>'} has an instance-level forward"
    if reason is None and ctx.excluded(path):
        reason = f"excluded by exclude={list(ctx.exclude)}"
    if reason is None:
        return True
    for name in norm_names:
        norm = block._modules.get(name)
        if norm is not None:
            ctx.leave(norm, join(path, name), reason)
    return False


def attribute_pair(ctx: Context, module: nn.Module, path: str, norm_name: str, act_name: str, rule: str,
                   known: dict) -> None:
    """norm -> act called back to back in a verified forward, the act used nowhere else:
    the norm's slot gets the fused module, the act's slot a FusedIdentity."""
    norm = module._modules.get(norm_name)
    act = module._modules.get(act_name)
    if norm is None:
        return
    if not _block_usable(ctx, module, path, known, [norm_name]):
        return
    try:
        if act is None:
            raise _Refuse(f"{type(module).__name__}.{act_name} is missing")
        fused = ctx.plan(norm, join(path, norm_name), act, join(path, act_name), rank_known=True)
    except _Refuse as reason:
        ctx.leave(norm, join(path, norm_name), str(reason))
        return
    ctx.install(module, norm_name, fused, rule, act_name=act_name)


def swap_block(ctx: Context, block: nn.Module, path: str, known: dict, fuse: Sequence[str], act_name: str,
               fused_cls: type, rule: str, optional: Sequence[str] = (),
               plain: Optional[Dict[str, str]] = None, notes: Optional[Dict[str, str]] = None) -> Optional[list]:
    """Fuse ``fuse`` norms (all or none) and ``optional`` ones (each if possible) with the shared
    activation ``act_name`` and swap the block's class for ``fused_cls``. ``plain``: norms that
    stay, with the reason; ``notes``: what a fused norm absorbs besides the activation (report).
    Returns the names fused, or None when the block was left."""
    plain = plain or {}
    if not _block_usable(ctx, block, path, known, list(fuse) + list(optional) + list(plain)):
        return None
    act = block._modules.get(act_name)
    planned = {}
    try:
        for name in fuse:
            planned[name] = ctx.plan(block._modules[name], join(path, name), act, join(path, act_name),
                                     rank_known=True, act_shared_ok=True)
    except _Refuse as reason:
        for name in list(fuse) + list(optional):
            ctx.leave(block._modules[name], join(path, name),
                      str(reason) if name not in planned else f"block left unfused: {reason}")
        for name, why in plain.items():
            if block._modules.get(name) is not None:
                ctx.leave(block._modules[name], join(path, name), why)
        return None
    for name in optional:
        try:
            planned[name] = ctx.plan(block._modules[name], join(path, name), act, join(path, act_name),
                                     rank_known=True, act_shared_ok=True)
        except _Refuse as reason:
            ctx.leave(block._modules[name], join(path, name), str(reason))
    original = type(block).__name__
    for name, fused in planned.items():
        ctx.install(block, name, fused, rule,
                    act_note=f"{(notes or {}).get(name, '')} + {describe(act)} (self.{act_name}; its call after "
                             f"{name} skipped)",
                    extra_also=[f"{path or '<root>'}: class {original} -> {fused_cls.__name__}"])
    block.__class__ = fused_cls
    for name, reason in plain.items():
        if name in block._modules and block._modules[name] is not None:
            ctx.leave(block._modules[name], join(path, name), reason)
    return list(planned)


def report_concat(ctx: Context, module: nn.Module, path: str, what: str, why_not: str) -> None:
    ctx.leave(module, path, f"concatenative skip {what} kept: {NOT_ADDITIVE}{why_not}", kind="skip")


# --------------------------------------------------------------------------------------------
# torchvision / smp
# --------------------------------------------------------------------------------------------
def _torchvision_rules(rules: Dict[type, Callable]) -> None:
    resnet = _loaded("torchvision.models.resnet")
    if resnet is None:
        return
    from . import _torchvision as tv

    def basic_block(ctx, block, path, pred):
        fused = swap_block(ctx, block, path, KNOWN["torchvision.BasicBlock"], ["bn1"], "relu", tv.FusedBasicBlock,
                           "torchvision:basic-block", optional=["bn2"], notes={"bn2": RESIDUAL_NOTE})
        if fused and "bn2" in fused:
            block._fusedskip_residual = True

    def bottleneck(ctx, block, path, pred):
        fused = swap_block(ctx, block, path, KNOWN["torchvision.Bottleneck"], ["bn1", "bn2"], "relu",
                           tv.FusedBottleneck, "torchvision:bottleneck", optional=["bn3"],
                           notes={"bn3": RESIDUAL_NOTE})
        if fused and "bn3" in fused:
            block._fusedskip_residual = True

    def stem(ctx, model, path, pred):
        attribute_pair(ctx, model, path, "bn1", "relu", "torchvision:resnet-stem", KNOWN["torchvision.ResNet"])

    rules[resnet.BasicBlock] = basic_block
    rules[resnet.Bottleneck] = bottleneck
    rules[resnet.ResNet] = stem


def _smp_rules(rules: Dict[type, Callable]) -> None:
    encoder = _loaded("segmentation_models_pytorch.encoders.resnet")
    if encoder is not None:
        def smp_stem(ctx, model, path, pred):
            attribute_pair(ctx, model, path, "bn1", "relu", "smp:resnet-encoder-stem", KNOWN["smp.ResNetEncoder"])

        rules[encoder.ResNetEncoder] = smp_stem
    efficientnet = _loaded("segmentation_models_pytorch.encoders._efficientnet")
    if efficientnet is not None:
        rules[efficientnet.MBConvBlock] = _smp_mbconv_block
    efficientnet_encoder = _loaded("segmentation_models_pytorch.encoders.efficientnet")
    if efficientnet_encoder is not None:
        rules[efficientnet_encoder.EfficientNetEncoder] = _smp_efficientnet_encoder
    decoder = _loaded("segmentation_models_pytorch.decoders.unet.decoder")
    if decoder is not None:
        def unet_block(ctx, block, path, pred):
            report_concat(ctx, block, path, "cat([up, skip]) -> conv1",
                          "an additive merge is not offered for smp.Unet: the upsampled and encoder "
                          "features have different channel counts (decoder vs encoder widths), so it "
                          "would need new projection weights and retraining; use fusedskip.models.AddUNet "
                          "for an additive U-Net")

        rules[decoder.UnetDecoderBlock] = unet_block


def _smp_mbconv_block(ctx: Context, block: nn.Module, path: str, pred) -> None:
    """_bn0 (expansion) and _bn1 (depthwise) + the shared Swish; _bn2 after the project conv with
    the residual add (identity skip: ``_bn2(x, residual=inputs)`` while drop connect is off), or
    alone (identity activation) in blocks without the skip."""
    from . import _smp

    known = KNOWN["smp.MBConvBlock"]
    residual = bool(getattr(block, "_has_drop_connect", True))
    if not _block_usable(ctx, block, path, known, ["_bn0", "_bn1", "_bn2"]):
        return
    optional = ["_bn0"] if getattr(block, "_has_expansion", False) else []
    fused = swap_block(ctx, block, path, known, ["_bn1"], "_swish", _smp.FusedMBConvBlock, "smp:mbconv-block",
                       optional=optional)
    if fused is None:
        if block._modules.get("_bn2") is not None:
            ctx.leave(block._modules["_bn2"], join(path, "_bn2"), "its block was left unfused (see _bn1)")
        return
    for name in fused:
        setattr(block, f"_fusedskip{name}_act", True)
    norm = block._modules.get("_bn2")
    if norm is None:
        return
    try:
        if not residual and not ctx.norm_without_act:
            raise _Refuse("no activation follows it (project conv -> norm -> block output) and "
                          "norm_without_act=False")
        fused_bn2 = ctx.plan(norm, join(path, "_bn2"), None, None, rank_known=True)
    except _Refuse as reason:
        ctx.leave(norm, join(path, "_bn2"), str(reason))
        return
    ctx.install(block, "_bn2", fused_bn2, "smp:mbconv-norm-residual" if residual else "smp:mbconv-conv-norm",
                act_note=RESIDUAL_NOTE + " when drop connect is off" if residual else "")
    block._fusedskip_bn2_residual = residual


def _smp_efficientnet_encoder(ctx: Context, encoder: nn.Module, path: str, pred) -> None:
    """Stem _bn0 + Swish (forward, extract_features) and head _bn1 + Swish (extract_features)."""
    from . import _smp

    fused = swap_block(ctx, encoder, path, KNOWN["smp.EfficientNetEncoder"], ["_bn0"], "_swish",
                       _smp.FusedEfficientNetEncoder, "smp:efficientnet-encoder", optional=["_bn1"])
    for name in fused or ():
        setattr(encoder, f"_fusedskip{name}_act", True)


# --------------------------------------------------------------------------------------------
# MONAI
# --------------------------------------------------------------------------------------------
def _monai_rules(rules: Dict[type, Callable]) -> None:
    basic = _loaded("monai.networks.nets.basic_unet")
    if basic is not None:
        rules[basic.UpCat] = _upcat
    layers = _loaded("monai.networks.layers.simplelayers")
    if layers is not None:
        def skip_connection(ctx, module, path, pred):
            if getattr(module, "mode", None) == "cat":
                report_concat(ctx, module, path, "cat([x, submodule(x)])",
                              "an additive merge is not offered for MONAI UNet: x and submodule(x) differ "
                              "in channels and the up path's conv is built for their sum, so it would "
                              "need new weights and retraining (MONAI's own SkipConnection(mode='add') "
                              "builds such a model)")

        rules[layers.SkipConnection] = skip_connection


def _upcat(ctx: Context, upcat: nn.Module, path: str, pred) -> None:
    what = "cat([skip, up]) -> TwoConv"
    if not ctx.concat_to_add:
        report_concat(ctx, upcat, path, what, "concat_to_add=True replaces it by a gated additive skip "
                      "(up + softplus(β)·skip, changes the architecture, see the docs)")
        return
    reason = ctx.verify_forward(type(upcat), KNOWN["monai.UpCat"])
    try:
        if reason:
            raise _Refuse(reason)
        if "forward" in upcat.__dict__ or any(getattr(upcat, h) for h in ("_forward_hooks", "_forward_pre_hooks")):
            raise _Refuse("the UpCat has hooks or an instance-level forward")
        try:
            conv_block = upcat.convs.conv_0
            conv = conv_block.conv
        except AttributeError:
            raise _Refuse("unexpected UpCat layout (convs.conv_0.conv missing)") from None
        if type(conv) is not nn.Conv2d:
            raise _Refuse(f"first conv is {type(conv).__name__}, not nn.Conv2d: the gated skip is 2-D only")
        deconv = getattr(upcat.upsample, "deconv", None)
        if not isinstance(deconv, nn.ConvTranspose2d):
            raise _Refuse("only upsample='deconv' is supported (its output channels are known)")
        up_channels = deconv.out_channels
        cat_channels = conv.in_channels - up_channels
        if cat_channels != up_channels:
            raise _Refuse(f"skip ({cat_channels}) and upsampled ({up_channels}) channels differ: an "
                          "additive merge needs equal channel counts")
        if ctx.slot_refs[id(conv)] > 1:
            raise _Refuse("the first conv is shared")
    except _Refuse as exc:
        report_concat(ctx, upcat, path, what, f"concat_to_add was asked for but cannot apply: {exc}")
        return
    from . import _monai

    new_conv = nn.Conv2d(up_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
    new_conv.train(conv.training)
    conv_block._modules["conv"] = new_conv
    ctx.created.add(id(new_conv))
    upcat._modules["skip_gate"] = gate = _monai.make_gate(up_channels, conv.weight)
    gate.train(upcat.training)
    ctx.created.add(id(gate))
    upcat.__class__ = _monai.GatedAddUpCat
    ctx.record(path, "monai:upcat-concat-to-add", f"UpCat {what}({conv.in_channels} ch)",
               f"GatedAddUpCat convs(up + softplus(β)·skip)({up_channels} ch)",
               [f"new parameter {join(path, 'skip_gate.beta')}",
                f"{join(path, 'convs.conv_0.conv.weight')} {tuple(conv.weight.shape)} -> "
                f"{tuple(new_conv.weight.shape)}, re-initialised",
                "not checkpoint compatible; train before use"])


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------
def _diffusers_rules(rules: Dict[type, Callable]) -> None:
    resnet = _loaded("diffusers.models.resnet")
    if resnet is not None:
        def resnet_block(ctx, block, path, pred):
            from . import _diffusers

            temb_norm = getattr(block, "time_embedding_norm", None)
            if temb_norm in ("default", "scale_shift"):
                note = " + the time embedding's scale/shift (scale=, shift=)" if temb_norm == "scale_shift" else ""
                fused = swap_block(ctx, block, path, KNOWN["diffusers.ResnetBlock2D"], ["norm1"], "nonlinearity",
                                   _diffusers.FusedResnetBlock2D, "diffusers:resnet-block", optional=["norm2"],
                                   notes={"norm2": note})
                if fused and "norm2" in fused:
                    block._fusedskip_norm2_act = True
            else:
                for name in ("norm1", "norm2"):
                    if block._modules.get(name) is not None:
                        ctx.leave(block._modules[name], join(path, name),
                                  f"time_embedding_norm={temb_norm!r} is not handled")

        rules[resnet.ResnetBlock2D] = resnet_block
    attention = _loaded("diffusers.models.attention_processor")
    if attention is not None and hasattr(attention, "Attention"):
        def attention_block(ctx, module, path, pred):
            for name in ("group_norm", "spatial_norm", "norm_cross"):
                norm = module._modules.get(name)
                if norm is not None:
                    ctx.leave(norm, join(path, name), "feeds the attention projections; no activation follows. "
                              + GN_ALONE)

        rules[attention.Attention] = attention_block
    transformer = _loaded("diffusers.models.transformers.transformer_2d")
    if transformer is not None:
        def transformer_2d(ctx, module, path, pred):
            norm = module._modules.get("norm")
            if type(norm) is nn.GroupNorm:
                ctx.leave(norm, join(path, "norm"), "Transformer2DModel input GroupNorm -> proj_in feeds the "
                          "attention projections; no activation follows. " + GN_ALONE)

        rules[transformer.Transformer2DModel] = transformer_2d
    unet = _loaded("diffusers.models.unets.unet_2d")
    if unet is not None:
        def unet2d(ctx, model, path, pred):
            attribute_pair(ctx, model, path, "conv_norm_out", "conv_act", "diffusers:unet2d-out",
                           KNOWN["diffusers.UNet2DModel"])

        rules[unet.UNet2DModel] = unet2d
    blocks = _loaded("diffusers.models.unets.unet_2d_blocks")
    if blocks is not None:
        def up_block(ctx, block, path, pred):
            report_concat(ctx, block, path, "cat([hidden, skip]) before each resnet",
                          "an additive merge is not offered for diffusers: each resnet's conv1/shortcut "
                          "take hidden + skip channels, which differ, so it would need new weights and "
                          "retraining")

        for name, cls in vars(blocks).items():
            if (inspect.isclass(cls) and issubclass(cls, nn.Module) and "Up" in name
                    and cls.__module__ == blocks.__name__ and _forward_concatenates(cls)):
                rules.setdefault(cls, up_block)


@functools.lru_cache(maxsize=None)
def _forward_concatenates(cls: type) -> bool:
    try:
        return "torch.cat(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def block_rules(ctx: Context) -> Dict[type, Callable]:
    """Rules for the block classes of every library already imported."""
    rules: Dict[type, Callable] = {}
    _torchvision_rules(rules)
    _smp_rules(rules)
    _monai_rules(rules)
    _diffusers_rules(rules)
    return rules
