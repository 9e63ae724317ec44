"""Studies that measure claims with seeds, baselines and computed verdicts.

``fusedskip study addunet`` (:mod:`fusedskip.study.addunet`): the AddUNet paper's claims.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

STUDIES = ("addunet",)


def main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip study") -> int:
    """``fusedskip study NAME [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{{','.join(STUDIES)}}} [options]\n\n"
              "  addunet   the AddUNet paper's claims: baselines, seeds, verdicts (see --help)")
        return 0 if argv else 2
    if argv[0] not in STUDIES:
        sys.stderr.write(f"{prog}: error: unknown study {argv[0]!r}; choose from {', '.join(STUDIES)}\n")
        return 2
    from .addunet import main as addunet_main

    return addunet_main(argv[1:], prog=f"{prog} {argv[0]}")
