"""Seed statistics and verdicts for the study: mean ± std, paired differences, t-intervals.

A claim is tested on per-seed pairs (the same seed drives both arms: same data order, same
noise, same initial weights where the architectures allow). For paired values ``a_s, b_s`` the
difference ``d_s = a_s − b_s`` gives a mean ``d̄``, a standard deviation ``s_d`` and a two-sided
95 % Student-t interval ``d̄ ± t(0.975, n−1) · s_d / √n``. Verdicts come from that interval and
nothing else:

* ``better`` claims (``a`` exceeds ``b``): **supported** when the interval lies above 0,
  **not supported** when it lies below 0, **inconclusive** when it contains 0 (the difference is
  inside the seed spread).
* ``non-inferior`` claims (``a`` is not worse than ``b`` by more than a margin ``m``):
  **supported** when the interval lies above −m, **not supported** when it lies below −m,
  **inconclusive** when it straddles −m.

With fewer than two seeds there is no spread, so the verdict is **inconclusive**.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable, List, Optional, Sequence

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)

# Two-sided 95 % Student-t quantiles t(0.975, df) for df = 1..30; 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile for ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _finite(values: Iterable[float], name: str) -> List[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name}: no values")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: non-finite values {bad[:3]}")
    return out


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    v = _finite(values, "mean_std")
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def paired(a: Sequence[float], b: Sequence[float], drop_nonfinite: bool = False) -> Dict[str, float]:
    """Paired difference a − b over seeds: mean, std, 95 % t-interval, wins (a > b) out of n.

    Non-finite values raise ValueError, or with ``drop_nonfinite`` drop their pair (``dropped``
    counts them; with fewer than two pairs left the verdicts say inconclusive)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs as many values on each side (>= 1), got {len(a)} and {len(b)}")
    keep = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(keep) < len(a) and not drop_nonfinite:
        _finite(a, "paired a")
        _finite(b, "paired b")
    d = [x - y for x, y in keep]
    n = len(d)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "wins": 0, "diffs": [],
                "dropped": len(a)}
    mean = statistics.fmean(d)
    std = statistics.stdev(d) if n > 1 else math.nan
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n,
            "wins": sum(x > 0 for x in d), "diffs": d, "dropped": len(a) - n}


def verdict_better(diff: Dict[str, float]) -> str:
    """``a`` better than ``b`` (larger), from :func:`paired`'s interval."""
    return _verdict(diff, 0.0)


def verdict_non_inferior(diff: Dict[str, float], margin: float) -> str:
    """``a`` not worse than ``b`` by more than ``margin`` (>= 0), from :func:`paired`'s interval."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return _verdict(diff, -float(margin))


def _verdict(diff: Dict[str, float], threshold: float) -> str:
    if diff["n"] < 2 or not math.isfinite(diff["lo"]):
        return INCONCLUSIVE
    if diff["lo"] > threshold:
        return SUPPORTED
    if diff["hi"] < threshold:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """One verdict from several sub-tests: supported only if every part is, not supported if any
    part is not supported and none is supported, inconclusive otherwise (mixed or open)."""
    vs = list(verdicts)
    for v in vs:
        if v not in VERDICTS:
            raise ValueError(f"unknown verdict {v!r}")
    if not vs:
        return INCONCLUSIVE
    if all(v == SUPPORTED for v in vs):
        return SUPPORTED
    if NOT_SUPPORTED in vs and SUPPORTED not in vs:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def fmt_ms(stats: Optional[Dict[str, float]], digits: int = 2) -> str:
    """``mean ± std`` (``—`` when missing)."""
    if not stats:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def fmt_diff(diff: Dict[str, float], digits: int = 2) -> str:
    """``+d̄ [lo, hi] (wins/n)``."""
    if diff["n"] < 2:
        return f"{diff['mean']:+.{digits}f} ({diff['n']} usable seed{'s' if diff['n'] != 1 else ''})"
    d = digits
    return f"{diff['mean']:+.{d}f} [{diff['lo']:+.{d}f}, {diff['hi']:+.{d}f}] ({diff['wins']}/{diff['n']})"
