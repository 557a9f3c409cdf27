"""Private copies of adapter files, taken as soon as a checkpoint is complete.

Evaluation reads only the snapshot, so `save_total_limit` rotation deleting the
trainer's folder mid-evaluation (or while it waits in the backlog) changes nothing.
Copies are verified: the source must not change while it is copied, the copy's SHA-256
must match what was read, and the safetensors header must parse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ckpt_watch.checkpoints import ADAPTER_CONFIG, adapter_weights, confined, read_safetensors_header
from ckpt_watch.core import CheckpointError

MANIFEST = "snapshot.json"


class CheckpointVanished(CheckpointError):
    """The trainer's folder disappeared (rotation) before it could be copied."""


def _copy_hashed(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_dir(cache_root: Path, run: str, step: int) -> Path:
    return cache_root / "snapshots" / run / f"step-{step}"


def existing_snapshot(dest: Path) -> Path | None:
    """A snapshot from an earlier session, if it is still intact."""
    manifest = dest / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        if all(_sha256(dest / name) == digest for name, digest in files.items()):
            return dest
    except (OSError, KeyError, json.JSONDecodeError):
        pass  # damaged snapshot: the caller takes a fresh one
    return None


def take_snapshot(src: Path, watch_root: Path, dest: Path) -> Path:
    """Copy the adapter config and weights of `src` into `dest` (atomically); return dest."""
    if (found := existing_snapshot(dest)) is not None:
        return found
    if not src.is_dir():
        raise CheckpointVanished(f"{src} no longer exists (rotated away before its snapshot)")
    weights = adapter_weights(src)
    names = [ADAPTER_CONFIG, weights.name if weights else "adapter_model.safetensors"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=dest.parent))
    try:
        digests: dict[str, str] = {}
        for name in names:
            s = src / name
            if not confined(s, watch_root):
                raise CheckpointError(f"refused: {name} points outside the watched directory ({s.resolve()})")
            try:
                before = s.stat()
                digests[name] = _copy_hashed(s, tmp / name)
                after = s.stat()
            except FileNotFoundError as exc:
                raise CheckpointVanished(f"{src} vanished while being copied ({exc.filename})") from None
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                raise CheckpointError(f"{s} changed while it was being copied")
            if _sha256(tmp / name) != digests[name]:
                raise CheckpointError(f"copy of {s} does not match what was read")
        if names[1].endswith(".safetensors"):
            try:
                read_safetensors_header(tmp / names[1])
            except ValueError as exc:
                raise CheckpointError(f"snapshot of {src.name}: {exc}") from None
        (tmp / MANIFEST).write_text(json.dumps({"source": str(src), "files": digests}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def remove_snapshot(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
