"""Reading a model directory's small files as data: confined to the directory (no link out of
it, a regular file: `cicada.common.package.read_package_file`) and bounded in size."""

from __future__ import annotations

from pathlib import Path

from cicada.common.errors import PackageFormatError
from cicada.common.package import read_package_file


def read_model_file(directory: Path, name: str, cap: int) -> bytes | None:
    """The bytes of `directory/name`, None when there is no such file; PackageFormatError
    when it leaves the directory, is not a regular file, or holds more than `cap` bytes."""
    try:
        return read_package_file(directory, name, cap, PackageFormatError)
    except FileNotFoundError:
        return None
