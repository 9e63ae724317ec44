"""`fusedskip study addunet` and the demo: verdict logic on synthetic numbers, end to end at a tiny size."""
import json
import math

import pytest

from fusedskip import demo
from fusedskip.study import addunet
from fusedskip.study import main as study_main
from fusedskip.study import stats as st

TINY = ["--seeds", "2", "--epochs", "1", "--photo-epochs", "1", "--mnist-train", "32", "--mnist-test", "12",
        "--photo-patches", "32", "--photo-size", "16", "--depth", "2", "--test-crop", "24", "--width", "4",
        "--dncnn-depth", "3", "--jobs", "1", "--batch-size", "16", "--lambdas", "0.1", "--methods", ""]


def test_verdicts_on_synthetic_numbers():
    better = st.paired([30.5, 30.6, 30.55], [30.0, 30.1, 30.02])
    assert st.verdict_better(better) == st.SUPPORTED and better["wins"] == 3
    assert st.verdict_better(st.paired([29.0, 29.1, 29.05], [30.0, 30.1, 30.02])) == st.NOT_SUPPORTED
    noisy = st.paired([30.5, 29.4, 30.2], [30.0, 30.1, 30.02])  # inside the seed spread
    assert st.verdict_better(noisy) == st.INCONCLUSIVE
    assert noisy["lo"] < 0 < noisy["hi"]
    # non-inferiority with a 0.2 dB margin: slightly worse but within it / clearly worse / straddling
    assert st.verdict_non_inferior(st.paired([29.95, 30.05, 29.98], [30.0, 30.1, 30.02]), 0.2) == st.SUPPORTED
    assert st.verdict_non_inferior(st.paired([29.0, 29.1, 29.02], [30.0, 30.1, 30.02]), 0.2) == st.NOT_SUPPORTED
    assert st.verdict_non_inferior(st.paired([29.5, 30.3, 29.9], [30.0, 30.1, 30.02]), 0.2) == st.INCONCLUSIVE
    # one seed: no spread, never a verdict
    assert st.verdict_better(st.paired([31.0], [30.0])) == st.INCONCLUSIVE
    assert st.combine([st.SUPPORTED, st.SUPPORTED]) == st.SUPPORTED
    assert st.combine([st.SUPPORTED, st.INCONCLUSIVE]) == st.INCONCLUSIVE
    assert st.combine([st.NOT_SUPPORTED, st.INCONCLUSIVE]) == st.NOT_SUPPORTED
    assert st.combine([st.NOT_SUPPORTED, st.SUPPORTED]) == st.INCONCLUSIVE
    assert st.t975(2) == pytest.approx(4.303) and st.t975(100) == pytest.approx(1.96)


def test_paired_statistics_and_bad_input():
    d = st.paired([1.0, 2.0, 4.0], [0.0, 0.0, 0.0])
    assert d["mean"] == pytest.approx(7 / 3) and d["std"] == pytest.approx(math.sqrt(7 / 3))
    assert d["hi"] - d["mean"] == pytest.approx(4.303 * d["std"] / math.sqrt(3))
    with pytest.raises(ValueError, match="as many values"):
        st.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        st.paired([1.0, math.nan], [1.0, 2.0])
    kept = st.paired([1.0, math.nan, 3.0], [0.0, 0.0, 0.0], drop_nonfinite=True)
    assert kept["n"] == 2 and kept["dropped"] == 1
    with pytest.raises(ValueError, match="unknown verdict"):
        st.combine(["yes"])
    ms = st.mean_std([1.0, 3.0])
    assert ms["mean"] == 2.0 and ms["std"] == pytest.approx(math.sqrt(2)) and st.fmt_ms(ms) == "2.00 ± 1.41"


def _runs(tilts_st, tilts_mt):
    """Synthetic demo runs whose gates give the asked tilts log(a1/aL)."""
    runs = {}
    for s, (a, b) in enumerate(zip(tilts_st, tilts_mt)):
        runs[f"single-task/s{s}"] = {"seed": s, "final_gates": [math.exp(a), 1.0, 1.0]}
        runs[f"multi-task/s{s}"] = {"seed": s, "final_gates": [math.exp(b), 1.0, 1.0]}
    return runs


def test_demo_gate_finding_never_says_yes_inside_the_spread():
    clear = demo.gate_finding(_runs([0.0, 0.01, -0.01], [0.2, 0.21, 0.19]))
    assert clear["verdict"] == st.SUPPORTED
    mixed = demo.gate_finding(_runs([0.0, 0.01, -0.01], [0.05, -0.04, 0.03]))
    assert mixed["verdict"] == st.INCONCLUSIVE and "inside the run-to-run variation" in mixed["statement"]
    single = demo.gate_finding(_runs([0.0], [0.3]))
    assert single["verdict"] == st.INCONCLUSIVE and "one seed" in single["statement"]
    against = demo.gate_finding(_runs([0.2, 0.21, 0.19], [0.0, 0.01, -0.01]))
    assert against["verdict"] == st.NOT_SUPPORTED
    for f in (clear, mixed, single, against):
        assert ": yes" not in f["statement"].lower()


def test_study_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "study"
    assert study_main(["addunet", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "study_addunet.json").read_text())
    names = [c["claim"] for c in report["claims"]]
    for part in ("Competitive reconstruction", "No added model complexity", "Improved training stability",
                 "Task-aware gate redistribution", "limited classifier capacity", "Joint training"):
        assert any(part in n for n in names), part
    assert all(c["verdict"] in st.VERDICTS for c in report["claims"])
    table = report["table"]
    for key in ("photos/addunet", "photos/addunet-hierarchical", "photos/concat-unet", "photos/dncnn",
                "mnist/single-task", "mnist/multi-task", "mnist/head-tiny", "mnist/head-wide"):
        assert table[key]["seeds"] == 2 and table[key]["parameters"] > 0, key
    assert table["photos/addunet"]["parameters"] < table["photos/concat-unet"]["parameters"]
    assert set(report["classical"]["sets"]["photos"]) >= {"noisy", "nlm", "tv", "wavelet"}
    text = (out / "study_addunet.md").read_text()
    assert "## Verdicts" in text and "DnCNN" in text and "non-local means" in text
    # a second call reuses the finished runs (same settings) and writes the same verdicts
    assert study_main(["addunet", "--out", str(out), *TINY]) == 0
    again = json.loads((out / "study_addunet.json").read_text())
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in report["claims"]]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--photo-size", "18", "--depth", "2"], "multiple of 4"),
    (["--methods", "nosuch"], "unknown MTL method"),
    (["--skip-photos", "--skip-mnist"], "nothing to run"),
    (["--test-crop", "8"], "--test-crop"),
])
def test_study_bad_options(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        addunet.main(["--out", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the options are checked


def test_study_command_errors(tmp_path, capsys):
    assert study_main(["nosuch"]) == 2
    assert "unknown study" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        addunet.main(["--out", str(blocker), *TINY])
    assert exc.value.code == 2 and "cannot create output directory" in capsys.readouterr().err


def test_demo_end_to_end_tiny(tmp_path, capsys):
    code = demo.main(["--out", str(tmp_path), "--dataset", "digits", "--limit", "32", "--epochs", "1", "--seeds", "2",
                      "--width", "4", "--depth", "2", "--jobs", "1", "--no-selfcheck"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["gate_finding"]["verdict"] in st.VERDICTS
    assert set(report["models"]) == {"single-task", "multi-task"}
    assert "accuracy" in report["models"]["multi-task"]["test"]["sigma_25"]
    assert set(report["nlm"]) == {"sigma_15", "sigma_25", "sigma_50"}
    text = (tmp_path / "report.md").read_text()
    assert "non-local means" in text and "noisy input" in text and ": yes" not in text.split("## Finding")[1]
    for name in ("samples.png", "gates.png", "curves.png"):
        assert (tmp_path / name).is_file(), name


def test_cli_dispatches_study_and_demo(capsys):
    from fusedskip import cli

    assert cli.main(["study", "nosuch"]) == 2
    assert "unknown study" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "addunet", "--seeds", "0"])
    assert exc.value.code == 2 and "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--seeds", "0"])
    assert exc.value.code == 2 and "--seeds must be >= 1" in capsys.readouterr().err
