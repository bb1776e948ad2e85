"""experiment=gpu_smoke (issue 23), the preset scripts/gpu_check.sh runs on a GPU: it composes as
described, and on a CPU it trains 2 steps a phase when shrunk on the command line.

    python -m pytest tests/test_gpu_smoke.py -q
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from lego.cli import to_config
from lego.config import block_layers, resolve, validate
from lego.run import run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
# model, data and budget shrunk to seconds on one CPU thread; everything else is the preset's
SHRUNK = ["device=cpu", "model.precision=fp32", "model.compile=false", "model.dim=16", "model.num_heads=2",
          "model.max_seq_len=16", "blocks=[1,2]", "data.tokenizer=bytes", "data.seq_len=16", "data.batch_size=8",
          "data.eval_batch_size=32", "data.max_train_tokens=4000", "data.max_eval_tokens=2000",
          "phase1.max_epochs=1", "phase1.epoch_steps=2", "phase1.warmup_steps=0", "phase2.max_epochs=1",
          "phase2.epoch_steps=2", "phase2.warmup_steps=0", "phase2.batch_size=8", "eval.analysis=false",
          "generate.enabled=false", "num_threads=1"]


def test_gpu_smoke_is_6_layers_at_384_in_bf16_compiled_on_cuda():
    cfg = resolve(to_config(compose_config(["experiment=gpu_smoke"])))
    validate(cfg)
    m = cfg.model
    assert (m.dim, m.num_heads, m.precision, m.compile, cfg.device) == (384, 6, "bf16", True, "cuda")
    assert block_layers(cfg) == [3, 6] and (cfg.phase1.layers, cfg.phase2.layers) == (3, 6)
    assert cfg.phase1.max_epochs * cfg.phase1.epoch_steps == 300 and cfg.phase2.max_epochs * cfg.phase2.epoch_steps == 200


def test_gpu_smoke_trains_two_steps_a_phase_on_cpu_when_shrunk(tmp_path):
    cfg = to_config(compose_config(["experiment=gpu_smoke", *SHRUNK, f"data.cache_dir={tmp_path / 'cache'}"]))
    summary = run(cfg, tmp_path / "run")
    for phase in ("phase1", "phase2"):
        rows = [json.loads(r) for r in (tmp_path / "run" / phase / "history.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["steps"] == 2, rows
        assert math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["val_loss"]), rows
    assert math.isfinite(summary["ppl"])

    # scripts/gpu_check.sh's checks on this run: finite losses pass and tokens/s is printed; a NaN fails
    res = subprocess.run(["bash", str(SCRIPT), "--report", str(tmp_path / "run")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("tokens/s") == 2 and "test ppl" in res.stdout, res.stdout
    history = tmp_path / "run" / "phase2" / "history.jsonl"
    history.write_text(history.read_text().replace('"train_loss": ', '"train_loss": NaN, "was": '))
    res = subprocess.run(["bash", str(SCRIPT), "--report", str(tmp_path / "run")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert res.returncode != 0 and "FAILED" in res.stderr and "non-finite losses" in res.stderr, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_gpu_check_says_so_without_cuda():
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and not res.stdout, (res.stdout, res.stderr)
