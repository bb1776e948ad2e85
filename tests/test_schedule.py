"""Learning-rate schedules (lego/schedule.py): hand-computed values, constant = no scheduler, resume."""

import math

import pytest
import torch

from lego.schedule import check_schedule, lr_at, make_scheduler

COS = dict(schedule="cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)


def test_cosine_values_by_hand():
    lr = lambda step: lr_at(step, base_lr=2.0, **COS)
    assert lr(0) == 2.0 * 1 / 5  # warmup start: base * (0 + 1) / (4 + 1)
    assert lr(3) == 2.0 * 4 / 5  # last warmup step
    assert lr(4) == 2.0  # end of warmup: cosine starts at the base
    # midpoint of the cosine (step 4 + 10/2 = 9): floor + half the way: 2 * (0.1 + 0.5 * 0.9) = 1.1
    assert lr(9) == pytest.approx(1.1, abs=1e-12)
    # step 6 is (6 - 4) / 10 = 1/5 of the way: base * (0.1 + 0.5 * 0.9 * (1 + cos(pi / 5)))
    assert lr(6) == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi / 5))), abs=1e-12)
    assert lr(14) == pytest.approx(0.2, abs=1e-15)  # the floor at total_steps
    assert lr(15) == lr(1000) == 2.0 * 0.1  # and after
    assert all(lr(s) >= lr(s + 1) for s in range(4, 20))  # non-increasing after warmup
    no_warmup = dict(COS, warmup_steps=0)
    assert lr_at(0, base_lr=2.0, **no_warmup) == 2.0
    assert lr_at(7, base_lr=3e-4, schedule="constant", warmup_steps=4, total_steps=14, min_lr_ratio=0.1) == 3e-4


def test_check_schedule_names_the_key():
    check_schedule("phase1", "cosine", 0, 0.0)
    with pytest.raises(ValueError, match=r"phase1.schedule='foo' is not allowed; choose one of constant, cosine"):
        check_schedule("phase1", "foo", 0, 0.0)
    with pytest.raises(ValueError, match=r"phase2.warmup_steps=-1"):
        check_schedule("phase2", "cosine", -1, 0.0)
    with pytest.raises(ValueError, match=r"phase2.min_lr_ratio=1.5"):
        check_schedule("phase2", "cosine", 0, 1.5)
    with pytest.raises(ValueError, match=r"^schedule='x'"):
        make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), schedule="x")


def _train(schedule=None, steps=5):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_scheduler(opt, schedule=schedule, warmup_steps=2, total_steps=steps) if schedule else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model.state_dict()


def test_constant_is_bit_identical_to_no_scheduler():
    plain, const, cos = _train(None), _train("constant"), _train("cosine")
    assert all(torch.equal(plain[k], const[k]) for k in plain)
    assert not torch.equal(plain["weight"], cos["weight"])  # the comparison can fail: cosine changes training


def test_state_dict_round_trip_resumes_the_lr_sequence():
    def fresh():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        return opt, make_scheduler(opt, **COS)

    opt, sched = fresh()
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert expected == pytest.approx([lr_at(k, base_lr=0.5, **COS) for k in range(20)], abs=1e-15)

    opt, sched = fresh()
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt, sched = fresh()  # a new process: fresh objects, then the saved states
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    for _ in range(13):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == expected
