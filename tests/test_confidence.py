"""Confidences and per-token statistics (lego.confidence): chunked computation changes no bit."""


import pytest
import torch
import torch.nn.functional as F

from lego.confidence import _CHUNK_ELEMENTS, _row_stats, chunk_rows, confidence_from_logits, token_stats
from lego.config import CONFIDENCE_MEASURES, IGNORE_INDEX

# -- what runs, and for how many tokens -----------------------------------------------------------


@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_chunked_confidences_are_bit_identical(measure):
    vocab = 300
    rows = 3 * (_CHUNK_ELEMENTS // vocab) + 7  # several chunks and a ragged last one
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 4
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    targets[::5] = IGNORE_INDEX
    out = confidence_from_logits(logits.view(-1, 1, vocab), measure)
    assert out.shape == (rows, 1)
    whole = _row_stats(logits, targets, measure, IGNORE_INDEX)  # one pass, no chunks
    assert torch.equal(out.view(-1), whole["conf"])
    stats = token_stats(logits.view(-1, 1, vocab), targets.view(-1, 1), measure)
    for key in ("conf", "nll", "pred"):
        assert torch.equal(stats[key].view(-1), whole[key]), key
    # the textbook definitions, and what cross_entropy / argmax give
    p = F.softmax(logits.double(), -1)
    ref = {"max_prob": p.max(-1).values, "margin": p.topk(2, -1).values @ torch.tensor([1.0, -1.0]).double(),
           "entropy": (p * p.log()).sum(-1)}[measure]
    torch.testing.assert_close(out.view(-1).double(), ref, atol=1e-6, rtol=1e-5)
    keep = targets != IGNORE_INDEX
    assert torch.equal(stats["nll"].view(-1)[keep], F.cross_entropy(logits[keep], targets[keep], reduction="none"))
    assert (stats["nll"].view(-1)[~keep] == 0).all()
    assert torch.equal(stats["pred"].view(-1), logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_chunk_size_gives_the_unchunked_stats(dtype):
    """(B, T, V) logits in the model's dtype, rows `chunk` at a time, each chunk cast to float32 on its
    own: bit for bit what one float32 pass over the whole gives, for every chunk size."""
    B, T, V = 3, 5, 50
    logits = (torch.randn(B, T, V, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    targets[0, ::2] = IGNORE_INDEX
    whole = _row_stats(logits.float().view(-1, V), targets.view(-1), "entropy", IGNORE_INDEX)
    for chunk in (1, 4, 7, B * T, 1000, None):
        stats = token_stats(logits, targets, "entropy", chunk=chunk)
        assert stats["conf"].dtype == torch.float32
        for key in ("conf", "nll", "pred"):
            assert stats[key].shape == (B, T) and torch.equal(stats[key].view(-1), whole[key]), (chunk, key)
    with pytest.raises(ValueError, match="chunk=0"):
        token_stats(logits, targets, chunk=0)


def test_default_chunk_is_bounded_on_every_device():
    """4 MB of float32 logits per chunk on CPU, 256 MB on a GPU (no GPU needed to check the rule)."""
    assert chunk_rows(300, torch.device("cpu")) == (1 << 20) // 300
    assert chunk_rows(50304, torch.device("cuda")) == 1334  # 50304 * 1334 * 4 bytes = 268 MB
    assert chunk_rows(1 << 30, torch.device("cuda")) == 1  # at least one row


# -- mining keeps its rows in a few large slabs ---------------------------------------------------
