"""Rendering of a built report: Markdown (figures linked) and one self-contained HTML page.

The HTML page embeds every PNG as a base64 ``data:`` URI and carries its own
CSS, so it can be mailed, attached to an MLflow run or opened offline as a
single file. Called by irpo.report; nothing here reads MLflow.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from irpo.report.tables import Table, to_markdown


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
.note, figcaption, .meta { color: #555; font-size: 0.85em; }
"""


def table_html(table: Table) -> str:
    df = table.frame
    names = list(df.index.names) if df.index.nlevels > 1 else [df.index.name or ""]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [*names, *df.columns])
    body = []
    for idx, row in df.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in [*idx, *row.tolist()])
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f"<h3>{html.escape(table.title)}</h3>\n<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>\n{note}")


def figure_html(caption: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(title: str, meta: list[tuple[str, str]], sections: list[Section]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in meta)
    head = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>")
    parts = [head, f"<h1>{html.escape(title)}</h1>", f'<table class="meta">{rows}</table>']
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [table_html(t) for t in s.tables]
        parts += [figure_html(c, p) for c, p in s.figures]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, meta: list[tuple[str, str]], sections: list[Section],
                    out_dir: Path) -> str:
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta] + [""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for t in s.tables:
            lines += [to_markdown(t), ""]
        for caption, png in s.figures:
            lines += [f"![{caption}]({png.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)
