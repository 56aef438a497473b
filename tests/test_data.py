import math

import numpy as np
import pytest
import torch

from gpt2lib.data import DataLoader, load_tokens, read_asset_text, tokenize
from gpt2lib.runtime import UserError


def toks(n, start=0):
    return (np.arange(start, start + n) % 50000).astype(np.uint16)


def test_targets_are_inputs_shifted_by_one():
    data = toks(1000)
    x, y = DataLoader(data, B=4, T=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.from_numpy(data[:64].astype(np.int64)))
    assert torch.equal(y.flatten(), torch.from_numpy(data[1:65].astype(np.int64)))


def test_never_a_short_batch_and_wraps_to_the_next_epoch():
    data = toks(100)  # 3 batches of 2*16 (+1) fit; the 4th would not
    loader = DataLoader(data, B=2, T=16)
    firsts = []
    for _ in range(7):
        x, y = loader.next_batch()
        assert x.shape == (2, 16)
        assert int(y.max()) < 100  # never read past the end
        firsts.append(int(x[0, 0]))
    assert firsts == [0, 32, 64, 0, 32, 64, 0]


def shard_dir(tmp_path, sizes):
    offset = 0
    for i, n in enumerate(sizes):
        np.save(tmp_path / f"shard_{i:03d}.npy", toks(n, offset))
        offset += n
    return tmp_path


def test_batches_stay_inside_one_shard_and_every_shard_is_read(tmp_path):
    sizes = [300, 200, 257]
    loader = DataLoader(shard_dir(tmp_path, sizes), B=2, T=32)
    bounds = np.cumsum([0] + sizes)
    seen = set()
    for _ in range(20):
        x, y = loader.next_batch()
        lo, hi = int(x.min()), int(y.max())
        shard = int(np.searchsorted(bounds, lo, side="right")) - 1
        assert hi < bounds[shard + 1], "batch crosses a shard boundary"
        assert torch.equal(y[:, :-1], x[:, 1:])
        seen.add(shard)
    assert seen == {0, 1, 2}


def test_shard_order_is_shuffled_per_epoch_by_the_seed(tmp_path):
    path = shard_dir(tmp_path, [65] * 6)  # one batch of 2*32 per shard

    def orders(seed, epochs=3):
        loader = DataLoader(path, B=2, T=32, seed=seed)
        return [
            [int(loader.next_batch()[0][0, 0]) // 65 for _ in range(6)]
            for _ in range(epochs)
        ]

    a = orders(seed=1)
    assert a == orders(seed=1)  # deterministic
    assert all(
        sorted(epoch) == list(range(6)) for epoch in a
    )  # every shard once per epoch
    assert len({tuple(epoch) for epoch in a}) > 1  # reshuffled between epochs
    assert orders(seed=None, epochs=1) == [list(range(6))]


def test_two_ranks_read_what_one_process_reads():
    data = toks(5000)
    single = DataLoader(data, B=4, T=16)
    ranks = [DataLoader(data, B=2, T=16, rank=r, world_size=2) for r in range(2)]
    for _ in range(200):  # several epochs
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_state_dict_resumes_at_the_same_batch(tmp_path):
    loader = DataLoader(shard_dir(tmp_path, [300, 200, 257]), B=2, T=32, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(15)]  # crosses shards and epochs
    restored = DataLoader(tmp_path, B=2, T=32, seed=3)
    restored.load_state_dict(state)
    for x, y in expected:
        x2, y2 = restored.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_wrong_dtype_is_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.int32))
    with pytest.raises(ValueError, match="uint16.*int32"):
        load_tokens(tmp_path / "t.npy")
    with pytest.raises(ValueError, match="int32"):
        DataLoader(tmp_path, B=2, T=8)


def test_not_a_npy_file(tmp_path):
    (tmp_path / "t.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_tokens(tmp_path / "t.npy")


def test_data_shorter_than_one_batch(tmp_path):
    with pytest.raises(
        ValueError, match="shorter than one batch.*100 tokens.*4\\*32\\*1 \\+ 1 = 129"
    ):
        DataLoader(toks(100), B=4, T=32)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .npy token shards"):
        DataLoader(tmp_path, B=2, T=8)
    with pytest.raises(FileNotFoundError, match="no token file or directory"):
        DataLoader(tmp_path / "missing", B=2, T=8)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank 2"):
        DataLoader(toks(1000), B=2, T=8, rank=2, world_size=2)


def test_shipped_texts():
    full = read_asset_text("shakespeare.txt")  # shipped gzipped
    assert len(full.encode()) > 5_000_000 and full.startswith(
        "ALL'S WELL THAT ENDS WELL"
    )
    tiny = read_asset_text("tinyshakespeare.txt")
    assert len(tiny) == 1_115_394 and tiny.startswith("First Citizen")
    ids = tokenize(tiny[:1000])
    assert ids.dtype == np.uint16 and len(ids) > 100


def test_bigram_nll_equals_counting_by_hand():
    "The vectorised lookup against a dictionary of pair counts, on random tokens."
    from collections import Counter

    from gpt2lib.data import bigram_nll, unigram_probs

    rng = np.random.default_rng(0)
    V = 50
    fit, score = rng.integers(0, V, 2000), rng.integers(0, V, 500)
    pairs, prev = Counter(zip(fit[:-1], fit[1:])), Counter(fit[:-1])
    uni = unigram_probs(fit, V)
    for w in (0.3, 0.9):
        nll = [
            -math.log(w * pairs[(a, b)] / max(prev[a], 1) + (1 - w) * uni[b])
            for a, b in zip(score[:-1], score[1:])
        ]
        # float64 sums of 499 terms: rounding far below 1e-12 relative
        assert bigram_nll(fit, score, V, [w])[0] == pytest.approx(
            sum(nll) / len(nll), rel=1e-12
        )


def test_baselines_order_and_exact_values():
    from gpt2lib.data import baseline_losses

    # add-one smoothed unigram of [0, 0, 1] over 3 tokens: p = (3, 2, 1) / 6
    tiny = baseline_losses(np.array([0, 0, 1]), np.array([2, 0]), vocab_size=3)
    assert tiny["uniform"] == pytest.approx(math.log(3), rel=1e-15)
    assert tiny["unigram"] == pytest.approx(-math.log(3 / 6), rel=1e-15)
    # a text with structure between pairs: bigram < unigram < uniform
    text = np.tile(np.arange(10), 300)
    losses = baseline_losses(text, text[:200], vocab_size=100)
    assert losses["bigram"] < losses["unigram"] < losses["uniform"]


def test_baselines_of_a_tiny_text_are_numbers_without_a_warning():
    """A text of a few tokens leaves train's last tenth without a pair to choose the
    bigram's weight on: that once printed numpy's 'Mean of empty slice' and chose the
    weight from NaNs. Fewer than two tokens on either side cannot be scored at all."""
    import warnings

    from gpt2lib.data import baseline_losses

    val = np.arange(3, dtype=np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (2, 5, 10):
            losses = baseline_losses(np.arange(n, dtype=np.uint16) % 7, val)
            assert all(np.isfinite(v) for v in losses.values()), (n, losses)
    for train, val, side in ((1, 5, "training"), (5, 1, "validation")):
        with pytest.raises(UserError, match=f"at least 2 {side} tokens, got 1"):
            baseline_losses(
                np.arange(train, dtype=np.uint16), np.arange(val, dtype=np.uint16)
            )
