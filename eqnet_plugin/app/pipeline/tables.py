"""Plain-text / Markdown tables and JSON results files."""
from __future__ import annotations

import json
import os
from typing import Sequence

from ...quant.space import atomic_write_text


# --- tables ---------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Sequence], headers: Sequence[str], markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


def write_json(path: str | os.PathLike, obj) -> str:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))
    return os.fspath(path)
