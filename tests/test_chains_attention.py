"""scripts/chains_attention.py: where bindings are, and attention weights that are the ones the model runs."""

import torch

from conftest import load_script
from lego.model import Model, ModelArgs

attention = load_script("chains_attention")


def test_binding_values_are_the_bound_values_before_the_queries():
    text = "b9;qb;h0;jh;?q9;?j0"
    x = torch.tensor([list(text.encode())])
    vals = attention.binding_values(x, ord(";"), ord("?"))
    assert vals[0].nonzero().flatten().tolist() == [1, 4, 7, 10]  # 9, b, 0, h; never a query's answer


def test_attention_maps_give_each_layers_output_through_its_own_projections():
    torch.manual_seed(0)
    for pos in ("rope", "learned"):
        model = Model(ModelArgs(vocab_size=20, dim=16, num_layers=2, num_heads=4, max_seq_len=12, pos=pos)).eval()
        x = torch.randint(0, 20, (3, 9))
        maps = attention.attention_maps(model, x)
        assert [m.shape for m in maps] == [(3, 4, 9, 9)] * 2
        assert torch.allclose(maps[0].sum(-1), torch.ones(3, 4, 9), atol=1e-6)
        assert (maps[1].triu(1) == 0).all()  # causal
        h = model.embed(x)
        rope = None if model.rope_cos is None else (model.rope_cos, model.rope_sin)
        with torch.no_grad():
            for layer, att in zip(model.layers, maps):
                B, T, C = h.shape
                v = layer._heads(layer.qkv(layer.norm1(h)).split(C, dim=2)[2])
                y = h + layer.attn_out((att @ v).transpose(1, 2).reshape(B, T, C))
                by_maps = y + layer.mlp(layer.norm2(y))
                h = layer(h, rope)  # scaled_dot_product_attention, as training runs it
                assert torch.allclose(by_maps, h, atol=1e-5)
