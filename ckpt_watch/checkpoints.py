"""Checkpoint layouts and readiness: is this folder a complete checkpoint of step N?

HF Trainer writes adapter files, tokenizer, training_args, optimizer state and *last*
`trainer_state.json` (plain open("w"), not atomic), then rotates old checkpoints with
rmtree. So a checkpoint is complete when `trainer_state.json` parses with
`global_step == N`, the adapter config and weights are readable, and nothing in the
folder has changed for the settle time (DESIGN §3). torchtune's `epoch_N/` has no state
marker: readiness rests on the adapter files and the settle time alone.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.config import WatchConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"

_HF_RE = re.compile(r"^checkpoint-(\d+)$")
_TORCHTUNE_RE = re.compile(r"^epoch_(\d+)$")


class Layout:
    """Maps a folder name directly under the watch dir to a step, or None."""

    def __init__(self, watch: WatchConfig):
        self.kind = watch.layout
        self.pattern = watch.pattern
        self.step_re = re.compile(watch.step_regex) if watch.step_regex else None
        self.steps_per_epoch = getattr(watch, "steps_per_epoch", None) or 1

    def epoch_of(self, name: str) -> int | None:
        """torchtune's epoch number of an `epoch_N` folder (None for other layouts)."""
        m = _TORCHTUNE_RE.match(name) if self.kind == "torchtune" else None
        return int(m.group(1)) if m else None

    def step_of(self, name: str) -> int | None:
        """The global training step a folder holds, or None if it is not a checkpoint folder."""
        # trainers stage in hidden or tmp-* folders; those are never checkpoints
        if name.startswith(".") or name.startswith("tmp-"):
            return None
        if self.kind == "torchtune":
            epoch = self.epoch_of(name)
            return None if epoch is None else (epoch + 1) * self.steps_per_epoch
        if self.kind == "hf":
            m = _HF_RE.match(name)
        else:
            if self.pattern is None or not fnmatch.fnmatch(name, self.pattern):
                return None
            m = self.step_re.search(name) if self.step_re else None
        step = int(m.group(1)) if m else None
        return step if step else None  # step 0 is the base model, never a folder

    @property
    def has_state_marker(self) -> bool:
        return self.kind == "hf"


def scan(watch_dir: Path, layout: Layout) -> dict[int, Path]:
    """Every checkpoint-looking folder directly under watch_dir, by step."""
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(watch_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        step = layout.step_of(entry.name)
        if step is not None:
            found[step] = Path(entry.path)
    return found


def child_of(watch_dir: Path, path: str, depth: int = 1) -> str | None:
    """Name of the folder directly under watch_dir that `path` lies in (for events); with depth 2,
    `run/checkpoint-N` for a root of runs (or just `run` for the run folder itself)."""
    try:
        rel = os.path.relpath(path, watch_dir)
    except ValueError:
        return None
    if rel.startswith(".."):
        return None
    parts = rel.split(os.sep)[:depth]
    return None if parts[0] in (".", "") else "/".join(parts)


class Readiness(enum.StrEnum):
    READY = "ready"
    INCOMPLETE = "incomplete"  # still being written: wait, not an error
    INVALID = "invalid"  # stable but unusable: counted as a failed attempt


@dataclass(frozen=True)
class Check:
    state: Readiness
    reason: str = ""
    is_final: bool = False
    max_steps: int | None = None  # from trainer_state.json, when the trainer writes it


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: Path) -> tuple[Fingerprint, float]:
    """(name, size, mtime_ns) of every file below path, and the newest mtime (seconds)."""
    items = []
    newest = 0.0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            items.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    return tuple(sorted(items)), newest


def confined(path: Path, root: Path) -> bool:
    """True when path (after resolving symlinks) lies inside root."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def read_safetensors_header(path: Path) -> dict:
    """Parse the JSON header and check the file is as long as the header says."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("safetensors file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            raise ValueError(f"safetensors header length {n} exceeds the file ({size} bytes)")
        header = json.loads(fh.read(n))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"safetensors data truncated: needs {8 + n + end} bytes, file has {size}")
    return header


def adapter_weights(path: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (path / name).exists() or (path / name).is_symlink():
            return path / name
    return None


def check_checkpoint(path: Path, step: int, layout: Layout, watch_root: Path) -> Check:
    """Is the folder a complete, usable checkpoint of `step`? Pure inspection, no side effects."""
    final = False
    max_steps = None
    if layout.has_state_marker or (path / TRAINER_STATE).exists():
        state_file = path / TRAINER_STATE
        if not state_file.exists():
            return Check(Readiness.INCOMPLETE, f"no {TRAINER_STATE} yet")
        try:
            state = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return Check(Readiness.INVALID, f"{TRAINER_STATE} is not valid JSON ({exc})")
        except FileNotFoundError:
            return Check(Readiness.INCOMPLETE, f"{TRAINER_STATE} vanished")
        got = state.get("global_step") if isinstance(state, dict) else None
        if got != step:
            return Check(Readiness.INVALID, f"{TRAINER_STATE} global_step is {got!r}, folder says {step}")
        max_steps = state.get("max_steps")
        max_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
        final = max_steps is not None and step >= max_steps
    cfg = path / ADAPTER_CONFIG
    if not (cfg.exists() or cfg.is_symlink()):
        return Check(Readiness.INCOMPLETE if not layout.has_state_marker else Readiness.INVALID,
                     f"no {ADAPTER_CONFIG} (is this a LoRA/PEFT run?)")
    weights = adapter_weights(path)
    if weights is None:
        return Check(Readiness.INCOMPLETE if not layout.has_state_marker else Readiness.INVALID,
                     f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    for f in (cfg, weights):
        if not confined(f, watch_root):
            return Check(Readiness.INVALID,
                         f"refused: {f.name} is a symlink pointing outside the watched directory ({f.resolve()})")
    try:
        adapter_cfg = json.loads(cfg.read_text())
        if not isinstance(adapter_cfg, dict) or "peft_type" not in adapter_cfg:
            return Check(Readiness.INVALID, f"{ADAPTER_CONFIG} has no peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Check(Readiness.INVALID, f"{ADAPTER_CONFIG} is not valid JSON ({exc})")
    if weights.suffix == ".safetensors":
        try:
            read_safetensors_header(weights)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError, struct.error) as exc:
            return Check(Readiness.INVALID, f"{weights.name}: {exc}")
    return Check(Readiness.READY, is_final=final, max_steps=max_steps)
