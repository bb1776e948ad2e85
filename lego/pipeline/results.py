"""A stage's result on disk, the two rules written once:

- exists, rank 0 writes, others read: a result whose file exists is read, not recomputed; rank 0 alone looks
  (it may be writing the file this moment) and every rank follows its answer; what is computed is written by
  rank 0 alone (`load_or_run`, `on_disk`).
- exists, else StageError: a stage left out of `stages` reads what an earlier invocation wrote (`require`).

    info = load_or_run(out / "threshold.json", read_json, lambda: calibrate(...), write_json)
    model = load_or_run(out / "model.pt", lambda p: load_model(p, args, device, what), lambda: train(out))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

from lego import distributed
from lego.artifacts import StageError

T = TypeVar("T")


def on_disk(path: Path) -> bool:
    """Whether `path` exists, as rank 0 sees it (every rank gets the same answer)."""
    return distributed.broadcast(path.exists())


def load_or_run(path: Path, load: Callable[[Path], T], make: Callable[[], T],
                write: Optional[Callable[[Path, T], object]] = None) -> T:
    """`load(path)` when `path` exists (`on_disk`), else `make()`, then `write(path, result)` on rank 0 alone
    (None: `make` writes `path` itself, as `lego.training.fit` writes model.pt)."""
    if on_disk(path):
        return load(path)
    result = make()
    if write is not None and distributed.is_main():
        write(path, result)
    return result


def require(path: Path, who: str, what: str, stage: str) -> Path:
    """`path`, which an earlier invocation wrote; StageError("<who> needs <what> at <path>; include <stage> in
    stages") when it is not there."""
    if not path.exists():
        raise StageError(f"{who} needs {what} at {path}; include {stage} in stages")
    return path
