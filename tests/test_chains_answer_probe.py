"""scripts/chains_answer_probe.py: the answer-only and weighted losses, and a few steps of the probe end to end."""

import json
import math

import torch
import torch.nn.functional as F

from conftest import load_script

probe = load_script("chains_answer_probe")


def _batch(seed=0, B=3, T=10, V=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(-1, 3, (B, T), generator=g).to(torch.int8)  # -1 unpredictable, 0 format, 1-2 hops
    labels[0, 0] = 1  # at least one answer
    return logits, targets, labels


def test_answers_loss_is_the_mean_ce_over_answers_and_has_no_gradient_elsewhere():
    logits, targets, labels = _batch()
    loss = probe.weighted_ce(logits, targets, probe.token_weights(labels, targets, "answers", 10.0))
    answer = labels >= 1
    by_hand = F.cross_entropy(logits[answer], targets[answer])
    assert torch.allclose(loss, by_hand, atol=1e-6)
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    assert (grad[~answer] == 0).all() and (grad[answer] > 0).all()


def test_weighted_loss_weighs_answers_w_and_all_is_the_plain_mean():
    logits, targets, labels = _batch(seed=1)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    answer = labels >= 1
    w = torch.where(answer, 10.0, 1.0)
    weighted = probe.weighted_ce(logits, targets, probe.token_weights(labels, targets, "weighted", 10.0))
    assert torch.allclose(weighted, (w * ce).sum() / w.sum(), atol=1e-6)
    plain = probe.weighted_ce(logits, targets, probe.token_weights(labels, targets, "all", 10.0))
    assert torch.allclose(plain, ce.mean(), atol=1e-6)


def test_probe_trains_scores_by_label_and_writes_its_records(tmp_path):
    out = tmp_path / "out"
    rec = probe.main(["--name", "tiny", "--depth", "2", "--loss", "answers", "--lr", "3e-3", "--steps", "6",
                      "--warmup", "2", "--eval-every", "3", "--batch-size", "4", "--out", str(out), "--",
                      "experiment=chains", f"data.cache_dir={tmp_path / 'cache'}", "data.chains.train_lines=200",
                      "data.chains.eval_lines=24", "model.dim=16", "model.num_heads=2"])
    saved = json.loads((out / "tiny.json").read_text())
    lines = [json.loads(x) for x in (out / "histories" / "tiny.jsonl").read_text().splitlines()]
    assert [h["step"] for h in lines] == [0, 3, 6] == [h["step"] for h in saved["history"]]
    assert saved["steps"] == 6 and saved["stopped_by"] == "steps" and saved["train_macs"] > 0
    table = saved["by_label"]
    assert {"1 hops", "2 hops", "format", "unpredictable", "all"} <= set(table)
    # 24 programs of 20 bytes, one per window (experiment=chains): 24 x 19 targets, every one scored
    assert table["all"]["n_tokens"] == 24 * 19
    assert sum(v["n_tokens"] for k, v in table.items() if k != "all") == table["all"]["n_tokens"]
    assert rec["summary"]["final_acc"] == {k: lines[-1]["acc"][k] for k in ("1 hops", "2 hops")}


TINY = ["experiment=chains", "data.chains.train_lines=200", "data.chains.eval_lines=24", "model.dim=16",
        "model.num_heads=2"]


def _dense(tmp_path, layers):
    """A tiny dense chains model of `layers` layers, saved as a run's checkpoint; returns (path, model)."""
    from lego.checkpoint import save_model

    cfg = probe.compose_config([*TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    corpus = probe.load_corpus(cfg.data)
    torch.manual_seed(3)
    shape = probe.replace(cfg.model, precision="fp32")
    model = probe.Model(probe.ModelArgs.from_config(shape, probe.model_vocab_size(cfg, corpus.vocab_size), layers))
    path = tmp_path / f"dense{layers}.pt"
    save_model(path, model, cfg)
    return path, model


def test_grown_probe_trains_only_the_fresh_layer_unless_unfrozen(tmp_path):
    path, lower = _dense(tmp_path, 2)
    args = ["--depth", "2", "--loss", "all", "--steps", "3", "--warmup", "1", "--eval-every", "3", "--batch-size",
            "4", "--grow-from", str(path), "--lower-layers", "1", "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    kept = {k: v.clone() for k, v in lower.layers[0].state_dict().items()}
    frozen = probe.main(["--name", "frozen", "--out", str(tmp_path / "a"), *args])
    assert frozen["lower_layers"] == 1 and not frozen["unfreeze"]
    # the fresh layer, its deep head: the lower layer, embedding and exit head are frozen (`lego.ashem.grow`)
    per_layer = sum(p.numel() for p in lower.layers[0].parameters())
    head = sum(p.numel() for p in lower.output_head.parameters())
    assert frozen["trainable_params"] == per_layer + head
    thawed = probe.main(["--name", "thawed", "--unfreeze", "--out", str(tmp_path / "b"), *args])
    assert thawed["trainable_params"] > frozen["trainable_params"]
    # the lower model is the checkpoint's first layer, bit for bit
    cut = probe.lower_model(path, 1)
    assert cut.num_layers == 1
    for k, v in cut.layers[0].state_dict().items():
        assert torch.equal(v, kept[k])
    assert torch.equal(cut.output_head.proj.weight, lower.output_head.proj.weight)


def test_lower_layers_out_of_range_is_refused(tmp_path):
    path, _ = _dense(tmp_path, 2)
    import pytest

    with pytest.raises(ValueError, match="--lower-layers 3: between 1 and 2"):
        probe.lower_model(path, 3)


def test_joint_exit_model_trains_both_exits_and_grows_from_below_its_exit(tmp_path):
    saved = tmp_path / "joint.pt"
    rec = probe.main(["--name", "joint", "--depth", "2", "--joint-exit", "1", "--loss", "all", "--steps", "3",
                      "--warmup", "1", "--eval-every", "3", "--batch-size", "4", "--save-model", str(saved),
                      "--out", str(tmp_path / "a"), "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    assert rec["joint_exit"] == 1 and rec["exit_weight"] == 0.5 and rec["steps"] == 3
    state = probe.load_checkpoint(saved, what="test")
    full = probe.Model(probe.ModelArgs(**probe.stored_args(state["model_args"])))
    full.load_state_dict(state["state_dict"])
    assert full.exit_layers == (1,) or list(full.exit_layers) == [1]
    lower = probe.lower_model(saved)  # the layer below the exit and the exit's head
    assert lower.num_layers == 1 and not lower.exit_layers
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(lower(x), full(x, layer=1))
    import pytest

    with pytest.raises(ValueError, match="only the model below a single exit"):
        probe.lower_model(saved, 2)
    with pytest.raises(ValueError, match="--joint-exit 2: between 1 and 1"):
        probe.main(["--name", "bad", "--depth", "2", "--joint-exit", "2", "--steps", "1", "--out",
                    str(tmp_path / "b"), "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"])


def test_joint_loss_weighs_the_exit_and_the_last_layer():
    torch.manual_seed(0)
    x, y = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6))
    w = torch.ones(2, 6)
    model = probe.Model(probe.ModelArgs(vocab_size=40, dim=16, num_layers=2, num_heads=2, exits=(1,), deep_head=True))
    exit_ce = F.cross_entropy(model(x, layer=1).flatten(0, 1), y.flatten())  # the exit's head at layer 1
    last_ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # the deep head at layer 2
    assert not torch.allclose(exit_ce, last_ce)
    for ew in (0.0, 0.25, 1.0):
        got = probe.joint_loss(model, x, y, w, 1, ew)
        assert torch.allclose(got, ew * exit_ce + (1 - ew) * last_ce, atol=1e-6)


def test_joint_model_starts_from_the_dense_models_weights(tmp_path, monkeypatch):
    """--joint-exit draws the dense model's initial weights (same seed), both heads a copy of its head."""
    starts = {}
    real_main = probe.train_probe

    def spy(cfg, corpus, **kw):
        kw = dict(kw, steps=0)
        rec = real_main(cfg, corpus, **kw)
        starts[kw.get("joint_exit")] = rec["model"].state_dict()
        return rec

    monkeypatch.setattr(probe, "train_probe", spy)
    common = ["--depth", "2", "--steps", "1", "--eval-every", "1", "--batch-size", "4", "--seed", "3", "--", *TINY,
              f"data.cache_dir={tmp_path / 'cache'}"]
    probe.main(["--name", "dense", "--out", str(tmp_path / "a"), *common])
    probe.main(["--name", "joint", "--joint-exit", "1", "--out", str(tmp_path / "b"), *common])
    dense, joint = starts[None], starts[1]
    for k, v in dense.items():
        assert torch.equal(joint[k], v), k
    for k, v in dense.items():
        if k.startswith("output_head."):
            assert torch.equal(joint["deep_head." + k[len("output_head."):]], v)


def test_detached_exit_leaves_the_layers_the_dense_gradient():
    """--exit-detach: the loss is the exit's CE + the last layer's; every layer's and the embedding's gradient is
    the last layer's CE's alone (the dense model's), and the exit head's is the exit CE's."""
    torch.manual_seed(1)
    x, y = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6))
    w = torch.ones(2, 6)
    model = probe.Model(probe.ModelArgs(vocab_size=40, dim=16, num_layers=2, num_heads=2, exits=(1,), deep_head=True))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}

    exit_ce = F.cross_entropy(model(x, layer=1).flatten(0, 1), y.flatten())
    last_ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    got = probe.joint_loss(model, x, y, w, 1, 0.5, detach=True)
    assert torch.allclose(got, exit_ce + last_ce, atol=1e-6)
    joint, deep = grads(got), grads(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    exit_only = grads(F.cross_entropy(model(x, layer=1).flatten(0, 1), y.flatten()))
    # with exits=(1,), output_head is the exit's head and deep_head the last layer's (separate heads)
    trunk = [k for k in joint if not k.startswith("output_head.")]
    assert any(k.startswith("layers.0.") for k in trunk) and any(k.startswith("deep_head.") for k in trunk)
    for k in trunk:
        if deep[k] is None:
            assert joint[k] is None or not joint[k].any(), k
        else:
            assert torch.allclose(joint[k], deep[k], atol=1e-6), k
    heads = [k for k in joint if k.startswith("output_head.")]
    assert heads
    for k in heads:
        assert torch.allclose(joint[k], exit_only[k], atol=1e-6), k
    # without detach, the exit's loss reaches layer 0
    mixed = grads(probe.joint_loss(model, x, y, w, 1, 0.5))
    assert not torch.allclose(mixed["layers.0.qkv.weight"], 0.5 * deep["layers.0.qkv.weight"], atol=1e-6)


def test_joint_record_routes_the_asked_share_by_label(tmp_path):
    """The joint record's routers, chosen on the first half of validation and reported on the second: each stops
    about the asked share (the oracle by label: exactly the labelled share), its tokens are the exit's or the last
    layer's, per-label rows add up, and the per-token oracle is no worse than any router at its share."""
    rec = probe.main(["--name", "jd", "--depth", "2", "--joint-exit", "1", "--exit-detach", "--loss", "all",
                      "--steps", "3", "--warmup", "1", "--eval-every", "3", "--batch-size", "4", "--exit-share", "0.7",
                      "--out", str(tmp_path / "a"), "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    t = rec["joint_tables"]
    assert rec["exit_detach"] is True and rec["exit_weight"] is None and rec["exit_share"] == 0.7
    ex, deep = t["exit"], t["deep"]
    n = ex["all"]["n_tokens"]
    assert n == deep["all"]["n_tokens"]
    for name in ("max_prob", "learned", "learned_gain", "oracle", "oracle_by_label"):
        r = t[name]
        rows = r["by_label"]
        assert r["n_tokens"] == n and rows["all"]["n_tokens"] == n
        assert sum(v["n_exit"] for k, v in rows.items() if k != "all") == rows["all"]["n_exit"]
        assert r["shallow_ratio"] == rows["all"]["exit_share"]
        for label, row in rows.items():  # a routed token is the exit's or the last layer's
            assert min(ex[label]["correct"], deep[label]["correct"]) <= row["correct"] \
                <= ex[label]["correct"] + deep[label]["correct"]
    assert abs(t["oracle"]["shallow_ratio"] - 0.7) <= 5 / n  # calibrated on these tokens: to a token or a tie
    answers = sum(v["n_tokens"] for k, v in t["oracle_by_label"]["by_label"].items() if k.endswith("hops"))
    assert t["oracle_by_label"]["shallow_ratio"] >= 1 - answers / n  # only answers are sent up
    oracle_nll = math.log(t["oracle"]["ppl"])
    for name in ("max_prob", "learned", "learned_gain"):  # no router at or below the oracle's exit share beats it
        if t[name]["shallow_ratio"] >= t["oracle"]["shallow_ratio"]:
            assert oracle_nll <= math.log(t[name]["ppl"]) + 1e-9
    saved = json.loads((tmp_path / "a" / "jd.json").read_text())
    assert saved["joint_tables"]["max_prob"]["by_label"] == json.loads(json.dumps(t["max_prob"]["by_label"]))
    curves = t["curves"]
    assert [p["share"] for p in curves["oracle"]] == list(probe.CURVE_SHARES)
    for p in curves["oracle"]:  # the per-token oracle at each share is no worse than max-prob at that share
        q = next(q for q in curves["max_prob"] if q["share"] == p["share"])
        if q["shallow_ratio"] >= p["shallow_ratio"]:
            assert p["ppl"] <= q["ppl"] * (1 + 1e-9)
    for p in curves["learned_gain"]:
        assert math.isclose(p["gap_pct"], 100 * (p["ppl"] / deep["all"]["ppl"] - 1))
    oracle_ppl = [p["ppl"] for p in curves["oracle"]]
    assert oracle_ppl == sorted(oracle_ppl)  # the more tokens exit, the worse the best router does


def test_tables_from_scores_a_saved_joint_model_without_training(tmp_path):
    saved = tmp_path / "joint.pt"
    common = ["--depth", "2", "--joint-exit", "1", "--steps", "2", "--warmup", "1", "--eval-every", "2",
              "--batch-size", "4", "--exit-detach", "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    trained = probe.main(["--name", "jd", "--save-model", str(saved), "--out", str(tmp_path / "a"), *common])
    again = probe.main(["--name", "jd_tables", "--tables-from", str(saved), "--out", str(tmp_path / "b"), *common])
    assert again["joint_tables"]["max_prob"] == trained["joint_tables"]["max_prob"]
    assert json.loads((tmp_path / "b" / "jd_tables.json").read_text())["tables_from"] == str(saved)
    dense = tmp_path / "dense.pt"
    probe.main(["--name", "d", "--depth", "2", "--steps", "1", "--eval-every", "1", "--batch-size", "4", "--save-model",
                str(dense), "--out", str(tmp_path / "c"), "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    import pytest

    with pytest.raises(ValueError, match="a model with one exit"):
        probe.main(["--name", "x", "--tables-from", str(dense), "--out", str(tmp_path / "d"), "--", *TINY,
                    f"data.cache_dir={tmp_path / 'cache'}"])


def test_detached_exit_trains_the_layers_as_the_dense_model(tmp_path, monkeypatch):
    """--exit-detach from the dense model's start, on its batches: after a few clipped steps the layers, the
    embedding and the last layer's head are the dense model's (the exit head is clipped on its own), while the
    exit head has moved away from its start."""
    ends = {}
    real = probe.train_probe

    def spy(cfg, corpus, **kw):
        rec = real(cfg, corpus, **kw)
        ends[kw.get("joint_exit")] = {k: v.clone() for k, v in rec["model"].state_dict().items()}
        return rec

    monkeypatch.setattr(probe, "train_probe", spy)
    common = ["--depth", "2", "--loss", "all", "--steps", "4", "--warmup", "1", "--eval-every", "4", "--batch-size",
              "4", "--seed", "5", "--", *TINY, f"data.cache_dir={tmp_path / 'cache'}", "phase1.grad_clip=0.01"]
    probe.main(["--name", "dense", "--out", str(tmp_path / "a"), *common])
    probe.main(["--name", "jd", "--joint-exit", "1", "--exit-detach", "--out", str(tmp_path / "b"), *common])
    dense, joint = ends[None], ends[1]
    for k, v in dense.items():
        other = joint["deep_head." + k[len("output_head."):]] if k.startswith("output_head.") else joint[k]
        assert torch.allclose(other, v, atol=1e-6), k
    assert not torch.allclose(joint["output_head.proj.weight"], dense["output_head.proj.weight"], atol=1e-4)
