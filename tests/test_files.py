import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, resolve


def test_full_disk_keeps_the_previous_folder(tmp_path):
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "weights").write_text("good")
    full = r"the disk is full \(.* MiB free on the device holding .*\); the previous version is untouched"
    with pytest.raises(QloraError, match=full):
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


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, where the machine lets the tests mount one (root on Linux)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the ENOSPC injection tests cover the logic")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk_is_one_line_and_keeps_what_was_saved(small_disk):
    """The writers' own errors on a full device (safetensors' Rust I/O error, torch's stream writer) all
    become one line; the version saved before survives."""
    import torch
    from safetensors.torch import save_file

    from qlora_rt.train import checkpoint

    with atomic_dir(small_disk / "adapter") as d:
        save_file({"a": torch.zeros(1000)}, str(d / "w.safetensors"))
    with pytest.raises(QloraError, match=r"could not write .*adapter: the disk is full \(0.* MiB free .*\); the "
                                         "previous version is untouched"):
        with atomic_dir(small_disk / "adapter") as d:
            save_file({"a": torch.zeros(100_000)}, str(d / "w.safetensors"))
    assert sorted(p.name for p in small_disk.iterdir()) == ["adapter"]

    model = torch.nn.Linear(200, 200)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 200)).sum().backward()
    opt.step()  # its state is two copies of the weights: more than the disk holds
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(QloraError, match=r"the disk is full .*; nothing was written"):
        checkpoint.save(small_disk / "checkpoint", model, opt.state_dict(), sched, {"step": 1})
    assert sorted(p.name for p in small_disk.iterdir()) == ["adapter"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700)])
def test_a_written_folder_follows_the_umask(tmp_path, umask, mode):
    """Exports are copied to devices and served by other users: not mkdtemp's 0700 whatever the umask."""
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def test_sigterm_while_writing_leaves_no_temporary_folder(tmp_path):
    code = ("import sys, time; from pathlib import Path; from qlora_rt.files import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1]) / 'out') as tmp:\n"
            "    (tmp / 'model.onnx_data').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [], "neither the folder nor its temporary one"
