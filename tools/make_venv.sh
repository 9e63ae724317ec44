#!/usr/bin/env bash
# Create (or complete) a virtual environment and install fusedskip into it, editable.
#
#   tools/make_venv.sh VENV PYTHON EXTRAS [CONSTRAINTS]
#
# VENV: the folder; PYTHON: the interpreter that creates it; EXTRAS: setup.py extras
# ("test", "train", ...); CONSTRAINTS: a pip constraints file of exact versions (the lock), or
# empty for the newest versions setup.py admits. A missing interpreter, a Python older than 3.10
# or a registry that cannot be reached ends with one line saying so (the pip log is kept in
# VENV/install.log), never a pip traceback.
set -uo pipefail
venv=$1 python=$2 extras=$3 constraints=${4:-}
fail() { echo "fusedskip: $*" >&2; exit 1; }

command -v "$python" >/dev/null 2>&1 || fail "no '$python' on PATH: fusedskip needs Python >= 3.10 (pass PYTHON=/path/to/python3.10+)"
"$python" -c 'pass' >/dev/null 2>&1 || fail "'$python' is on PATH but does not run (a pyenv shim without that version selected?): pass PYTHON=/path/to/python3.10+"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || fail "'$python' is Python $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'): fusedskip needs Python >= 3.10 (pass PYTHON=/path/to/python3.10+)"
"$python" -c 'import venv, ensurepip' 2>/dev/null || fail "'$python' lacks the venv/ensurepip modules (Debian: apt install python3-venv)"

if [ ! -x "$venv/bin/python" ]; then
    # A new environment takes about 6 GiB (torch's CUDA build and its libraries: 6.1 GiB for the
    # test extras, 4.7 GiB for the device stack) plus pip's unpacking space: say so before pip
    # starts rather than fail half-way with ENOSPC. FUSEDSKIP_MIN_FREE_GIB=0 skips the check.
    need=${FUSEDSKIP_MIN_FREE_GIB:-7}
    dir=$(realpath -m "$venv")
    while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
    free=$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
    if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
        fail "only $free GiB free on the disk of $venv; a new environment needs about $need GiB (torch's CUDA build): free space, or set FUSEDSKIP_MIN_FREE_GIB=0 to try anyway"
    fi
    "$python" -m venv "$venv" || fail "could not create the virtual environment $venv with '$python'"
fi
log="$venv/install.log"
args=(-e ".[$extras]")
[ -n "$constraints" ] && args=(-c "$constraints" "${args[@]}")
echo "installing fusedskip[$extras] into $venv${constraints:+ (versions pinned by $constraints)}; log: $log"
if ! "$venv/bin/python" -m pip install --disable-pip-version-check "${args[@]}" >"$log" 2>&1; then
    if grep -qiE "connection|resolve|network|temporary failure|max retries|proxy|ssl|timed out|no matching distribution|could not find a version|conflicting dependencies|resolutionimpossible" "$log"; then
        fail "pip could not get the packages (no access to the package registry, or a pinned version it does not serve); details in $log"
    fi
    fail "pip install failed: $(grep -E '^ERROR' "$log" | head -1 | cut -c1-200); details in $log"
fi
