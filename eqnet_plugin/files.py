"""Writing files so that nothing is ever half-written: the one atomic writer of the package.

Every file eqnet_plugin writes (subnet JSON, search results, checkpoints, plots, ONNX models, AIMET encodings) goes
through `atomic_write` (one file) or `atomic_files` (several files that belong together): the data is written to a
temporary file in the destination folder, flushed, then renamed into place. On any error the temporary files are
removed and the files that were at the destinations before are still there, unchanged.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_files"]


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                                   # some file systems refuse fsync on read-only handles
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` with a temporary path in `path`'s folder (created if missing), then move it to `path`.

    Returns `path` as a string. If `write` raises, nothing is left behind and a previous file at `path` survives.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """Write several files as one unit: yields temporary paths (in a temporary folder next to the first
    destination) to write to; when the block ends without error they are moved to `paths`.

    If the block raises, or a move fails, no new file is left at any destination and files that were there before
    are restored. A temporary path the block did not create is an error (RuntimeError, nothing moved).
    """
    dests = [os.fspath(p) for p in paths]
    folders = {os.path.dirname(os.path.abspath(p)) for p in dests}
    for f in folders:
        os.makedirs(f, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dests[0])), prefix=".tmp-")
    try:
        tmps = [os.path.join(tmp_dir, f"{i}-{os.path.basename(p)}") for i, p in enumerate(dests)]
        yield tmps
        missing = [d for d, t in zip(dests, tmps) if not os.path.exists(t)]
        if missing:
            raise RuntimeError(f"atomic_files: nothing was written for {missing}")
        backups: list[tuple[str, str | None]] = []
        try:
            for i, (dest, tmp) in enumerate(zip(dests, tmps)):
                _fsync(tmp)
                backup = None
                if os.path.exists(dest):
                    backup = os.path.join(tmp_dir, f"previous-{i}")
                    shutil.copy2(dest, backup)
                os.replace(tmp, dest)
                backups.append((dest, backup))
        except BaseException:
            for dest, backup in reversed(backups):          # undo the moves already made
                if backup is not None:
                    os.replace(backup, dest)
                elif os.path.exists(dest):
                    os.unlink(dest)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
