"""Throughput basics: bf16 autocast everywhere the model runs, no host reads per training step,
pinned batches for a GPU.

bf16 is tested through CPU autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`): the same
code path a CUDA run takes, minus the kernels. fp32 stays bit-identical to before (the other
test files check that unchanged).
"""

import json
import re

import pytest
import torch
from conftest import grown_pair

from lego.analysis import token_outputs
from lego.ashem import (grow, 
    collect_hard_examples,
    compute_confidence_threshold,
    evaluate_on_hard_examples,
    gather_confidences,
    train_upper_layers,
)
from lego.config import ASHEMConfig, StageConfig, TrainingConfig, create_standard_config, validate
from lego.model import precision_choice
from lego.store import create_hard_example_loader
from lego.training import Trainer


def routed_config(threshold, exit_layer=2, num_layers=4):
    return TrainingConfig(stages=[StageConfig((num_layers, num_layers))], routing_threshold=threshold,
                          exit_layer=exit_layer, upper_context="full")


def record_dtypes(model):
    """Output dtypes of the first layer's QKV projection and of both heads, as they run."""
    seen = []
    for m in (model.layers[0].qkv, model.output_head.proj, *([model.deep_head.proj] if model.deep_head else [])):
        m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


# -- the setting ----------------------------------------------------------------------------------


def test_precision_choices_and_auto():
    assert precision_choice("auto", "cpu")["runs"] == "fp32"  # auto is bf16 on a CUDA GPU only
    assert precision_choice("bf16", "cpu")["runs"] == "bf16" and precision_choice("fp32", "cpu")["runs"] == "fp32"
    with pytest.raises(ValueError, match=r"^model.precision='fp16' is not allowed; choose one of auto, fp32, bf16$"):
        precision_choice("fp16", "cpu")
    cfg = ASHEMConfig()
    assert cfg.model.precision == "auto"
    cfg.model.precision = "half"
    with pytest.raises(ValueError, match=r"^model.precision='half' is not allowed; choose one of auto, fp32, bf16$"):
        validate(cfg)


def test_the_model_carries_its_precision(make_tiny_model):
    from lego.checkpoint import model_args

    model = make_tiny_model(num_layers=2, precision="bf16")
    big = grow(model, 4)
    assert big.precision == "bf16" and model_args(big)["precision"] == "bf16"
    assert make_tiny_model(num_layers=2).precision == "fp32"
    with pytest.raises(ValueError, match="precision='fp16' is not allowed"):
        make_tiny_model(num_layers=2, precision="fp16")
    assert all(p.dtype == torch.float32 for p in big.parameters())  # autocast, not bf16 weights


# -- bf16 at every forward site -------------------------------------------------------------------


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_every_forward_site_runs_in_the_models_precision(make_tiny_model, perturb, token_batches, precision, dtype):
    """Training, calibration, mining, phase-2 training and evaluation, routed evaluation and the
    analysis pass: the matmuls inside run in the model's precision; what comes out is float32."""
    small, big = grown_pair(make_tiny_model, perturb, precision)
    small_seen, big_seen = record_dtypes(small), record_dtypes(big)
    x, y = token_batches[0]
    loss = Trainer(create_standard_config(2), small.vocab_size, progress=False).compute_loss(small, x, y)
    assert loss.dtype == torch.float32
    conf = gather_confidences(small, token_batches, "cpu")
    assert conf.dtype == torch.float32
    threshold = compute_confidence_threshold(small, token_batches, 0.5)
    for store in ("memory", "recompute"):
        hard = collect_hard_examples(small, token_batches, threshold, "cpu", store=store)
        batches = create_hard_example_loader(hard, batch_size=4, shuffle=False)
        opt = torch.optim.SGD([p for p in big.parameters() if p.requires_grad], lr=0.0)
        assert isinstance(train_upper_layers(big, batches, opt, big.vocab_size, "cpu", 2), float)
        assert evaluate_on_hard_examples(big, batches, big.vocab_size, "cpu", 2)["n_tokens"] == hard["num_hard"]
        if store == "memory":
            assert hard["hidden_states"].dtype == torch.float32  # the residual stream stays float32
    Trainer(routed_config(threshold), big.vocab_size, progress=False).evaluate(big, token_batches)
    tok = token_outputs(big, token_batches, "cpu", exit_layer=2)
    assert tok["conf_max_prob"].dtype == tok["nll_deep"].dtype == torch.float32
    assert big(x).dtype == dtype
    assert small_seen and big_seen and set(small_seen) | set(big_seen) == {dtype}


def test_bf16_threshold_routes_the_calibrated_share(make_tiny_model, perturb, make_token_batches):
    """The threshold calibrated under bf16 splits the calibration tokens themselves exactly as
    routing does: evaluate's shallow_ratio is the share at or above it (1 - target up to ties),
    and the mined hard tokens are the rest. The confidences are bf16's, not fp32's."""
    batches = make_token_batches(n_batches=4, batch_size=8, seed=3)
    small, big = grown_pair(make_tiny_model, perturb, "bf16")
    for target in (0.3, 0.5):
        threshold = compute_confidence_threshold(small, batches, target)
        conf = gather_confidences(small, batches, "cpu")
        stats = Trainer(routed_config(threshold), big.vocab_size, progress=False).evaluate(big, batches)
        easy = int((conf >= threshold).sum())
        assert stats["shallow_ratio"] == easy / conf.numel()
        assert abs(stats["shallow_ratio"] - (1 - target)) <= 2 / conf.numel()
        assert collect_hard_examples(small, batches, threshold, "cpu")["num_hard"] == conf.numel() - easy
        tok = token_outputs(big, batches, "cpu", exit_layer=2)
        assert torch.equal(tok["conf_max_prob"], conf)  # the analysis pass sees the same confidences
    fp32 = make_tiny_model(num_layers=2)
    assert not torch.equal(gather_confidences(fp32, batches, "cpu"), conf)  # bf16 really ran


# -- no host reads per training step --------------------------------------------------------------


def test_bf16_run_records_its_precision(tmp_path):
    """A tiny run under bf16 on CPU: both checkpoints and the run's science config say bf16 (so
    the phase-1 cache and the run dir tell it from fp32), calibration's share holds, the one-pass
    analysis equals the routed evaluation, and an fp32 rerun in the same directory is refused."""
    from conftest import tiny_config

    from lego.artifacts import StageError, load_checkpoint
    from lego.run import run
    from lego.pipeline.science import science_config

    cfg = tiny_config(tmp_path / "cache", **{"model.precision": "bf16", "eval.standard_baseline": False,
                                             "eval.analysis": True, "eval.html_tokens": 20})
    run(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for stage in ("phase1", "phase2"):
        assert load_checkpoint(d / stage / "model.pt")["model_args"]["precision"] == "bf16", stage
    record = json.loads((d / "run.json").read_text())
    assert record["science_config"]["model"]["precision"] == "bf16"
    assert record["precision"] == {"asked": "bf16", "runs": "bf16", "why": "asked"}
    summary = json.loads((d / "metrics.json").read_text())
    assert (summary["precision"], summary["precision_asked"]) == ("bf16", "bf16")
    assert json.loads((d / "phase1/cache.json").read_text())["key_source"]["model"]["precision"] == "bf16"
    thr = json.loads((d / "hard_examples/threshold.json").read_text())
    assert abs(thr["achieved_ratio"] - 0.5) < 0.01
    ev = json.loads((d / "eval/metrics.json").read_text())
    an = json.loads((d / "eval/analysis.json").read_text())
    for k in ("acc", "ppl", "shallow_ratio", "compute_cost"):
        assert an["calibrated"][k] == pytest.approx(ev["ashem"][k], rel=1e-6, abs=1e-9), k
    fp32 = tiny_config(tmp_path / "cache", **{"model.precision": "fp32"})
    assert "precision" not in science_config(fp32)["model"]  # fp32 keeps the keys of older runs
    with pytest.raises(StageError, match="model.precision: 'bf16' -> None"):
        run(fp32, tmp_path / "run")


def test_precision_choice_says_what_runs_and_why(monkeypatch):
    from lego.model import cpu_bf16, precision_choice

    assert precision_choice("bf16", "cpu") == {"asked": "bf16", "runs": "bf16", "why": "asked"}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_bf16() == "avx512_bf16"
    got = precision_choice("auto", "cpu")
    assert got["runs"] == "fp32" and "avx512_bf16" in got["why"]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert cpu_bf16() is None and "native" not in precision_choice("auto", "cpu")["why"]


def test_run_json_and_the_final_table_say_which_precision_ran(tmp_path):
    """auto on a CPU: run.json records {"asked": "auto", "runs": "fp32", "why": ...} (whatever the CPU's bf16), the
    summary and the final table say fp32 ran; the science config leaves fp32 out, as before."""
    from conftest import tiny_config

    from lego.model import precision_choice
    from lego.run import claim_run_dir
    from lego.summary import format_table, summarize_run

    cfg = tiny_config(tmp_path / "cache")
    assert cfg.model.precision == "auto" and cfg.device == "cpu"
    (tmp_path / "run").mkdir()
    claim_run_dir(tmp_path / "run", cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["precision"] == precision_choice("auto", "cpu")
    assert record["precision"]["runs"] == "fp32" and record["precision"]["why"].startswith("cpu: auto is fp32")
    assert "precision" not in record["science_config"]["model"]

    class Vocab:
        vocab_size = 16

    summary = summarize_run(cfg, tmp_path / "run", Vocab(), None, {"phase1": 1.0})
    assert (summary["precision"], summary["precision_asked"]) == ("fp32", "auto")
    assert re.search(r"^precision \(model\.precision\) +fp32 \(auto\)$", format_table(summary), re.M)


def test_bench_precision_script_prints_its_table():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_precision.py"
    out = subprocess.run([sys.executable, str(script), "--layers", "1", "--vocab", "64", "--seq-len", "8", "--batch",
                          "2", "--rounds", "1", "--steps", "1", "--threads", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| fp32 |" in out.stdout and "| bf16 |" in out.stdout and "native bf16:" in out.stdout
