"""Every Triton kernel variant that the ops launch compiles for Hopper (sm_90): checked on the CPU.

The other tests run the kernels under Triton's CPU interpreter, which accepts code that the real
compiler rejects (a plain Python float global read inside a kernel, for one). Here the public ops
are driven (forward and backward, over dtypes, layouts, activations, affine, skip, gate kinds,
training / eval, edge shapes, and with int64 indexing forced) in a subprocess without
``TRITON_INTERPRET``; each launch is recorded instead of run, and a covering selection of the
recorded variants is compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``
down to a cubin. See tests/compile_recorder.py for what is recorded and selected.

Asserts: no variant fails to compile, no op or launch fails while being driven, every
``_*_kernel`` defined in fusedskip/kernels/*.py is compiled at least once (a new kernel that no
op drive reaches fails here until a case launches it), and every boolean constexpr of every
kernel is compiled with both values (ACT with every activation).

Environment knobs: ``FUSEDSKIP_COMPILE_COVERAGE`` (``default``, ``wide``: ~5x the compiles,
``all``), ``FUSEDSKIP_COMPILE_WORKERS`` (default 2), ``FUSEDSKIP_COMPILE_CACHE_DIR`` (a Triton
cache to reuse between runs; default: a fresh one per run), ``FUSEDSKIP_SKIP_GPU_COMPILE=1``.
Skipped, with the Triton version and the reason, where ``triton.compile`` for CUDA cannot be
driven (no NVIDIA backend or ptxas in the Triton wheel, an API the recorder uses moved): a probe
kernel decides that before anything else, so a version mismatch skips and never fails, while a
compile error in a fusedskip kernel fails. ``test_injected_compile_error_is_reported`` keeps the
check honest: a kernel reading a plain Python float global runs under the interpreter, fails to
compile here, and must be reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECORDER = os.path.join(HERE, "compile_recorder.py")
TIMEOUT_S = 1200  # generous: the run takes about a minute on 2 busy cores

pytestmark = pytest.mark.skipif(os.environ.get("FUSEDSKIP_SKIP_GPU_COMPILE", "0") == "1",
                                reason="FUSEDSKIP_SKIP_GPU_COMPILE=1")


def run_recorder(out, *extra_args) -> dict:
    """tests/compile_recorder.py in a subprocess without TRITON_INTERPRET; its report (skips when
    the report says this Triton cannot be driven, with the version and the reason)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, RECORDER, "--json", str(out), *extra_args]
    # A fresh Triton cache unless one is named: every run compiles for real (and leaves no cubins).
    with tempfile.TemporaryDirectory(prefix="fusedskip-sm90-cache-") as fresh_cache:
        env["TRITON_CACHE_DIR"] = os.environ.get("FUSEDSKIP_COMPILE_CACHE_DIR") or fresh_cache
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    if "unavailable" in result:
        pytest.skip(f"sm_90 compile check not run: {result['unavailable']}")
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    return run_recorder(out, "--workers", os.environ.get("FUSEDSKIP_COMPILE_WORKERS", "2"),
                        "--coverage", os.environ.get("FUSEDSKIP_COMPILE_COVERAGE", "default"))


def _summary(report) -> str:
    lines = [f"sm_90 compile check ({report['coverage']} coverage, triton {report['triton']}): "
             f"{report['variants_selected']} of {report['variants_recorded']} recorded variants compiled in "
             f"{report['compile_s']} s, recording {report['record_s']} s, total {report['total_s']} s",
             f"  argument specialisation: {report.get('launcher_cross_check')}",
             f"  {'kernel':<72} {'launches':>8} {'recorded':>8} {'compiled':>8} {'errors':>6}"]
    for kid, k in sorted(report["kernels"].items()):
        lines.append(f"  {kid:<72} {k['launches']:>8} {k['variants_recorded']:>8} "
                     f"{k['variants_compiled']:>8} {k['compile_errors']:>6}")
    return "\n".join(lines)


def test_every_launched_variant_compiles_for_sm90(report):
    print(_summary(report))
    drift = report.get("launcher_cross_check") or ""
    if drift.startswith("differs"):  # the check still holds; its variants are slightly off a GPU launch's
        warnings.warn(f"tests/compile_recorder.py specialize_arg vs triton {report['triton']}: {drift}")
    errors = report["compile_errors"]
    details = "\n\n".join(
        f"{e['kernel']} constexprs={e['constexprs']} pointers={e['pointers']} num_warps={e['num_warps']} "
        f"config={e['config']}\n  launched by: {e['cases']}\n  {e['error'][-4000:]}"
        for e in errors[:10])
    assert not errors, f"{len(errors)} kernel variant(s) do not compile for sm_90:\n\n{details}"


def test_ops_launch_without_errors(report):
    problems = report["launch_errors"] + report["driver_errors"]
    details = "\n\n".join(f"{p['case']}: {p['error']}\n{p['traceback']}" for p in problems[:10])
    assert not problems, f"{len(problems)} launch(es) or op call(s) failed while recording:\n\n{details}"


def test_every_kernel_is_compiled(report):
    assert report["kernels"], "no _*_kernel found in fusedskip.kernels"
    never_launched = report["never_launched"]
    assert not never_launched, (
        "kernels that no driven op launches (wire them to an op, or add a case that reaches them to "
        f"tests/compile_recorder.py): {never_launched}")
    failed = report["never_compiled"]
    assert not failed, f"kernels with no variant that compiles for sm_90 (see the compile errors): {failed}"


def test_every_constexpr_value_is_compiled(report):
    """Each boolean constexpr with both values, ACT with every activation: a driver (or a patch
    such as the forced int64 pass) that stops reaching a variant fails here, not silently."""
    from fusedskip.activations import ACTIVATION_IDS
    activations = sorted(repr(i) for i in ACTIVATION_IDS.values())
    missing = []
    for kid, values in sorted(report["constexpr_values_compiled"].items()):
        for name, got in sorted(values.items()):
            if set(got) <= {"True", "False"} and set(got) != {"True", "False"}:
                missing.append(f"{kid}: {name} only {got}")
            elif name == "ACT" and sorted(got) != activations:
                missing.append(f"{kid}: ACT only {got} of {activations}")
    assert not missing, "constexpr values never compiled:\n  " + "\n  ".join(missing)


def test_every_op_is_driven(report):
    if report["skipped_ops"]:
        pytest.skip("; ".join(f"{s['op']} not driven: {s['reason']}" for s in report["skipped_ops"]))


# A kernel that reads a plain Python float global: the interpreter runs it, the compiler refuses
# it. Beside it the same kernel with the float as an argument, which must compile.
INJECTED_SRC = '''import torch
import triton
import triton.language as tl

SCALE = 0.5


@triton.jit
def _global_float_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """x *= SCALE, read from a non-constexpr global; grid (cdiv(n, BLOCK),)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * SCALE, mask=o < n)


@triton.jit
def _argument_float_kernel(x_ptr, n, scale, BLOCK: tl.constexpr):
    """x *= scale; grid (cdiv(n, BLOCK),)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * scale, mask=o < n)


def CASES():
    x = torch.ones(100)
    yield "global float", lambda: _global_float_kernel[(1,)](x, 100, BLOCK=128)
    yield "argument float", lambda: _argument_float_kernel[(1,)](x, 100, 0.5, BLOCK=128)
'''


@pytest.fixture(scope="module")
def injected_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_compile_injected") / "fusedskip_injected_kernels.py"
    path.write_text(INJECTED_SRC)
    return path


def test_injected_compile_error_is_reported(injected_module):
    """The check is not vacuous: a kernel the interpreter runs but the compiler rejects is reported
    (as a compile error naming the kernel and the global), and its correct twin compiles."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("fusedskip_injected_interpreted", injected_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # under TRITON_INTERPRET=1 (tests/conftest.py)
    x = torch.ones(100)
    module._global_float_kernel[(1,)](x, 100, BLOCK=128)
    assert torch.equal(x, torch.full((100,), 0.5)), "the interpreter should run the injected kernel"

    result = run_recorder(injected_module.parent / "report.json", "--workers", "1", "--only-extra",
                          "--extra-kernels", str(injected_module))
    problems = result["launch_errors"] + result["driver_errors"]
    assert not problems, problems
    bad, good = "fusedskip_injected_kernels._global_float_kernel", "fusedskip_injected_kernels._argument_float_kernel"
    assert [e["kernel"] for e in result["compile_errors"]] == [bad], result["compile_errors"]
    assert "SCALE" in result["compile_errors"][0]["error"], result["compile_errors"][0]["error"]
    assert result["never_compiled"] == [bad]
    assert result["kernels"][good]["variants_compiled"] == 1
