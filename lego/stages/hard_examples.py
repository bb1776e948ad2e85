"""Stage `hard_examples`: calibrate the exit threshold on the calibration split (SPEC section 3.2); writes
hard_examples/threshold.json. The mining of hard sequences that phase 2 and the evaluation read is
`lego.pipeline.mining`."""

from __future__ import annotations

from typing import Any, Dict

from lego.artifacts import read_json, write_json
from lego.model import Model
from lego.pipeline.mining import calibrate
from lego.pipeline.results import load_or_run, require
from lego.pipeline.setup import RunContext


def run(ctx: RunContext, model1: Model) -> Dict[str, Any]:
    """The threshold at phase 1's exit and its statistics (threshold.json)."""
    return load_or_run(ctx.run_dir / "hard_examples" / "threshold.json", read_json,
                       lambda: calibrate(ctx.cfg, model1, ctx.loaders, ctx.device), write_json)


def load(ctx: RunContext) -> Dict[str, Any]:
    """threshold.json of a previous invocation."""
    return read_json(require(ctx.run_dir / "hard_examples" / "threshold.json", f"stages={ctx.cfg.stages}",
                             "the threshold", "hard_examples"))
