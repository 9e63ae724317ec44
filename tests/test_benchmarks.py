"""The benchmark suites, exercised at tiny sizes in the normal test run so they cannot rot.

Covers: the byte model, the timing engine on the CPU, the runner end to end on the CPU into a
temporary folder (JSON, CSV, plots, skipped-case reasons, the no-CUDA statement, targets left
unmeasured), the comparison command (a synthetic 2x slow-down is flagged, noise is not) and the
pytest-benchmark suite (every local case, collected and run once with --benchmark-disable).
No torch.compile here: compiling on the CPU takes tens of seconds per case.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bytes_model, compare, targets  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402
from benchmarks.cases import CASES, Case, Unavailable, one_input  # noqa: E402
from benchmarks.engine import NO_CUDA_MESSAGE, expand  # noqa: E402
from benchmarks.timing import Timer, sets_needed  # noqa: E402

THIRD_PARTY = ("convert_diffusers_unet", "convert_smp_unet", "convert_monai_unet")  # slow imports
LOCAL_CASES = [name for name in CASES if name not in THIRD_PARTY]
FAST = ["--rep-ms", "1", "--warmup-ms", "0", "--warmup-runs", "1", "--min-runs", "3", "--no-compile"]
CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Byte model
# --------------------------------------------------------------------------------------------
DIMS = {"n": 2, "c": 3, "h": 4, "w": 5}
E = 2 * 3 * 4 * 5


@pytest.mark.parametrize("itemsize", [4, 2])
def test_gated_skip_bytes(itemsize):
    # fwd: read up + read skip + write out; bwd: read dout + read skip + write dskip.
    assert bytes_model.traffic("gated_skip", "fwd", DIMS, itemsize)[0] == 3 * E * itemsize
    assert bytes_model.traffic("gated_skip", "bwd", DIMS, itemsize)[0] == 3 * E * itemsize
    assert bytes_model.traffic("gated_skip", "full", DIMS, itemsize)[0] == 6 * E * itemsize
    assert bytes_model.traffic("gated_skip", "fwd", DIMS, itemsize)[1] == 2 * E


@pytest.mark.parametrize("op, fwd, bwd", [
    ("group_norm_act", 2, 3),        # R x + W y; R x, dy + W dx
    ("batch_norm_act", 2, 3),
    ("skip_group_norm_act", 3, 5),   # R up, skip + W y; R dy, up, skip + W dup, dskip
    ("skip_batch_norm_act", 3, 5),
])
def test_norm_act_passes(op, fwd, bwd):
    assert bytes_model.traffic(op, "fwd", DIMS, 2)[0] == fwd * E * 2
    assert bytes_model.traffic(op, "bwd", DIMS, 2)[0] == bwd * E * 2
    assert bytes_model.passes_over_activation(op, "full") == fwd + bwd


def test_eval_batch_norm_and_conv_bytes():
    assert bytes_model.traffic("batch_norm_act_eval", "infer", DIMS, 4)[0] == 2 * E * 4
    d = {"n": 2, "c": 8, "h": 16, "w": 16, "c_out": 8, "k": 3}
    x = out = 2 * 8 * 16 * 16
    weight = 8 * 8 * 9
    nbytes, flops = bytes_model.traffic("conv_norm_act", "fwd", d, 2)
    assert nbytes == (x + weight + out) * 2
    assert flops == 2 * out * 8 * 9 + 6 * out
    nbytes, flops = bytes_model.traffic("conv_norm_act", "bwd", d, 2)
    assert nbytes == (x + out + weight + x + weight) * 2
    assert flops == 2 * (2 * out * 8 * 9) + 11 * out


def test_every_op_case_has_a_stated_model_for_each_pass():
    for case in CASES.values():
        if case.kind != "op":
            assert case.byte_model is None
            continue
        for pass_ in case.passes:
            nbytes, flops = bytes_model.traffic(case.byte_model, pass_, case.dims((2, 32, 8, 8)), 2)
            assert nbytes > 0 and flops > 0, (case.name, pass_)
            assert all(p.note for p in bytes_model.pass_components(case.byte_model, pass_))


# --------------------------------------------------------------------------------------------
# Timing engine and spec expansion
# --------------------------------------------------------------------------------------------
def test_cpu_timer_quantiles():
    timing = Timer("cpu", rep_ms=2, warmup_ms=0, min_runs=7).measure(lambda i: sum(range(2000)))
    assert timing.method == "perf_counter" and timing.runs >= 7
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_rotation_exceeds_flush_size():
    assert sets_needed(10 << 20, 100 << 20) * (10 << 20) > 100 << 20
    assert sets_needed(500 << 20, 100 << 20) == 1
    assert sets_needed(1 << 20, 0) == 1


def test_specs_cover_every_case_with_unique_ids():
    specs = expand("tiny")
    assert {s.case for s in specs} == set(CASES)
    assert len({s.id for s in specs}) == len(specs)
    for size in ("cpu", "quick", "full"):
        assert expand(size, passes=["fwd"], providers=["eager"])


def test_addunet_eager_baseline_is_plain_torch_and_checked(monkeypatch):
    from benchmarks import models
    try:
        model = models.build_addunet(3, 8)
    except Unavailable as exc:
        pytest.skip(str(exc))
    example = torch.randn(2, 3, 16, 16)
    plain = models.plain_torch_copy(model, example)
    assert not [m for m in plain.modules() if type(m).__module__.startswith("fusedskip.ops")]
    assert {id(p) for p in plain.parameters()}.isdisjoint(id(p) for p in model.parameters())  # a copy
    monkeypatch.setattr(models.EagerGate, "forward", lambda self, up, skip: up + 2.0 * skip)
    with pytest.raises(ValueError, match="differs"):
        models.plain_torch_copy(model, example)


# --------------------------------------------------------------------------------------------
# Runner end to end on the CPU
# --------------------------------------------------------------------------------------------
@pytest.fixture
def unavailable_case():
    """A registered case whose op does not exist: the runner must skip it, saying why."""
    def missing():
        raise Unavailable("ImportError: No module named 'fusedskip.ops.not_yet'")
    CASES["not_yet"] = Case("not_yet", "op", "an op that does not exist yet", ("fwd",), missing, one_input,
                            None, None, byte_model="gated_skip")
    yield "not_yet"
    del CASES["not_yet"]


def test_runner_end_to_end(tmp_path, capsys, unavailable_case):
    """On the CPU: reference and eager only, no fractions of bandwidth, targets unmeasured.
    On a GPU (same test, unchanged): the kernels too, with the copy bandwidth of the run."""
    # One element-wise op, one norm chain, one model (the suite test below covers every case).
    cases = ["gated_skip", "skip_gn_silu", "addunet", unavailable_case]
    rc = bench_main(["--size", "tiny", "--out", str(tmp_path), "--name", "run", *FAST, "--cases", ",".join(cases)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "targets" in out and "skipped" in out

    data = json.loads((tmp_path / "run.json").read_text())
    meta = data["meta"]
    for key in ("device", "driver", "torch", "triton", "git_commit", "git_dirty", "timestamp"):
        assert key in meta
    assert {"case": "not_yet", "provider": None,
            "reason": "ImportError: No module named 'fusedskip.ops.not_yet'"} in data["skipped"]

    rows = data["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, [r["error"] for r in rows]
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup_vs_eager"] is not None
        if r["kind"] == "op":
            assert r["gbps"] > 0 and r["bytes"] > 0
    if CUDA:
        assert meta["device_type"] == "cuda" and meta["copy_gbps"] > 0
        assert any(r["provider"] == "fusedskip" for r in ok)
        assert all(r["frac_copy"] is not None for r in ok if r["kind"] == "op")
        assert all(r["peak_mb"] is not None for r in ok if r["pass"] in ("full", "train", "infer"))
    else:
        assert NO_CUDA_MESSAGE in out
        assert meta["device_type"] == "cpu" and meta["copy_gbps"] is None
        assert {r["provider"] for r in rows} <= {"reference", "eager"}  # no kernel timings on the CPU
        assert all(r["frac_copy"] is None for r in rows)                # no bandwidth fractions either
        assert {e["status"] for e in data["targets"]} == {"unmeasured"}
    ran = {r["case"] for r in ok}
    for name in cases:
        if name != unavailable_case and CASES[name].available() is None:
            assert name in ran, name
    assert {r["dtype"] for r in ok} == {"fp32", "bf16"} and {r["layout"] for r in ok} == {"nchw", "channels_last"}

    with open(tmp_path / "run.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for column in ("device", "torch", "git_commit", "case", "shape", "dtype", "layout", "provider", "pass",
                   "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "tflops", "peak_mb",
                   "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_compile_max_autotune"):
        assert column in table[0]

    # The other sub-commands read the same file.
    assert bench_main(["compare", str(tmp_path / "run.json"), str(tmp_path / "run.json")]) == 0
    assert bench_main(["show", str(tmp_path / "run.json")]) == 0

    pytest.importorskip("matplotlib")
    plots = sorted((tmp_path / "run-plots").glob("*.png"))
    assert {p.stem for p in plots} == ran
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    one_case = {**data, "rows": [r for r in rows if r["case"] == "gated_skip"]}
    (tmp_path / "one.json").write_text(json.dumps(one_case))
    assert bench_main(["plot", str(tmp_path / "one.json"), "--out", str(tmp_path / "replot")]) == 0
    assert [p.name for p in (tmp_path / "replot").glob("*.png")] == ["gated_skip.png"]


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
def _results(medians, spread=0.03, device="NVIDIA H100 80GB HBM3"):
    rows = []
    for i, med in enumerate(medians):
        rows.append({"case": "gated_skip", "pass": "fwd", "shape": f"16x{32 * (i + 1)}x64x64", "dtype": "bf16",
                     "layout": "nchw", "provider": "fusedskip", "status": "ok", "median_ms": med,
                     "p20_ms": med * (1 - spread / 2), "p80_ms": med * (1 + spread / 2)})
    return {"meta": {"device": device, "git_commit": "abc1234", "git_dirty": False, "timestamp": "t"}, "rows": rows}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_compare_flags_a_2x_slowdown(tmp_path, capsys):
    base = [1.0, 2.0, 0.5, 4.0, 0.25, 1.5]
    a = _write(tmp_path, "a.json", _results(base))
    slow = list(base)
    slow[2] *= 2.0
    b = _write(tmp_path, "b.json", _results(slow))
    assert bench_main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "16x96x64x64" in out
    res = compare.compare(json.loads(open(a).read()), json.loads(open(b).read()))
    assert [it["key"][2] for it in res["regressed"]] == ["16x96x64x64"]


def test_compare_ignores_noise(tmp_path):
    base = [1.0, 2.0, 0.5, 4.0, 0.25, 1.5]
    jitter = [1.04, 0.97, 1.03, 0.96, 1.045, 1.0]  # within max(5%, spreads) of A
    a = _write(tmp_path, "a.json", _results(base))
    b = _write(tmp_path, "b.json", _results([m * j for m, j in zip(base, jitter)]))
    assert bench_main(["compare", a, b]) == 0
    # A 2x speed-up is an improvement, never a regression.
    c = _write(tmp_path, "c.json", _results([m / 2 for m in base]))
    assert bench_main(["compare", a, c]) == 0


def test_compare_margin_is_noise_or_threshold():
    a = _results([1.0], spread=0.0)
    assert not compare.compare(a, _results([1.04], spread=0.0))["regressed"]
    assert compare.compare(a, _results([1.06], spread=0.0))["regressed"]
    noisy_a, noisy_b = _results([1.0], spread=0.2), _results([1.3], spread=0.2)  # margin 40%
    assert not compare.compare(noisy_a, noisy_b)["regressed"]


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
def _row(case, pass_, provider, median, shape="16x64x256x256", dtype="bf16", layout="nchw", **extra):
    r = {"case": case, "pass": pass_, "shape": shape, "dtype": dtype, "layout": layout, "provider": provider,
         "status": "ok", "median_ms": median, "act_mb": 134.2}
    r.update(extra)
    return r


def test_targets_from_measured_rows_only():
    gpu = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"}
    rows = [
        _row("gated_skip", "fwd", "fusedskip", 0.1, frac_copy=0.97),
        _row("gated_skip", "fwd", "fusedskip", 0.1, shape="1x64x64x64", frac_copy=0.5, act_mb=0.5),  # small: ignored
        _row("gn_silu", "fwd", "fusedskip", 0.1, frac_copy=0.85),
        _row("skip_gn_silu", "full", "fusedskip", 1.0, speedup_vs_eager=3.5),
        _row("skip_gn_silu", "full", "compile", 1.2),
        _row("skip_gn_silu", "full", "compile-max-autotune", 1.4),
        _row("addunet", "train", "fusedskip", 10.0, shape="16x3x256x256/w64", layout="channels_last",
             speedup_vs_eager=1.6, peak_mb=500.0),
        _row("addunet", "train", "eager", 16.0, shape="16x3x256x256/w64", layout="channels_last", peak_mb=1000.0),
    ]
    status = {e["target"]: e for e in targets.evaluate(rows, gpu)}
    assert status["gated_skip_fwd_bw"]["status"] == "met" and status["gated_skip_fwd_bw"]["rows"] == 1
    assert status["norm_act_fwd_bw"]["status"] == "missed"
    assert status["norm_act_bwd_bw"]["status"] == "unmeasured"
    assert status["skip_gn_silu_vs_eager"]["status"] == "met"
    assert status["skip_gn_silu_vs_compile"]["status"] == "missed"          # 1.2 / 1.0 < 1.3
    assert status["skip_gn_silu_vs_compile"]["value"] == pytest.approx(1.2)
    assert status["addunet_vs_eager"]["status"] == "met"
    assert status["addunet_vs_compile"]["status"] == "unmeasured"
    assert status["addunet_memory"]["status"] == "met"                      # 0.5 <= 0.6
    cpu = targets.evaluate(rows, {"device": "CPU", "device_type": "cpu"})
    assert {e["status"] for e in cpu} == {"unmeasured"}
    other = {e["target"]: e for e in targets.evaluate(rows, {"device": "NVIDIA H200", "device_type": "cuda"})}
    assert "indicative" in other["gated_skip_fwd_bw"]["note"]


# --------------------------------------------------------------------------------------------
# pytest-benchmark suite
# --------------------------------------------------------------------------------------------
def test_pytest_benchmark_suite_collects_and_runs():
    pytest.importorskip("pytest_benchmark")
    # Every local case in the configuration the targets name (bf16, channels_last); the runner
    # test above covers both dtypes and layouts.
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
           "--bench-size", "tiny", "--bench-no-compile", "--bench-cases", ",".join(LOCAL_CASES),
           "--bench-dtypes", "bf16", "--bench-layouts", "channels_last"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
    assert "error" not in proc.stdout.splitlines()[-1], tail
