"""Reading a model directory's small files as data: confined to the directory (no link out of
it, a regular file: `cicada.common.package.open_package_file`) and bounded in size."""

from __future__ import annotations

import os
from pathlib import Path

from cicada.common.errors import PackageFormatError
from cicada.common.package import open_package_file


def read_model_file(directory: Path, name: str, cap: int) -> bytes | None:
    """The bytes of `directory/name`, None when there is no such file; PackageFormatError
    when it leaves the directory, is not a regular file, or holds more than `cap` bytes."""
    try:
        fd = open_package_file(directory, name, PackageFormatError)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(cap + 1)
    if len(raw) > cap:
        raise PackageFormatError(f"{directory / name} is larger than {cap} bytes: refused")
    return raw
