#!/usr/bin/env bash
# Does LEGO train on a GPU? experiment=gpu_smoke (6 layers x 384, blocks [3,6], 300 + 200 steps, bf16 +
# torch.compile) on one GPU, then the same under torchrun with 2 processes when 2 GPUs exist. Fails unless
# every recorded loss and the final ppl are finite; prints each phase's tokens/s and model TFLOP/s.
#   bash scripts/gpu_check.sh                          # runs in outputs/gpu_check/<date_time>/
#   bash scripts/gpu_check.sh phase1.max_epochs=1      # extra overrides go to every run
#   GPU_CHECK_DIR=/scratch/gpu_check PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --report <run dir>       # only the checks and numbers, for any finished run
# Run it from the checkout. Without a CUDA device it exits with status 2 and one line saying so.
# Not yet run on a GPU.
set -euo pipefail
PY=${PYTHON:-python}
# Every loss in the phases' history.jsonl and the final ppl finite; tokens/s and model TFLOP/s per phase
# (result.json's tokens and train_macs over train_s; lego/cost.py counts a training step as 3x the forward).
report() {
  "$PY" - "$1" <<'PYEOF'
import json, math, sys
from pathlib import Path

run = Path(sys.argv[1])
for phase in ("phase1", "phase2"):
    rows = [json.loads(r) for r in (run / phase / "history.jsonl").read_text().splitlines()]
    bad = [(r["epoch"], k, v) for r in rows for k, v in r.items() if "loss" in k and not math.isfinite(v)]
    if not rows or bad:
        sys.exit(f"gpu_check: FAILED: {run}/{phase}: {'no epochs' if not rows else f'non-finite losses {bad}'}")
    res = json.loads((run / phase / "result.json").read_text())
    print(f"gpu_check: {run.name} {phase}: {res['steps']} steps, last train_loss {rows[-1]['train_loss']:.4f}, "
          f"best val_ppl {res['best_val_ppl']:.2f}, {res['tokens'] / res['train_s']:,.0f} tokens/s, "
          f"{2 * res['train_macs'] / res['train_s'] / 1e12:.1f} model TFLOP/s")
summary = json.loads((run / "metrics.json").read_text())
if not math.isfinite(summary["ppl"]):
    sys.exit(f"gpu_check: FAILED: {run}: test ppl {summary['ppl']}")
print(f"gpu_check: {run.name}: test ppl {summary['ppl']:.2f}, shallow_ratio {summary['shallow_ratio']:.3f}, "
      f"world_size {summary.get('world_size', 1)}")
PYEOF
}

if [ "${1:-}" = "--report" ]; then
  report "$2"
  exit
fi
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU" >&2
  exit 2
fi
out=${GPU_CHECK_DIR:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "|", torch.cuda.device_count(), "x",
          torch.cuda.get_device_name(0))'

start=$SECONDS
"$PY" -m lego experiment=gpu_smoke device=cuda "hydra.run.dir=$out/one_gpu" "$@"
report "$out/one_gpu"
echo "gpu_check: one GPU took $((SECONDS - start)) s"
if [ "$gpus" -ge 2 ]; then
  start=$SECONDS
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m lego experiment=gpu_smoke device=cuda \
    "hydra.run.dir=$out/torchrun_2" "$@"
  report "$out/torchrun_2"
  echo "gpu_check: torchrun with 2 processes took $((SECONDS - start)) s"
else
  echo "gpu_check: one GPU only: the torchrun check (2 processes) is skipped"
fi
echo "gpu_check: OK ($out)"
