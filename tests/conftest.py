"""Test set-up: without a GPU the kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before fusedskip is
imported, so it is decided here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedskip  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_backend_threads():
    """Each test starts from a fixed seed and the default backend, whatever the last one did, on
    one intra-op thread: the tensors are tiny, so extra threads only wait for cores the other
    test worker is using (a tiny U-Net step: ~0.04 s on one thread, up to 1 s on two busy ones)."""
    torch.manual_seed(0)
    fusedskip.set_backend(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    fusedskip.set_backend(None)


@pytest.fixture
def triton_backend():
    """Run the test body on the Triton kernels (native on a GPU, interpreted on the CPU)."""
    with fusedskip.use_backend("triton"):
        yield
