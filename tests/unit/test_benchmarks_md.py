"""BENCHMARKS.md is written by the scripts in benchmarks/: every section names its script, the summary table is the
sections' headline rows, and the accuracy sections are exactly what their `--report-only` renders from
benchmarks/results/<name>.json (nothing is trained or measured here)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TEXT = (ROOT / "BENCHMARKS.md").read_text()
SECTIONS = [m.group(1) for m in re.finditer(r"<!-- (\w+):start -->", TEXT) if m.group(1) != "summary"]


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))
    try:
        import _report
        yield _report
    finally:
        sys.path.remove(str(BENCH))


def test_under_400_lines_with_a_summary_first():
    assert len(TEXT.splitlines()) < 400
    assert TEXT.index("<!-- summary:start -->") < TEXT.index(f"<!-- {SECTIONS[0]}:start -->")


@pytest.mark.parametrize("name", SECTIONS)
def test_every_section_has_its_script(name):
    script = BENCH / f"{name}.py"
    assert script.is_file(), f"BENCHMARKS.md section {name!r} has no benchmarks/{name}.py"
    assert f"<!-- {name}:start -->\n## {name}\n" in TEXT
    source = script.read_text()
    assert f'"{name}"' in source and ("update_section(" in source or "render(" in source), \
        f"benchmarks/{name}.py does not write its BENCHMARKS.md section"


def test_every_benchmark_script_has_its_section():
    scripts = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    assert scripts == sorted(SECTIONS), f"scripts {scripts} vs BENCHMARKS.md sections {SECTIONS}"


def test_summary_is_the_sections_headlines(report):
    block = re.search(r"<!-- summary:start -->\n(.*?)\n<!-- summary:end -->", TEXT, re.S).group(1)
    assert block == report.summary_table(TEXT)
    assert block.count("\n") > len(SECTIONS)          # a header, and at least one row per section


@pytest.mark.parametrize("name", ["bench_supernet", "bench_search", "bench_recipe"])
def test_report_only_reproduces_the_section(report, name):
    module = __import__(name)
    rendered = report.render(name, module.section(report.load_results(name)), TEXT)
    assert rendered == TEXT, f"run `python benchmarks/{name}.py --report-only` and commit BENCHMARKS.md"
