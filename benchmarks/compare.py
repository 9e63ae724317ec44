"""``python -m benchmarks compare A.json B.json``: flag cases that got slower from A to B.

A row regressed when B's median exceeds A's by more than the run-to-run noise: the relative
p20–p80 spreads of both runs added together, and never less than ``--threshold`` (default 5%).
Faster beyond the same margin is reported as improved. Exit status 1 when any row regressed.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .report import format_table, read_results

KEY = ("case", "pass", "shape", "dtype", "layout", "provider")


def _key(r: Dict[str, Any]) -> Tuple:
    return tuple(r[k] for k in KEY)


def _spread(r: Dict[str, Any]) -> float:
    med, p20, p80 = r.get("median_ms"), r.get("p20_ms"), r.get("p80_ms")
    if not med or p20 is None or p80 is None:
        return 0.0
    return max(0.0, (p80 - p20) / med)


def compare(a: Dict[str, Any], b: Dict[str, Any], threshold: float = 0.05) -> Dict[str, Any]:
    rows_a = {_key(r): r for r in a["rows"] if r.get("status") == "ok" and r.get("median_ms")}
    rows_b = {_key(r): r for r in b["rows"] if r.get("status") == "ok" and r.get("median_ms")}
    out: Dict[str, Any] = {"regressed": [], "improved": [], "unchanged": [],
                           "only_a": sorted(set(rows_a) - set(rows_b)), "only_b": sorted(set(rows_b) - set(rows_a))}
    for key in sorted(set(rows_a) & set(rows_b)):
        ra, rb = rows_a[key], rows_b[key]
        margin = max(threshold, _spread(ra) + _spread(rb))
        ratio = rb["median_ms"] / ra["median_ms"]
        item = {"key": key, "a_ms": ra["median_ms"], "b_ms": rb["median_ms"], "ratio": ratio, "margin": margin}
        if ratio > 1.0 + margin:
            out["regressed"].append(item)
        elif ratio < 1.0 / (1.0 + margin):
            out["improved"].append(item)
        else:
            out["unchanged"].append(item)
    return out


def _table(items: List[Dict[str, Any]]) -> str:
    return format_table(
        KEY + ("A ms", "B ms", "B/A", "margin"),
        [(*map(str, it["key"]), f"{it['a_ms']:.4g}", f"{it['b_ms']:.4g}", f"{it['ratio']:.3f}",
          f"{100 * it['margin']:.1f}%") for it in items])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="baseline results JSON")
    parser.add_argument("b", help="new results JSON")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="minimum relative slow-down flagged, whatever the noise (default 0.05)")
    args = parser.parse_args(argv)
    a, b = read_results(args.a), read_results(args.b)
    if a["meta"].get("device") != b["meta"].get("device"):
        print(f"warning: different devices: {a['meta'].get('device')!r} vs {b['meta'].get('device')!r}")
    res = compare(a, b, args.threshold)
    print(f"A: {args.a} ({a['meta'].get('git_commit')}{'+dirty' if a['meta'].get('git_dirty') else ''}, "
          f"{a['meta'].get('timestamp')})")
    print(f"B: {args.b} ({b['meta'].get('git_commit')}{'+dirty' if b['meta'].get('git_dirty') else ''}, "
          f"{b['meta'].get('timestamp')})")
    print(f"{len(res['regressed'])} regressed, {len(res['improved'])} improved, {len(res['unchanged'])} within noise, "
          f"{len(res['only_a'])} only in A, {len(res['only_b'])} only in B "
          f"(margin = max({100 * args.threshold:.0f}%, spread A + spread B), spread = (p80 - p20) / median)")
    if res["regressed"]:
        print("\nREGRESSED (B slower):")
        print(_table(res["regressed"]))
    if res["improved"]:
        print("\nimproved (B faster):")
        print(_table(res["improved"]))
    return 1 if res["regressed"] else 0
