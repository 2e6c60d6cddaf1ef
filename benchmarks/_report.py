"""BENCHMARKS.md and benchmarks/results/: one section and at most one results file per benchmark script.

A section lives between ``<!-- name:start -->`` and ``<!-- name:end -->`` and opens with ``## name``. Its headline
rows (``<!-- headline | measure | result | -->`` lines inside it) make up the summary table at the top of the file,
which `update_section` rebuilds from every section each time one section changes. The hand-written reading of a
section, ``benchmarks/results/<name>_notes.md`` when it exists, follows the generated text.
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
HEADER = """# Benchmarks

Every section below is written by the script it is named after (`benchmarks/<name>.py`): its command, budget and
wall time are in the section and in the script's docstring. Accuracy benchmarks keep their runs in
`benchmarks/results/<name>.json` (one entry per run) and rebuild their section from it with `--report-only`; timing
benchmarks rewrite their section when they run. Timings are ratios against a baseline measured in the same run.
"""
SUMMARY_HEAD = "| section | measures | current result |\n|---|---|---|"
_HEADLINE = re.compile(r"^<!-- headline (\|.*\|) -->$", re.M)


def machine() -> str:
    """One line describing where the numbers were measured."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {dev}")


def load_results(name: str) -> dict:
    """``benchmarks/results/<name>.json``: the benchmark's recorded runs, keyed by run ({} when none)."""
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_run(name: str, key: str, run: dict) -> None:
    """Record (or replace) one run in ``benchmarks/results/<name>.json``, keeping the others."""
    runs = load_results(name)
    runs[key] = run
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def headline(measure: str, result: str) -> str:
    """A summary-table row of the section it is placed in."""
    return f"<!-- headline | {measure} | {result} | -->"


def summary_table(text: str) -> str:
    """The summary table: one row per headline of every section, in the file's order."""
    rows = []
    for m in re.finditer(r"<!-- (\w+):start -->(.*?)<!-- \1:end -->", text, re.S):
        name = m.group(1)
        rows += [f"| [{name}](#{name}) {row}" for row in _HEADLINE.findall(m.group(2))]
    return SUMMARY_HEAD + "\n" + "\n".join(rows)


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"


def render(name: str, markdown: str, text: str) -> str:
    """`text` (BENCHMARKS.md's contents) with section `name` set to `markdown` plus its notes file, and the summary
    table rebuilt."""
    notes = RESULTS_DIR / f"{name}_notes.md"
    if notes.exists():
        markdown = markdown.rstrip() + "\n\n" + notes.read_text()
    text = _replace_block(text or HEADER, name, markdown)
    if "<!-- summary:start -->" not in text:
        text = text.replace(HEADER.rstrip(), HEADER.rstrip() + "\n\n<!-- summary:start -->\n<!-- summary:end -->", 1)
    return _replace_block(text, "summary", summary_table(text))


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) section `name` of BENCHMARKS.md and rebuild the summary table."""
    text = render(name, markdown, path.read_text() if path.exists() else HEADER)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
