"""Resume checkpoints on a schedule (phase1/phase2.checkpoint_every_steps / _minutes, `lego.resume`): a training
interrupted between two validations resumes from its last step checkpoint and ends as an uninterrupted one; the
best weights are copied into the same host buffers at every improvement."""

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_config

from lego.cli import to_config
from lego.config import ConfigError, create_standard_config, validate
from lego.batches import SeededBatches
from lego.early_stopping import keep_best
from lego.pipeline.science import science_config
from lego.resume import CheckpointSchedule
from lego.run import run
from lego.training import Trainer, fit, train_epoch


class Interrupted(Exception):
    pass


def loaders(make_token_batches):
    """4 shuffled batches of 8 x 8 per epoch (a DataLoader over SeededBatches) and 2 validation batches."""
    train = make_token_batches(n_batches=4, batch_size=8, seed=1)
    data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]))
    loader = torch.utils.data.DataLoader(data, batch_sampler=SeededBatches(32, 8, True, 0, drop_last=False))
    return loader, make_token_batches(n_batches=2, batch_size=8, seed=2)


def train(make_tiny_model, make_token_batches, work_dir, *, every=None, die_after=None):
    """fit over 3 epochs x 3 optimizer steps of 2 micro-batches (a seeded DataLoader: opening it draws from the
    global RNG), dropout (the RNG state matters), AdamW and an lr schedule; `die_after`: raise in the forward of
    that micro-batch (counted from 1 over the whole training)."""
    torch.manual_seed(0)
    model = make_tiny_model(num_layers=2, noise=0.0, dropout=0.1)
    loader, val = loaders(make_token_batches)  # an epoch: 2 optimizer steps of 2 micro-batches
    trainer = Trainer(create_standard_config(2), 16, progress=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    seen = [0]

    def loss_fn(m, x, y):
        seen[0] += 1
        if seen[0] == die_after:
            raise Interrupted
        return trainer.stage_loss_sum(m, x, y)

    def one_epoch(epoch, totals, max_steps, **within):
        return train_epoch(model, loader, optimizer, loss_fn, "cpu", epoch=epoch, totals=totals, max_steps=max_steps,
                           grad_accum=2, lr_factor=lambda k: 1.0 / (k + 1), progress=False, **within)

    result = fit(model, one_epoch, lambda: trainer.validation_loss(model, val), optimizer=optimizer,
                 work_dir=work_dir, budget_steps=6, steps_per_epoch=2, patience=None, name="t",
                 save=lambda path, result: None, checkpoints=CheckpointSchedule(every_steps=every))
    return model, result, [{k: v for k, v in row.items() if k != "train_s"} for row in
                           map(json.loads, (work_dir / "history.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("die_after", [4, 7, 10])
def test_an_interrupted_training_resumes_from_its_last_step_checkpoint(make_tiny_model, make_token_batches,
                                                                       tmp_path, die_after):
    """Checkpoints after optimizer steps 3 (inside epoch 2) and 6 (the last): dying in micro-batch 4 (step 2, before
    any checkpoint), 7 (step 4) or 10 (step 5, epoch 3) and rerunning gives the weights, history and totals of the
    uninterrupted training, bit for bit."""
    whole, result, history = train(make_tiny_model, make_token_batches, tmp_path / "whole", every=3)
    plain, plain_result, plain_history = train(make_tiny_model, make_token_batches, tmp_path / "plain")
    assert history == plain_history  # the schedule changes when last.pt is written, nothing else
    with pytest.raises(Interrupted):
        train(make_tiny_model, make_token_batches, tmp_path / "cut", every=3, die_after=die_after)
    last = tmp_path / "cut" / "last.pt"
    if die_after == 4:
        assert not last.exists()  # no checkpoint before step 3; no validation checkpoint either
    else:
        within = torch.load(last, weights_only=True)["resume"]["within"]
        assert within["steps"] + 2 * within["epoch"] - 2 == 3  # step 3 of the training: epoch 2, its 1st step
    resumed, resumed_result, resumed_history = train(make_tiny_model, make_token_batches, tmp_path / "cut", every=3)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed_history == history
    for key in ("steps", "tokens", "counted", "best_val_loss", "best_epoch", "epochs_run"):
        assert resumed_result[key] == result[key], key
    assert not last.exists()  # a finished training leaves no resume checkpoint


def test_the_clock_schedule_writes_after_the_minutes_pass(monkeypatch):
    import types

    import lego.resume as resume

    now = [0.0]
    monkeypatch.setattr(resume, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    clock = CheckpointSchedule(every_minutes=2.0)
    assert not clock.at_validations and not clock.due(1)
    now[0] = 119.0
    assert not clock.due(2)
    now[0] = 121.0
    assert clock.due(3) and not clock.due(4)  # the clock starts again at the checkpoint
    now[0] = 241.0
    assert clock.due(5)
    both = CheckpointSchedule(every_steps=10, every_minutes=60.0)
    assert [s for s in range(1, 31) if both.due(s)] == [10, 20, 30]
    assert CheckpointSchedule().at_validations


def test_the_best_weights_reuse_their_buffers(make_tiny_model):
    model = make_tiny_model(num_layers=2)
    best = keep_best(model, None)
    ptrs = {k: v.data_ptr() for k, v in best.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again = keep_best(model, best)
    assert again is best and {k: v.data_ptr() for k, v in again.items()} == ptrs
    for k, v in model.state_dict().items():
        assert torch.equal(again[k], v) and again[k].data_ptr() != v.data_ptr(), k


@pytest.mark.parametrize("key,value,allowed", [
    ("phase1.checkpoint_every_steps", 0, "an integer >= 1, or null"),
    ("phase2.checkpoint_every_steps", -3, "an integer >= 1, or null"),
    ("phase1.checkpoint_every_minutes", 0.0, "a number > 0, or null"),
    ("phase2.checkpoint_every_minutes", -0.5, "a number > 0, or null"),
])
def test_bad_checkpoint_schedules_are_refused_with_the_key_named(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"^{key}={value} is not allowed; allowed: {allowed}$"):
        validate(to_config(compose_config(["debug=tiny", f"{key}={value}"])))


def test_a_schedule_changes_no_cache_key():
    base = to_config(compose_config(["debug=tiny"]))
    timed = to_config(compose_config(["debug=tiny", "phase1.checkpoint_every_steps=100",
                                      "phase2.checkpoint_every_minutes=30"]))
    validate(timed)
    assert timed.phase1.checkpoint_every_steps == 100 and timed.phase2.checkpoint_every_minutes == 30.0
    assert science_config(timed) == science_config(base)


def test_a_run_killed_between_validations_resumes_from_its_step_checkpoint(tmp_path, monkeypatch):
    """lego-run debug=tiny with phase1.checkpoint_every_steps=5 (epochs of 8 steps): phase 1 dies at step 10
    before writing that checkpoint; the rerun resumes from step 5 (inside epoch 1) and ends with the numbers and
    phase-1 weights of a clean run. Phase 1 trains in its cache entry (another cache dir than the clean run's)."""
    import lego.training as training

    keys = {"eval.standard_baseline": False, "phase1.checkpoint_every_steps": 5}
    clean = run(tiny_config(tmp_path / "cache", **keys), tmp_path / "clean")
    real_save = training.save_resume

    def die_at_step_10(work_dir, state):
        within = state.get("within")
        if within is not None and within["epoch"] == 2 and within["steps"] == 2:  # step 10 = epoch 2, its 2nd
            raise KeyboardInterrupt
        real_save(work_dir, state)

    monkeypatch.setattr(training, "save_resume", die_at_step_10)
    cfg = tiny_config(tmp_path / "cache2", **keys)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    last, = (tmp_path / "cache2").rglob("phase1*/last.pt")
    within = torch.load(last, weights_only=True)["resume"]["within"]
    assert (within["epoch"], within["steps"], within["tokens"]) == (1, 5, 5 * 16 * 16)  # batch 16 x seq_len 16
    monkeypatch.setattr(training, "save_resume", real_save)
    resumed = run(cfg, tmp_path / "cut")
    for key in ("acc", "ppl", "shallow_ratio", "compute_cost", "threshold"):
        assert resumed[key] == clean[key], key
    a = torch.load(tmp_path / "clean/phase1/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut/phase1/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ref", ["quick", "learned_router", "lego_study_chains/jobs/0_+variant=spec,seed=1"])
def test_committed_runs_keep_their_science_config(ref):
    """A key added at its default leaves the science config (the run-dir claim, the stage caches' keys) as it was:
    each committed reference run's recorded science_config is what this code computes from its resolved config."""
    from omegaconf import OmegaConf

    from lego.cli import to_config
    from lego.config import ASHEMConfig

    root = Path(__file__).resolve().parents[1] / "outputs" / "reference" / ref
    recorded = json.loads((root / "run.json").read_text())["science_config"]
    cfg = to_config(OmegaConf.merge(OmegaConf.structured(ASHEMConfig), OmegaConf.load(root / "config_resolved.yaml")))
    assert science_config(cfg) == recorded
