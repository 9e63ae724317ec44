"""The tree walk behind :func:`fusedskip.convert` and :func:`fusedskip.unconvert`.

Design (see the package docstring for the user-facing summary):

* **State stays where it was.** A norm followed by an activation is replaced *in its own slot*
  by the fused norm + activation module, which takes over the norm's very Parameter and buffer
  objects (so state_dict keys and values, ``requires_grad`` flags and optimizer references are
  unchanged). The activation's slot gets a :class:`FusedIdentity` (no state). Convolutions stay
  plain ``nn.Conv2d``: fusing them too would need a module holding conv and norm as children,
  which renames keys (``0.weight`` -> ``0.conv.weight``).
* **Only what provably runs in attribute order is fused**: adjacent children of an
  ``nn.Sequential`` whose ``forward``/``__iter__`` are Sequential's own, self-contained norm-act
  modules (timm), and blocks whose ``forward`` source fusedskip has verified (per-library rules,
  :mod:`.libraries`), whose class is then swapped for a subclass with the fused forward.
* **Exact types only**; a module with hooks, parametrizations, an instance-level ``forward``, or
  held in more than one slot is left alone, as is anything whose fused module is unavailable or
  refuses the configuration. Every norm layer left is listed with the reason.
* **Reversible**: each fused norm keeps a tensor-less copy of the module it replaced (its
  "shell", an unregistered attribute: invisible to state_dict, ``.to()`` and ``named_modules``);
  each FusedIdentity keeps the activation module. :func:`unconvert` puts them back around the
  current tensors.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
import importlib
import inspect
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..activations import resolve_activation
from .interop import fx_leaf_call
from .report import ConversionReport, Left, Replaced

NORM_FAMILIES = ("batch", "group", "instance")
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "relu6", "hardswish", "hardsigmoid", "sigmoid",
               "mish", "elu", "prelu")
_SHELL = "_fusedskip_original"          # attribute on fused modules / FusedIdentity
_RESTORES_TO = "_fusedskip_restores_to"  # class attribute of swapped block classes
_IRREVERSIBLE = "_fusedskip_irreversible"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_DROPOUTS = (nn.Dropout, nn.Dropout2d)
# Positively homogeneous activations: act(s·x) = s·act(x) for s >= 0, so they commute with
# (inverted) dropout, which multiplies each element by 0 or 1/(1-p).
_COMMUTE_WITH_DROPOUT = ("identity", "relu", "leaky_relu")


class _Refuse(Exception):
    """A candidate that must be left as it is; the message is the reason."""


class FusedIdentity(nn.Identity):
    """Stands in an activation's slot after the activation was fused into the module ``into``
    (a sibling attribute/child name). No state; it keeps the original activation module (not
    registered, so not in ``named_modules``) for :func:`fusedskip.unconvert`."""

    def __init__(self, original: Optional[nn.Module] = None, into: str = ""):
        super().__init__()
        object.__setattr__(self, _SHELL, original)
        self.into = into

    @property
    def original(self) -> Optional[nn.Module]:
        return self.__dict__.get(_SHELL)

    def forward(self, x):
        traced = fx_leaf_call(self, x)  # torch.fx: keep the slot as a node (feature extractors name it)
        return x if traced is None else traced

    def extra_repr(self) -> str:
        return f"{self.original!r} runs fused in {self.into!r}"


class FusedPReLUSlot(FusedIdentity):
    """A :class:`FusedIdentity` for an ``nn.PReLU`` whose slope moved into the fused norm: it keeps
    the very ``weight`` Parameter (same state_dict key ``<slot>.weight``, same object for
    optimizers); the fused module reads the slope from here (``borrow_act_weight``)."""

    def __init__(self, original: nn.PReLU, into: str = ""):
        super().__init__(original, into)
        self.weight = original.weight


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.lru_cache(maxsize=None)
def source_digest(func) -> Optional[str]:
    """A digest of a function's source with whitespace and full-line comments removed (None
    when the source is unavailable). Used to check that a block's forward is the one a rule
    was written for."""
    try:
        src = inspect.getsource(func)
    except (OSError, TypeError):
        return None
    lines = [line for line in src.splitlines() if not line.strip().startswith("#")]
    return hashlib.sha256("".join("".join(lines).split()).encode()).hexdigest()[:16]


def hooks_of(m: nn.Module) -> List[str]:
    return [name.strip("_") for name in _HOOK_DICTS if getattr(m, name, None)]


def is_pure_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order: Sequential's own forward
    and iteration, and no instance-level forward."""
    t = type(m)
    return (isinstance(m, nn.Sequential) and t.forward is nn.Sequential.forward
            and t.__iter__ is nn.Sequential.__iter__ and "forward" not in m.__dict__)


def first_leaf(m: Optional[nn.Module]) -> Optional[nn.Module]:
    while m is not None and is_pure_sequential(m) and len(m._modules):
        m = next(iter(m._modules.values()))
    return m


def last_leaf(m: Optional[nn.Module]) -> Optional[nn.Module]:
    while m is not None and is_pure_sequential(m) and len(m._modules):
        m = list(m._modules.values())[-1]
    return m


def is_conv2d(m: Optional[nn.Module]) -> bool:
    return isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))


def is_conv(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def is_fusedskip_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("fusedskip.")


def describe(m: Optional[nn.Module]) -> str:
    """A short description: class name, positional settings and the activation settings."""
    if m is None:
        return "nothing"
    try:
        parts = [p.strip() for p in m.extra_repr().split(",") if p.strip()]
    except Exception:  # noqa: BLE001 - a description must never fail
        parts = []
    keep = [p for p in parts if "=" not in p or p == "inplace=True"
            or p.startswith(("act=", "negative_slope=", "approximate=", "p="))]
    text = f"{type(m).__name__}({', '.join(keep)})"
    return text if len(text) <= 80 else text[:77] + "..."


def norm_like(m: nn.Module) -> bool:
    """A normalisation layer, for the report's list of norms left unfused."""
    if is_fusedskip_module(m):
        return False
    known = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        known = known + (nn.RMSNorm,)
    if isinstance(m, known):
        return True
    if any(is_conv(c) or norm_like(c) for c in m.children()):
        return False  # a container (timm ConvNormAct, a conv-norm block), not a norm layer
    name = type(m).__name__
    return name.endswith(("NormAct", "NormAct2d", "ABN", "ABNSync")) or ("Norm" in name and not m._modules)


def _optional_attr(module_name: str, attr: str):
    """``module.attr`` when ``module_name`` is already imported (a model can only hold a
    library's classes if the library was imported), else None."""
    import sys

    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------
def activation_spec(act: nn.Module) -> Tuple[str, float]:
    """``(name, negative_slope)`` of a supported activation module (exact types), else _Refuse."""
    t = type(act)
    if t in (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Mish,
             nn.ELU):
        return resolve_activation(act)
    timm_gelu = _optional_attr("timm.layers.activations", "GELU")
    timm_gelu_tanh = _optional_attr("timm.layers.activations", "GELUTanh")
    if timm_gelu is not None and t is timm_gelu:
        return "gelu", 0.0
    if timm_gelu_tanh is not None and t is timm_gelu_tanh:
        return "gelu_tanh", 0.0
    monai_swish = _optional_attr("monai.networks.blocks.activation", "Swish")
    monai_me_swish = _optional_attr("monai.networks.blocks.activation", "MemoryEfficientSwish")
    if monai_swish is not None and t is monai_swish:
        if float(getattr(act, "alpha", 1.0)) == 1.0:
            return "silu", 0.0
        raise _Refuse(f"MONAI Swish with alpha={act.alpha} (x·sigmoid(αx)) has no fused kernel; only alpha=1 (SiLU)")
    if monai_me_swish is not None and t is monai_me_swish:
        return "silu", 0.0
    if t is nn.PReLU:
        return "prelu", 0.0
    raise _Refuse(f"activation {t.__name__} has no fused kernel (supported: ReLU, LeakyReLU, SiLU, "
                  "GELU, ReLU6, Hardswish, Hardsigmoid, Sigmoid, Mish, ELU, exact types)")


def _check_act_state(act: nn.Module, norm: nn.Module) -> None:
    """Only PReLU's slope (1 or C values) may travel into a fused module; other state refuses."""
    if type(act) is nn.PReLU:
        channels = getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)
        if act.weight.numel() not in (1, channels):
            raise _Refuse(f"PReLU with {act.weight.numel()} slopes for {channels} channels")
        return
    if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
        raise _Refuse(f"activation {type(act).__name__} has state")


def looks_like_activation(m: Optional[nn.Module]) -> bool:
    if m is None or m._modules:
        return False
    mod = type(m).__module__
    return mod == "torch.nn.modules.activation" or mod.startswith(("timm.layers.activations",
                                                                    "monai.networks.blocks.activation"))


# --------------------------------------------------------------------------------------------
# Norms: what each supported type becomes
# --------------------------------------------------------------------------------------------
def _fused_class(module_name: str, class_name: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise _Refuse(f"fused module {class_name} is unavailable ({module_name} is not installed)") from None
        raise
    cls = getattr(module, class_name, None)
    if cls is None:
        raise _Refuse(f"fused module {class_name} is unavailable ({module_name} has no {class_name})")
    return cls


def _check_bias(norm: nn.Module) -> None:
    if getattr(norm, "affine", False) and getattr(norm, "bias", None) is None:
        raise _Refuse("bias-free affine norm (bias=False): the fused modules always carry a bias")


def timm_norm_act_types() -> Dict[type, str]:
    """timm's self-contained norm + act modules fusedskip replaces, by family."""
    out = {}
    for name, family in (("BatchNormAct2d", "batch"), ("GroupNormAct", "group"), ("GroupNorm1Act", "group")):
        cls = _optional_attr("timm.layers.norm_act", name)
        if cls is not None:
            out[cls] = family
    return out


def norm_family(norm: nn.Module) -> Optional[str]:
    """The family of a norm fusedskip can fuse (exact types), else None."""
    t = type(norm)
    if t is nn.BatchNorm2d or t is nn.SyncBatchNorm:
        return "batch"
    if t is nn.GroupNorm:
        return "group"
    if t is nn.InstanceNorm2d:
        return "instance"
    return timm_norm_act_types().get(t)


def type_reason(m: nn.Module) -> str:
    """Why a norm-like module of this type is not fused."""
    t = type(m)
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "parametrized (torch.nn.utils.parametrize): its tensors are computed, not stored"
    if isinstance(m, nn.SyncBatchNorm) and type(m) is not nn.SyncBatchNorm:
        return f"{type(m).__name__} subclasses nn.SyncBatchNorm (timm's SyncBatchNormAct?): left as is"
    for base, name in ((nn.BatchNorm2d, "BatchNorm2d"), (nn.GroupNorm, "GroupNorm"),
                       (nn.InstanceNorm2d, "InstanceNorm2d")):
        if isinstance(m, base) and t is not base:
            return (f"{t.__module__}.{t.__name__} subclasses nn.{name} and may change its maths; "
                    "only exact types are fused")
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm3d)):
        return "not a 2-D norm: the fused kernels take [N, C, H, W]"
    if isinstance(m, nn.LayerNorm):
        return "LayerNorm has no fused kernel (on NCHW it normalises the last dims, not channels)"
    if t.__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
        return "frozen BatchNorm (fixed statistics) has no fused equivalent"
    if "ABN" in t.__name__:
        return "inplace_abn module: its own fused (in-place) implementation, left as is"
    return f"{t.__name__} has no fused equivalent in fusedskip"


def _build_fused(norm: nn.Module, family: str, act: str, slope: float,
                 act_module: Optional[nn.Module] = None) -> nn.Module:
    """Build the fused module for ``norm`` on the meta device and hand it norm's tensors; a PReLU
    (``act_module``) keeps its slope, which the fused module reads from it."""
    neg = slope if act in ("leaky_relu", "elu") else None
    if family == "batch":
        cls = _fused_class("fusedskip.ops.batch_norm_act", "BatchNormAct2d")
        kwargs = dict(num_features=norm.num_features, eps=norm.eps, momentum=norm.momentum,
                      affine=norm.affine, track_running_stats=norm.track_running_stats)
    elif family == "group":
        cls = _fused_class("fusedskip.ops.group_norm_act", "GroupNormAct")
        kwargs = dict(num_groups=norm.num_groups, num_channels=norm.num_channels, eps=norm.eps,
                      affine=norm.affine)
    else:  # instance
        if norm.track_running_stats:
            raise _Refuse("InstanceNorm2d with track_running_stats=True (eval uses running "
                          "statistics): no fused equivalent")
        try:
            cls = _fused_class("fusedskip.ops.group_norm_act", "InstanceNormAct2d")
            kwargs = dict(num_features=norm.num_features, eps=norm.eps, momentum=norm.momentum,
                          affine=norm.affine)
        except _Refuse:  # GroupNorm with one group per channel is InstanceNorm
            cls = _fused_class("fusedskip.ops.group_norm_act", "GroupNormAct")
            kwargs = dict(num_groups=norm.num_features, num_channels=norm.num_features,
                          eps=norm.eps, affine=norm.affine)
    try:
        with torch.device("meta"):
            fused = cls(**kwargs, act=act, negative_slope=neg)
    except (TypeError, ValueError) as exc:
        raise _Refuse(f"{cls.__name__} rejects this configuration: {exc}") from None
    if act == "prelu":
        if act_module is None:
            raise _Refuse("PReLU given without its module: the learned slope has no owner")
        fused.borrow_act_weight(act_module)
    _transplant(norm, fused)
    fused.train(norm.training)
    if type(norm) is nn.SyncBatchNorm:
        if not hasattr(fused, "sync"):
            raise _Refuse(f"{type(fused).__name__} has no synchronised mode (fusedskip.distributed)")
        fused.sync = True
        fused.process_group = norm.process_group
    return fused


def fuse_norm_alone(norm: nn.Module) -> nn.Module:
    """The fused module with the identity activation for one exact torch norm (BatchNorm2d,
    SyncBatchNorm, GroupNorm, InstanceNorm2d), holding ``norm``'s very tensors and a shell of it
    for :func:`fusedskip.unconvert`. ValueError with the reason when there is none. Used by
    :func:`fusedskip.convert_sync_batchnorm` for plain BatchNorm2d layers on the CPU."""
    family = norm_family(norm)
    try:
        if family is None or type(norm) in timm_norm_act_types():
            raise _Refuse(type_reason(norm) if family is None else "a timm norm-act module carries its activation")
        _check_bias(norm)
        fused = _build_fused(norm, family, "identity", 0.0)
    except _Refuse as reason:
        raise ValueError(str(reason)) from None
    object.__setattr__(fused, _SHELL, make_shell(norm))
    return fused


def _state_layout(m: nn.Module):
    params = {k: tuple(v.shape) for k, v in m.named_parameters(recurse=True)}
    buffers = {k: tuple(v.shape) for k, v in m.named_buffers(recurse=True)}
    keys = set(m.state_dict(keep_vars=True).keys())
    return params, buffers, keys


def _transplant(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very Parameter/buffer objects of ``src``; refuse unless both have the
    same state names and shapes (so state_dict keys and values cannot change)."""
    s_params, s_buffers, s_keys = _state_layout(src)
    d_params, d_buffers, d_keys = _state_layout(dst)
    if s_params != d_params or s_buffers != d_buffers or s_keys != d_keys:
        raise _Refuse(f"{type(dst).__name__}'s state ({sorted(d_keys)}) does not match "
                      f"{type(src).__name__}'s ({sorted(s_keys)}): state_dict keys would change")
    if any("." in k for k in d_params) or any("." in k for k in d_buffers):
        raise _Refuse(f"{type(dst).__name__} keeps its state in submodules; cannot hand over tensors")
    for k in d_params:
        dst._parameters[k] = src._parameters[k]
    for k in d_buffers:
        dst._buffers[k] = src._buffers[k]


def make_shell(m: nn.Module) -> nn.Module:
    """A copy of ``m`` without its tensors (parameter/buffer slots set to None), keeping its
    class, configuration and stateless children (timm's act/drop), for unconvert."""
    shell = copy.copy(m)
    shell.__dict__["_parameters"] = {k: None for k in m._parameters}
    shell.__dict__["_buffers"] = {k: None for k in m._buffers}
    shell.__dict__["_modules"] = dict(m._modules)
    shell.__dict__["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
    return shell


def refill_shell(shell: nn.Module, fused: nn.Module) -> nn.Module:
    """Turn a shell back into a working module holding ``fused``'s current tensors."""
    restored = copy.copy(shell)
    restored.__dict__["_parameters"] = {k: fused._parameters.get(k) for k in shell._parameters}
    restored.__dict__["_buffers"] = {k: fused._buffers.get(k) for k in shell._buffers}
    restored.__dict__["_modules"] = dict(shell._modules)
    for attr in ("eps", "momentum"):
        if attr in shell.__dict__ and attr in fused.__dict__:
            restored.__dict__[attr] = fused.__dict__[attr]
    restored.train(fused.training)
    return restored


# --------------------------------------------------------------------------------------------
# The conversion context: options, bookkeeping, the checks every rule shares
# --------------------------------------------------------------------------------------------
class Context:
    def __init__(self, model: nn.Module, report: ConversionReport, norms: Sequence[str],
                 activations: Optional[Sequence[str]], norm_without_act: bool, assume_2d: bool,
                 concat_to_add: bool, exclude: Sequence[str], libraries: bool):
        self.report = report
        self.norms = tuple(norms)
        self.activations = tuple(ACTIVATIONS if activations is None else activations)
        self.norm_without_act = norm_without_act
        self.assume_2d = assume_2d
        self.concat_to_add = concat_to_add
        self.exclude = tuple(exclude)
        self.libraries = libraries
        self.graph = True
        self.slot_refs: Counter = Counter()
        self.paths: Dict[int, str] = {}
        self.parents: Dict[int, Tuple[nn.Module, str]] = {}
        self.created: set = set()
        self.replaced_ids: set = set()
        self.left_norms: Dict[int, Left] = {}
        self.visited: set = set()
        for path, parent in model.named_modules():
            self.paths.setdefault(id(parent), path)
            for name, child in parent._modules.items():
                if child is not None:
                    self.slot_refs[id(child)] += 1
                    self.parents.setdefault(id(child), (parent, name))

    # -- bookkeeping ----------------------------------------------------------------------
    def excluded(self, path: str) -> bool:
        return any(path == pat or path.startswith(pat + ".") or fnmatch.fnmatchcase(path, pat)
                   for pat in self.exclude)

    def leave(self, module: nn.Module, path: str, reason: str, kind: str = "norm") -> None:
        entry = Left(path, type(module).__name__, reason, kind)
        if kind == "norm":
            self.left_norms.setdefault(id(module), entry)
        else:
            self.report.left.append(entry)

    def replace(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = new
        self.created.add(id(new))
        self.replaced_ids.add(id(old))

    def record(self, path: str, rule: str, before: str, after: str, also: Iterable[str] = ()) -> None:
        self.report.replaced.append(Replaced(path, rule, before, after, tuple(also)))

    # -- the checks every rule shares ---------------------------------------------------------
    def check_module(self, m: nn.Module, path: str, role: str) -> None:
        if self.excluded(path):
            raise _Refuse(f"excluded by exclude={list(self.exclude)}")
        hooks = hooks_of(m)
        if hooks:
            raise _Refuse(f"the {role} {path or '<root>'} has hooks registered ({', '.join(hooks)}); "
                          "fusing would bypass or change what they see")
        if "forward" in m.__dict__:
            raise _Refuse(f"the {role} {path or '<root>'} has an instance-level forward")
        if torch.nn.utils.parametrize.is_parametrized(m):
            raise _Refuse(f"the {role} {path or '<root>'} is parametrized")
        if self.slot_refs[id(m)] > 1:
            raise _Refuse(f"the {role} module object {path or '<root>'} is held in "
                          f"{self.slot_refs[id(m)]} places; fusing one use would change the others")

    def plan(self, norm: nn.Module, norm_path: str, act: Optional[nn.Module], act_path: Optional[str],
             rank_known: bool, between: Sequence[Tuple[nn.Module, str]] = (),
             act_spec: Optional[Tuple[str, float]] = None, act_shared_ok: bool = False) -> nn.Module:
        """Validate one norm (+ activation) candidate and return the fused module (not yet
        placed), or raise _Refuse with the reason.

        ``act_spec`` overrides the activation taken from ``act`` (timm modules carry it inside);
        ``act_shared_ok``: the activation module stays where it is (block rules whose forward
        still calls it elsewhere), so it may be held in several places.
        """
        family = norm_family(norm)
        if family is None:
            raise _Refuse(type_reason(norm))
        if family not in self.norms:
            raise _Refuse(f"{family} norms are not selected (norms={list(self.norms)})")
        self.check_module(norm, norm_path, "norm")
        _check_bias(norm)
        if type(norm) in (nn.GroupNorm, nn.SyncBatchNorm) and not rank_known:
            raise _Refuse(f"{type(norm).__name__} accepts any rank and nothing around it shows the input "
                          "is [N, C, H, W] (no adjacent Conv2d); pass assume_2d=True if the model is 2-D")
        name, slope = "identity", 0.0
        if act_spec is not None:
            name, slope = act_spec
        elif act is not None:
            name, slope = activation_spec(act)
            if not act_shared_ok:
                self.check_module(act, act_path, "activation")
            else:
                hooks = hooks_of(act)
                if hooks:
                    raise _Refuse(f"the activation {act_path} has hooks registered ({', '.join(hooks)})")
            _check_act_state(act, norm)
        if name != "identity" and name not in self.activations:
            raise _Refuse(f"activation {name} is not selected (activations={list(self.activations)})")
        for mod, path in between:
            self.check_module(mod, path, "dropout")
            if mod.p > 0 and name not in _COMMUTE_WITH_DROPOUT:
                raise _Refuse(f"{type(mod).__name__}(p={mod.p}) between the norm and {name}: moving "
                              f"{name} before dropout would change the result (it commutes only "
                              "with ReLU/LeakyReLU)")
        return _build_fused(norm, family, name, slope, act)  # PReLU: its slope stays in its slot (install)

    def install(self, parent: nn.Module, norm_name: str, fused: nn.Module, rule: str,
                act_name: Optional[str] = None, extra_also: Iterable[str] = (), act_note: str = "") -> None:
        """Put ``fused`` in the norm's slot (keeping a shell of the norm) and, when given, a
        FusedIdentity in the activation's slot; record the replacement."""
        path = self.paths.get(id(parent), "")
        norm = parent._modules[norm_name]
        object.__setattr__(fused, _SHELL, make_shell(norm))
        object.__setattr__(fused, "_fusedskip_path", join(path, norm_name))  # named in errors/warnings
        self.replace(parent, norm_name, fused)
        also = list(extra_also)
        before = describe(norm) + act_note
        if act_name is not None:
            act = parent._modules[act_name]
            identity = (FusedPReLUSlot if type(act) is nn.PReLU else FusedIdentity)(act, into=norm_name)
            identity.train(act.training)
            self.replace(parent, act_name, identity)
            also.insert(0, f"{join(path, act_name)} -> FusedIdentity")
            before = f"{before} + {describe(act)}"
        self.record(join(path, norm_name), rule, before, describe(fused), also)

    def verify_forward(self, cls: type, known: Dict[str, Iterable[str]]) -> Optional[str]:
        """None when each named method of ``cls`` has a known source digest, else the reason."""
        for method, digests in known.items():
            func = getattr(cls, method, None)
            digest = source_digest(func) if func is not None else None
            if digest is None or digest not in set(digests):
                return (f"{cls.__name__}.{method} is not the version fusedskip verified (source "
                        f"digest {digest}); its call order is unknown, so it is left as is")
        return None


# --------------------------------------------------------------------------------------------
# The generic rules
# --------------------------------------------------------------------------------------------
def scan_sequential(ctx: Context, seq: nn.Module, path: str, pred: Optional[nn.Module]) -> None:
    """Fuse norm -> [dropout ->] act (and conv -> norm) among adjacent children of a Sequential."""
    items = [(n, c) for n, c in seq._modules.items()]
    i = 0
    while i < len(items):
        name, child = items[i]
        if child is None or norm_family(child) is None or type(child) in timm_norm_act_types():
            i += 1
            continue
        child_path = join(path, name)
        j = i + 1
        drops = []
        while j < len(items) and items[j][1] is not None and type(items[j][1]) in _DROPOUTS:
            drops.append((items[j][1], join(path, items[j][0])))
            j += 1
        act_item = items[j] if j < len(items) and looks_like_activation(items[j][1]) else None
        before = pred if i == 0 else last_leaf(items[i - 1][1])
        after_index = (j + 1) if act_item is not None else (i + 1)
        after = first_leaf(items[after_index][1]) if after_index < len(items) else None
        rank_known = is_conv2d(before) or is_conv2d(after) or ctx.assume_2d
        conv_before = is_conv(before)
        try:
            if act_item is not None:
                fused = ctx.plan(child, child_path, act_item[1], join(path, act_item[0]), rank_known, drops)
                rule = "sequential:conv-norm-act" if conv_before else "sequential:norm-act"
                ctx.install(seq, name, fused, rule, act_name=act_item[0])
                i = j + 1
                continue
            if not (conv_before and ctx.norm_without_act):
                nxt = items[i + 1][1] if i + 1 < len(items) else None
                raise _Refuse(f"no activation follows it (next: {describe(nxt)}); nothing to fuse"
                              + ("" if conv_before else " and no conv precedes it"))
            fused = ctx.plan(child, child_path, None, None, rank_known)
            ctx.install(seq, name, fused, "sequential:conv-norm")
        except _Refuse as reason:
            ctx.leave(child, child_path, str(reason))
        i += 1


def replace_timm_children(ctx: Context, parent: nn.Module, path: str, pred: Optional[nn.Module]) -> None:
    """timm's BatchNormAct2d / GroupNormAct / GroupNorm1Act: self-contained norm -> drop -> act
    modules, replaced whole by the fused module (same state names: they subclass the torch norm)."""
    types = timm_norm_act_types()
    if not types:
        return
    conv_norm_act = _optional_attr("timm.layers.conv_bn_act", "ConvNormAct")
    items = list(parent._modules.items())
    for idx, (name, child) in enumerate(items):
        if child is None or type(child) not in types:
            continue
        child_path = join(path, name)
        try:
            if type(child).__name__.startswith("GroupNorm") and getattr(child, "_fast_norm", False):
                raise _Refuse("timm fast_norm is enabled for this GroupNormAct (low-precision "
                              "statistics under autocast); the fused op computes fp32 statistics")
            drop = child._modules.get("drop")
            if drop is not None and type(drop) is not nn.Identity:
                raise _Refuse(f"drop layer {type(drop).__name__} inside the norm-act module")
            act = child._modules.get("act")
            for sub, role in ((act, "activation"), (drop, "drop layer")):
                if sub is not None and hooks_of(sub):
                    raise _Refuse(f"the {role} inside has hooks registered")
            spec = ("identity", 0.0) if act is None or type(act) is nn.Identity else activation_spec(act)
            if is_pure_sequential(parent):
                before = pred if idx == 0 else last_leaf(items[idx - 1][1])
            elif conv_norm_act is not None and type(parent) is conv_norm_act and name == "bn":
                before = parent._modules.get("conv")
            else:
                before = None
            rank_known = type(child).__name__ == "BatchNormAct2d" or is_conv2d(before) or ctx.assume_2d
            fused = ctx.plan(child, child_path, None, None, rank_known, act_spec=spec)
            ctx.install(parent, name, fused, "timm:norm-act")
        except _Refuse as reason:
            ctx.leave(child, child_path, str(reason))


def _default_reason(ctx: Context, m: nn.Module) -> str:
    if norm_family(m) is None:
        return type_reason(m)
    parent, _ = ctx.parents.get(id(m), (None, None))
    if parent is None:
        return "the model is a lone norm with no activation to fuse"
    if hasattr(type(parent), _RESTORES_TO):
        return f"inside {type(parent).__name__}, a block fusedskip converted already; not fusable itself"
    return (f"its parent {type(parent).__name__} is not an nn.Sequential and fusedskip has no rule "
            "for it: the parent's forward, not the attribute order, decides what runs after the norm")


def visit(ctx: Context, module: nn.Module, path: str, pred: Optional[nn.Module], rules: Dict[type, Callable]) -> None:
    if id(module) in ctx.visited or id(module) in ctx.created:
        return
    ctx.visited.add(id(module))
    if path and ctx.excluded(path):
        return
    if is_fusedskip_module(module) and not module._modules:
        return
    rule = rules.get(type(module))
    if rule is not None:
        rule(ctx, module, path, pred)
    elif is_pure_sequential(module):
        scan_sequential(ctx, module, path, pred)
    elif ctx.graph and not is_fusedskip_module(module) and not hasattr(type(module), _RESTORES_TO):
        from .graph import graph_rule
        graph_rule(ctx, module, path, pred)
    replace_timm_children(ctx, module, path, pred)
    items = list(module._modules.items())
    sequential = is_pure_sequential(module)
    for idx, (name, child) in enumerate(items):
        if child is None:
            continue
        child_pred = None
        if sequential:
            child_pred = pred if idx == 0 else last_leaf(items[idx - 1][1])
        visit(ctx, child, join(path, name), child_pred, rules)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
class _Root(nn.Module):
    """Holds the model in a slot so a rule may replace the root itself (a lone timm norm-act)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules[""] = model


def convert_model(model: nn.Module, *, norms: Sequence[str] = NORM_FAMILIES,
                  activations: Optional[Sequence[str]] = None, norm_without_act: bool = True,
                  assume_2d: bool = False, concat_to_add: bool = False, exclude: Sequence[str] = (),
                  libraries: bool = True, inplace: bool = True,
                  graph: bool = True) -> Tuple[nn.Module, ConversionReport]:
    from . import libraries as lib

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    norms = (norms,) if isinstance(norms, str) else tuple(norms)
    bad = [n for n in norms if n not in NORM_FAMILIES]
    if bad:
        raise ValueError(f"norms must be drawn from {NORM_FAMILIES}, got {bad}")
    if activations is not None:
        activations = (activations,) if isinstance(activations, str) else tuple(activations)
        bad = [a for a in activations if a not in ACTIVATIONS]
        if bad:
            raise ValueError(f"activations must be drawn from {ACTIVATIONS}, got {bad}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport("convert")
    report.already_fused = [p for p, m in model.named_modules() if is_fusedskip_module(m)]
    norms_before = [(p, m) for p, m in model.named_modules() if norm_like(m)]
    root = _Root(model)
    ctx = Context(root, report, norms, activations, norm_without_act, assume_2d, concat_to_add, exclude, libraries)
    ctx.paths[id(model)] = ""
    ctx.graph = graph
    rules = lib.block_rules(ctx) if libraries else {}
    visit(ctx, model, "", None, rules)
    # the root's own slot: a lone timm norm-act module
    replace_timm_children(ctx, root, "", None)
    model = root._modules[""]
    for path, m in norms_before:
        if id(m) in ctx.replaced_ids:
            continue
        if ctx.excluded(path):
            entry = Left(path, type(m).__name__, f"excluded by exclude={list(exclude)}")
        else:
            entry = ctx.left_norms.get(id(m)) or Left(path, type(m).__name__, _default_reason(ctx, m))
        report.left.append(entry)
    report.left.sort(key=lambda e: (e.kind != "norm", _order(norms_before, e.path)))
    report.norms_total = len(norms_before)
    report.norms_fused = sum(1 for _, m in norms_before if id(m) in ctx.replaced_ids)
    if report.replaced:
        from .ecosystem import register_quantization_fusers
        register_quantization_fusers()
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        report.notes.append("global module hooks are registered: they will see the fused modules "
                            "(and no call for fused-away activations)")
    if any(r.rule.startswith(("sequential", "timm", "torchvision", "smp", "diffusers")) for r in report.replaced):
        report.notes.append("state_dict keys and values are unchanged: checkpoints load into the original "
                            "and the converted model alike (fusedskip.unconvert restores plain modules)")
    if any(r.rule == "monai:upcat-concat-to-add" for r in report.replaced):
        report.notes.append("concat_to_add changed the architecture (new gate parameters, conv weights of "
                            "half the input channels, re-initialised): train before use; checkpoints of the "
                            "concatenative model no longer load, and unconvert cannot undo it")
    if type(model).__name__ in ("OptimizedModule", "DistributedDataParallel", "FullyShardedDataParallel",
                                "DataParallel"):
        report.notes.append(f"the model is wrapped ({type(model).__name__}): convert the plain module before "
                            "compiling or wrapping it, and wrap again")
    if report.replaced:
        report.notes.append("code that finds norms by type (isinstance(m, nn.BatchNorm2d): freezing BN, "
                            "weight-decay groups) no longer sees fused ones: use fusedskip.conversion's "
                            "NORM_TYPES / BATCH_NORM_TYPES, split_normalization_params, freeze_batch_norm")
        report.notes.append("forward hooks on a fused norm see the post-activation output; unconvert "
                            "(or exclude=[path]) the modules whose hooks need the norm's own output")
    if any(r.before.startswith("SyncBatchNorm") for r in report.replaced):
        report.notes.append("SyncBatchNorm layers became BatchNormAct2d with sync=True (same process group): "
                            "statistics stay synchronised across ranks")
    if any(type(m).__name__ == "BatchNormAct2d" and not getattr(m, "sync", False) for m in model.modules()):
        report.notes.append("for distributed training with synchronised BatchNorm call "
                            "fusedskip.convert_sync_batchnorm(model) (torch's, timm's and Lightning's "
                            "converters leave the fused modules computing local statistics; they warn "
                            "once when they train so in a process group of world size > 1)")
    return model, report


def _order(pairs, path):
    for i, (p, _) in enumerate(pairs):
        if p == path:
            return i
    return len(pairs)


def _plain_from_fused(fused: nn.Module) -> Optional[nn.Module]:
    """A plain torch norm from a fused module that has no shell (e.g. rebuilt by another tool)."""
    name = type(fused).__name__
    if name == "BatchNormAct2d" and getattr(fused, "sync", False):
        cls = nn.SyncBatchNorm
        kwargs = dict(num_features=fused.num_features, eps=fused.eps, momentum=fused.momentum,
                      affine=fused.affine, track_running_stats=fused.track_running_stats,
                      process_group=getattr(fused, "process_group", None))
    elif name == "BatchNormAct2d":
        cls = nn.BatchNorm2d
        kwargs = dict(num_features=fused.num_features, eps=fused.eps, momentum=fused.momentum,
                      affine=fused.affine, track_running_stats=fused.track_running_stats)
    elif name == "InstanceNormAct2d":
        cls = nn.InstanceNorm2d
        kwargs = dict(num_features=fused.num_features, eps=fused.eps, affine=fused.affine)
    elif name == "GroupNormAct":
        cls = nn.GroupNorm
        kwargs = dict(num_groups=fused.num_groups, num_channels=fused.num_channels, eps=fused.eps,
                      affine=fused.affine)
    else:
        return None
    with torch.device("meta"):
        plain = cls(**kwargs)
    try:
        _transplant(fused, plain)
    except _Refuse:
        return None
    plain.train(fused.training)
    return plain


def unconvert_model(model: nn.Module, *, inplace: bool = True) -> Tuple[nn.Module, ConversionReport]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport("unconvert")
    root = _Root(model)
    seen: set = set()
    # Slots whose activation went into a sibling: (id(parent), sibling name).
    partners = {(id(parent), child.into) for parent in root.modules()
                for child in parent._modules.values() if isinstance(child, FusedIdentity)}
    for ppath, parent in list(root.named_modules()):
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        in_swapped = hasattr(type(parent), _RESTORES_TO)
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = join(ppath, name) if parent is not root else ""
            if isinstance(child, FusedIdentity):
                original = child.original if child.original is not None else nn.Identity()
                parent._modules[name] = original
                report.replaced.append(Replaced(path, "unconvert:activation", "FusedIdentity", describe(original)))
                continue
            if not is_fusedskip_module(child) or child._modules or hasattr(type(child), _RESTORES_TO):
                continue
            if not hasattr(child, "num_features") and not hasattr(child, "num_channels"):
                continue  # not a fused norm (e.g. GatedSkip)
            shell = child.__dict__.get(_SHELL)
            if shell is not None and type(shell) in (nn.BatchNorm2d, nn.SyncBatchNorm) and \
                    (type(shell) is nn.SyncBatchNorm) != bool(getattr(child, "sync", False)):
                shell = None  # synchronised (or reverted) since: rebuild as (Sync)BatchNorm from the module
            if shell is not None:
                restored = refill_shell(shell, child)
            else:
                act = getattr(child, "act_name", None) or getattr(child, "act", "identity")
                ok = act in ("identity", None) or (id(parent), name) in partners or in_swapped
                restored = _plain_from_fused(child) if ok else None
                if restored is None:
                    report.left.append(Left(path, type(child).__name__,
                                            "a fused module not created by fusedskip.convert (no record of "
                                            "the original); a plain norm + activation would need a new "
                                            "slot, changing state_dict keys", "fused"))
                    continue
            parent._modules[name] = restored
            report.replaced.append(Replaced(path, "unconvert:norm", describe(child), describe(restored)))
        target = getattr(type(parent), _RESTORES_TO, None)
        if getattr(type(parent), _IRREVERSIBLE, False):
            report.left.append(Left(ppath, type(parent).__name__, type(parent)._fusedskip_irreversible_reason, "fused"))
        elif target is not None:
            name = type(parent).__name__
            for attr in list(parent.__dict__):
                if attr.startswith("_fusedskip_"):
                    del parent.__dict__[attr]
            parent.__class__ = target
            report.replaced.append(Replaced(ppath, "unconvert:block", name, target.__name__))
    return root._modules[""], report
