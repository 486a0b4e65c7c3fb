"""Replace a file or a directory atomically: write beside it, then rename over it.

A reader sees the old version or the new one, never half of either. Replacing by rename also
keeps the old inode intact, so a process that has the old weights mapped is not disturbed
(`cicada pack` relies on that). The temporary name sits in the same directory, hidden and
tagged with the process id, so two writers never share one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _beside(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextmanager
def replacing_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def replacing_dir(out: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it takes the place of `out`
    (whatever was there is renamed aside and then deleted), on error it is deleted."""
    out = Path(out)
    tmp = _beside(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = _beside(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
