"""Readiness, layouts, snapshots and mount detection on real trainer checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ckpt_watch.checkpoints import Layout, Readiness, check_checkpoint, child_of, scan
from ckpt_watch.config import WatchConfig
from ckpt_watch.core import CheckpointError
from ckpt_watch.snapshot import CheckpointVanished, take_snapshot
from ckpt_watch.watcher import mount_fstype, use_polling

HF = Layout(WatchConfig())


def _copy_ckpt(tiny_run: Path, dst_root: Path, step: int = 4) -> Path:
    dst = dst_root / f"checkpoint-{step}"
    shutil.copytree(tiny_run / f"checkpoint-{step}", dst)
    return dst


def test_real_trainer_checkpoints_are_ready(tiny_run):
    found = scan(tiny_run, HF)
    assert sorted(found) == [2, 4, 6]
    checks = {s: check_checkpoint(p, s, HF, tiny_run) for s, p in found.items()}
    assert all(c.state is Readiness.READY for c in checks.values()), checks
    # max_steps=6: only the last one is final
    assert [s for s, c in checks.items() if c.is_final] == [6]


def test_layouts_and_ignored_folders(tmp_path):
    for name in ("checkpoint-10", ".checkpoint-20", "tmp-checkpoint-30", "checkpoint-x", "epoch_3", "ckpt_step_7",
                 "epoch_0", "ckpt_step_0", "checkpoint-0"):
        (tmp_path / name).mkdir()
    assert sorted(scan(tmp_path, HF)) == [10]  # checkpoint-0 would be the base model's step: not a checkpoint
    # torchtune counts epochs from 0: epoch_0 is the first adapter, never the base model (step 0)
    assert sorted(scan(tmp_path, Layout(WatchConfig(layout="torchtune")))) == [1, 4]
    per_epoch = Layout(WatchConfig(layout="torchtune", steps_per_epoch=50))
    assert sorted(scan(tmp_path, per_epoch)) == [50, 200]
    assert per_epoch.epoch_of("epoch_3") == 3 and HF.epoch_of("checkpoint-10") is None
    glob = Layout(WatchConfig(layout="glob", pattern="ckpt_*", step_regex=r"step_(\d+)"))
    assert sorted(scan(tmp_path, glob)) == [7]
    assert child_of(tmp_path, str(tmp_path / "checkpoint-10" / "x.json")) == "checkpoint-10"
    assert child_of(tmp_path, "/elsewhere/file") is None


def test_half_written_trainer_state_is_invalid_not_ready(tiny_run, tmp_path):
    ck = _copy_ckpt(tiny_run, tmp_path)
    full = (ck / "trainer_state.json").read_text()
    (ck / "trainer_state.json").write_text(full[: len(full) // 2])
    c = check_checkpoint(ck, 4, HF, tmp_path)
    assert c.state is Readiness.INVALID and "not valid JSON" in c.reason
    (ck / "trainer_state.json").unlink()
    assert check_checkpoint(ck, 4, HF, tmp_path).state is Readiness.INCOMPLETE
    state = json.loads(full)
    state["global_step"] = 3
    (ck / "trainer_state.json").write_text(json.dumps(state))
    c = check_checkpoint(ck, 4, HF, tmp_path)
    assert c.state is Readiness.INVALID and "global_step is 3" in c.reason


def test_truncated_safetensors_and_bad_adapter_config(tiny_run, tmp_path):
    ck = _copy_ckpt(tiny_run, tmp_path)
    weights = ck / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    c = check_checkpoint(ck, 4, HF, tmp_path)
    assert c.state is Readiness.INVALID and "truncated" in c.reason
    weights.write_bytes(data)
    (ck / "adapter_config.json").write_text('{"r": 8')
    c = check_checkpoint(ck, 4, HF, tmp_path)
    assert c.state is Readiness.INVALID and "adapter_config.json" in c.reason


def test_symlink_outside_watch_dir_is_refused(tiny_run, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    ck = _copy_ckpt(tiny_run, watch)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ck / "adapter_model.safetensors", outside)
    os.symlink(outside, ck / "adapter_model.safetensors")
    c = check_checkpoint(ck, 4, HF, watch)
    assert c.state is Readiness.INVALID and c.reason.startswith("refused") and "outside" in c.reason
    with pytest.raises(CheckpointError, match="refused"):
        take_snapshot(ck, watch, tmp_path / "snap")


def test_snapshot_survives_rotation_and_is_verified(tiny_run, tmp_path):
    (tmp_path / "w").mkdir()
    ck = _copy_ckpt(tiny_run, tmp_path / "w")
    taken = take_snapshot(ck, ck.parent, tmp_path / "snap" / "step-4")
    snap = taken.path
    original = (ck / "adapter_model.safetensors").read_bytes()
    assert taken.sha256 == hashlib.sha256(original).hexdigest()  # the adapter's fingerprint
    shutil.rmtree(ck)  # save_total_limit rotation
    assert (snap / "adapter_model.safetensors").read_bytes() == original
    assert json.loads((snap / "adapter_config.json").read_text())["peft_type"] == "LORA"
    manifest = json.loads((snap / "snapshot.json").read_text())
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # a second call reuses the verified snapshot even though the source is gone
    assert take_snapshot(ck, ck.parent, snap).path == snap
    with pytest.raises(CheckpointVanished):
        take_snapshot(ck, ck.parent, tmp_path / "snap" / "other")


def test_snapshot_of_retrained_folder_is_taken_afresh(tiny_run, tmp_path):
    """Retraining into the same folder: an existing snapshot of checkpoint-4 is reused only while
    the trainer's weights file is the one it was copied from."""
    (tmp_path / "w").mkdir()
    ck = _copy_ckpt(tiny_run, tmp_path / "w")
    first = take_snapshot(ck, ck.parent, tmp_path / "snap" / "step-4")
    assert take_snapshot(ck, ck.parent, first.path) == first  # unchanged source: reused
    # new training run: other weights at the same step (checkpoint-6's adapter written over -4's)
    shutil.copyfile(tiny_run / "checkpoint-6" / "adapter_model.safetensors", ck / "adapter_model.safetensors")
    second = take_snapshot(ck, ck.parent, first.path)
    assert second.sha256 != first.sha256
    assert second.sha256 == hashlib.sha256((ck / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (second.path / "adapter_model.safetensors").read_bytes() == (ck / "adapter_model.safetensors").read_bytes()


def test_opened_file_is_checked_not_just_the_path(tiny_run, tmp_path):
    """The confinement check looks at the file actually opened (/proc/self/fd), so a symlink
    swapped in after `confined()` said yes is still refused."""
    from ckpt_watch.snapshot import CheckpointRefused, _open_confined

    watch = tmp_path / "watch"
    watch.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not an adapter")
    (watch / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointRefused, match="outside the watched directory"):
        _open_confined(watch / "adapter_model.safetensors", watch)
    inside = watch / "real.bin"
    inside.write_bytes(b"ok")
    os.close(_open_confined(inside, watch))


def test_mount_detection_picks_polling_on_network_fs(tmp_path):
    """A stand-in mount table (the real one here has no NFS/FUSE mount to test against)."""
    (tmp_path / "nfs").mkdir()
    (tmp_path / "bucket").mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"server:/export {tmp_path}/nfs nfs4 rw 0 0\n"
        f"gcsfuse {tmp_path}/bucket fuse.gcsfuse rw 0 0\n"
    )
    assert mount_fstype(tmp_path / "nfs" / "run1", str(mounts)) == "nfs4"
    auto = WatchConfig()
    assert use_polling(auto, tmp_path / "nfs" / "run1", str(mounts))[0] is True
    assert use_polling(auto, tmp_path / "bucket" / "x", str(mounts))[0] is True
    assert use_polling(auto, tmp_path / "local", str(mounts))[0] is False
    assert use_polling(WatchConfig(polling=True), tmp_path / "local", str(mounts))[0] is True
