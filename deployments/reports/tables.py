"""The one table renderer for the terminal: aligned columns through rich, plain text that a
pipe, a file or a test reads the same as a person does."""

from __future__ import annotations

import io
from collections.abc import Sequence


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 0
) -> list[str]:
    """The table's lines: the header, then one line per row, columns two spaces apart, each
    line `indent` spaces in, nothing trailing."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1), header_style="")
    for name in header:
        table.add_column(name, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*row)
    out = io.StringIO()
    console = Console(file=out, width=100_000, color_system=None, highlight=False, emoji=False)
    console.print(table, markup=False)
    return [" " * indent + line.rstrip() for line in out.getvalue().splitlines()]


def render_rows(rows: Sequence[dict[str, str]], indent: int = 0) -> str:
    """Rows of the same keys as a table, the keys as its header; empty for no rows."""
    if not rows:
        return ""
    header = list(rows[0])
    return "\n".join(render_table(header, [[r[h] for h in header] for r in rows], indent))
