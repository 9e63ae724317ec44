"""What :func:`fusedskip.convert` / :func:`fusedskip.unconvert` did: a small, printable record."""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class Replaced:
    """One replacement.

    ``path``: the module replaced (``""`` is the root); ``rule``: which rule matched (e.g.
    ``"sequential:conv-norm-act"``); ``before``/``after``: short descriptions; ``also``: other
    paths the rule touched (activation slots turned into :class:`FusedIdentity`, swapped classes,
    new parameters).
    """

    path: str
    rule: str
    before: str
    after: str
    also: Tuple[str, ...] = ()

    def __str__(self) -> str:
        also = f"  [{'; '.join(self.also)}]" if self.also else ""
        return f"{self.path or '<root>'}: {self.before} -> {self.after} ({self.rule}){also}"


@dataclass(frozen=True)
class Left:
    """A module left as it was, and why. ``kind`` is ``"norm"`` (a normalisation layer that was
    not fused), ``"skip"`` (a skip connection kept as written), ``"block"`` (a block rule that
    did not apply) or ``"fused"`` (unconvert: a fused module it cannot turn back)."""

    path: str
    module: str
    reason: str
    kind: str = "norm"

    def __str__(self) -> str:
        return f"{self.path or '<root>'} ({self.module}): {self.reason}"


@dataclass
class ConversionReport:
    """The outcome of :func:`fusedskip.convert` (``direction="convert"``) or
    :func:`fusedskip.unconvert` (``direction="unconvert"``).

    Attributes:
        replaced: every replacement made, in model order.
        left: every candidate left untouched, with the reason.
        already_fused: paths of fusedskip modules that were there before the call (a converted
            model converted again lists them here and replaces nothing: convert is idempotent).
        notes: remarks that apply to the whole model (e.g. global hooks, options used).
    """

    direction: str = "convert"
    replaced: List[Replaced] = field(default_factory=list)
    left: List[Left] = field(default_factory=list)
    already_fused: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    norms_total: int = 0
    norms_fused: int = 0

    @property
    def norms_left(self) -> List[Left]:
        """The norm layers left unfused (one entry each, with the reason)."""
        return [e for e in self.left if e.kind == "norm"]

    @property
    def coverage(self) -> float:
        """Fraction of the model's norm layers (before the call) that were fused (1.0 if none)."""
        return self.norms_fused / self.norms_total if self.norms_total else 1.0

    def coverage_line(self) -> str:
        """One line: norm layers before, fused, left (convert reports)."""
        return (f"coverage: {self.norms_fused}/{self.norms_total} norm layers fused "
                f"({100.0 * self.coverage:.1f} %), {len(self.norms_left)} left")

    @property
    def changed(self) -> bool:
        """True when the call changed the model."""
        return bool(self.replaced)

    def __bool__(self) -> bool:  # a report is always truthy; use .changed for "did anything happen"
        return True

    def counts(self) -> Dict[str, int]:
        """Number of replacements per rule."""
        return dict(Counter(r.rule for r in self.replaced))

    def left_by_reason(self) -> "OrderedDict[str, List[Left]]":
        """Left entries grouped by reason (first-seen order)."""
        groups: "OrderedDict[str, List[Left]]" = OrderedDict()
        for entry in self.left:
            groups.setdefault(entry.reason, []).append(entry)
        return groups

    def __str__(self) -> str:
        verb = "replaced" if self.direction == "convert" else "restored"
        head = f"fusedskip.{self.direction}: {len(self.replaced)} {verb}, {len(self.left)} left"
        if self.direction == "convert":
            head += f", {len(self.already_fused)} already fused"
        lines = [head]
        if self.direction == "convert":
            lines.append(self.coverage_line())
        if not self.replaced:
            if self.already_fused and self.direction == "convert":
                lines.append("  nothing to convert: the model already holds fusedskip modules "
                             "(convert is idempotent)")
            else:
                lines.append(f"  nothing to {self.direction}")
        if self.replaced:
            lines.append(f"{verb.capitalize()} ({', '.join(f'{k}: {v}' for k, v in self.counts().items())}):")
            lines.extend(f"  {r}" for r in self.replaced)
        if self.left:
            lines.append("Left (grouped by reason):")
            for reason, entries in self.left_by_reason().items():
                paths = [e.path or "<root>" for e in entries]
                shown = ", ".join(paths[:6]) + (f", ... (+{len(paths) - 6})" if len(paths) > 6 else "")
                kinds = sorted({e.module for e in entries})
                lines.append(f"  [{len(entries)} x {'/'.join(kinds)}] {reason}")
                lines.append(f"      at {shown}")
        if self.already_fused:
            shown = ", ".join(p or "<root>" for p in self.already_fused[:6])
            more = f", ... (+{len(self.already_fused) - 6})" if len(self.already_fused) > 6 else ""
            lines.append(f"Already fused: {shown}{more}")
        if self.notes:
            lines.append("Notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        return "\n".join(lines)
