"""Files that readers must never see half-written: replaced at once, with their mode from the start."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` at once (readers see the old or the new file, never a part), created
    with `mode` whatever the umask, so a secret is never readable by others even for a moment.

    The temporary file beside it has a random name and is created exclusively (O_EXCL, O_NOFOLLOW): a
    file or link planted under that name is never written through, and a leftover of a crashed writer
    is never reused. It is removed whenever the replacement fails.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(lock_file: Path, mode: int = 0o600) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if missing): one writer at a time."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
