"""Design properties of the fused ops, counted on the CPU (benchmarks/accounting.py): launches per
op, bytes each input is read, no activation-sized temporaries. The bounds are today's design; a
kernel redesign tightens them (never loosens) — design targets not met yet live in the committed
accounting table, not here. Plus the GPU session's dry run and the mock-driver host path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import accounting  # noqa: E402

SHAPE = (1, 32, 4, 4)

# case -> pass -> (most Triton launches, most passes over each listed input, most bulk passes:
# reads + writes of activation tensors, statistics and partials left out)
DESIGN = {
    "gated_skip": {"fwd": (1, {"up": 1, "skip": 1}, 3), "bwd": (1, {"dout": 1, "skip": 1}, 3)},
    # GroupNorm at SHAPE: the single-pass design (the group is on chip): fwd 1 launch at the 2-pass
    # minimum, bwd 1 launch (dγ, dβ, gate summed by its last program) at the 3-pass minimum (5 with skip).
    "gn_silu": {"fwd": (1, {"x": 1}, 2), "bwd": (1, {"x": 1, "dout": 1}, 3)},
    "bn_relu": {"fwd": (2, {"x": 2}, 3), "bwd": (2, {"x": 2, "dout": 2}, 5)},
    "skip_gn_silu": {"fwd": (1, {"up": 1, "skip": 1}, 3), "bwd": (1, {"up": 1, "skip": 1, "dout": 1}, 5)},
    "skip_bn_relu": {"fwd": (2, {"up": 2, "skip": 2}, 5), "bwd": (2, {"up": 2, "skip": 2, "dout": 2}, 8)},
    # relu(BN(x) + r) (x is "up", the residual "skip" here): the residual read once each way; the
    # reduce kernel writes d_residual = dy', which the dx kernel reads instead of dout and r.
    "bn_residual_relu": {"fwd": (2, {"up": 2, "skip": 1}, 4), "bwd": (2, {"up": 2, "skip": 1, "dout": 1}, 7)},
}


@pytest.fixture(scope="module")
def counted():
    out = {}
    for case, passes in DESIGN.items():
        for pass_ in passes:
            out[case, pass_] = accounting.measure_interp(case, "fusedskip", pass_, SHAPE)
    return out


@pytest.mark.parametrize("case, pass_", [(c, p) for c, ps in DESIGN.items() for p in ps])
def test_fused_design_bounds(counted, case, pass_):
    row = counted[case, pass_]
    launches, reads, total = DESIGN[case][pass_]
    assert 1 <= row["triton_launches"] <= launches, row["kernels"]
    for name, most in reads.items():
        assert 0.99 <= row["reads"].get(name, 0) <= most + 0.01, (name, row["reads"])
    bulk = sum(v for k, v in list(row["reads"].items()) + list(row["writes"].items())
               if not k.startswith("tmp:") and k not in ("param", "buffer"))
    assert bulk <= total + 0.01, (row["reads"], row["writes"])
    # The only activation-sized tensors written are the results: the skip sum is never stored.
    assert row["large_tmp_writes"] == 0, row["writes"]
    results = {"fwd": ("out",), "bwd": ("dskip", "dup", "dx")}[pass_]
    for name, passes in row["writes"].items():
        if not name.startswith("tmp:") and name != "buffer":  # buffer: BatchNorm's running statistics
            assert name in results and passes == pytest.approx(1.0), row["writes"]


def test_fused_saves_less_than_eager_for_norm_chains():
    for case in ("gn_silu", "skip_gn_silu"):
        fused = accounting.measure_interp(case, "fusedskip", "fwd", SHAPE)
        eager = accounting.measure_interp(case, "eager", "fwd", SHAPE)
        assert fused["saved_bytes"] < eager["saved_bytes"], case
        assert eager["torch_ops"] >= 2 and eager["triton_launches"] == 0


def test_prediction_is_the_largest_term():
    row = {"provider": "fusedskip", "launches": 10, "triton_launches": 4, "host_us": 100.0, "bytes": 4 * 2 ** 20}
    pred = accounting.predict(row, "op", (1, 32, 32, 32))
    for value in pred.values():
        assert value["us"] == max(value["launch_us"], value["host_us"], value["bytes_us"])
        assert value["host_us"] == 100.0 + accounting.DRIVER_LAUNCH_US * 4


def _run(args, env_extra, timeout=300):
    env = {**os.environ, **env_extra, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_mock_driver_host_path_matches_interpreted_launches(tmp_path):
    """The host worker runs Triton's real launch path behind the mock driver (TRITON_INTERPRET=0)."""
    out = tmp_path / "host.json"
    _run(["-m", "benchmarks", "account", "--worker", "host", "--worker-out", str(out), "--cases", "gated_skip",
          "--host-ms", "5"], {"TRITON_INTERPRET": "0"})
    data = json.loads(out.read_text())
    assert data["meta"]["target_programs_replaced"] >= 1
    fused = data["subjects"]["gated_skip"]["fusedskip"]
    assert fused["fwd"]["triton_launches_host"] == 1 and fused["full"]["triton_launches_host"] == 2
    assert fused["fwd"]["host_us"] > 0
    programs = fused["fwd"]["programs"]
    assert set(programs) == {"16x128x64x64", "16x64x256x256"} and all(p[0] > 0 for p in programs.values())
    assert data["subjects"]["gated_skip"]["eager"]["full"]["triton_launches_host"] == 0


def test_gpu_session_dry_run(tmp_path):
    """The one-shot GPU script end to end on the CPU (interpreter, tiny shapes), steps that need
    minutes on the interpreter (tests, selfcheck) left out; the budget skips rows it cannot fit."""
    _run(["-m", "benchmarks", "gpu-session", str(tmp_path), "--dry-run", "--no-compile", "--skip", "tests,check",
          "--budget-s", "40"], {"TRITON_INTERPRET": "1"})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["copy"]["status"] == "done" and summary["steps"]["bench"]["status"] == "done"
    assert summary["steps"]["tests"]["status"] == "skipped"
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["gbps"] == max(copy["copy_"]["gbps"], copy["triton"]["gbps"])
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["dry_run"] and env["git_commit"]
    for name in ("headline.json", "headline-graphs.json"):
        data = json.loads((tmp_path / name).read_text())
        ok = [r for r in data["rows"] if r["status"] == "ok"]
        assert ok and ok[0]["provider"] == "fusedskip"
        assert len(data["rows"]) + len(data["skipped"]) >= 2
