"""Atomic file writes: the one primitive every layer uses (it imports nothing from the package).

A file is written to a temporary file ``.<name>.<random><suffix>`` in the same folder, then renamed over
the target, so that readers never see a half-written file; a write that fails removes its temporary file,
and a process killed while writing leaves only that temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_path", "atomic_write", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error.

    Args:
        path: the target file (its folder is created).
        suffix: suffix of the temporary file, for writers that pick the format from the name (``.nii.gz``).

    Yields:
        the temporary file (created empty, mode 0600 as :func:`tempfile.mkstemp` makes it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], fsync: bool = False) -> Path:
    """Write ``path`` atomically: ``write`` gets the temporary file opened in binary mode.

    Args:
        path: the target file.
        write: writes the content to the file object it is given.
        fsync: flush and fsync the file before the rename (checkpoints: the content is on disk before the
            name points to it).

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
