"""Helpers shared by the CLI tests: run `eqnet` in-process and check its one-line errors."""
from __future__ import annotations

from eqnet_plugin.app import cli

FAST = ["--threads", "1", "--no-progress"]


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr); arguments are passed as strings (paths welcome)."""
    rc = cli.main([*map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    """Exit status 2, one line on stderr, no traceback, every needle in that line."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
