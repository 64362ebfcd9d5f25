import errno

import pytest

from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, resolve


def test_full_disk_keeps_the_previous_folder(tmp_path):
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "weights").write_text("good")
    with pytest.raises(QloraError, match=r"the disk is full \(.* MiB free on the device holding .*\); the previous version is untouched"):
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "weights").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "adapter" / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind


def test_crash_between_renames_still_finds_the_previous_version(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "state").write_text("1")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.previous")  # as if the process died mid-replace
    assert resolve(tmp_path / "ckpt") == tmp_path / "ckpt.previous"
    assert resolve(tmp_path / "none") is None


def test_refuses_existing_folder_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(QloraError, match="already exists"):
        with atomic_dir(tmp_path / "out", overwrite=False):
            pass


def test_failed_save_after_a_crash_keeps_the_aside_copy(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "state").write_text("1")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.previous")
    with pytest.raises(QloraError):
        with atomic_dir(tmp_path / "ckpt") as d:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (resolve(tmp_path / "ckpt") / "state").read_text() == "1"
