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
exact types and every check of the other rules (hooks, shared modules, dropout) apply.

A norm whose only consumer is a plain two-tensor add (``out = norm(x); out += r``, through
``nn.Identity``; no dropout) fuses with it: the forward is rewritten to call
``norm(x, residual=r)`` where the add was (both operands exist there), and the activation that
consumes the sum, if any, moves into the fused module too (``act(norm(x) + r)``). When both
operands of the add are norms (MONAI UnetResBlock's norm2 and norm3), the first takes the add and
the other, after a conv, is fused alone (its output becomes the residual).

Graph capture cannot follow data-dependent control flow: such blocks keep per-library rules
(:mod:`.libraries`) or stay as they are.
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
        self.passthrough: List[fx.Node] = []     # Identity nodes between the norm and the add
        self.add_node: Optional[fx.Node] = None  # act(norm(x) + residual): the add and its other operand
        self.residual: Optional[fx.Node] = None
        self.remove_act = False                  # the rewritten forward drops the activation call
        self.rank_known = False


_ADDS = (operator.add, operator.iadd, torch.add)


def _residual_operand(add: fx.Node, node: fx.Node) -> fx.Node:
    """The other operand of ``node + residual`` (a plain two-tensor add), else _Refuse."""
    if add.kwargs or len(add.args) != 2:
        raise _Refuse("its output goes to an add with extra arguments (alpha/out): not a plain residual add")
    a, b = add.args
    other = b if a is node else a
    if not isinstance(other, fx.Node) or other is node:
        raise _Refuse("its output goes to an add of a constant or of itself: not a residual add")
    return other


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _follow_residual(block: nn.Module, add: fx.Node, node: fx.Node, m: _Match, claimed: Dict[fx.Node, str]) -> None:
    """norm -> add(·, residual) [-> activation]: fused as ``norm(x, residual=r)`` + act."""
    if add in claimed:
        raise _Refuse(f"its output is the residual operand of {claimed[add]}, fused with that add")
    if m.between:
        raise _Refuse("dropout between the norm and the residual add: the add cannot move into the norm")
    m.residual = _residual_operand(add, node)
    m.add_node = add
    users = list(add.users)
    if len(users) == 1:
        user = users[0]
        if user.op == "call_module" and looks_like_activation(_module(block, user.target)):
            m.act_node, m.act_module, m.act_target = user, _module(block, user.target), user.target
            m.spec = activation_spec(m.act_module)
            return
        spec = _functional_activation(user)
        if spec is not None and user.args and user.args[0] is add:
            m.act_node, m.spec = user, spec
            return
    m.spec = ("identity", 0.0)  # norm + residual, the sum used as it is


def _follow(block: nn.Module, path: str, m: _Match, calls: Dict[str, int], claimed: Dict[fx.Node, str]) -> None:
    """Find what consumes the norm's output: an activation (through Identity/dropout), a residual
    add (then maybe an activation), or something else (raises _Refuse with the reason)."""
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
                m.passthrough.append(user)
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
        if _is_add(user):
            return _follow_residual(block, user, node, m, claimed)
        what = user.target if user.op != "output" else "the block's output"
        raise _Refuse(f"followed by {getattr(what, '__name__', what)}, not an activation: nothing to fuse")


def _used_elsewhere(block: nn.Module, attr: str) -> Optional[str]:
    """The first method of ``block``'s classes other than ``forward``/``__init__`` that uses
    ``self.<attr>`` other than reading its state (e.g. an ``extract_features`` that calls the same
    norm or activation): fusing would silently change that method, so such chains are left."""
    # Reading the norm's state (``nn.init.zeros_(self.bn2.weight)`` in timm's zero_init_last) is
    # fine: the fused module holds the same tensors under the same names.
    state = "weight|bias|running_mean|running_var|num_batches_tracked|num_features|num_channels|eps|momentum"
    pattern = re.compile(rf"self\.{re.escape(attr)}\b(?!\s*\.\s*(?:{state})\b)"  # self.bn2.weight
                         rf"(?!\s*,\s*['\"](?:{state})['\"])")  # getattr(self.bn2, 'weight', None)
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


def _match_norm(ctx: Context, block: nn.Module, path: str, node: fx.Node, norm: nn.Module, calls: Dict[str, int],
                claimed: Dict[fx.Node, str]) -> Tuple[_Match, nn.Module, bool]:
    """Match one norm call of the traced forward and plan its fused module: ``(match, fused,
    own_slot)``, or _Refuse with the reason."""
    name = node.target
    if calls[name] > 1:
        raise _Refuse(f"called {calls[name]} times in {type(block).__name__}.forward")
    m = _Match(name, node)
    m.rank_known = _rank_known(block, node, ctx)
    try:
        _follow(block, path, m, calls, claimed)
    except _Refuse:
        src = node.args[0] if node.args else None
        conv_before = (isinstance(src, fx.Node) and src.op == "call_module"
                       and is_conv(last_leaf(_module(block, src.target))))
        users = list(node.users)
        into_conv = len(users) == 1 and users[0].op == "call_module" and is_conv(_module(block, users[0].target))
        into_fused_add = len(users) == 1 and users[0] in claimed  # the residual operand of a fused norm
        if not (conv_before and ctx.norm_without_act and (into_conv or into_fused_add)):
            raise
        m = _Match(name, node)  # conv -> norm -> conv (or -> a fused norm's residual): the norm alone
        m.rank_known, m.spec = _rank_known(block, node, ctx), ("identity", 0.0)
    for attr in (name, m.act_target):
        other = _used_elsewhere(block, attr) if attr else None
        if other:
            raise _Refuse(f"self.{attr} is also used by {other}, which fusing would change")
    own_slot = (m.act_module is not None and "." not in m.act_target and calls[m.act_target] == 1
                and ctx.slot_refs[id(m.act_module)] == 1)
    m.remove_act = m.act_node is not None and not own_slot
    act_path = join(path, m.act_target) if m.act_target else None
    fused = ctx.plan(norm, join(path, name), m.act_module if own_slot or m.spec[0] == "prelu" else None,
                     act_path if own_slot else None, m.rank_known, m.between,
                     act_spec=None if own_slot else m.spec, act_shared_ok=not own_slot)
    if m.add_node is not None:
        claimed[m.add_node] = f"self.{name}"
    return m, fused, own_slot


def graph_rule(ctx: Context, block: nn.Module, path: str, pred=None) -> None:
    """Fuse the norm -> activation and norm -> residual add -> activation chains of ``block``'s
    traced forward (see the module docs)."""
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
    plans, claimed = [], {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in norms:
            try:
                plans.append(_match_norm(ctx, block, path, node, norms[node.target], calls, claimed))
            except _Refuse as reason:
                ctx.leave(norms[node.target], join(path, node.target), str(reason))
    if not plans:
        return
    rewritten = [m for m, _, _ in plans if m.remove_act or m.add_node is not None]
    new_cls = None
    if rewritten:
        try:
            new_cls = _rewritten_class(type(block), graph, rewritten)
        except _Refuse as reason:
            for m in rewritten:
                ctx.leave(norms[m.norm_name], join(path, m.norm_name), str(reason))
            plans = [p for p in plans if p[0] not in rewritten]
    _install(ctx, block, path, plans)
    if new_cls is not None and plans:
        block.__class__ = new_cls


def _install(ctx: Context, block: nn.Module, path: str, plans: List[Tuple[_Match, nn.Module, bool]]) -> None:
    original = type(block).__name__
    for m, fused, own in plans:
        rule = ("graph:norm-residual-act" if m.add_node is not None else
                "graph:norm-act" if m.act_node is not None else "graph:conv-norm")
        note, also = "", []
        if m.add_node is not None:
            note = f" + residual add ({m.residual.name})"
        if m.remove_act:
            what = m.act_target and f"self.{m.act_target}" or str(getattr(m.act_node.target, "__name__",
                                                                          m.act_node.target))
            note += f" + {m.spec[0]} ({what}; call removed from the traced forward)"
        if m.remove_act or m.add_node is not None:
            also.append(f"{path or '<root>'}: class {original} -> traced forward")
        ctx.install(block, m.norm_name, fused, rule, act_name=m.act_target if own else None, act_note=note,
                    extra_also=also)


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
        _rewire(graph, m)
    graph.lint()
    code = graph.python_code("self")
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    source = _format_import_block(code.globals, sys_importer) + "\n" + code.src
    return _graph_class(cls, source)


def _rewire(graph: fx.Graph, m: _Match) -> None:
    """Edit the traced graph for one match: drop the activation call the fused norm absorbs and,
    for a residual add, call the norm with ``residual=`` where the add was (both operands exist
    there) and drop the add."""
    if m.add_node is None:
        m.act_node.replace_all_uses_with(m.act_node.args[0])
        graph.erase_node(m.act_node)
        return
    with graph.inserting_before(m.add_node):
        fused = graph.call_module(m.norm_name, args=m.node.args, kwargs={**m.node.kwargs, "residual": m.residual})
    if m.remove_act:
        m.act_node.replace_all_uses_with(fused)
        graph.erase_node(m.act_node)
    else:
        m.add_node.replace_all_uses_with(fused)
    graph.erase_node(m.add_node)
    for node in reversed(m.passthrough):
        graph.erase_node(node)
    graph.erase_node(m.node)


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
