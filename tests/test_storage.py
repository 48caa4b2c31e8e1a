"""atomic_write: modes like any new file, refuses to overwrite when asked, leaves nothing half-written;
kill points, strict JSON, tensor metadata and early output checks."""

import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from poslens.variants.storage import (
    KILL_AT_ENV,
    atomic_write,
    check_output_dir,
    check_output_file,
    check_real_folders,
    commit_folder,
    content_digest,
    is_temporary,
    read_tensors,
    remove_temporaries,
    save_tensors,
    temporary_folder,
    write_json,
)


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


def test_kill_at_a_write_point_leaves_old_file_or_new_and_temporaries_are_removable(tmp_path):
    """`POSLENS_KILL_AT=N` SIGKILLs the process at its N-th durable write point: at the first
    (temporary complete, not renamed) the old file and a temporary remain; at the second the new file."""
    path = atomic_write(tmp_path / "c.txt", b"old")
    for point, content in ((1, b"old"), (2, b"new")):
        pid = os.fork()
        if pid == 0:
            os.environ[KILL_AT_ENV] = str(point)
            atomic_write(path, b"new")
            os._exit(0)  # not reached
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert path.read_bytes() == content
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "c.txt"]
        assert len(leftovers) == (point == 1) and all(is_temporary(name) for name in leftovers)
        assert remove_temporaries(tmp_path) == leftovers
        atomic_write(path, b"old")
    (tmp_path / ".mine.txt").write_text("not ours")  # only poslens's own pattern is removed
    assert remove_temporaries(tmp_path) == [] and (tmp_path / ".mine.txt").exists()


def test_json_is_strict_and_tensor_files_carry_metadata(tmp_path):
    with pytest.raises(ValueError, match="refusing to write non-finite numbers"):
        write_json(tmp_path / "h.json", [{"loss": float("nan")}])
    assert not (tmp_path / "h.json").exists()
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3.0)}
    save_tensors(tmp_path / "t.safetensors", tensors, {"note": "x"})
    loaded, metadata = read_tensors(tmp_path / "t.safetensors")
    assert metadata == {"note": "x"} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    digest = content_digest(tensors, metadata)
    assert content_digest({**tensors, "a": tensors["a"] + 1}, metadata) != digest
    assert content_digest(tensors, {"note": "y"}) != digest
    assert content_digest({"a": tensors["a"].reshape(3, 2), "step": tensors["step"]}, metadata) != digest


def test_tensors_come_back_sorted_by_name_in_every_process(tmp_path):
    """safetensors alone hands tensors over in an order that changes from process to process; a
    figure drawn in that order (the block-means matrices of `reproduce`) changed on resume."""
    names = [f"corr:blocks.{i}.hook_resid_post" for i in (3, 0, 11, 1, 2)] + [f"t{i}" for i in range(15)]
    save_tensors(tmp_path / "t.safetensors", {name: torch.full((2,), float(i)) for i, name in enumerate(names)})
    script = ("import sys; from poslens.variants.storage import read_tensors; "
              "print(' '.join(read_tensors(sys.argv[1])[0]))")
    orders = {tuple(subprocess.run([sys.executable, "-P", "-c", script, str(tmp_path / "t.safetensors")], check=True,
                                   capture_output=True, text=True).stdout.split()) for _ in range(2)}
    assert orders == {tuple(sorted(names))}


def test_output_checks_name_the_path_and_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file; a directory is expected here"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match=r"file is a file, so .*file/run cannot be a directory"):
        check_output_dir(tmp_path / "file" / "run")
    with pytest.raises(IsADirectoryError, match=r"is a directory; a file name is expected here"):
        check_output_file(tmp_path)
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_only_marked_temporaries_are_removed_never_what_poslens_did_not_write(tmp_path):
    """A dead writer's marked files and marked folders go; a file merely named like a temporary, a
    folder without the marker and a link (to a file or a folder) stay, and so do the links' targets."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "album").mkdir(parents=True)
    (elsewhere / "album" / "photo.jpg").write_bytes(b"jpeg")
    (elsewhere / "diary.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".notes.txt.ab12cd34.tmp").write_text("a user's file")  # the pattern before poslens marked its own
    (out / ".photos.20240101.tmp").mkdir()
    (out / ".photos.20240101.tmp" / "a.jpg").write_bytes(b"jpeg")
    unmarked = out / ".step-000001.poslens-abcd1234.tmp"  # named like ours, but no marker inside
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("x")
    (out / ".a.txt.poslens-link0001.tmp").symlink_to(elsewhere / "diary.txt")
    (out / ".b.poslens-link0002.tmp").symlink_to(elsewhere / "album", target_is_directory=True)
    left = out / ".run.json.poslens-k1lled00.tmp"
    left.write_text("half")
    folder = temporary_folder(out / "checkpoints" / "step-000002")  # a snapshot killed while being filled
    (folder / "model.safetensors").write_bytes(b"partial")
    assert is_temporary(left.name) and not is_temporary(".notes.txt.ab12cd34.tmp")
    assert remove_temporaries(out) == [left.name] and remove_temporaries(out / "checkpoints") == [folder.name]
    assert sorted(p.name for p in out.iterdir()) == [".a.txt.poslens-link0001.tmp", ".b.poslens-link0002.tmp",
                                                     ".notes.txt.ab12cd34.tmp", ".photos.20240101.tmp",
                                                     unmarked.name, "checkpoints"]
    assert (unmarked / "keep.txt").read_text() == "x" and (out / ".photos.20240101.tmp" / "a.jpg").exists()
    assert (elsewhere / "diary.txt").read_text() == "mine" and (elsewhere / "album" / "photo.jpg").exists()
    final = commit_folder(temporary_folder(out / "snap"), out / "snap")  # committed: no marker left inside
    assert list(final.iterdir()) == [] and remove_temporaries(out / "snap") == []


def test_folders_poslens_writes_into_must_be_real_folders(tmp_path):
    (tmp_path / "target").mkdir()
    out = tmp_path / "out"
    (out / "runs" / "a").mkdir(parents=True)
    (out / "file-link").symlink_to(tmp_path / "target" / "x.csv")  # a link to a file is replaced, never followed
    check_real_folders(out)
    check_real_folders(tmp_path / "not-yet")
    (out / "runs" / "a" / "measures").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(ValueError, match=rf"{out}/runs/a/measures is a symbolic link \(to {tmp_path}/target\); "
                                         "poslens writes only into real folders"):
        check_real_folders(out)
    (tmp_path / "linked-out").symlink_to(out, target_is_directory=True)
    with pytest.raises(ValueError, match="linked-out is a symbolic link"):
        check_real_folders(tmp_path / "linked-out")
