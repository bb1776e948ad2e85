"""Batches (lego.batches): pinned host memory only for a GPU."""


import torch

from lego.batches import make_loader
from lego.store import create_hard_example_loader

# -- the setting ----------------------------------------------------------------------------------


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
