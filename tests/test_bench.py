"""scripts/bench.py runs and prints its table (a smoke test; benchmarks are never timed assertions)."""

import json
from pathlib import Path

import pytest

from lego.cost import routed_macs
from conftest import load_script

# -- what runs, and for how many tokens -----------------------------------------------------------


def test_bench_script_smoke(tmp_path):
    bench = load_script("bench")
    out = tmp_path / "bench.json"
    result = bench.main(["--model", "tiny", "--vocab", "64", "--seq-len", "16", "--batch", "2", "--warmup", "0",
                         "--repeats", "1", "--rounds", "1", "--threshold-n", "1000", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    cases = {r["case"]: r for r in result["rows"]}
    assert {"full-model step", "phase-2 step full", "phase-2 step propagate", "phase-2 step skip",
            "phase-2 step full (recompute)", "full-depth eval"} <= set(cases)
    assert all(f"routed eval {p} @{r}" in cases for p in ("full", "propagate", "skip") for r in ("0.3", "0.5", "0.7"))
    assert cases["full-model step"]["time_ratio"] == 1.0 and cases["full-depth eval"]["time_ratio"] == 1.0
    row = cases["routed eval skip @0.5"]
    assert row["flop_ratio"] == pytest.approx(routed_macs(
        dim=128, ffn_mult=4, ffn="gelu", vocab_size=64, seq_len=16, exit_layer=2, num_layers=4,
        shallow_ratio=1 - row["hard_ratio"], policy="skip")["flop_cost"])
    assert result["threshold"]["exact"] and result["threshold"]["n"] == 1000


def test_bench_capacity_script_smoke(tmp_path):
    """scripts/bench_capacity.py: every case runs and the rows carry the slots and the overflow share."""
    out = tmp_path / "capacity.json"
    rows = load_script("bench_capacity").main(["--seq-len", "16", "--batch", "2", "--steps", "1", "--rounds", "1",
                                               "--ratios", "0.5", "--no-compile", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"full", *(f"{k} {p} @0.5" for k in ("routed", "capacity") for p in ("propagate", "skip"))}
    assert cases["capacity skip @0.5"]["slots_per_row"] == 16  # ceil(0.6 * 16) = 10, rounded up to 16
    assert all(0.0 <= r["overflow_share"] <= 1.0 and r["ms_per_step"] > 0 for r in rows)
