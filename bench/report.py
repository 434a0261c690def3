"""Results: rows of the table, the Markdown between markers in ``performance.md``, and the PNG chart.

A cell is a number, an error message (the measurement failed; the rest of the run goes on) or ``None`` (does not
apply: nginx has no cold upstream). The fourth column, the bucket read or written directly with curl, is the anchor
of the shared-tier rows (scenario 6) only; the fifth, dioproxy with one worker, that of the ``--workers 2`` rows
(scenario 7). Ratios and verdicts are computed where the row is made, by the scenario that
knows which way is better; this module only formats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

Cell = Union[float, str, None]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

SERVERS = ("dioproxy", "CNCF registry proxy", "nginx", "bucket, curl", "dioproxy, 1 worker")
COLORS = ("#2b7bba", "#e07b39", "#7a9a3a", "#8e6bb0", "#7fb2d9")


@dataclass
class Row:
    """One line of the table."""

    scenario: str  # "1", "2", …: the numbering, also the chart's grouping
    title: str
    unit: str
    ours: Cell
    cncf: Cell = None
    nginx: Cell = None
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None
    #: An absolute target to draw on the chart (e.g. 150 MB), if the target is one.
    target_value: float | None = None
    #: The S3 bucket itself, by curl of a presigned URL (scenario 6's anchor; last, so rows built by position keep
    #: their meaning).
    bucket: Cell = None
    #: dioproxy with one worker (scenario 7's anchor; the row's ``ours`` is then ``--workers 2``).
    single: Cell = None

    def cells(self) -> tuple[Cell, Cell, Cell, Cell, Cell]:
        return (self.ours, self.cncf, self.nginx, self.bucket, self.single)

    @property
    def errors(self) -> list[str]:
        return [c for c in self.cells() if isinstance(c, str)]


def number(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"
    if value >= 100 or unit in ("GETs",):
        return f"{value:,.0f}"
    return f"{value:.1f}"


def cell_text(cell: Cell, unit: str) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return "error: " + re.sub(r"\s+", " ", cell).replace("|", "/")[:120]
    return number(cell, unit)


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def ratio(ours: Cell, anchor: Cell) -> float | None:
    """ours / anchor when both are numbers (and the anchor is not zero)."""
    if isinstance(ours, (int, float)) and isinstance(anchor, (int, float)) and anchor:
        return ours / anchor
    return None


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| # | scenario | dioproxy | CNCF registry proxy | nginx | bucket, curl | dioproxy, 1 worker | ratio | target "
        "| met? |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        cells = " | ".join(cell_text(c, row.unit) for c in row.cells())
        lines.append(
            f"| {row.scenario} | {row.title} ({row.unit}) | {cells} | {row.ratio} | {row.target} | {verdict(row.met)} |"
        )
    return "\n".join(lines) + "\n"


TEMPLATE = f"""# Performance

Written by `python -m bench`; everything between the markers is replaced on each run.

{BEGIN}
{END}
"""


def write_markdown(path: Path, body: str) -> None:
    """Replace what lies between the markers of ``path`` (created from a template if missing)."""
    text = path.read_text() if path.exists() else TEMPLATE
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}")


def chart(rows: Sequence[Row], path: Path, subtitle: str) -> None:
    """One small panel per row: the servers (and the bucket) side by side, the target as a dashed line when it is
    absolute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    lines = math.ceil(len(rows) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.1 * lines), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows):
        names, values, colors = [], [], []
        for name, cell, color in zip(SERVERS, row.cells(), COLORS):
            if cell is None:
                continue
            names.append(name.replace(" registry proxy", "\nproxy").replace(", ", "\n"))
            values.append(cell if isinstance(cell, (int, float)) else 0.0)
            colors.append(color)
        bars = ax.bar(names, values, color=colors)
        for bar, cell in zip(bars, [c for c in row.cells() if c is not None]):
            label = "error" if isinstance(cell, str) else number(cell, row.unit)
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        if row.target_value is not None:
            ax.axhline(row.target_value, color="#c0392b", linestyle="--", linewidth=1)
        mark = {True: " ✓", False: " ✗", None: ""}[row.met]
        ax.set_title(f"{row.scenario}. {row.title}{mark}", fontsize=9, wrap=True)
        ax.set_ylabel(row.unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.18)
    figure.suptitle(f"dioproxy vs CNCF registry proxy vs nginx vs the bucket vs one worker — {subtitle}", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
