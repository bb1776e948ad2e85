"""The training loop (lego.training.train_epoch): one host read per epoch, the epoch loss by hand."""

import os
import sys

import pytest
import torch
from conftest import grown_pair

from lego.ashem import (
    collect_hard_examples,
    compute_confidence_threshold,
    train_upper_layers,
)
from lego.config import create_standard_config
from lego.store import create_hard_example_loader
from lego.training import Trainer

# -- the setting ----------------------------------------------------------------------------------


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
