"""The presets of issue 22: model=deep, experiment=deep, model=gpt2_small (composes, and trains when shrunk).

    python -m pytest tests/test_deep_presets.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from lego.checkpoint import build_model
from lego.cli import to_config
from lego.config import block_layers, resolve, validate
from lego.pipeline.compute import dense_depths


@pytest.mark.parametrize("blocks,exits", [(None, [2]), ("[2,4,8]", [2, 4])])
def test_experiment_deep_is_an_8_layer_model_exiting_after_layer_2(blocks, exits):
    cascade = [f"blocks={blocks}", "phase1.budget_fraction=null"] if blocks else []  # a budget split: two Blocks only
    cfg = to_config(compose_config(["experiment=deep", *cascade]))
    validate(cfg)
    assert (cfg.model.name, cfg.model.dim, cfg.phase1.layers, cfg.phase2.layers) == ("deep", 384, 2, 8)
    assert block_layers(cfg)[:-1] == exits and dense_depths(resolve(cfg)) == [*exits, 8]  # every Block boundary
    assert cfg.phase1.patience is None and cfg.phase2.patience is None and cfg.phase1.budget_fraction == (None if blocks else 0.45)


def test_gpt2_small_composes_and_trains_a_few_steps_when_shrunk():
    cfg = resolve(to_config(compose_config(["model=gpt2_small", "blocks=[4,12]", "data.seq_len=16"])))
    validate(cfg)
    m = cfg.model
    assert (m.dim, m.num_heads, m.max_seq_len, cfg.phase2.layers) == (768, 12, 1024, 12)
    torch.manual_seed(0)
    model = build_model(cfg, 256, cfg.phase2.layers).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (2, 17))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
