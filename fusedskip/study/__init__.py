"""Studies that measure claims with seeds, baselines and computed verdicts.

``fusedskip study addunet`` (:mod:`fusedskip.study.addunet`): the AddUNet paper's claims.
``fusedskip study mtl`` (:mod:`fusedskip.study.mtl`): multi-task architectures (MTAN, CACM, VMSM,
cross-task modules) × MTL methods on MultiMNIST, with Δm% and seed-spread verdicts.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

STUDIES = ("addunet", "mtl")


def main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip study") -> int:
    """``fusedskip study NAME [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{{','.join(STUDIES)}}} [options]\n\n"
              "  addunet   the AddUNet paper's claims: baselines, seeds, verdicts (see --help)\n"
              "  mtl       architectures × MTL methods on MultiMNIST: Δm%, seed-spread verdicts (see --help)")
        return 0 if argv else 2
    if argv[0] not in STUDIES:
        sys.stderr.write(f"{prog}: error: unknown study {argv[0]!r}; choose from {', '.join(STUDIES)}\n")
        return 2
    if argv[0] == "mtl":
        from .mtl import main as study_main
    else:
        from .addunet import main as study_main
    return study_main(argv[1:], prog=f"{prog} {argv[0]}")
