"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections untouched."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it. Timings " \
         "are ratios against a baseline measured in the same run.\n"


def machine() -> str:
    """One line describing where the numbers were measured."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {dev}")


NOTES_DIR = ROOT / "benchmarks" / "results"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``. The hand-written
    reading of the numbers, ``benchmarks/results/<name>_notes.md`` when it exists, follows the generated text, so
    rebuilding a section keeps it."""
    notes = NOTES_DIR / f"{name}_notes.md"
    if notes.exists():
        markdown = markdown.rstrip() + "\n\n" + notes.read_text()
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
