"""Atomic file writes: the one helper every stage uses for outputs a kill must never tear.

A file is written under a temporary name in its own folder, flushed and fsynced, then renamed over
the target (a rename within a folder is atomic on POSIX): readers see the old file or the new one,
never half of one. On an exception the temporary file is removed; after a SIGKILL it stays behind
as `.NAME.PID.tmp`, which no reader lists.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "summary.json"
    >>> _ = atomic_write(target, '{"ok": true}')
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{"ok": true}', ['summary.json'])
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | Path,
    mode: str = "wb",
    *,
    tmp_name: str | None = None,
    perms: int = 0o666,
    fsync: bool = True,
) -> Iterator[IO]:
    """`with atomic_open(path) as f: ...` writes `path` atomically (see the module docstring).

    tmp_name: the temporary file's name in the same folder (default `.NAME.PID.tmp`, distinct per
    process); perms: permission bits the file is created with (0o600: only its owner reads it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, perms)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, **kwargs) -> Path:
    """Write text or bytes to `path` atomically; returns `path`. kwargs: see `atomic_open`."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb", **kwargs) as f:
        f.write(data)
    return Path(path)
