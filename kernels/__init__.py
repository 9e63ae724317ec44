"""Triton kernels of fusedskip and their host-side launchers (installed as ``fusedskip.kernels``).

One module per op: ``@triton.jit`` kernels named ``_<op>_<pass>_kernel`` and the launchers
``<op>_forward`` / ``<op>_backward`` that validate nothing (the public API in ``fusedskip`` does
that before any launch) but choose the launch configuration and allocate outputs. Launch glue
shared by every op lives in :mod:`fusedskip.kernels.launch`, jit helpers shared by the kernels
(program prologues, per-channel parameters, scalar arguments) in :mod:`fusedskip.kernels.common`.
"""
