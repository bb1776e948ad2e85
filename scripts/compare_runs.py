"""Compare two finished runs number for number: every key of metrics.json and eval/metrics.json, recursively,
must be equal, except what the clock, the machine or the run directory decide (run dir paths, wall-clock
times, throughput, and the generation numbers picked by time).

    python scripts/compare_runs.py /tmp/run-before /tmp/run-after

Prints each difference as `file: key.path: before -> after`; exit status 0 when the runs agree, 1 when they
differ, 2 on bad input (a directory without the files).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, List

FILES = ("metrics.json", "eval/metrics.json")
# Keys whose values are clock time, throughput or a path: they differ between two runs of the same code.
TIMES = {"run_dir", "wall_s", "train_s", "wall_cost", "time_over_dense", "tokens_per_s", "model_tflops_per_s", "mfu",
         "peak_memory_bytes",
         # the summary's generation numbers: speed-ups, and the k (with its acceptance rate) chosen as the fastest
         "gen_speculative_speedup", "gen_routed_wall_ratio", "gen_speculative_k", "gen_acceptance_rate"}
TIME_PREFIXES = ("tokens_per_s_", "model_tflops_per_s_", "mfu_", "peak_memory_bytes_")  # the summary's per-training


def is_time(key: str) -> bool:
    return key in TIMES or key.startswith(TIME_PREFIXES)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a metric that is undefined in both runs)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b if isinstance(a, (int, float)) and not isinstance(a, bool) else a == b


def differences(a: Any, b: Any, path: str = "") -> List[str]:
    """`path: a -> b` for each leaf where `a` and `b` differ, skipping time keys (`is_time`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if is_time(str(k)):
                continue
            where = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{where}: {'missing' if k not in a else a[k]!r} -> {'missing' if k not in b else b[k]!r}")
            else:
                out += differences(a[k], b[k], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if same(a, b) else [f"{path}: {a!r} -> {b!r}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="a finished run directory")
    ap.add_argument("after", type=Path, help="another finished run directory")
    args = ap.parse_args(argv)
    missing = [str(d / f) for d in (args.before, args.after) for f in FILES if not (d / f).is_file()]
    if missing:
        print(f"compare_runs: error: no {', '.join(missing)}", file=sys.stderr)
        return 2
    found = []
    for f in FILES:
        found += [f"{f}: {d}" for d in differences(json.loads((args.before / f).read_text()),
                                                   json.loads((args.after / f).read_text()))]
    print("\n".join(found) if found else f"identical: every key of {' and '.join(FILES)} but the times")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
