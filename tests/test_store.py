"""Hard-example stores (lego.store): RAM slabs, float16 rows on disk, the same examples either way."""


import numpy as np
import pytest
import torch

from lego.ashem import collect_hard_examples, compute_confidence_threshold
from lego.store import HalfRowWriter, RowBuffer

# -- what runs, and for how many tokens -----------------------------------------------------------


def test_row_buffer_joins_pieces_across_slabs_in_order(monkeypatch):
    monkeypatch.setattr(RowBuffer, "SLAB_BYTES", 5 * 8 * 4)  # 5 rows of 4 int64 per slab
    buf = RowBuffer()
    pieces = [torch.arange(k * 4, dtype=torch.long).view(k, 4) + 100 * i for i, k in enumerate([3, 0, 7, 1, 5])]
    for p in pieces:
        buf.append(p)
    assert buf.rows == 16 and len(buf.slabs) == 4
    assert torch.equal(buf.tensor(torch.empty(0)), torch.cat(pieces))
    assert buf.slabs == [] and buf.rows == 0
    empty = torch.empty(0, 0, dtype=torch.long)
    assert RowBuffer().tensor(empty) is empty


def test_half_rows_round_trip_pickle_and_truncation(tmp_path):
    import pickle

    rows = torch.randn(7, 3, 4)
    w = HalfRowWriter(str(tmp_path / "s" / "h.f16"), (3, 4))
    w.append(rows[:2])
    w.append(rows[2:])
    store = w.close()
    assert store.shape == (7, 3, 4) and len(store) == 7
    assert (tmp_path / "s" / "h.f16").stat().st_size == 7 * 3 * 4 * 2  # float16, nothing else
    assert np.array_equal(store[5], rows[5].half().numpy()) and np.array_equal(store[-1], rows[6].half().numpy())
    assert np.array_equal(np.asarray(store), rows.half().numpy())
    again = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives
    assert np.array_equal(again[3], rows[3].half().numpy())
    with pytest.raises(IndexError):
        store[7]
    with open(tmp_path / "s" / "h.f16", "r+b") as f:
        f.truncate(6 * 3 * 4 * 2)
    with pytest.raises(ValueError, match="truncated"):
        again[6]


@pytest.mark.parametrize("store", ["memory", "disk", "recompute"])
def test_mining_with_small_slabs_gives_the_same_examples(make_tiny_model, token_batches, tmp_path, monkeypatch,
                                                         store):
    model = make_tiny_model(num_layers=2)
    t = compute_confidence_threshold(model, token_batches, 0.5)
    ref = collect_hard_examples(model, token_batches, t, store=store, store_dir=str(tmp_path / "a"))
    monkeypatch.setattr(RowBuffer, "SLAB_BYTES", 1)  # one row per slab
    out = collect_hard_examples(model, token_batches, t, store=store, store_dir=str(tmp_path / "b"))
    for key in ("inputs", "targets", "confidences"):
        assert torch.equal(out[key], ref[key]) and out[key].dtype == ref[key].dtype
    if store == "memory":
        assert torch.equal(out["hidden_states"], ref["hidden_states"])
    assert compute_confidence_threshold(model, token_batches, 0.5) == t


