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
Skipped, with the reason, where ``triton.compile`` for CUDA cannot run (no NVIDIA backend or
ptxas in the Triton wheel, Triton internals the recorder mirrors missing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECORDER = os.path.join(HERE, "compile_recorder.py")
TIMEOUT_S = 1200  # generous: the run takes about a minute on 2 busy cores

pytestmark = pytest.mark.skipif(os.environ.get("FUSEDSKIP_SKIP_GPU_COMPILE", "0") == "1",
                                reason="FUSEDSKIP_SKIP_GPU_COMPILE=1")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    workers = int(os.environ.get("FUSEDSKIP_COMPILE_WORKERS", "2"))
    cmd = [sys.executable, RECORDER, "--json", str(out), "--workers", str(workers),
           "--coverage", os.environ.get("FUSEDSKIP_COMPILE_COVERAGE", "default")]
    # A fresh Triton cache unless one is named: every run compiles for real (and leaves no cubins).
    with tempfile.TemporaryDirectory(prefix="fusedskip-sm90-cache-") as fresh_cache:
        env["TRITON_CACHE_DIR"] = os.environ.get("FUSEDSKIP_COMPILE_CACHE_DIR") or fresh_cache
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    return result


def _summary(report) -> str:
    lines = [f"sm_90 compile check ({report['coverage']} coverage, triton {report['triton']}): "
             f"{report['variants_selected']} of {report['variants_recorded']} recorded variants compiled in "
             f"{report['compile_s']} s, recording {report['record_s']} s, total {report['total_s']} s",
             f"  {'kernel':<72} {'launches':>8} {'recorded':>8} {'compiled':>8} {'errors':>6}"]
    for kid, k in sorted(report["kernels"].items()):
        lines.append(f"  {kid:<72} {k['launches']:>8} {k['variants_recorded']:>8} "
                     f"{k['variants_compiled']:>8} {k['compile_errors']:>6}")
    return "\n".join(lines)


def test_every_launched_variant_compiles_for_sm90(report):
    print(_summary(report))
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
