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


def ranked(key_src: Dict[str, Any]) -> Dict[str, Any]:
    """`key_src` with the world size when more than one rank trains (more ranks = larger batches: another model)."""
    return {**key_src, "world_size": distributed.world_size()} if distributed.world_size() > 1 else key_src


def cache_entry(cfg: ASHEMConfig, name: str, key_src: Dict[str, Any]) -> Path:
    """The cache directory of `name` under `key_src` (ranked: the world size counts)."""
    return cache_root(cfg.data) / "models" / f"{name}-{fingerprint(ranked(key_src))}"


def nearest_cached_steps(cfg: ASHEMConfig, name: str, key_at: Callable[[int], Dict[str, Any]], steps: int,
                         tolerance: float) -> int:
    """The step count, within `tolerance` x `steps` of `steps`, of the nearest finished cache entry of `name` whose
    key is `key_at(step count)` (the fewer steps on a tie), or `steps` when none is (or tolerance is 0): a
    dense model asked for one step more than one already trained is that model, its budget off by that step."""
    span = int(tolerance * steps)
    for n in sorted(range(max(1, steps - span), steps + span + 1), key=lambda n: (abs(n - steps), n)):
        if (cache_entry(cfg, name, key_at(n)) / "model.pt").exists():
            return n
    return steps


def through_cache(cfg: ASHEMConfig, name: str, key_src: Dict[str, Any], out: Path, make: Callable[[Path], T],
                  files: Sequence[str]) -> T:
    """`make(entry)` in the cache entry of `key_src` (it trains there, or loads what is there), then `files`
    copied from the entry into the run dir's `out` with out/cache.json (key, entry, hit, key_source).

    `key_src` must hold everything that determines the result. Concurrent jobs with one key run it
    once (a file lock held by rank 0 for all ranks: they train together and only rank 0 writes)."""
    key_src = ranked(key_src)
    key = fingerprint(key_src)
    entry = cache_entry(cfg, name, key_src)
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
