"""The content-addressed cache of trained models: a model trained once per key and copied into each run dir.

Phase 1, the dense baselines (`lego.pipeline.standard.cached_standard`) and each upper Block
(`lego.stages.phase2`, `lego.stages.blocks`) go through `through_cache`, on when phase1.cache is (the default):

    model = through_cache(cfg, "phase2", key_source, run_dir / "phase2", lambda entry: train(entry),
                          ("model.pt", "history.jsonl", "result.json"))
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, TypeVar

from lego import distributed
from lego.artifacts import file_lock, remove_partial_writes, write_json
from lego.config import ASHEMConfig
from lego.data import cache_root
from lego.pipeline.science import fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")


def through_cache(cfg: ASHEMConfig, name: str, key_src: Dict[str, Any], out: Path, make: Callable[[Path], T],
                  files: Sequence[str]) -> T:
    """`make(entry)` in the cache entry of `key_src` (it trains there, or loads what is there), then `files`
    copied from the entry into the run dir's `out` with out/cache.json (key, entry, hit, key_source).

    `key_src` must hold everything that determines the result. Concurrent jobs with one key run it
    once (a file lock held by rank 0 for all ranks: they train together and only rank 0 writes)."""
    if distributed.world_size() > 1:  # more ranks = larger batches: another model
        key_src = {**key_src, "world_size": distributed.world_size()}
    key = fingerprint(key_src)
    entry = cache_root(cfg.data) / "models" / f"{name}-{key}"
    with file_lock(entry.parent / f"{name}-{key}.lock") if distributed.is_main() else contextlib.nullcontext():
        hit = (entry / "model.pt").exists()
        if distributed.is_main() and entry.is_dir():
            remove_partial_writes(entry)  # a killed trainer's litter; we hold this entry's lock
        log.info("%s: %s cache entry %s", name, "reusing" if hit else "training into", entry)
        result = make(entry)
        if not distributed.is_main():
            return result
        out.mkdir(parents=True, exist_ok=True)
        for fname in files:
            shutil.copy2(entry / fname, out / f".{fname}.tmp")
            (out / f".{fname}.tmp").replace(out / fname)
        write_json(out / "cache.json", {"key": key, "entry": str(entry), "hit": hit, "key_source": key_src})
    return result
