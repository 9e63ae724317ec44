"""tools/make_venv.sh refuses early, in one line, what would otherwise fail half-way through pip."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "make_venv.sh"


def run(venv, python, env_extra=None):
    env = {"PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), str(venv), python, "test"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_too_little_disk_is_refused_before_the_venv_is_made(tmp_path):
    venv = tmp_path / "deeper" / ".venv"
    r = run(venv, sys.executable, {"FUSEDSKIP_MIN_FREE_GIB": "1000000"})
    assert r.returncode == 1
    assert "GiB free on the disk of" in r.stderr and "needs about 1000000 GiB" in r.stderr
    assert "FUSEDSKIP_MIN_FREE_GIB=0" in r.stderr
    assert not venv.exists() and not (tmp_path / "deeper").exists()


def test_missing_interpreter_is_named():
    r = run("/nonexistent/.venv", "python3.999")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "fusedskip: no 'python3.999' on PATH: fusedskip needs Python >= 3.10 (pass PYTHON=/path/to/python3.10+)")
