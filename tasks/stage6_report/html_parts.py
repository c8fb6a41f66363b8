"""The building blocks of a self-contained HTML page, shared by the run report and the trend
page: escaping, number formatting, tables, embedded figures, file links and the style sheet.
A cell is escaped unless it is ``Raw``; a figure is a data URI, so the page needs no network."""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSS", "Raw", "data_uri", "embedded_figure", "escape", "file_link", "fmt", "html_table", "image_type",
           "kv_table", "md_table"]


def escape(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers to short text: None as a dash, floats to ``digits`` significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x)
    return str(x)


def image_type(data: bytes) -> str:
    """"jpeg" or "png", from the file's magic bytes."""
    return "jpeg" if data[:3] == b"\xff\xd8\xff" else "png"


def data_uri(png: bytes) -> str:
    """A PNG (or JPEG) as a data URI, so pages and artifacts need no file access."""
    return f"data:image/{image_type(png)};base64," + base64.b64encode(png).decode("ascii")


def embedded_figure(figures: Mapping[str, bytes], key: str | None, alt: str,
                    linked: Mapping[str, str] | None = None) -> str:
    """An embedded figure, or a link to its PNG file when the page has no room for it."""
    if key and linked and key in linked:
        return f'<p><a href="{escape(linked[key])}">{escape(alt)} (image file)</a></p>'
    if not key or key not in figures:
        return ""
    return f'<img src="{data_uri(figures[key])}" alt="{escape(alt)}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """Cells are escaped unless wrapped in ``Raw``; numbers are formatted by ``fmt``."""
    def cell(v: Any) -> str:
        if isinstance(v, Raw):
            return str(v)
        return escape(fmt(v))

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """Already-escaped HTML for a table cell."""


def file_link(label: str, target: str, base_dir: Path | None) -> str:
    """A relative file link for a local path; URLs of remote stores (s3://, memory://) are shown
    as text: the report must not point the browser at the network."""
    if "://" in target and not target.startswith("file://"):
        return f"{escape(label)}: <code>{escape(target)}</code>"
    path = Path(target.removeprefix("file://"))
    href = os.path.relpath(path, base_dir) if base_dir is not None and path.is_absolute() else str(path)
    href = Path(href).as_posix()
    return f'{escape(label)}: <a href="{escape(href)}">{escape(href)}</a>'


CSS = """
:root { --fg: #1d1f21; --muted: #5f6b7a; --line: #d8dde3; --accent: #2f5d8a; --bg-alt: #f5f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1280px; padding: 24px 32px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; color: var(--muted); }
p.lead, .muted { color: var(--muted); }
code { font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; background: var(--bg-alt);
       padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; }
td:first-child, th:first-child, td.l, th.l { text-align: left; }
table.kv td:first-child { color: var(--muted); }
table.kv td { text-align: left; }
tbody tr:hover { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0 12px; image-rendering: auto; }
details { margin: 8px 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px 12px; }
details > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
details[open] > summary { margin-bottom: 6px; }
.channel { border-left: 4px solid var(--accent); padding-left: 14px; margin: 26px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e4ecf4; color: var(--accent); margin-left: 6px; }
.ok { color: #2e7d32; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 12px 24px; }
nav ul { columns: 3; margin: 6px 0; padding-left: 18px; }
.findings { background: var(--bg-alt); border: 1px solid var(--line); border-radius: 6px; padding: 8px 18px; }
.findings li { margin: 2px 0; }
.findings h2 { margin-top: 8px; }
ul.warn { color: #8a5a00; } ul.warn li::marker { content: "! "; }
img.thumbs { image-rendering: pixelated; }
"""


def kv_table(d: Mapping[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            v = json.dumps(v, sort_keys=True)
        rows.append((k, v))
    return html_table(["parameter", "value"], rows, "kv")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
