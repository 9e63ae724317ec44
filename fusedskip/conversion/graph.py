"""Graph-level matching: norm -> activation chains found in a block's traced ``forward``.

For a module that is neither a plain ``nn.Sequential`` nor covered by a per-library rule but
holds norm layers as direct children, its ``forward`` is traced with torch.fx, every submodule a
leaf (one level: the children's own forwards are not entered). A norm whose only consumer is an
activation (``self.relu(...)``, ``F.relu(...)``, ``torch.relu``, ``x.relu()``, through
``nn.Identity`` and dropout as the Sequential rule allows) is fused:

* the activation is a child module called once, held in one slot: its slot gets a
  :class:`~fusedskip.conversion.FusedIdentity`, the forward is untouched;
* otherwise (a shared ``self.relu`` called twice, a functional activation) the block's class is
  swapped for a subclass whose ``forward`` is the traced graph with the activation call removed
  (the fused norm applies it). The subclass pickles and unconvert restores the original class.

Safety (each failure is a report line with the reason): the forward is traced in training and
in eval mode and both graphs must be the same (no branch on ``self.training``); no optional or
variadic parameters (tracing would fix one branch of ``x is None`` tests); no instance-level
forward; a rewritten forward must not use constructs a graph drops (checkpointing, autocast,
grad modes, isinstance, scripting/compile checks, prints, warnings); each norm is called once;
exact types and every check of the other rules (hooks, shared modules, dropout) apply. Norms
whose output goes to a residual add are reported as waiting for the ``act(norm(x) + residual)``
kernel. Graph capture cannot follow data-dependent control flow: such blocks keep per-library
rules (:mod:`.libraries`) or stay as they are.
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from .core import (
    _DROPOUTS,
    _RESTORES_TO,
    Context,
    _Refuse,
    activation_spec,
    is_conv,
    join,
    last_leaf,
    looks_like_activation,
    norm_family,
    timm_norm_act_types,
)

_RISKY_SOURCE = ("checkpoint", "autocast", "no_grad", "enable_grad", "inference_mode", "set_grad_enabled",
                 "isinstance", "is_scripting", "is_tracing", "is_compiling", "print(", "warn", "torch.jit",
                 "register_", "random", "np.")
RESIDUAL_REASON = ("its output goes to a residual add (act(norm(x) + residual)): fusing it needs the "
                   "residual norm-act kernel, which is not built yet (it waits for the kernel redesign)")


def _functional_activation(node: fx.Node) -> Optional[Tuple[str, float]]:
    """``(name, slope)`` of an activation called as a function or Tensor method, else None."""
    if node.op == "call_function":
        t = node.target
        if t in (F.relu, torch.relu, torch.relu_, F.relu_):
            return "relu", 0.0
        if t in (F.silu,):
            return "silu", 0.0
        if t in (F.leaky_relu, F.leaky_relu_):
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        simple = {F.relu6: "relu6", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", F.mish: "mish"}
        if t in simple and len(node.args) == 1:
            return simple[t], 0.0
        if t is F.elu:
            alpha = node.args[1] if len(node.args) > 1 else node.kwargs.get("alpha", 1.0)
            return ("elu", float(alpha)) if isinstance(alpha, (int, float)) else None
        if t is F.gelu:
            approx = node.kwargs.get("approximate", "none")
            return ("gelu_tanh" if approx == "tanh" else "gelu", 0.0) if approx in ("none", "tanh") else None
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid") and len(node.args) == 1:
        return ("sigmoid" if node.target == "sigmoid" else "relu"), 0.0
    return None


class _OneLevelTracer(fx.Tracer):
    """Every submodule is a leaf: only the traced module's own forward is entered."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(block: nn.Module) -> fx.Graph:
    flags = [(m, m.training) for m in block.modules()]
    try:
        graphs = []
        for mode in (True, False):
            block.train(mode)
            graphs.append(_OneLevelTracer().trace(block))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not capturable
        raise _Refuse(f"its parent {type(block).__name__}'s forward cannot be traced by torch.fx "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                      "no per-library rule covers it") from None
    finally:
        for m, mode in flags:
            m.training = mode
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise _Refuse(f"its parent {type(block).__name__}'s forward differs between training and eval "
                      "(it branches on the training flag); the call order is not fixed")
    return graphs[0]


def _signature_ok(block: nn.Module) -> Optional[str]:
    if "forward" in block.__dict__:
        return "has an instance-level forward"
    try:
        params = list(inspect.signature(type(block).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "has a forward without a signature"
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"has a variadic forward parameter ({p.name}): tracing would fix one call pattern"
        if p.default is not p.empty:
            return f"has an optional forward parameter ({p.name}={p.default!r}): tracing would fix one branch"
    return None


def _module(block: nn.Module, target: str) -> Optional[nn.Module]:
    try:
        return block.get_submodule(target)
    except AttributeError:
        return None


class _Match:
    def __init__(self, norm_name: str, node: fx.Node):
        self.norm_name, self.node = norm_name, node
        self.act_node: Optional[fx.Node] = None
        self.spec: Optional[Tuple[str, float]] = None
        self.act_module: Optional[nn.Module] = None
        self.act_target: Optional[str] = None
        self.between: List[Tuple[nn.Module, str]] = []
        self.rank_known = False


def _follow(block: nn.Module, path: str, m: _Match, calls: Dict[str, int]) -> None:
    """Find what consumes the norm's output: an activation (through Identity/dropout), a residual
    add, or something else (raises _Refuse with the reason)."""
    node = m.node
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise _Refuse(f"its output has {len(users)} consumers in {type(block).__name__}.forward; "
                          "fusing an activation would change what the others see")
        user = users[0]
        if user.op == "call_module":
            mod = _module(block, user.target)
            if type(mod) is nn.Identity or type(mod) in _DROPOUTS:
                if calls[user.target] > 1 and type(mod) is not nn.Identity:
                    raise _Refuse(f"{type(mod).__name__} {user.target} after it is called more than once")
                if type(mod) in _DROPOUTS:
                    m.between.append((mod, join(path, user.target)))
                node = user
                continue
            if looks_like_activation(mod):
                m.act_node, m.act_module, m.act_target = user, mod, user.target
                m.spec = activation_spec(mod)
                return
            raise _Refuse(f"followed by {type(mod).__name__} ({user.target}), not an activation: nothing to fuse")
        spec = _functional_activation(user)
        if spec is not None and user.args and user.args[0] is node:
            m.act_node, m.spec = user, spec
            return
        if user.op == "call_function" and user.target in (operator.add, operator.iadd, torch.add):
            raise _Refuse(RESIDUAL_REASON)
        if user.op == "call_method" and user.target in ("add", "add_"):
            raise _Refuse(RESIDUAL_REASON)
        what = user.target if user.op != "output" else "the block's output"
        raise _Refuse(f"followed by {getattr(what, '__name__', what)}, not an activation: nothing to fuse")


def _used_elsewhere(block: nn.Module, attr: str) -> Optional[str]:
    """The first method of ``block``'s classes other than ``forward``/``__init__`` that reads
    ``self.<attr>`` (e.g. an ``extract_features`` that calls the same norm or activation): fusing
    would silently change that method, so such chains are left."""
    pattern = re.compile(rf"self\.{re.escape(attr)}\b")
    for cls in type(block).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch."):
            continue
        for name, fn in vars(cls).items():
            if name in ("forward", "__init__") or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if pattern.search(source):
                return f"{cls.__name__}.{name}"
    return None


def _rank_known(block: nn.Module, node: fx.Node, ctx: Context) -> bool:
    src = node.args[0] if node.args else None
    if ctx.assume_2d or (isinstance(src, fx.Node) and src.op == "call_module"
                         and isinstance(last_leaf(_module(block, src.target)), (nn.Conv2d, nn.ConvTranspose2d))):
        return True
    return type(_module(block, node.target)) in (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d)


def graph_rule(ctx: Context, block: nn.Module, path: str, pred=None) -> None:
    """Fuse the norm -> activation chains of ``block``'s traced forward (see the module docs)."""
    timm_types = timm_norm_act_types()
    norms = {n: c for n, c in block._modules.items()
             if c is not None and norm_family(c) is not None and type(c) not in timm_types}
    if not norms:
        return

    def leave_all(reason: str) -> None:
        for n, c in norms.items():
            ctx.leave(c, join(path, n), reason)

    bad = _signature_ok(block)
    if bad:
        return leave_all(f"its parent {type(block).__name__} {bad}; no per-library rule covers it")
    try:
        graph = _trace(block)
    except _Refuse as reason:
        return leave_all(str(reason))
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    plans, rewrite = [], False
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in norms:
            continue
        name, norm = node.target, norms[node.target]
        try:
            if calls[name] > 1:
                raise _Refuse(f"called {calls[name]} times in {type(block).__name__}.forward")
            m = _Match(name, node)
            m.rank_known = _rank_known(block, node, ctx)
            try:
                _follow(block, path, m, calls)
            except _Refuse:
                src = node.args[0] if node.args else None
                conv_before = (isinstance(src, fx.Node) and src.op == "call_module"
                               and is_conv(last_leaf(_module(block, src.target))))
                users = list(node.users)
                if not (conv_before and ctx.norm_without_act and len(users) == 1 and users[0].op == "call_module"
                        and is_conv(_module(block, users[0].target))):
                    raise
                m.spec = ("identity", 0.0)  # conv -> norm -> conv: fuse the norm alone
            for attr in (name, m.act_target):
                other = _used_elsewhere(block, attr) if attr else None
                if other:
                    raise _Refuse(f"self.{attr} is also used by {other}, which fusing would change")
            own_slot = (m.act_module is not None and "." not in m.act_target and calls[m.act_target] == 1
                        and ctx.slot_refs[id(m.act_module)] == 1)
            if m.act_node is not None and not own_slot:
                rewrite = True
            act_path = join(path, m.act_target) if m.act_target else None
            fused = ctx.plan(norm, join(path, name), m.act_module if own_slot else None, act_path if own_slot else None,
                             m.rank_known, m.between, act_spec=None if own_slot else m.spec,
                             act_shared_ok=not own_slot)
            plans.append((m, fused, own_slot))
        except _Refuse as reason:
            ctx.leave(norm, join(path, name), str(reason))
    if not plans:
        return
    new_cls = None
    if rewrite:
        try:
            new_cls = _rewritten_class(type(block), graph, [m for m, _, own in plans if m.act_node is not None
                                                            and not own])
        except _Refuse as reason:
            for m, _, own in plans:
                if own or m.act_node is None:
                    continue
                ctx.leave(norms[m.norm_name], join(path, m.norm_name), str(reason))
            plans = [p for p in plans if p[2] or p[0].act_node is None]
    original = type(block).__name__
    for m, fused, own in plans:
        rule = "graph:norm-act" if m.act_node is not None else "graph:conv-norm"
        if own:
            ctx.install(block, m.norm_name, fused, rule, act_name=m.act_target)
        elif m.act_node is not None:
            what = m.act_target and f"self.{m.act_target}" or str(getattr(m.act_node.target, "__name__",
                                                                          m.act_node.target))
            ctx.install(block, m.norm_name, fused, rule, act_note=f" + {m.spec[0]} ({what}; call removed from the "
                        "traced forward)", extra_also=[f"{path or '<root>'}: class {original} -> traced forward"])
        else:
            ctx.install(block, m.norm_name, fused, rule)
    if new_cls is not None and any(not own and m.act_node is not None for m, _, own in plans):
        block.__class__ = new_cls


def _rewritten_class(cls: type, graph: fx.Graph, matches: List[_Match]) -> type:
    if getattr(cls, _RESTORES_TO, None) is not None:
        raise _Refuse(f"{cls.__name__} was already swapped by fusedskip")
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        raise _Refuse(f"{cls.__name__}.forward has no source to check; its forward is kept") from None
    risky = [w for w in _RISKY_SOURCE if w in src]
    if risky:
        raise _Refuse(f"{cls.__name__}.forward uses {', '.join(risky)}, which a traced graph would drop or fix; "
                      "its forward is kept, so the shared or functional activation cannot be removed")
    for m in matches:
        m.act_node.replace_all_uses_with(m.act_node.args[0])
        graph.erase_node(m.act_node)
    graph.lint()
    code = graph.python_code("self")
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    source = _format_import_block(code.globals, sys_importer) + "\n" + code.src
    return _graph_class(cls, source)


@functools.lru_cache(maxsize=None)
def _graph_class(base: type, source: str) -> type:
    """The subclass of ``base`` whose forward is ``source`` (generated by torch.fx)."""
    namespace: dict = {}
    exec(compile(source, f"<fusedskip traced {base.__qualname__}.forward>", "exec"), namespace)  # noqa: S102
    return type(base.__name__, (base,), {
        "forward": namespace["forward"], _RESTORES_TO: base, "_fusedskip_graph_source": source,
        "__module__": base.__module__, "__qualname__": base.__qualname__, "__reduce_ex__": _reduce_ex,
        "__doc__": f"{base.__name__} with fused norm + activation (forward traced by fusedskip.convert)"})


def _reduce_ex(self, protocol):
    """Pickle as the library class plus the traced forward's source (the class is generated)."""
    rv = list(object.__reduce_ex__(self, max(protocol, 2)))
    rv[0], rv[1] = _rebuild, (type(self)._fusedskip_restores_to, type(self)._fusedskip_graph_source)
    return tuple(rv)


def _rebuild(base: type, source: str):
    return object.__new__(_graph_class(base, source))
