"""``python -m benchmarks [run|account|gpu-session|compare|plot|show|list] ...`` (``run`` is the default)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "run"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if command == "run":
        from .runner import run
        return run(rest)
    if command in ("account", "model"):
        from .accounting import main as account_main
        return account_main(rest)
    if command == "gpu-session":
        from .gpu_session import main as session_main
        return session_main(rest)
    if command == "compare":
        from .compare import main as compare_main
        return compare_main(rest)
    if command in ("plot", "show"):
        parser = argparse.ArgumentParser(prog=f"python -m benchmarks {command}")
        parser.add_argument("results", help="a results JSON written by python -m benchmarks")
        if command == "plot":
            parser.add_argument("--out", help="folder for the PNGs (default: <results stem>-plots beside it)")
        args = parser.parse_args(rest)
        from .report import read_results
        results = read_results(args.results)
        if command == "show":
            from .runner import show
            show(results)
            return 0
        from .plots import make_plots
        out = args.out or os.path.splitext(args.results)[0] + "-plots"
        for path in make_plots(results, out):
            print(path)
        return 0
    if command == "list":
        from .cases import CASES
        from .report import format_table
        print(format_table(("case", "kind", "passes", "status", "what"),
                           [(c.name, c.kind, ",".join(c.passes), c.available() or "available", c.title)
                            for c in CASES.values()]))
        return 0
    print(f"unknown command {command!r}: use run, account, gpu-session, compare, plot, show or list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
