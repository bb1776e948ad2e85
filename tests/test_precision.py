"""Throughput basics: bf16 autocast everywhere the model runs, no host reads per training step,
pinned batches for a GPU.

bf16 is tested through CPU autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`): the same
code path a CUDA run takes, minus the kernels. fp32 stays bit-identical to before (the other
test files check that unchanged).
"""

import json
import os
import sys

import pytest
import torch

from lego.analysis import token_outputs
from lego.ashem import (collect_hard_examples, compute_confidence_threshold, evaluate_on_hard_examples, gather_confidences, train_upper_layers)
from lego.store import create_hard_example_loader
from lego.config import ASHEMConfig, validate
from lego.batches import make_loader
from lego.model import resolve_precision
from lego.config import StageConfig, TrainingConfig, create_standard_config
from lego.training import Trainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grown_pair(make_tiny_model, perturb, precision):
    small = make_tiny_model(num_layers=2, precision=precision)
    big = small.grow(4)
    perturb(list(big.layers[2:].parameters()) + list(big.deep_head.parameters()), std=0.3, seed=1)
    return small, big.eval()


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
    assert resolve_precision("auto", "cpu") == "fp32"  # auto is bf16 on a CUDA GPU only
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match=r"^model.precision='fp16' is not allowed; choose one of auto, fp32, bf16$"):
        resolve_precision("fp16", "cpu")
    cfg = ASHEMConfig()
    assert cfg.model.precision == "auto"
    cfg.model.precision = "half"
    with pytest.raises(ValueError, match=r"^model.precision='half' is not allowed; choose one of auto, fp32, bf16$"):
        validate(cfg)


def test_the_model_carries_its_precision(make_tiny_model):
    from lego.checkpoint import model_args

    model = make_tiny_model(num_layers=2, precision="bf16")
    big = model.grow(4)
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
@pytest.fixture
def host_reads(monkeypatch):
    """Every tensor -> Python read (item, int, float, bool, tolist) made from lego's own code."""
    calls = []
    for name in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}lego{os.sep}" in caller:
                calls.append((_name, os.path.basename(caller), sys._getframe(1).f_lineno))
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_train_epoch_reads_the_device_once_per_epoch(make_tiny_model, make_token_batches, host_reads):
    batches = make_token_batches(n_batches=4)
    trainer = Trainer(create_standard_config(2), 16, progress=False)
    counts = []
    for n in (2, 4):
        model = make_tiny_model(num_layers=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        host_reads.clear()
        trainer.train_epoch(model, batches[:n], opt)
        counts.append(list(host_reads))
        host_reads.clear()
        trainer.validation_loss(model, batches[:n])
        counts.append(list(host_reads))
    assert counts[0] == counts[2] and counts[1] == counts[3], counts  # nothing per step
    assert len(counts[0]) == 2  # the epoch's loss and token count


def test_train_upper_layers_reads_the_device_once_per_epoch(make_tiny_model, perturb, make_token_batches,
                                                           host_reads):
    """Under the full upper context; propagate/skip size their packed layout from the hard mask,
    which is a read per layer by nature (and so is picking the hard positions' logits)."""
    batches = make_token_batches(n_batches=4)
    small, big = grown_pair(make_tiny_model, perturb, "fp32")
    hard = collect_hard_examples(small, batches, compute_confidence_threshold(small, batches, 0.5), "cpu")
    loader = create_hard_example_loader(hard, batch_size=2, shuffle=False)
    rows = list(loader)
    opt = torch.optim.AdamW([p for p in big.parameters() if p.requires_grad], lr=1e-3)
    counts = []
    for n in (2, 4):
        host_reads.clear()
        train_upper_layers(big, rows[:n], opt, 16, "cpu", 2)
        counts.append(list(host_reads))
    assert counts[0] == counts[1] and len(counts[0]) == 1, counts


def test_epoch_loss_is_the_hand_computed_mean(make_tiny_model, make_token_batches):
    """train_epoch's loss is sum(batch loss sums) / sum(counted tokens), the sum taken in float32 in
    batch order, over the losses of the weights each step saw; the weights step as by hand."""
    batches = make_token_batches(n_batches=3, n_ignored=5)
    trainer = Trainer(create_standard_config(2), 16, progress=False)
    model, ref = make_tiny_model(num_layers=2), make_tiny_model(num_layers=2)
    model.train(), ref.train()
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))
    loss = trainer.train_epoch(model, batches, opt)
    acc, count = torch.zeros(()), 0
    for x, y in batches:
        total = torch.nn.functional.cross_entropy(ref(x).reshape(-1, 16), y.reshape(-1), reduction="sum")
        n = int((y != -100).sum())
        ref_opt.zero_grad()
        (total / n).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        acc += total.detach()
        count += n
    assert count == 3 * 4 * 8 - 3 * 5
    assert loss == float(acc) / count
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# -- pinned memory --------------------------------------------------------------------------------
def test_batches_are_pinned_only_for_a_gpu(token_batches):
    import numpy as np

    tokens = np.arange(200) % 16
    assert make_loader(tokens, 8, 4, shuffle=False, seed=0, device="cuda").pin_memory
    assert make_loader(tokens, 8, 4, shuffle=False, seed=0, device=torch.device("cuda:0")).pin_memory
    assert not make_loader(tokens, 8, 4, shuffle=False, seed=0, device="cpu").pin_memory
    assert not make_loader(tokens, 8, 4, shuffle=False, seed=0).pin_memory
    hard = {"hidden_states": None, "inputs": token_batches[0][0], "targets": token_batches[0][1]}
    assert create_hard_example_loader(hard, 2, device="cuda").pin_memory
    assert not create_hard_example_loader(hard, 2, device="cpu").pin_memory


# -- a whole run ----------------------------------------------------------------------------------
def test_bf16_run_records_its_precision(tmp_path):
    """A tiny run under bf16 on CPU: both checkpoints and the run's science config say bf16 (so
    the phase-1 cache and the run dir tell it from fp32), calibration's share holds, the one-pass
    analysis equals the routed evaluation, and an fp32 rerun in the same directory is refused."""
    from lego.artifacts import load_checkpoint
    from lego.artifacts import StageError
    from lego.run import run
    from lego.stages.setup import science_config
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "cache", **{"model.precision": "bf16", "eval.standard_baseline": False,
                                             "eval.analysis": True, "eval.html_tokens": 20})
    run(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for stage in ("phase1", "phase2"):
        assert load_checkpoint(d / stage / "model.pt")["model_args"]["precision"] == "bf16", stage
    assert json.loads((d / "run.json").read_text())["science_config"]["model"]["precision"] == "bf16"
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
