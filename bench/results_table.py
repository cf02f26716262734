"""The markdown table the GPU benchmarks write beside their JSON under ``bench/results/``."""

from __future__ import annotations

import pathlib


def cell(value, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures, lists element-wise."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cell(v, digits) for v in value) + "]"
    return str(value)


def write_markdown(path: pathlib.Path, title: str, meta: dict, cols: list[str], rows: list[dict], digits=3) -> str:
    """Write ``path``: a title line naming ``meta``'s fields, then one table row per entry of ``rows`` (missing
    columns left blank). Returns the text, for printing."""
    lines = [f"{title}: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, ""), digits) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
