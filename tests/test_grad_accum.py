"""Gradient accumulation (`train_epoch(grad_accum=n)`, phase1/phase2.grad_accum): n micro-batches train like one
batch n times larger, one micro-batch like the loop without accumulation, and under DDP the gradients are
exchanged on each step's last micro-batch only."""

import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose_config

from lego.cli import to_config
from lego.config import ConfigError, create_standard_config, validate
from lego.model import DeepSupervisionTransformer
from lego.training import TrainingTotals, Trainer, train_epoch

VOCAB, B, T = 16, 3, 8


def _model() -> DeepSupervisionTransformer:
    torch.manual_seed(0)
    return DeepSupervisionTransformer(VOCAB, 16, 2, 2, max_seq_len=T)


def _batches(n: int, seed: int = 0, ignored: bool = True):
    """n batches (B, T); with `ignored`, a different number of ignored targets in each (uneven counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        seq = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
        if ignored:
            y[: i % B + 1, : i % T + 1] = -100
        out.append((x, y))
    return out


def _optimizer(model):
    # SGD shows the gradient as it is; Adam's 1/sqrt(v) would turn float32 noise on a parameter whose gradient
    # is 0 (the key bias: softmax ignores it) into lr-sized steps that differ between any two summation orders
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


def _train(batches, grad_accum: int, **kw):
    model = _model()
    trainer = Trainer(create_standard_config(2), progress=False)
    opt = _optimizer(model)
    totals = TrainingTotals()
    loss = train_epoch(model, batches, opt, trainer.stage_loss_sum, "cpu", grad_clip=1.0, totals=totals,
                       progress=False, grad_accum=grad_accum, lr_factor=lambda k: 1.0 / (k + 1), **kw)
    return model, totals, loss


def _concat(batches, n: int):
    """Every n consecutive batches as one batch n times larger."""
    return [tuple(torch.cat(parts) for parts in zip(*batches[i:i + n])) for i in range(0, len(batches), n)]


@pytest.mark.parametrize("n", [2, 3])
def test_n_micro_batches_train_like_one_batch_n_times_larger(n):
    """fp32, uneven counted tokens per micro-batch, clipping, weight decay and an lr schedule: the weights after
    3 optimizer steps match those of one batch n times larger (float32 reduction order apart), and the
    counters count optimizer steps and every position."""
    micro = _batches(3 * n)
    accumulated, totals, loss = _train(micro, n)
    big, big_totals, big_loss = _train(_concat(micro, n), 1)
    for (name, p), q in zip(accumulated.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert totals == big_totals and totals.steps == 3 and totals.tokens == 3 * n * B * T
    assert loss == pytest.approx(big_loss, rel=1e-6)


def test_one_micro_batch_is_the_plain_loop_bit_for_bit():
    """grad_accum=1 is the loop without accumulation: zero_grad, loss = total / n, backward, clip, step."""
    batches = _batches(4)
    model, _, _ = _train(batches, 1)
    ref = _model()
    trainer = Trainer(create_standard_config(2), progress=False)
    opt = _optimizer(ref)
    for k, (x, y) in enumerate(batches):
        total, n = trainer.stage_loss_sum(ref, x, y)
        opt.zero_grad(set_to_none=True)
        (total / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) / (k + 1)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_the_last_step_of_an_epoch_takes_the_micro_batches_left_and_max_steps_counts_steps():
    micro = _batches(5)
    _, totals, _ = _train(micro, 2)
    assert totals.steps == 3 and totals.tokens == 5 * B * T  # 2 + 2 + 1
    _, capped, _ = _train(micro, 2, max_steps=2)
    assert capped.steps == 2 and capped.tokens == 4 * B * T


def test_bad_grad_accum_is_refused_with_the_key_named():
    with pytest.raises(ValueError, match=r"grad_accum=0"):
        _train(_batches(2), 0)
    for key in ("phase1.grad_accum", "phase2.grad_accum"):
        with pytest.raises(ConfigError, match=rf"^{key}=0 must be a positive integer"):
            validate(to_config(compose_config(["debug=tiny", f"{key}=0"])))
    assert to_config(compose_config(["phase1.grad_accum=4"])).phase1.grad_accum == 4


def test_a_whole_run_accumulates_in_both_phases_and_says_so(tmp_path):
    """lego-run debug=tiny phase1.grad_accum=2 phase2.grad_accum=2: every stage runs, each training's result.json
    records its grad_accum, and an optimizer step took 2 micro-batches (tokens per step: 2 batches' worth)."""
    import json
    import math

    from conftest import tiny_config

    from lego.run import run

    summary = run(tiny_config(tmp_path / "cache", **{"phase1.grad_accum": 2, "phase2.grad_accum": 2,
                                                     "eval.standard_baseline": False}), tmp_path / "run")
    assert math.isfinite(summary["ppl"]) and 0 < summary["shallow_ratio"] < 1
    p1, p2 = (json.loads((tmp_path / "run" / s / "result.json").read_text()) for s in ("phase1", "phase2"))
    assert p1["grad_accum"] == p2["grad_accum"] == 2
    assert p1["steps"] == p1["budget_steps"] == 3 * 8 and p1["tokens"] == p1["steps"] * 2 * 16 * 16  # x B x T
    assert p2["steps"] == p2["budget_steps"] > 0
    assert 16 * 32 * p2["steps"] < p2["tokens"] <= 2 * 16 * 32 * p2["steps"]  # phase2.batch_size 32, T 16
    plain = json.loads((tmp_path / "run" / "run.json").read_text())["science_config"]
    assert plain["phase1"]["grad_accum"] == plain["phase2"]["grad_accum"] == 2  # a different run from grad_accum=1


# -- under DDP: 2 gloo processes --------------------------------------------------------------------------
def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ddp = torch.nn.parallel.DistributedDataParallel
    calls = []
    real = ddp.no_sync

    def counting_no_sync(self):
        calls.append(1)
        return real(self)

    ddp.no_sync = counting_no_sync
    try:
        batches = _batches(8, ignored=False)[rank::2]  # rank r: batches r, r + 2, ... (SeededBatches' sharding)
        model, totals, _ = _train(batches, 2)
        assert totals.steps == 2 and len(calls) == 2  # no_sync on the first of each step's 2 micro-batches
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        ddp.no_sync = real
        dist.destroy_process_group()


def test_under_ddp_no_sync_skips_all_but_the_last_micro_batch_and_equals_one_process(tmp_path):
    """2 ranks x 2 micro-batches per step train like one process taking 4 micro-batches per step (equal counts
    per rank, so the mean of the ranks' normalised gradients is the global one)."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single, _, _ = _train(_batches(8, ignored=False), 4)
    got = torch.load(out)
    for name, p in single.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), msg=name)


# -- observability: lego.throughput, fit's result.json, the final table ------------------------------------
def test_gpu_names_match_their_dense_bf16_peak():
    from lego.throughput import peak_tflops

    assert peak_tflops("NVIDIA A100-SXM4-80GB") == peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40S") == 362.0  # L40S is not an L4
    assert peak_tflops("NVIDIA A10G") == peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("Tesla V100-SXM2-16GB") == 125.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None and peak_tflops("cpu") is None


def test_a_stages_result_says_how_fast_it_trained(tmp_path):
    """fit's result.json: tokens_per_s = tokens / train_s, model_tflops_per_s = 2 x train_macs / train_s, and on
    CPU no MFU and no peak memory; the final table shows tokens/s and leaves MFU out."""
    import json

    from lego.summary import format_table
    from lego.training import fit

    model = _model()
    trainer = Trainer(create_standard_config(2), progress=False)
    opt = _optimizer(model)
    batches = _batches(4)

    def one_epoch(epoch, totals, max_steps):
        return train_epoch(model, batches, opt, trainer.stage_loss_sum, "cpu", totals=totals, max_steps=max_steps,
                           progress=False, grad_accum=2)

    fit(model, one_epoch, lambda: 1.0, optimizer=opt, work_dir=tmp_path, budget_steps=2, steps_per_epoch=2,
        patience=None, name="phase1", save=lambda path, result: None, macs=lambda totals: 1e6 * totals.tokens)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["steps"] == 2 and r["tokens"] == 4 * B * T and r["train_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["train_s"])
    assert r["model_tflops_per_s"] == pytest.approx(2 * r["train_macs"] / r["train_s"] / 1e12)
    assert r["mfu"] is None and r["peak_memory_bytes"] is None
    table = format_table({"run_dir": "d", "wall_s": {}, "tokens_per_s_phase1": r["tokens_per_s"]})
    assert "training tokens/s" in table and "MFU" not in table and "peak device memory" not in table
    assert re.search(r"^MFU +phase1 40.0%$", format_table({"run_dir": "d", "wall_s": {}, "mfu_phase1": 0.4}), re.M)
