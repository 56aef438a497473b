"""Generation with a KV cache gives exactly the tokens of recomputing the context, for
both attention kernels, greedy and sampled, and past block_size (where the window slides
and the cache must be rebuilt)."""

import pytest
import torch

from gpt2lib.model import GPT, GPTConfig, KVCache

BLOCK = 16


def small_gpt(attn_impl: str) -> GPT:
    """A small random GPT whose logits are far from ties: GPT-2's init gives nearly
    uniform logits, where a rounding difference could flip a greedy pick."""
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=BLOCK,
        vocab_size=50,
        n_layer=2,
        n_head=2,
        n_embd=32,
        attn_impl=attn_impl,
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_cached_logits_equal_recomputed(attn_impl):
    model = small_gpt(attn_impl)
    seq = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(seq)
        cache = KVCache(model.config)
        # a prompt, then one token at a time, then a chunk of three after the cache
        pieces = [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 12)]
        cached = torch.cat(
            [model(seq[:, a:b], kv_cache=cache)[0] for a, b in pieces], 1
        )
    assert cache.length == 12
    # fp32; the cached path multiplies matrices of other shapes, so sums run in
    # another order: rounding differences of ~1e-6 on logits of size ~10
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("top_k", [1, 5])  # greedy, and seeded top-k sampling
def test_generation_with_cache_equals_without(attn_impl, top_k):
    model = small_gpt(attn_impl)
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    new = 2 * BLOCK  # runs past block_size: the window slides
    lengths = {}
    for use_cache in (True, False):
        seen = lengths[use_cache] = []
        hook = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].size(1)))
        out = model.generate(
            prompt,
            new,
            top_k=top_k,
            generator=torch.Generator().manual_seed(3),
            use_cache=use_cache,
        )
        hook.remove()
        if use_cache:
            with_cache = out
    assert torch.equal(with_cache, out)
    assert with_cache.shape == (3, 5 + new)
    # the cache is really used: one position per step until the window is full, then
    # the whole window, recomputed, every step
    filled = BLOCK - 5
    assert lengths[True] == [5] + [1] * filled + [BLOCK] * (new - 1 - filled)
    assert lengths[False] == [min(5 + i, BLOCK) for i in range(new)]


def test_cache_past_block_size_is_refused():
    model = small_gpt("sdpa")
    cache = KVCache(model.config)
    with torch.no_grad():
        model(torch.zeros(1, BLOCK, dtype=torch.long), kv_cache=cache)
        with pytest.raises(
            ValueError, match=f"17 tokens is longer than block_size {BLOCK}"
        ):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
