"""Reports drawn from Jinja2 templates (`reports/templates/`): the compare page, the chart, the
pull request comment. HTML and SVG are escaped by the template engine; Markdown by its filters."""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).with_name("templates")


def md(text: Any) -> str:
    """Text safe inside a Markdown table cell or line: no pipes, no HTML, one line."""
    return md_piece(text).strip()


def md_piece(text: Any) -> str:
    """A piece of a line, its spaces kept (collapsed), Markdown and HTML escaped."""
    escaped = html.escape(re.sub(r"\s+", " ", str(text)), quote=False)
    return re.sub(r"([\\`*_~|\[\]#])", r"\\\1", escaped)


@functools.cache
def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "svg"], default_for_string=False, default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(md=md, md_piece=md_piece)
    return environment


def render(name: str, **context: Any) -> str:
    """The template `name` (in `reports/templates/`) filled in with `context`."""
    return str(_environment().get_template(name).render(**context))
