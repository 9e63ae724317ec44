"""Shared test utilities: inputs with a non-zero mean, layouts, poisoning, per-dtype tolerances."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from conftest import DEVICE

# (atol, rtol) for comparing a kernel with a float64 reference, by the kernel's I/O dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LAYOUTS = ("nchw", "channels_last", "strided")


def make_input(shape, dtype=torch.float32, layout="nchw", mean=0.5, scale=1.0, device=DEVICE,
               requires_grad=False) -> torch.Tensor:
    """Fresh random data with a non-zero mean, in the asked layout.

    ``strided`` returns a non-contiguous view (every other column of a wider tensor, channels
    permuted) so kernels must honour arbitrary strides.
    """
    n, c, h, w = shape
    if layout == "strided":
        base = torch.randn(n, h, c, 2 * w + 1, device=device, dtype=torch.float64) * scale + mean
        x = base.to(dtype).permute(0, 2, 1, 3)[..., 1::2]
    else:
        x = (torch.randn(shape, device=device, dtype=torch.float64) * scale + mean).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    assert x.shape == torch.Size(shape)
    return x.requires_grad_(requires_grad)


def tolerance(dtype: torch.dtype):
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg=""):
    """Compare with a (float64) reference at the tolerance of ``dtype``, scaled by ``scale``."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               msg=msg or None)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make every new uninitialised allocation hold NaN, so a kernel that skips a store is caught."""
    real_empty, real_empty_like, real_empty_strided = torch.empty, torch.empty_like, torch.empty_strided

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    torch.empty_strided = lambda *a, **k: fill(real_empty_strided(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.empty_strided = real_empty, real_empty_like, real_empty_strided


def run_cli(capsys, *argv):
    """Run ``fusedskip ARGV...`` in-process: (exit status, stdout, stderr)."""
    from fusedskip import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def spy_launches(monkeypatch, module, names) -> list:
    """Replace each kernel ``module.<name>`` by a wrapper that records its name at every launch
    (``kernel[grid](...)``) and then launches it; returns the list the names are appended to."""
    launches: list = []

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(module, name, Spy(getattr(module, name), name))
    return launches


def fused_twin(norm, fused):
    """Give the torch ``norm`` a non-trivial affine (γ ∈ [0.5, 1.5], β ∈ [−0.5, 0.5]) and load its
    state_dict into the fused module ``fused``; returns ``fused``."""
    import torch

    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(norm.state_dict())
    return fused
