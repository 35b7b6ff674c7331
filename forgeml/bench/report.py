"""Render benchmark reports (tables on the terminal, Markdown for results files)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from forgeml.bench.harness import Report, paired_ratio

COLUMNS = ["case", "precision", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "min ms", "runs/s", "peak RSS MB",
           "size MB", "paired vs ref", "p50 vs ref"]


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if 0 < abs(value) < 10 ** -digits:
        return f"{value:.2g}"  # slow cases (emulated devices): 0.027 runs/s, not 0.0
    return f"{value:.{digits}f}" if value < 100 else f"{value:.1f}"


def precision(case: Any) -> str:
    """A case's precision ("fp32", "tf32", "fp16"); reports written before it was recorded: fp32."""
    return str(case.extra.get("precision") or "fp32")


def references(report: Report) -> dict[tuple[str, str], Any]:
    """(model, precision) -> the first baseline case of that model and precision."""
    out: dict[tuple[str, str], Any] = {}
    for c in report.cases:
        if c.extra.get("reference"):
            out.setdefault((c.model, precision(c)), c)
    return out


def rows(report: Report) -> list[list[str]]:
    """One row per case; the ratios are to the reference case of the same model and the same precision
    (<1: faster): p50 over its p50, and the paired ratio of their alternating blocks (`paired_ratio`); a
    case with no reference at its precision gets none ("-")."""
    reference = references(report)
    block = int(report.settings.get("block", 10))
    out = []
    for case in report.cases:
        s = case.stats
        ref = reference.get((case.model, precision(case)))
        ratio = "ref" if ref is case else (f"{s.p50_ms / ref.stats.p50_ms:.2f}x" if ref else "-")
        paired = paired_ratio(case.samples_ms, ref.samples_ms, block) if ref and ref is not case else None
        out.append([case.name, precision(case), _fmt(s.p50_ms), _fmt(s.p90_ms), _fmt(s.p99_ms), _fmt(s.mean_ms),
                    _fmt(s.std_ms), _fmt(s.min_ms), _fmt(s.throughput_per_s, 1), _fmt(case.peak_rss_mb, 1),
                    _fmt(case.artifact_mb, 2), "ref" if ref is case else (f"{paired:.2f}x" if paired else "-"),
                    ratio])
    return out


def print_table(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    settings = report.settings
    table = Table(title=f"forgeml bench: {settings.get('threads')} threads, {settings.get('repeat')} runs "
                        f"after {settings.get('warmup')} warm-up, {settings.get('isolation', 'alternating')} "
                        f"({report.machine.get('cpu')})")
    body = list(rows(report))
    case = COLUMNS.index("case")
    for col in COLUMNS:  # the case names whole on one line (logs and tests search them); numbers may wrap
        table.add_column(col, justify="left" if col == "case" else "right", no_wrap=col == "case",
                         min_width=max((len(row[case]) for row in body), default=4) if col == "case" else None)
    for row in body:
        table.add_row(*row)
    console.print(table)


def markdown_table(report: Report, columns: list[str] | None = None) -> str:
    cols = columns or COLUMNS
    idx = [COLUMNS.index(c) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows(report):
        lines.append("| " + " | ".join(row[i] for i in idx) + " |")
    return "\n".join(lines)


def summary(report: Report) -> dict[str, Any]:
    """p50 per case name, for quick comparisons."""
    return {c.name: c.stats.p50_ms for c in report.cases}
