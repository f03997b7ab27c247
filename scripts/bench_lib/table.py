"""The result table: rows, formatting, JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RATIO = "ratio"
DELTA = "delta"
NA = "n/a"


@dataclass
class Row:
    """One line of the table. `direct`/`proxied` are numbers, or text for n/a rows."""

    section: str
    metric: str
    direct: float | str | None
    proxied: float | str | None
    unit: str
    compare: str = ""  # RATIO (proxied/direct), DELTA (proxied - direct) or ""
    note: str = ""
    #: Compare `proxied` with this instead of `direct` (when `direct` is not shown).
    base: float | None = None

    @property
    def comparison(self) -> float | None:
        d, p = (self.direct if self.base is None else self.base), self.proxied
        if not isinstance(d, (int, float)) or not isinstance(p, (int, float)):
            return None
        if self.compare == RATIO:
            return p / d if d else None
        if self.compare == DELTA:
            return p - d
        return None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["comparison"] = self.comparison
        return data


def not_available(section: str, metric: str, why: str) -> Row:
    """A placeholder row for a feature the proxy does not have yet."""
    return Row(section, metric, None, f"{NA} ({why})", "", note="")


def fmt(x: float | str | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_comparison(row: Row) -> str:
    c = row.comparison
    if c is None:
        return "-"
    if row.compare == RATIO:
        return f"x{c:.2f}"
    return ("+" if c >= 0 else "") + fmt(c)


HEADER = ("metric", "direct", "proxied", "ratio/delta", "unit", "notes")


def render(rows: list[Row], section_titles: dict[str, str]) -> str:
    """One plain-text table; a section title line precedes each section's rows."""
    cells: list[tuple[str, ...] | str] = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            cells.append(section_titles.get(section, section))
        if isinstance(row.proxied, str) and row.direct is None:
            cells.append((row.metric, "", row.proxied, "", "", row.note))
            continue
        cells.append((row.metric, fmt(row.direct), fmt(row.proxied), fmt_comparison(row),
                      row.unit, row.note))
    tuples = [c for c in cells if isinstance(c, tuple)]
    # The n/a text may run long: it does not widen the numeric columns.
    widths = [max([len(HEADER[i])] + [len(c[i]) for c in tuples
                                      if not (i == 2 and c[1] == "" and c[3] == "")])
              for i in range(len(HEADER))]
    right = {1, 2, 3}

    def line(c: tuple[str, ...]) -> str:
        parts = []
        for i, cell in enumerate(c[:-1]):
            if i == 2 and c[1] == "" and c[3] == "" and cell:
                parts.append(cell)  # an n/a message: free width
                return "  ".join([parts[0].ljust(widths[0]), " " * widths[1], cell])
            parts.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return ("  ".join(parts) + "  " + c[-1]).rstrip()

    total = sum(widths[:-1]) + 2 * (len(widths) - 1) + 5
    out = [line(HEADER), "-" * total]
    for c in cells:
        out.append(f"[{c}]" if isinstance(c, str) else line(c))
    out.append("-" * total)
    return "\n".join(out)
