"""`eqnet_plugin.files`: several files written all or nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from eqnet_plugin.files import atomic_files, atomic_write_text


def test_atomic_files_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    atomic_write_text(a, "old a")
    with pytest.raises(ZeroDivisionError):
        with atomic_files([a, b]) as (ta, tb):
            Path(ta).write_text("new a")
            Path(tb).write_text("new b")
            1 / 0
    assert a.read_text() == "old a" and not b.exists()
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic_files([a, b]) as (ta, tb):
            Path(ta).write_text("new a")
    assert a.read_text() == "old a" and not b.exists()
    with atomic_files([a, b]) as (ta, tb):
        Path(ta).write_text("new a")
        Path(tb).write_text("new b")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
