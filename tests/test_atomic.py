"""tta._atomic.atomic_file: all or nothing."""
from __future__ import annotations

import stat

import pytest

from tta._atomic import atomic_file


def test_replaces_on_success_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_file(path, "w") as f:
        f.write("new")
        assert not path.exists()  # nothing visible before the rename
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="'w' or 'wb', got 'a'"):
        with atomic_file(tmp_path / "x", "a"):
            pass
