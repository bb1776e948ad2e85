"""Trainer: stage losses, early stopping (and resume), routed evaluation.

    python -m pytest tests/test_training.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lego.ashem import grow
from lego.batches import SeededBatches
from lego.confidence import confidence_from_logits
from lego.config import StageConfig, TrainingConfig, create_standard_config
from lego.training import Trainer, early_stopping_loop


@torch.no_grad()
def ce(model, batches, layer):
    """Mean cross-entropy at `layer` over counted tokens, computed from the model's logits directly."""
    nll, n = 0.0, 0
    for x, y in batches:
        logits = model(x, layer=layer)
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += int((y != -100).sum())
    return nll / n


# -- stage losses -----------------------------------------------------------------------------------

def test_stage_loss_is_the_mean_over_its_layers(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=3)
    x, y = token_batches[0]
    trainer = Trainer(TrainingConfig(stages=[StageConfig(layers=(2, 3), loss_weight=1.0)]), model.vocab_size)
    expected = (ce(model, [(x, y)], 2) + ce(model, [(x, y)], 3)) / 2
    assert float(trainer.compute_loss(model, x, y).detach()) == pytest.approx(expected, rel=1e-6)


def test_two_weighted_stages_give_the_weighted_sum(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=3)
    x, y = token_batches[0]
    single = lambda stage: Trainer(TrainingConfig(stages=[stage]), model.vocab_size).compute_loss(model, x, y)
    a, b = StageConfig(layers=(1, 1), loss_weight=0.3), StageConfig(layers=(2, 3), loss_weight=0.7)
    both = Trainer(TrainingConfig(stages=[a, b]), model.vocab_size).compute_loss(model, x, y)
    expected = 0.3 * single(StageConfig((1, 1))) + 0.7 * single(StageConfig((2, 3)))
    torch.testing.assert_close(both, expected)
    # overlapping stages add up too
    c = StageConfig(layers=(3, 3), loss_weight=2.0)
    both = Trainer(TrainingConfig(stages=[b, c]), model.vocab_size).compute_loss(model, x, y)
    torch.testing.assert_close(both, 0.7 * single(StageConfig((2, 3))) + 2.0 * single(StageConfig((3, 3))))


def test_standard_config_takes_the_loss_at_the_last_layer(make_tiny_model, token_batches):
    config = create_standard_config(3)
    assert [(s.layers, s.loss_weight) for s in config.stages] == [((3, 3), 1.0)]
    assert config.routing_threshold is None and config.exit_layer is None
    model = make_tiny_model(num_layers=3)
    x, y = token_batches[0]
    assert float(Trainer(config, model.vocab_size).compute_loss(model, x, y).detach()) == pytest.approx(ce(model, [(x, y)], 3),
                                                                                               rel=1e-6)


@pytest.mark.parametrize("layers", [(0, 1), (3, 2)])
def test_stage_config_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        StageConfig(layers=layers)


def test_stage_deeper_than_the_model_is_refused(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=2)
    trainer = Trainer(create_standard_config(3), model.vocab_size)
    with pytest.raises(ValueError, match="stage layer 3"):
        trainer.validation_loss(model, token_batches)
    with pytest.raises(ValueError, match="stages"):
        Trainer(TrainingConfig(), model.vocab_size).validation_loss(model, token_batches)


# -- early stopping ---------------------------------------------------------------------------------

SCRIPT = [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1, 2.0, 2.5]


def scripted_run(losses, patience, max_epochs=None, **kwargs):
    """Run early_stopping_loop where epoch e sets the model's weight to e and validation returns losses[e-1]."""
    model = torch.nn.Linear(1, 1, bias=False)

    def train_epoch(epoch):
        with torch.no_grad():
            model.weight.fill_(epoch)
        return 1.0

    validate = lambda: losses[int(model.weight.item()) - 1]
    result = early_stopping_loop(model, train_epoch, validate, max_epochs=max_epochs or len(losses),
                                 patience=patience, **kwargs)
    return model, result


@pytest.mark.parametrize("patience,epochs_run,best_epoch,stopped", [
    (1, 3, 2, True), (2, 6, 4, True), (3, 7, 4, True), (4, 9, 8, False),
])
def test_early_stopping_honours_patience(patience, epochs_run, best_epoch, stopped):
    model, result = scripted_run(SCRIPT, patience)
    assert result["epochs_run"] == epochs_run
    assert result["best_epoch"] == best_epoch
    assert result["stopped_early"] is stopped
    assert result["best_val_loss"] == SCRIPT[best_epoch - 1]
    assert result["best_val_ppl"] == pytest.approx(math.exp(SCRIPT[best_epoch - 1]))
    assert [r["val_loss"] for r in result["history"]] == SCRIPT[:epochs_run]
    assert model.weight.item() == best_epoch, "the best epoch's weights must be restored"


def test_equal_loss_is_not_an_improvement():
    model, result = scripted_run([2.0, 2.0, 1.0], patience=1)
    assert (result["epochs_run"], result["best_epoch"], model.weight.item()) == (2, 1, 1.0)


def test_scripted_resume_continues_where_it_left_off():
    states = []
    model, full = scripted_run(SCRIPT, 3, on_epoch_end=lambda s: states.append(torch.utils._pytree.tree_map(
        lambda v: v.clone() if torch.is_tensor(v) else v, {**s, "history": list(s["history"])})))
    assert len(states) == full["epochs_run"]
    resumed_model, resumed = scripted_run(SCRIPT, 3, resume=states[4])
    assert resumed == full
    assert resumed_model.weight.item() == model.weight.item()


@pytest.mark.parametrize("kwargs,key", [(dict(patience=0), "patience"), (dict(max_epochs=0), "max_epochs")])
def test_early_stopping_bad_arguments(kwargs, key):
    args = dict(max_epochs=3, patience=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=key):
        early_stopping_loop(torch.nn.Linear(1, 1), lambda e: 1.0, lambda: 1.0, **args)


def make_loaders(make_token_batches, seed=0):
    train = make_token_batches(n_batches=4, batch_size=8, seed=seed + 1)
    inputs = torch.cat([x for x, _ in train])
    targets = torch.cat([y for _, y in train])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets),
                                         batch_sampler=SeededBatches(len(inputs), 8, True, seed, drop_last=False))
    return loader, make_token_batches(n_batches=2, batch_size=8, seed=seed + 2)


def test_train_with_early_stopping_end_to_end(make_tiny_model, make_token_batches):
    """Random tokens + a large learning rate: it overfits, stops after `patience` bad epochs, keeps the best."""
    model = make_tiny_model(num_layers=2, noise=0.0)
    train_loader, val_loader = make_loaders(make_token_batches)
    trainer = Trainer(create_standard_config(2), model.vocab_size, progress=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    result = trainer.train_with_early_stopping(model, train_loader, val_loader, optimizer, max_epochs=30, patience=2)
    val = [r["val_loss"] for r in result["history"]]
    assert result["stopped_early"]
    assert result["epochs_run"] == len(val) == result["best_epoch"] + 2
    assert result["best_val_loss"] == min(val) == val[result["best_epoch"] - 1]
    assert all(v >= result["best_val_loss"] for v in val[result["best_epoch"]:])
    assert val[-1] > result["best_val_loss"], "the last epoch was worse: the best weights must have been restored"
    assert trainer.validation_loss(model, val_loader) == pytest.approx(result["best_val_loss"], rel=1e-6, abs=0)
    assert set(result) >= {"best_val_loss", "best_val_ppl", "best_epoch", "epochs_run", "stopped_early", "history"}


def test_resume_from_an_epoch_end_state_matches_an_uninterrupted_run(make_tiny_model, make_token_batches, tmp_path):
    train_loader, val_loader = make_loaders(make_token_batches)
    trainer = Trainer(create_standard_config(2), 16, progress=False)

    def run(model, **kwargs):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        return trainer.train_with_early_stopping(model, train_loader, val_loader, optimizer, max_epochs=8,
                                                 patience=2, **kwargs)

    # dropout draws from the global RNG, so the saved RNG state matters too
    model = make_tiny_model(num_layers=2, noise=0.0, dropout=0.1)
    full = run(model, on_epoch_end=lambda s: torch.save(s, tmp_path / f"epoch{s['epoch']}.pt"))
    assert full["epochs_run"] >= 3
    resumed_model = make_tiny_model(num_layers=2, seed=5, dropout=0.1)  # other weights: all must come from the state
    torch.manual_seed(123)
    resumed = run(resumed_model, resume=torch.load(tmp_path / "epoch2.pt"))
    assert resumed == full
    for (k, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_empty_loaders_name_the_loader(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=2)
    trainer = Trainer(create_standard_config(2), model.vocab_size, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="train_loader"):
        trainer.train_with_early_stopping(model, [], token_batches, optimizer, max_epochs=2)
    with pytest.raises(ValueError, match="val_loader"):
        trainer.train_with_early_stopping(model, token_batches, [], optimizer, max_epochs=2)
    with pytest.raises(ValueError, match="loader"):
        trainer.evaluate(model, [])


def test_seeded_batches_depend_on_seed_and_epoch_only():
    a, b = SeededBatches(20, 4, True, 3, False), SeededBatches(20, 4, True, 3, False)
    a.set_epoch(2)
    first = list(a)
    list(b)  # b has seen another epoch first
    b.set_epoch(2)
    assert list(b) == first and sorted(sum(first, [])) == list(range(20)) and all(len(x) == 4 for x in first)
    a.set_epoch(3)
    assert list(a) != first
    ranks = [list(SeededBatches(20, 4, True, 3, False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(sum(ranks, []), [])) == list(range(20))


# -- routed evaluation ------------------------------------------------------------------------------

def routed_trainer(threshold, exit_layer, num_layers, **kwargs):
    config = TrainingConfig(stages=[StageConfig(layers=(num_layers, num_layers))], routing_threshold=threshold,
                            exit_layer=exit_layer, **kwargs)
    return Trainer(config, 16, progress=False)


def test_evaluate_without_routing_is_the_plain_last_layer(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=3)
    stats = Trainer(create_standard_config(3), model.vocab_size, progress=False).evaluate(model, token_batches)
    assert stats["ppl"] == pytest.approx(math.exp(ce(model, token_batches, 3)), rel=1e-6)
    assert (stats["shallow_ratio"], stats["compute_cost"]) == (0.0, 1.0)
    assert stats["n_tokens"] == sum(int((y != -100).sum()) for _, y in token_batches)


@pytest.mark.parametrize("exit_layer,num_layers", [(2, 4), (1, 3), (3, 6)])
def test_evaluate_threshold_zero_exits_everything(make_tiny_model, token_batches, exit_layer, num_layers):
    model = grow(make_tiny_model(num_layers=exit_layer), num_layers)
    stats = routed_trainer(0.0, exit_layer, num_layers).evaluate(model, token_batches)
    assert stats["shallow_ratio"] == 1.0
    assert stats["compute_cost"] == pytest.approx(exit_layer / num_layers)
    assert stats["ppl"] == pytest.approx(math.exp(ce(model, token_batches, exit_layer)), rel=1e-6)
    assert set(stats) >= {"acc", "ppl", "shallow_ratio", "compute_cost"}


@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
@pytest.mark.parametrize("exit_layer,num_layers", [(2, 4), (1, 3), (3, 6)])
def test_evaluate_threshold_above_one_is_the_full_model(make_tiny_model, perturb, make_token_batches, exit_layer,
                                                       num_layers, policy):
    # No ignored targets here: evaluate routes a token whose target is ignored as easy (hard = low
    # confidence & counted target), which under propagate/skip changes later tokens' context.
    token_batches = make_token_batches(n_ignored=0)
    model = grow(make_tiny_model(num_layers=exit_layer), num_layers)
    perturb(model.layers[exit_layer:].parameters())
    stats = routed_trainer(1.01, exit_layer, num_layers, upper_context=policy).evaluate(model, token_batches)
    plain = Trainer(create_standard_config(num_layers), 16, progress=False).evaluate(model, token_batches)
    assert (stats["shallow_ratio"], stats["compute_cost"]) == (0.0, 1.0)
    assert stats["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert stats["acc"] == plain["acc"]
    assert stats["hard_deep_ppl"] == pytest.approx(plain["ppl"], rel=1e-5)


def test_evaluate_mixed_threshold_matches_a_hand_computation(make_tiny_model, perturb, token_batches):
    model = grow(make_tiny_model(num_layers=2), 4)
    perturb(model.layers[2:].parameters())
    x = torch.cat([b[0] for b in token_batches])
    y = torch.cat([b[1] for b in token_batches])
    valid = y != -100
    with torch.no_grad():
        exit_logits, deep_logits = model(x, layer=2), model(x)  # full policy: every token through every layer
    conf = confidence_from_logits(exit_logits)  # max softmax probability (tested in test_ashem)
    threshold = float(conf[valid].median())
    easy = (conf >= threshold) & valid
    used = torch.where(easy[..., None], exit_logits, deep_logits)[valid]
    n, n_easy = int(valid.sum()), int(easy.sum())
    assert 0 < n_easy < n
    expected = {
        "acc": float((used.argmax(-1) == y[valid]).float().mean()),
        "ppl": math.exp(float(F.cross_entropy(used, y[valid]))),
        "shallow_ratio": n_easy / n,
        "compute_cost": (n_easy * 2 + (n - n_easy) * 4) / (n * 4),
        "exit_ppl": math.exp(float(F.cross_entropy(exit_logits[valid], y[valid]))),
        "hard_deep_ppl": math.exp(float(F.cross_entropy(deep_logits[~easy & valid], y[~easy & valid]))),
    }
    stats = routed_trainer(threshold, 2, 4, upper_context="full").evaluate(model, token_batches)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-5), key


def test_evaluate_bad_routing_arguments(make_tiny_model, token_batches):
    model = grow(make_tiny_model(num_layers=2), 4)
    with pytest.raises(ValueError, match="exit_layer"):
        routed_trainer(0.5, 4, 4).evaluate(model, token_batches)
    with pytest.raises(ValueError, match="confidence"):
        routed_trainer(0.5, 2, 4, confidence="variance").evaluate(model, token_batches)
    with pytest.raises(ValueError, match="upper_context"):
        routed_trainer(0.5, 2, 4, upper_context="partial").evaluate(model, token_batches)


def test_an_epoch_trains_on_that_epochs_seeded_order(make_tiny_model):
    """Epoch e's optimizer steps see exactly the batches SeededBatches gives for epoch e (a progress
    wrapper that touched the loader first once shifted training to epoch e + 1's order)."""
    from lego.batches import EpochSteps, make_loader
    from lego.training import train_epoch

    tokens = torch.randint(0, 16, (2000,), generator=torch.Generator().manual_seed(0)).numpy()
    loader = make_loader(tokens, 8, 4, shuffle=True, seed=3)
    batches = EpochSteps(loader, 5)
    model = make_tiny_model(num_layers=2)
    trainer = Trainer(create_standard_config(2), progress=False)
    seen = []

    def loss(m, x, y):
        seen.append(x.clone())
        return trainer.stage_loss_sum(m, x, y)

    train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), loss, "cpu", epoch=4, progress=False)
    loader.sampler.set_epoch(4)
    expected = [x for x, _ in list(loader)[:5]]
    assert len(seen) == 5 and all(torch.equal(a, b) for a, b in zip(seen, expected))
