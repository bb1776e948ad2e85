"""What a run leaves on disk: atomic files, checkpoints that load with weights_only=True, locks.

Every file is written to a temporary name in the same directory and renamed into place, so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

import filelock
import torch

from lego.config import ConfigError

CHECKPOINT_FORMAT = "lego-checkpoint-v1"


class StageError(RuntimeError):
    """A stage cannot run (missing prerequisite, foreign run directory); the message says why."""


class RunDirTaken(StageError):
    """The run directory holds a run of another config."""


class LockBusy(RuntimeError):
    """A non-blocking `file_lock` found the lock held by another live process."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call `write(file)` on a temporary file next to `path`, fsync, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_partial_writes(directory: Path) -> int:
    """Delete the temporaries (`.<name>.<random>.tmp`) of `atomic_write`s that a killed process
    left under `directory`; returns how many. Only while holding the lock of whoever writes there."""
    stale = [p for p in Path(directory).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"))


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    return atomic_write(path, lambda f: f.writelines(json.dumps(_jsonable(r)) + "\n" for r in rows))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> Path:
    """Save plain values and tensors only, so `torch.load(weights_only=True)` reads it back."""
    return atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f), mode="wb")


def load_checkpoint(path: Path, *, what: str = "checkpoint") -> Dict[str, Any]:
    """Load with weights_only=True; a corrupt or foreign file gives one clear error line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ConfigError(f"{what} {path} is corrupt or truncated (UnpicklingError); "
                             "delete it to recompute that stage") from None
        # Loading it would run arbitrary code from the file: never fall back to weights_only=False.
        raise ConfigError(f"{what} {path} holds pickled Python objects, which weights_only=True refuses to "
                         "load; LEGO checkpoints hold tensors and plain values only") from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise ConfigError(f"{what} {path} is corrupt or truncated ({type(e).__name__}); "
                         "delete it to recompute that stage") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{what} {path} is not a LEGO checkpoint ({CHECKPOINT_FORMAT})")
    return state


def _write_pid(fd: int) -> None:
    # Through the locked descriptor, so nobody sees a half-written pid; contenders open the file
    # without truncating it, so it names the holder for as long as the lock is held.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True, busy_message: Optional[str] = None):
    """Exclusive lock on `path` (filelock's flock lock) held for the `with` block; the kernel
    releases it if the process dies, and the file, holding the holder's pid, stays in place.

    With blocking=False a lock held elsewhere raises `LockBusy(busy_message)` at once.
    A filesystem without flock raises OSError: the `on_acquired` hook keeps filelock from
    silently falling back to a marker file that a killed process would leave behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, on_acquired=_write_pid)
    try:
        lock.acquire(blocking=blocking)
    except filelock.Timeout:
        raise LockBusy(busy_message or f"{path} is locked by another process") from None
    try:
        yield
    finally:
        lock.release()
