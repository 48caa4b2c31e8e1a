"""atomic_write: modes like any new file, refuses to overwrite when asked, leaves nothing half-written."""

import os
import stat

import pytest

from poslens.variants.storage import atomic_write


def test_new_files_get_the_mode_open_would_give(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write(tmp_path / "a.txt", "hello")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask != 0o600
    assert path.read_text() == "hello"


def test_overwrite_refused_and_failed_write_leaves_old_file(tmp_path):
    path = atomic_write(tmp_path / "b.txt", b"old")
    with pytest.raises(FileExistsError, match="b.txt"):
        atomic_write(path, b"new", overwrite=False)
    with pytest.raises(TypeError):
        atomic_write(path, 123)  # fails mid-write: the old file and no temporary file remain
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]
