"""Training checkpoints: atomic folders, validation, keep-last-K + best, and finding the one to resume from.

Layout of a run's checkpoint folder (`<out>/checkpoints/`):

    step-00000100/
        config.json, model.safetensors, tokenizer.json, ...   # the task's weights (VL stages: official DeepSeek-VL2
                                                              # format, so `load_deepseek_vl2(folder)` reads it)
        trainer_state.pt     # optimizer + scheduler state (full, unsharded, keyed by parameter name), data position,
                             # RNG states (torch, numpy, python, cuda) of every process
        train_state.json     # step, samples seen, loss, world size, stage, time (human-readable)
        manifest.json        # written last: every file with its size and sha256 -> the checkpoint is complete
    best.json                # {"step": N, "metric": x}: the best checkpoint, never pruned
    .tmp-step-00000100-<pid>/  # a checkpoint being written (or left by a killed run: ignored and removed)

A checkpoint is written into a temporary folder, every file fsynced, then renamed to `step-N` (a rename is atomic on
POSIX), so a run killed at any moment (SIGKILL included) leaves either a complete checkpoint or none. `find_resumable`
walks checkpoints newest first and returns the first whose manifest matches its files; corrupt or partial ones
(truncated safetensors, missing file, bad hash) are reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
TRAIN_STATE_JSON = "train_state.json"
BEST = "best.json"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint folder is incomplete or damaged."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished `step-N` folder, oldest first (validity not checked)."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit():
                out.append((int(p.name[len(STEP_PREFIX):]), p))
    return sorted(out)


def write_checkpoint_dir(root: Path, step: int, write_files: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Atomically create `root/step-N`: `write_files(tmp)` fills a temporary folder, then manifest, fsync, rename."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    (tmp / TRAIN_STATE_JSON).write_text(json.dumps(info | {"step": step, "time": time.time()}, indent=2))
    names = []
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with f.open("rb+") as handle:
            os.fsync(handle.fileno())
        names.append(str(f.relative_to(tmp)))
    _write_json_atomic(tmp / MANIFEST, {"step": step, "files": file_records(tmp, names)})
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def validate_checkpoint(path: Path, hashes: bool = True) -> None:
    """Raise CheckpointCorrupt unless every file of the manifest is present with its size (and hash)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointCorrupt(f"{path}: no {MANIFEST} (the checkpoint was never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointCorrupt(f"{manifest_path}: unreadable ({e})") from e
    for name in (TRAINER_STATE, TRAIN_STATE_JSON):
        if name not in files:
            raise CheckpointCorrupt(f"{path}: the manifest does not list {name}")
    check_files(path, files, hashes)


def file_records(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of files of `folder` (the manifest's schema)."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


def check_files(path: Path, files: dict[str, dict[str, Any]], hashes: bool = True) -> None:
    """Raise CheckpointCorrupt unless every file of `files` ({name: {"size", "sha256"}}) is in `path` as recorded."""
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointCorrupt(f"{f}: missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointCorrupt(f"{f}: {size} bytes, the manifest says {meta['size']} (truncated or overwritten)")
        if hashes and _sha256(f) != meta["sha256"]:
            raise CheckpointCorrupt(f"{f}: content does not match its sha256 in the manifest (corrupt)")


def find_resumable(root: Path, report: Callable[[str], None] = print, quarantine: bool = False) -> Path | None:
    """The newest valid checkpoint under `root`, reporting every newer one that is corrupt or partial; with
    `quarantine` those are renamed `corrupt-step-N` (kept for inspection, out of the way of pruning and resuming)."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            validate_checkpoint(path)
            return path
        except CheckpointCorrupt as e:
            report(f"checkpoint {path.name} is unusable, trying the previous one: {e}")
            if quarantine:
                os.rename(path, path.with_name(f"corrupt-{path.name}-{int(time.time())}"))
    return None


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary folders left by killed runs; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def read_best(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / BEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def update_best(root: Path, step: int, metric: float) -> bool:
    """Record `step` as best if `metric` is lower than the recorded one; True when it became the best."""
    best = read_best(root)
    if best is not None and (root / step_dir_name(best["step"])).is_dir() and best["metric"] <= metric:
        return False
    _write_json_atomic(root / BEST, {"step": step, "metric": metric})
    return True


def prune(root: Path, keep_last: int, keep_best: bool = True) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and the best one); returns the removed folders."""
    checkpoints = list_checkpoints(root)
    best = read_best(root) if keep_best else None
    keep = {p for _, p in checkpoints[-keep_last:]} if keep_last > 0 else {p for _, p in checkpoints}
    if best is not None:
        keep.add(root / step_dir_name(best["step"]))
    removed = [p for _, p in checkpoints if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
