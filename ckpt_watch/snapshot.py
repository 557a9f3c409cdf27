"""Private copies of adapter files, taken as soon as a checkpoint is complete.

Evaluation reads only the snapshot, so `save_total_limit` rotation deleting the
trainer's folder mid-evaluation (or while it waits in the backlog) changes nothing.
Copies are verified: the source must not change while it is copied, the copy's SHA-256
must match what was read, and the safetensors header must parse. The weights' SHA-256 is the
adapter's fingerprint in the ledger (a known step whose fingerprint changes is a new training
run). Files are opened once and the opened file itself is checked to lie inside the watched
directory (/proc/self/fd), so a symlink swapped in between the check and the open cannot
smuggle a file from elsewhere in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.checkpoints import ADAPTER_CONFIG, adapter_weights, confined, read_safetensors_header
from ckpt_watch.core import CheckpointError

MANIFEST = "snapshot.json"


class CheckpointVanished(CheckpointError):
    """The trainer's folder disappeared (rotation) before it could be copied."""


class CheckpointRefused(CheckpointError):
    """The checkpoint must never be used (e.g. a file pointing outside the watched directory)."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    sha256: str  # of the adapter weights file
    weights_stat: str  # "size:mtime_ns" of the trainer's weights file when it was copied


def stat_key(path: Path) -> str | None:
    """Cheap change detector for a trainer's weights file: "size:mtime_ns" (None if missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _open_confined(src: Path, watch_root: Path) -> int:
    """Open src for reading and check the file actually opened lies inside watch_root."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.isdir("/proc/self/fd") else src.resolve()
        if not confined(opened, watch_root):
            raise CheckpointRefused(f"refused: {src.name} points outside the watched directory ({opened})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_hashed(src: Path, dst: Path, watch_root: Path) -> str:
    h = hashlib.sha256()
    fd = _open_confined(src, watch_root)
    with os.fdopen(fd, "rb") as fin, dst.open("wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def weights_sha256(src: Path, watch_root: Path) -> str | None:
    """SHA-256 of a checkpoint folder's adapter weights (read confined), None if it has none."""
    weights = adapter_weights(src)
    if weights is None:
        return None
    h = hashlib.sha256()
    with os.fdopen(_open_confined(weights, watch_root), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_dir(cache_root: Path, run: str, step: int) -> Path:
    return cache_root / "snapshots" / run / f"step-{step}"


def existing_snapshot(dest: Path, src: Path | None = None) -> Snapshot | None:
    """A snapshot from an earlier session, if it is still intact and (when `src` still exists)
    was taken from the weights that are there now."""
    manifest = dest / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        if not all(_sha256(dest / name) == digest for name, digest in files.items()):
            return None  # damaged snapshot: the caller takes a fresh one
        weights = next((n for n in files if n != ADAPTER_CONFIG), None)
        source_weights = adapter_weights(src) if src is not None and src.is_dir() else None
        if source_weights is not None and stat_key(source_weights) != data.get("weights_stat"):
            return None  # the trainer's folder now holds other weights: copy them afresh
        return Snapshot(dest, files.get(weights, ""), data.get("weights_stat", ""))
    except (OSError, KeyError, AttributeError, json.JSONDecodeError):
        return None


def take_snapshot(src: Path, watch_root: Path, dest: Path) -> Snapshot:
    """Copy the adapter config and weights of `src` into `dest` (atomically)."""
    if (found := existing_snapshot(dest, src)) is not None:
        return found
    if not src.is_dir():
        raise CheckpointVanished(f"{src} no longer exists (rotated away before its snapshot)")
    weights = adapter_weights(src)
    names = [ADAPTER_CONFIG, weights.name if weights else "adapter_model.safetensors"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=dest.parent))
    try:
        digests: dict[str, str] = {}
        weights_stat = ""
        for name in names:
            s = src / name
            if not confined(s, watch_root):
                raise CheckpointRefused(f"refused: {name} points outside the watched directory ({s.resolve()})")
            try:
                before = s.stat()
                digests[name] = _copy_hashed(s, tmp / name, watch_root)
                after = s.stat()
            except FileNotFoundError as exc:
                raise CheckpointVanished(f"{src} vanished while being copied ({exc.filename})") from None
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                raise CheckpointError(f"{s} changed while it was being copied")
            if _sha256(tmp / name) != digests[name]:
                raise CheckpointError(f"copy of {s} does not match what was read")
            if name == names[1]:
                weights_stat = f"{after.st_size}:{after.st_mtime_ns}"
        if names[1].endswith(".safetensors"):
            try:
                read_safetensors_header(tmp / names[1])
            except ValueError as exc:
                raise CheckpointError(f"snapshot of {src.name}: {exc}") from None
        manifest = {"source": str(src), "files": digests, "weights_stat": weights_stat}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Snapshot(dest, digests[names[1]], weights_stat)


def remove_snapshot(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
