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




# -- compact dtypes (hard_examples.store_dtype) and copies from a device -----------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_memory_store_round_trips_its_states_in_each_dtype(make_tiny_model, token_batches, dtype):
    """Stored in `dtype`, the exit-layer states come back through the loader and `upper_states` as float32: exactly
    the mined states in float32, within the dtype's rounding (half an eps, relative) in the others."""
    from lego.ashem import upper_states
    from lego.store import create_hard_example_loader

    model = make_tiny_model(num_layers=2)
    t = compute_confidence_threshold(model, token_batches, 0.5)
    ref = collect_hard_examples(model, token_batches, t)["hidden_states"]  # float32, the default
    hard = collect_hard_examples(model, token_batches, t, store_dtype=dtype)
    stored = hard["hidden_states"]
    assert ref.dtype == torch.float32 and stored.dtype == getattr(torch, dtype) and stored.shape == ref.shape
    assert stored.element_size() * stored[0, 0].numel() == {"float32": 4, "bfloat16": 2, "float16": 2}[dtype] * 16
    loader = create_hard_example_loader(hard, batch_size=3, shuffle=False)
    back = torch.cat([upper_states(model, h, 2) for h, _ in loader])
    assert back.dtype == torch.float32
    if dtype == "float32":
        assert torch.equal(back, ref)
    else:
        assert torch.equal(back, ref.to(getattr(torch, dtype)).float())  # one rounding, nothing else
        assert ((back - ref).abs() <= torch.finfo(getattr(torch, dtype)).eps / 2 * ref.abs()).all()
        assert not torch.equal(back, ref)  # it did round


def test_a_bad_store_dtype_is_refused_with_the_key_named(make_tiny_model, token_batches):
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import ConfigError, validate
    from lego.pipeline.science import science_config

    with pytest.raises(ConfigError, match=r"^hard_examples\.store_dtype='float64' is not allowed; choose one of "
                                          r"float32, bfloat16, float16$"):
        validate(to_config(compose_config(["debug=tiny", "hard_examples.store_dtype=float64"])))
    with pytest.raises(ConfigError, match=r"^hard_examples\.store_dtype=bfloat16 applies to hard_examples\.store="
                                          r"memory; store=disk keeps float16 rows: allowed there: float32"):
        validate(to_config(compose_config(["debug=tiny", "hard_examples.store=disk",
                                           "hard_examples.store_dtype=bfloat16"])))
    with pytest.raises(ConfigError, match=r"^store_dtype='int8' is not allowed"):
        collect_hard_examples(make_tiny_model(num_layers=2), token_batches, 0.5, store_dtype="int8")
    # the default leaves every run directory and cache key as it was; a compact store is a new experiment
    base = to_config(compose_config(["debug=tiny"]))
    compact = to_config(compose_config(["debug=tiny", "hard_examples.store_dtype=bfloat16"]))
    validate(compact)
    assert "store_dtype" not in science_config(base)["hard_examples"]
    assert science_config(compact)["hard_examples"]["store_dtype"] == "bfloat16"


def test_host_copies_hand_cpu_rows_over_at_once_and_in_order():
    from lego.store import HostCopies

    seen = []
    copies = HostCopies(seen.append)
    parts = [torch.full((2, 3), float(i)) for i in range(3)]
    for i, p in enumerate(parts):
        copies.put(p)
        assert len(seen) == i + 1 and seen[-1] is p  # nothing pending on a CPU: the same tensor, no copy
    copies.flush()
    assert len(seen) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_from_a_cuda_device_arrive_complete_and_in_order(tmp_path):
    """Pinned, non-blocking copies: every row lands in order once the buffer is read (RowBuffer) or closed (disk)."""
    parts = [torch.randn(k, 5, 4, device="cuda") for k in (3, 0, 64, 1)]
    buf = RowBuffer()
    writer = HalfRowWriter(str(tmp_path / "h.f16"), (5, 4))
    for p in parts:
        buf.append(p.to(torch.bfloat16))
        writer.append(p)
    assert buf.rows == 68 and writer.rows == 68
    assert torch.equal(buf.tensor(torch.empty(0)), torch.cat(parts).to(torch.bfloat16).cpu())
    assert np.array_equal(np.asarray(writer.close()), torch.cat(parts).half().cpu().numpy())


def test_a_run_with_a_bfloat16_store_trains_phase2_on_the_rounded_states(tmp_path):
    """lego-run debug=tiny hard_examples.store_dtype=bfloat16: the same phase 1 and threshold, phase 2 trained on
    states rounded once to bfloat16; at this size its perplexity moves by far less than 0.1%."""
    from conftest import tiny_config

    from lego.run import run

    keys = {"eval.standard_baseline": False}
    full = run(tiny_config(tmp_path / "cache", **keys), tmp_path / "f32")
    compact = run(tiny_config(tmp_path / "cache", **keys, **{"hard_examples.store_dtype": "bfloat16"}),
                  tmp_path / "bf16")
    assert compact["threshold"] == full["threshold"] and compact["shallow_ratio"] == full["shallow_ratio"]
    assert compact["ppl"] == pytest.approx(full["ppl"], rel=1e-3)
