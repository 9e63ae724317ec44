"""The public-op drives of tests/compile_recorder.py: forward and backward over dtypes, layouts,
activations, affine, skip, gate kinds, training / eval and edge shapes.

Each driver resolves the API it needs first (a missing op or class makes the recorder skip that
driver with the reason), then yields ``(label, case)`` pairs; a case calls the op on CPU tensors
while the recorder's hooks record every kernel launch instead of running it.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Tuple

LAYOUTS = ("nchw", "channels_last", "strided")
Cases = Iterable[Tuple[str, Callable[[], None]]]


def _acts():
    """Every activation the kernels implement (tests/test_gpu_compile.py checks each is compiled)."""
    from fusedskip.activations import ACTIVATION_IDS
    return tuple(sorted(ACTIVATION_IDS, key=ACTIVATION_IDS.get))


def _dtypes():
    import torch
    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def make(shape, dtype, layout="nchw", requires_grad=False):
    """A [N, C, H, W] tensor; ``strided``: a view whose (H, W) do not merge into one stride (every
    other column of a wider tensor, channels permuted; its data pointer is not 16-byte aligned)."""
    import torch
    n, c, h, w = shape
    if layout == "strided":
        x = torch.randn(n, h, c, 2 * w + 1, dtype=dtype).permute(0, 2, 1, 3)[..., 1::2]
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, dtype=dtype)
    assert tuple(x.shape) == tuple(shape)
    return x.requires_grad_(requires_grad)


def backward(out, how: str = "randn"):
    import torch
    if how == "sum":  # an expanded (stride-0) incoming gradient
        out.float().sum().backward()
    elif how == "channels_last":
        out.backward(torch.randn_like(out).contiguous(memory_format=torch.channels_last))
    else:
        out.backward(torch.randn_like(out))


def cases_gated_skip() -> Cases:
    import torch

    from fusedskip.ops.gated_skip import GatedSkip, gated_skip_add
    shape = (2, 8, 5, 6)
    for dtype, layout, gate_kind in itertools.product(_dtypes(), LAYOUTS, ("float", "scalar", "channel")):
        def case(dtype=dtype, layout=layout, gate_kind=gate_kind):
            gate = {"float": 0.7, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(shape[1], requires_grad=True)}[gate_kind]
            backward(gated_skip_add(make(shape, dtype, layout, True), make(shape, dtype, layout, True), gate))
        yield f"gated_skip_add {dtype} {layout} gate={gate_kind}", case
    for dtype in _dtypes():
        def no_dskip(dtype=dtype):  # NEED_DSKIP off, NEED_DGATE on; mixed layouts
            out = gated_skip_add(make(shape, dtype, "nchw", True), make(shape, dtype, "channels_last"),
                                 torch.rand(shape[1], requires_grad=True))
            backward(out, "sum")
        yield f"gated_skip_add {dtype} skip without grad", no_dskip
    for kind in ("softplus", "softplus_channel", "sigmoid_channel", 0.5):
        for shp, layout in (((1, 1, 7, 3), "channels_last"), ((2, 3, 1, 1), "nchw"), ((2, 64, 48, 48), "nchw"),
                            ((2, 256, 16, 16), "channels_last"), ((3, 5, 6, 1), "strided")):
            def module_case(kind=kind, shp=shp, layout=layout):
                m = GatedSkip(shp[1], gate=kind)
                out = m(make(shp, torch.float32, layout, True), make(shp, torch.float32, layout, True))
                backward(out, "channels_last")
            yield f"GatedSkip({kind}) {shp} {layout}", module_case


def cases_group_norm() -> Cases:
    import torch

    from fusedskip.ops.group_norm_act import GroupNormAct, InstanceNormAct2d, group_norm_act
    shape, groups = (2, 8, 5, 6), 4
    c = shape[1]
    for dtype, layout, act, has_skip in itertools.product(_dtypes(), LAYOUTS, _acts(), (False, True)):
        def case(dtype=dtype, layout=layout, act=act, has_skip=has_skip):
            w = torch.rand(c, dtype=dtype, requires_grad=True)
            b = torch.rand(c, dtype=dtype, requires_grad=True)
            skip = make(shape, dtype, layout, True) if has_skip else None
            gate = torch.rand(c, requires_grad=True) if has_skip else None
            slope = torch.rand(c, requires_grad=True) if act == "prelu" else None
            backward(group_norm_act(make(shape, dtype, layout, True), groups, w, b, 1e-5, act, 0.2,
                                    skip=skip, gate=gate, act_weight=slope))
        yield f"group_norm_act {dtype} {layout} {act} skip={has_skip}", case
    # After the norm: residual (with its gradient, or "frozen": without, read only to recompute u),
    # per-(n, c) scale / shift (each alone and together), PReLU slopes.
    for dtype, layout, (res, scale, shift), (act, slopes) in itertools.product(
            _dtypes(), LAYOUTS, ((True, False, False), ("frozen", False, False), (False, True, False),
                                 (False, False, True), (True, True, True)),
            (("silu", 0), ("prelu", 1), ("prelu", c))):
        def post_case(dtype=dtype, layout=layout, res=res, scale=scale, shift=shift, act=act, slopes=slopes):
            n = shape[0]
            backward(group_norm_act(
                make(shape, dtype, layout, True), groups, torch.rand(c, dtype=dtype, requires_grad=True), None,
                1e-5, act, residual=make(shape, dtype, layout, res is True) if res else None,
                scale=torch.randn(n, 2 * c, 1, 1, dtype=dtype, requires_grad=True)[:, :c] if scale else None,
                shift=torch.randn(n, c, dtype=dtype, requires_grad=True) if shift else None,
                act_weight=torch.rand(slopes, requires_grad=True) if slopes else None))
        yield (f"group_norm_act {dtype} {layout} residual={res} scale={scale} shift={shift} {act}({slopes})",
               post_case)
    # Weight only / bias only / neither, as fp32 parameters with any x (autocast).
    for dtype, (has_w, has_b), act in itertools.product(_dtypes(), ((True, False), (False, True), (False, False)),
                                                        ("relu", "gelu")):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, act=act):
            w = torch.rand(c, requires_grad=True) if has_w else None
            b = torch.rand(c, requires_grad=True) if has_b else None
            backward(group_norm_act(make(shape, dtype, "nchw", True), groups, w, b, 1e-5, act), "sum")
        yield f"group_norm_act {dtype} weight={has_w} bias={has_b} {act}", affine_case
    # The needs_input_grad combinations; scalar and float gates.
    for dtype, (x_grad, skip_grad, gate_kind) in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, False, "float"))):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind):
            gate = {"float": 0.3, "scalar": torch.tensor(0.5, requires_grad=True),
                    "channel": torch.rand(c, requires_grad=True)}[gate_kind]
            w = torch.rand(c, dtype=dtype, requires_grad=True)
            backward(group_norm_act(make(shape, dtype, "channels_last", x_grad), 2, w, None, 1e-5, "silu",
                                    skip=make(shape, dtype, "nchw", skip_grad), gate=gate))
        yield f"group_norm_act {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind}", grads_case
    # Shapes that move tiles, chunks and the ints specialised to 1 (N, C/G, H, W = 1; S > tile).
    for (shp, g), layout in itertools.product(
            (((1, 1, 1, 3), 1), ((1, 4, 1, 1), 2), ((2, 3, 7, 1), 3), ((1, 64, 48, 48), 32),
             ((4, 256, 8, 8), 32), ((2, 96, 33, 17), 32)), LAYOUTS):
        def module_case(shp=shp, g=g, layout=layout):
            backward(GroupNormAct(g, shp[1], act="silu")(make(shp, torch.float32, layout, True)))
        yield f"GroupNormAct({g}, {shp[1]}) {shp} {layout}", module_case
    for dtype, affine in itertools.product(_dtypes(), (False, True)):
        def instance_case(dtype=dtype, affine=affine):
            m = InstanceNormAct2d(6, affine=affine, act="leaky_relu").to(dtype)
            backward(m(make((2, 6, 9, 10), dtype, "channels_last", True)))
        yield f"InstanceNormAct2d {dtype} affine={affine}", instance_case


def _both_group_norm_designs(cases: Cases) -> Cases:
    """Each GroupNorm case as the rule runs it (small shapes: the single-pass design) and again
    with the split design forced through the rule's own threshold, so both designs' kernels are
    compiled for every flag and activation."""
    import contextlib

    from fusedskip.kernels import group_norm_act as gn

    @contextlib.contextmanager
    def split_design():
        saved = gn.SINGLE_PASS_MAX_ELEMS
        gn.SINGLE_PASS_MAX_ELEMS = 0
        try:
            yield
        finally:
            gn.SINGLE_PASS_MAX_ELEMS = saved

    for label, case in cases:
        yield label, case

        def split_case(case=case):
            with split_design():
                case()
        yield f"{label} (split design)", split_case


def cases_skip_norm_act() -> Cases:
    from fusedskip.ops.skip_norm_act import SkipNormAct
    shape = (2, 8, 5, 6)
    for dtype, layout, gate in itertools.product(_dtypes(), LAYOUTS, ("softplus", "softplus_channel", 0.5)):
        def group_case(dtype=dtype, layout=layout, gate=gate):
            m = SkipNormAct(shape[1], norm="group", num_groups=4, act="gelu_tanh", gate=gate).to(dtype)
            backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        yield f"SkipNormAct(group) {dtype} {layout} gate={gate}", group_case
    for dtype, layout, training, track in itertools.product(_dtypes(), LAYOUTS, (True, False), (True, False)):
        def batch_case(dtype=dtype, layout=layout, training=training, track=track):
            m = SkipNormAct(shape[1], norm="batch", act="relu", gate="sigmoid_channel", track_running_stats=track)
            m.train(training)
            backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        yield f"SkipNormAct(batch) {dtype} {layout} training={training} track={track}", batch_case


def cases_batch_norm() -> Cases:
    import torch

    from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act
    shape = (2, 8, 5, 6)
    c = shape[1]
    for dtype, layout, act, training, has_skip in itertools.product(_dtypes(), LAYOUTS, _acts(), (True, False),
                                                                    (False, True)):
        def case(dtype=dtype, layout=layout, act=act, training=training, has_skip=has_skip):
            m = BatchNormAct2d(c, act=act, negative_slope=0.1).to(dtype).train(training)
            x = make(shape, dtype, layout, True)
            out = m(x, make(shape, dtype, layout, True), torch.rand(c, requires_grad=True)) if has_skip else m(x)
            backward(out)
        yield f"BatchNormAct2d {dtype} {layout} {act} training={training} skip={has_skip}", case
    # Residual after the norm (with and without its gradient) and PReLU with 1 or C slopes.
    for dtype, layout, training, (act, slopes), res_grad in itertools.product(
            _dtypes(), LAYOUTS, (True, False), (("relu", 1), ("prelu", 1), ("prelu", c)), (True, False)):
        def residual_case(dtype=dtype, layout=layout, training=training, act=act, slopes=slopes, res_grad=res_grad):
            m = BatchNormAct2d(c, act=act, prelu_parameters=slopes).to(dtype).train(training)
            backward(m(make(shape, dtype, layout, True), residual=make(shape, dtype, layout, res_grad)))
        yield (f"BatchNormAct2d {dtype} {layout} training={training} {act}({slopes}) residual "
               f"grad={res_grad}"), residual_case
    # Only the residual needs a gradient (frozen norm, x without one): the dx kernel writes it alone.
    for dtype, layout, training in itertools.product(_dtypes(), LAYOUTS, (True, False)):
        def residual_only_case(dtype=dtype, layout=layout, training=training):
            m = BatchNormAct2d(c, act="silu").to(dtype).train(training).requires_grad_(False)
            backward(m(make(shape, dtype, layout), residual=make(shape, dtype, layout, True)))
        yield f"BatchNormAct2d {dtype} {layout} training={training} silu residual grad only", residual_only_case
    # Weight only / bias only / neither, as fp32 parameters with any x.
    for dtype, (has_w, has_b), training in itertools.product(
            _dtypes(), ((False, False), (True, False), (False, True)), (True, False)):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, training=training):
            w = torch.rand(c, requires_grad=True) if has_w else None
            b = torch.rand(c, requires_grad=True) if has_b else None
            out = batch_norm_act(make(shape, dtype, "nchw", True), torch.zeros(c), torch.ones(c), w, b, training,
                                 0.1, 1e-5, "silu")
            backward(out, "sum")
        yield f"batch_norm_act {dtype} weight={has_w} bias={has_b} training={training}", affine_case
    # Cumulative average (momentum=None), no running statistics (eval then uses batch statistics).
    for dtype, momentum, track in itertools.product(_dtypes(), (0.1, None), (True, False)):
        def stats_case(dtype=dtype, momentum=momentum, track=track):
            m = BatchNormAct2d(c, momentum=momentum, track_running_stats=track, affine=False, act="gelu")
            backward(m(make(shape, dtype, "channels_last", True)))
            m.eval()
            backward(m(make(shape, dtype, "channels_last", True)))
        yield f"BatchNormAct2d {dtype} momentum={momentum} track={track}", stats_case
    # The needs_input_grad combinations; scalar and float gates.
    for dtype, (x_grad, skip_grad, gate_kind), training in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, True, "float")), (True, False)):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind, training=training):
            m = BatchNormAct2d(c, act="leaky_relu").train(training)
            gate = {"float": 0.3, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(c, requires_grad=True)}[gate_kind]
            out = m(make(shape, dtype, "strided", x_grad), make(shape, dtype, "nchw", skip_grad), gate)
            backward(out, "channels_last")
        yield (f"BatchNormAct2d {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind} "
               f"training={training}"), grads_case
    # Shapes that move tiles, row splits and the ints specialised to 1.
    for (shp, layout), training in itertools.product(
            (((2, 1, 1, 1), "nchw"), ((1, 3, 1, 5), "channels_last"), ((2, 5, 7, 1), "strided"),
             ((8, 16, 48, 48), "nchw"), ((4, 512, 8, 8), "channels_last"), ((16, 3, 64, 64), "channels_last"),
             ((2, 96, 33, 17), "strided")), (True, False)):
        def shape_case(shp=shp, layout=layout, training=training):
            m = BatchNormAct2d(shp[1], act="relu").train(training)
            backward(m(make(shp, torch.float32, layout, True)))
        yield f"BatchNormAct2d {shp} {layout} training={training}", shape_case
    # SyncBatchNorm's merge of per-rank statistics (fusedskip.distributed), called directly.
    for dtype, track in itertools.product((torch.float32, torch.float64), (True, False)):
        def merge_case(dtype=dtype, track=track):
            counts = torch.tensor([12.0, 20.0, 7.0], dtype=dtype)
            rm, rv = (torch.zeros(c), torch.ones(c)) if track else (None, None)
            torch.ops.fusedskip.batch_norm_act_merge_stats(
                counts, torch.randn(3, c, dtype=dtype), torch.rand(3, c, dtype=dtype), rm, rv,
                torch.tensor(3) if track else None, 0.0, 1e-5)
        yield f"batch_norm_act_merge_stats {dtype} running={track}", merge_case


def cases_conv_norm_act() -> Cases:
    import torch

    from fusedskip.ops.conv_norm_act import ConvNormAct
    for norm, bias, training, layout in itertools.product(("batch", "group", "instance", None), (None, True),
                                                          (True, False), ("nchw", "channels_last")):
        def case(norm=norm, bias=bias, training=training, layout=layout):
            m = ConvNormAct(3, 16, 3, norm=norm, num_groups=4, bias=bias, act="silu").train(training)
            if layout == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            x = make((2, 3, 9, 8), torch.float32, layout, True)
            backward(m(x))
            if norm == "batch" and not training:
                backward(m.fold_bn()(x))
        yield f"ConvNormAct norm={norm} bias={bias} training={training} {layout}", case


DRIVERS = (("gated_skip_add / GatedSkip", cases_gated_skip),
           ("group_norm_act / GroupNormAct / InstanceNormAct2d", lambda: _both_group_norm_designs(cases_group_norm())),
           ("SkipNormAct (group, batch)", cases_skip_norm_act),
           ("batch_norm_act / BatchNormAct2d", cases_batch_norm),
           ("ConvNormAct", cases_conv_norm_act))

