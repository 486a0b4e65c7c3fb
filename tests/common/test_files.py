"""Atomic replacement: a reader sees the old version or the new one, and a failed write leaves
the old one as it was, with nothing left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cicada.common.files import replacing_dir, replacing_file, write_text_atomic


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    write_text_atomic(target, "old")
    inode = os.stat(target).st_ino
    with pytest.raises(RuntimeError), replacing_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and os.stat(target).st_ino == inode
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_directory_is_swapped_and_the_old_inode_survives_for_its_readers(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with replacing_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    held = open(out / "weights")  # noqa: SIM115 - a reader that keeps the old file open
    try:
        with pytest.raises(RuntimeError), replacing_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("the writer failed")
        assert (out / "weights").read_text() == "v1"
        with replacing_dir(out) as tmp:
            (tmp / "weights").write_text("v2")
        assert (out / "weights").read_text() == "v2"
        assert held.read() == "v1"
    finally:
        held.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
