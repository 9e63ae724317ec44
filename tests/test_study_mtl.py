"""``fusedskip study mtl``: the plan, the verdicts of the analysis, its errors and one tiny run end
to end (2 architectures × 2 methods × 2 seeds on MultiMNIST, two steps each)."""
import json

import pytest

from fusedskip.study import STUDIES, mtl
from fusedskip.study import main as study_main

TINY = ["--seeds", "2", "--width", "2", "--epochs", "1", "--train-count", "32", "--val-count", "4", "--test-count",
        "8", "--batch-size", "16", "--jobs", "1", "--kem-slots", "4", "--kem-topk", "8", "--backend", "reference"]


def _args(*extra):
    args = mtl.build_parser().parse_args([*TINY, *extra])
    assert mtl.check_args(args) is None
    return args


def test_plan_covers_the_grid_and_baselines():
    """Every architecture × method × seed, the reference added when left out, single-task runs;
    the cross-task architectures carry the CLI's model keys."""
    args = _args("--archs", "vmsanet,mtan+stable_kem", "--methods", "pcgrad,acg_released")
    keys = [s.key for s in mtl.plan(args)]
    assert len(keys) == len(set(keys)) == (1 + 2 * 2) * 2 + 4 * 2
    assert "mtl/mtan/equal/s1" in keys and "mtl/mtan+stable_kem/acg_released/s0" in keys
    assert "single/denoise/s1" in keys
    spec = next(s for s in mtl.plan(args) if s.key == "mtl/mtan+stable_kem/pcgrad/s0")
    assert spec.cfg["model"]["cross_task"] == "stable_kem" and spec.cfg["model"]["cross_task_stage"] == 2
    assert spec.cfg["model"]["cross_task_options"] == {"num_slots": 4, "topk": 8}
    assert spec.cfg["method"] == "pcgrad" and spec.cfg["tasks"] == list(mtl.TASKS)
    full = mtl.build_parser().parse_args([])
    assert mtl.check_args(full) is None
    assert set(full.methods) == {"equal", "uncertainty", "dwa", "pcgrad", "cagrad", "imtl_g", "gradvac", "acg",
                                 "acg_released"}
    assert len(full.archs) == 7 and full.seeds >= 3 and "mtl" in STUDIES


def _run(seed, seg, cls, psnr, key="x"):
    kinds = {"seg": ["segment", 3], "cls_left": ["classify", 10], "denoise": ["denoise", 1]}
    return {"key": key, "seed": seed, "tasks": list(kinds), "task_kinds": kinds, "parameters": 10,
            "shared_parameters": 5, "cross_task_parameters": 0, "seconds_per_step": 0.1, "seconds": 1.0,
            "diverged": False, "grad_norm_spikes": 0,
            "test": {"seg": {"miou": seg, "pixel_acc": 0.9}, "cls_left": {"accuracy": cls},
                     "denoise": {"psnr": psnr}}}


def test_verdicts_against_the_reference():
    """A consistent gain is 'better', a consistent loss 'worse', a noisy one 'within seed
    spread'; Δm% is computed against the seed-mean single-task runs."""
    results = {}
    for s in range(3):
        results[f"mtl/mtan/equal/s{s}"] = _run(s, 0.50, 0.30, 20.0)
        noise = (0.005, -0.005, 0.001)[s]
        results[f"mtl/mtan+kem/pcgrad/s{s}"] = _run(s, 0.60 + 0.001 * s, 0.30 + noise, 19.0 - 0.01 * s)
        results[f"single/seg/s{s}"] = {**_run(s, 0.5, 0, 0), "tasks": ["seg"]}
        results[f"single/cls_left/s{s}"] = {**_run(s, 0, 0.3, 0), "tasks": ["cls_left"]}
        results[f"single/denoise/s{s}"] = {**_run(s, 0, 0, 20.0), "tasks": ["denoise"]}
    a = mtl.analyse(results)
    verdicts = {c["metric"]: c["verdict"] for c in a["comparisons"]["mtl/mtan+kem/pcgrad"]}
    assert verdicts == {"seg/miou": "better", "seg/pixel_acc": mtl.SPREAD, "cls_left/accuracy": mtl.SPREAD,
                        "denoise/psnr": "worse", "Δm%": "better"}
    ref = a["table"]["mtl/mtan/equal"]
    assert ref["delta_m"]["mean"] == pytest.approx(0.0, abs=1e-9)
    expected = (20.2 + 0.0 + 0.1 / 0.9 - 5.05) / 4  # seed means: seg miou +20.2 %, accuracy +1/9 %, PSNR −5.05 %
    assert a["table"]["mtl/mtan+kem/pcgrad"]["delta_m"]["mean"] == pytest.approx(expected, abs=1e-6)
    assert a["baselines"]["denoise"]["psnr"] == 20.0
    text = mtl.markdown({"settings": vars(_args()), "tasks": list(mtl.TASKS), "device": "cpu", "torch": "x",
                         "seconds": 1.0, **a})
    assert "| MTAN + KEM | pcgrad |" in text and "seg/miou +0.101" in text and "denoise/psnr -1.010" in text


@pytest.mark.parametrize("argv, message", [
    (["--archs", "mtan,segnet"], "unknown architecture"),
    (["--methods", "equal,gradnorm"], "unknown MTL method"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--cross-stage", "5"], "--cross-stage must be a decoder step"),
    (["--archs", "mtan+stable_kem", "--width", "1", "--kem-slots", "8"], "mtan\\+stable_kem at --width 1.*etf_dim"),
    (["--archs", "mtan+kem", "--cross-stage", "0", "--kem-topk", "64"], "topk \\(64\\).*T·N = 16"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        study_main(["mtl", *argv, "--out", "/nonexistent/never"])
    assert exc.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_study_mtl_end_to_end(tmp_path):
    """2 architectures × 2 methods × 2 seeds + single-task baselines, two steps each: the JSON and
    Markdown reports with Δm%, parameters, seconds per step and a verdict for every comparison;
    a second call reuses every finished run."""
    out = tmp_path / "study"
    argv = ["mtl", *TINY, "--archs", "mtan,mtan+kem", "--methods", "equal,pcgrad", "--out", str(out)]
    logs = []
    assert study_main(argv) == 0
    report = json.loads((out / "study_mtl.json").read_text())
    assert set(report["table"]) == {f"mtl/{a}/{m}" for a in ("mtan", "mtan+kem") for m in ("equal", "pcgrad")}
    assert len(report["runs"]) == 4 * 2 + 4 * 2 and set(report["single_task"]) == set(mtl.TASKS)
    kem = report["table"]["mtl/mtan+kem/equal"]
    assert kem["cross_task_parameters"] > 0 and kem["parameters"] == report["table"]["mtl/mtan/equal"]["parameters"] \
        + kem["cross_task_parameters"]
    assert kem["seconds_per_step"]["mean"] > 0 and kem["delta_m"] is not None and kem["seeds"] == [0, 1]
    comps = report["comparisons"]
    assert set(comps) == {"mtl/mtan/pcgrad", "mtl/mtan+kem/equal", "mtl/mtan+kem/pcgrad"}
    for rows in comps.values():
        assert [c["metric"] for c in rows][-1] == "Δm%" and len(rows) == 6
        assert all(c["verdict"] in ("better", "worse", mtl.SPREAD) and c["diff"]["n"] == 2 for c in rows)
    text = (out / "study_mtl.md").read_text()
    assert "MTAN + KEM" in text and "Differences from MTAN + equal beyond the seed spread" in text
    assert "32 training / 4 validation / 8 test images" in text and "2 steps of batch 16" in text
    mtime = (out / "runs" / "mtl__mtan__equal__s0" / "summary.json").stat().st_mtime_ns
    assert mtl.main(argv[1:], log=logs.append) == 0
    assert (out / "runs" / "mtl__mtan__equal__s0" / "summary.json").stat().st_mtime_ns == mtime  # reused
    assert json.loads((out / "study_mtl.json").read_text())["table"] == report["table"]


def test_dwa_note_when_it_cannot_reweight():
    """DWA needs two epochs of losses before it reweights: the report says so for shorter studies."""
    assert "exactly as equal weighting" in " ".join(mtl._method_notes({"methods": ["equal", "dwa"], "epochs": 2}))
    assert mtl._method_notes({"methods": ["equal", "dwa"], "epochs": 3}) == []
    assert mtl._method_notes({"methods": ["equal", "pcgrad"], "epochs": 1}) == []
