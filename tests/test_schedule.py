"""Learning-rate schedules (lego/schedule.py): hand-computed values, constant = no scheduler, resume."""

import math
from functools import partial

import pytest
import torch

from lego.config import check_schedule
from lego.schedule import lr_factor
from lego.training import TrainingTotals, train_epoch

COS = dict(schedule="cosine", warmup_steps=4, total_steps=15, min_lr_ratio=0.1)  # steps 0..14: cosine over 4..14


def test_cosine_values_by_hand():
    lr = lambda step: 2.0 * lr_factor(step, **COS)  # what train_epoch sets: base lr x factor
    assert lr(0) == 2.0 * 1 / 5  # warmup start: base * (0 + 1) / (4 + 1)
    assert lr(3) == 2.0 * 4 / 5  # last warmup step
    assert lr(4) == 2.0  # end of warmup: cosine starts at the base
    # midpoint of the cosine (step 4 + 10/2 = 9): floor + half the way: 2 * (0.1 + 0.5 * 0.9) = 1.1
    assert lr(9) == pytest.approx(1.1, abs=1e-12)
    # step 6 is (6 - 4) / 10 = 1/5 of the way: base * (0.1 + 0.5 * 0.9 * (1 + cos(pi / 5)))
    assert lr(6) == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi / 5))), abs=1e-12)
    assert lr(14) == pytest.approx(0.2, abs=1e-15)  # the floor at the budget's last step (total_steps - 1)
    assert lr(13) > lr(14)  # and not before it
    assert lr(15) == lr(1000) == 2.0 * 0.1  # and after
    assert all(lr(s) >= lr(s + 1) for s in range(4, 20))  # non-increasing after warmup
    no_warmup = dict(COS, warmup_steps=0)
    assert 2.0 * lr_factor(0, **no_warmup) == 2.0
    assert 3e-4 * lr_factor(7, schedule="constant", warmup_steps=4, total_steps=15, min_lr_ratio=0.1) == 3e-4


def test_check_schedule_names_the_key():
    check_schedule("phase1", "cosine", 0, 0.0)
    with pytest.raises(ValueError, match=r"phase1.schedule='foo' is not allowed; choose one of constant, cosine"):
        check_schedule("phase1", "foo", 0, 0.0)
    with pytest.raises(ValueError, match=r"phase2.warmup_steps=-1"):
        check_schedule("phase2", "cosine", -1, 0.0)
    with pytest.raises(ValueError, match=r"phase2.min_lr_ratio=1.5"):
        check_schedule("phase2", "cosine", 0, 1.5)
    with pytest.raises(ValueError, match=r"^schedule='x'"):
        lr_factor(0, schedule="x", warmup_steps=0, total_steps=1, min_lr_ratio=0.1)


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(factor, batches):
    model, opt = _model_and_optimizer()
    train_epoch(model, batches, opt, _loss, "cpu", lr_factor=factor, totals=TrainingTotals(), progress=False)
    return model.state_dict()


def test_the_loop_applies_the_schedule_and_a_constant_factor_changes_no_bit():
    """`lego.training.train_epoch` with lr_factor: a factor of 1 everywhere trains bit for bit like no
    schedule (so `constant`, which passes none, is today's training); cosine changes the weights."""
    batches = _batches()
    plain, ones = _train(None, batches), _train(lambda step: 1.0, batches)
    cos = _train(partial(lr_factor, **COS), batches)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    assert not torch.equal(plain["weight"], cos["weight"])  # the comparison can fail: cosine changes training


def test_resume_continues_the_lr_sequence_from_the_stages_step_count():
    """Two halves with the optimizer state and the stage's step count carried over (as `fit` resumes from
    the history) train exactly like one pass: step k runs at base lr x lr_factor(k) in both."""
    batches, factor = _batches(), partial(lr_factor, **COS)
    whole = _train(factor, batches)
    model, opt = _model_and_optimizer()
    totals = TrainingTotals()
    train_epoch(model, batches[:3], opt, _loss, "cpu", lr_factor=factor, totals=totals, progress=False)
    state, opt_state = model.state_dict(), opt.state_dict()
    model, opt = _model_and_optimizer()
    model.load_state_dict(state)
    opt.load_state_dict(opt_state)
    resumed = TrainingTotals(steps=totals.steps)
    train_epoch(model, batches[3:], opt, _loss, "cpu", lr_factor=factor, totals=resumed, progress=False)
    assert resumed.steps == 6 and all(torch.equal(whole[k], model.state_dict()[k]) for k in whole)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(5, **COS), rel=1e-12)
