"""The modern model (chapter 11): with every switch off it is chapter 2's GPT, bit for bit;
each switch does what it says, checked against a reference computation."""

import itertools
import math

import pytest
import torch

from gpt2lib.model import GPT, Block, GPTConfig, KVCache
from gpt2lib.modern import SWITCHES, ModernBlock, ModernConfig, rotary

SHAPE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
ON = dict(
    rope=True,
    qk_norm=True,
    relu2=True,
    untie_head=True,
    zero_init_proj=True,
    softcap=2.0,
)
OFF = {name: getattr(ModernConfig, name) for name in SWITCHES}  # the defaults


def build(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)  # one class: the config names the parts


def tokens(seed=1, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (3, T), generator=g)


@pytest.mark.parametrize("extra", [{}, dict(pad_vocab_to=64), dict(attn_impl="manual")])
def test_with_every_switch_off_it_is_gpt2_bit_for_bit(extra):
    # Same seed, same modules made in the same order: the same weights. The forward runs the
    # same operations in the same order, so logits, loss and gradients are equal exactly.
    gpt2, modern = (
        build(GPTConfig(**SHAPE, **extra)),
        build(ModernConfig(**SHAPE, **extra)),
    )
    assert type(modern) is GPT and modern.config.changes() == []
    assert all(type(block) is ModernBlock for block in modern.transformer.h)
    a, b = gpt2.state_dict(), modern.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert modern.lm_head.weight is modern.transformer.wte.weight  # tied, as GPT-2
    x = tokens()
    (la, loss_a), (lb, loss_b) = gpt2(x, x), modern(x, x)
    assert torch.equal(la, lb) and torch.equal(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(gpt2.named_parameters(), modern.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # and it is not a constant: another seed gives other logits
    assert not torch.equal(build(ModernConfig(**SHAPE, **extra), seed=1)(x)[0], lb)


def test_a_gpt_config_builds_chapter_2s_parts():
    model = build(GPTConfig(**SHAPE))
    assert all(type(block) is Block for block in model.transformer.h)
    assert type(model.transformer.wpe) is torch.nn.Embedding
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_switch_changes_the_model(switch):
    x = tokens()
    base = build(ModernConfig(**SHAPE))(x)[0]
    changed = build(ModernConfig(**SHAPE, **{switch: ON[switch]}))(x)[0]
    assert (changed - base).abs().max() > 1e-3  # none of them is a silent no-op


def complex_rotation_reference(x, base=10000.0):
    "RoPE as the paper writes it: pairs as complex numbers, times exp(i t theta_j)."
    T, d = x.shape[-2:]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    z = z * torch.polar(
        torch.ones(T, d // 2, dtype=torch.float64),
        torch.arange(T, dtype=torch.float64)[:, None] * theta,
    )
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def test_rotary_is_the_complex_rotation_of_the_paper():
    x = torch.randn(2, 3, 50, 16)
    # float32 angles t * theta up to 49 rad: cos/sin of a float32 angle are off by about
    # 49 * 2^-24 ~ 3e-6 relative to float64's; 1e-5 on O(1) entries covers it
    torch.testing.assert_close(
        rotary(x).double(), complex_rotation_reference(x), rtol=0, atol=1e-5
    )


def test_rotary_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 16).expand(64, 16), torch.randn(1, 16).expand(64, 16)
    scores = rotary(q) @ rotary(k).T
    for d in range(64):
        diag = scores.diagonal(-d)
        assert (diag - diag[0]).abs().max() < 1e-4  # float32 angles, as above
    assert (
        scores.diagonal(0)[0] - scores.diagonal(-5)[0]
    ).abs() > 1e-3  # but distance matters


def roformer_reference(x, positions, base):
    """RoFormer's rotation, written out pair by pair in float64: the pair (x[2i],
    x[2i+1]) at position t turns by the angle t * theta_i, theta_i = base^(-2i/d)."""
    d = x.size(-1)
    t = torch.tensor(positions, dtype=torch.float64)  # (T,)
    out = torch.empty(x.shape, dtype=torch.float64)
    x = x.double()
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        cos, sin = torch.cos(t * theta), torch.sin(t * theta)
        first, second = x[..., 2 * i], x[..., 2 * i + 1]  # (..., T)
        out[..., 2 * i] = first * cos - second * sin
        out[..., 2 * i + 1] = first * sin + second * cos
    return out


def assert_rotated(got, x, start, base=10000.0):
    """`got` (..., T, d) is x rotated at positions start, ..., start + T - 1 with
    `base`. The module computes the angle t * theta in float32: theta = base^(-2i/d) by
    a float32 power (d a power of 2, so the exponent is exact; the power is within 2
    ulps, 2^-22 relative), times t (exact integers), rounded once more (2^-24): the
    angle is within t * 2^-21 (theta <= 1) of the exact one, and a coordinate moves by
    at most that times its pair's length. cos and sin (a few ulps) and the two products
    and the sum (one rounding each) add at most 2^-21 of the pair's length. Another base
    turns the second pair by another angle already at t = 1 (0.1 rad for base 1000), far
    larger."""
    T, d = x.shape[-2:]
    assert d & (d - 1) == 0
    positions = list(range(start, start + T))
    expected = roformer_reference(x, positions, base)
    pair_length = x.double().unflatten(-1, (d // 2, 2)).norm(dim=-1).max()
    angle_error = torch.tensor(positions, dtype=torch.float64)[:, None] * 2**-21
    bound = (angle_error + 2**-21) * pair_length
    assert ((got.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("start", [0, 1, 1000, 8000])
def test_rotary_is_roformers_rotation_with_base_10000(start):
    # the pairs are interleaved (x[2i], x[2i+1]), not halves, and the default base is
    # RoFormer's 10000, at small and large positions (a KV cache's `start`)
    x = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(start))
    assert_rotated(rotary(x, start=start), x, start)
    assert_rotated(rotary(x, base=500.0, start=start), x, start, base=500.0)


def test_the_models_rope_uses_roformers_base():
    # what the model computes: its attention's queries and keys, rotated with the
    # config's default base, at the positions after a cache's 1000
    attention = build(ModernConfig(**SHAPE, rope=True)).transformer.h[0].attn
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    for start in (0, 1000):
        rq, rk = attention.transform_qk(q, k, start)
        assert_rotated(rq, q, start)
        assert_rotated(rk, k, start)
    assert ModernConfig.rope_base == 10000.0


def test_rope_removes_the_position_table():
    model = build(ModernConfig(**SHAPE, rope=True))
    assert "transformer.wpe.weight" not in model.state_dict()
    assert (
        model.num_params()
        == build(GPTConfig(**SHAPE)).num_params()
        - SHAPE["block_size"] * SHAPE["n_embd"]
    )
    out = model.generate(
        tokens(T=4)[:, :4], max_new_tokens=3, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (3, 7)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    # With QK-norm, multiplying the q and k rows of c_attn by 10 changes nothing (up to the
    # rms_norm epsilon and float32 rounding); without it the logits change.
    x = tokens()
    for qk_norm in (True, False):
        model = build(ModernConfig(**SHAPE, qk_norm=qk_norm))
        before = model(x)[0]
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[: 2 * SHAPE["n_embd"]] *= 10
                block.attn.c_attn.bias[: 2 * SHAPE["n_embd"]] *= 10
        difference = (model(x)[0] - before).abs().max()
        if qk_norm:
            assert difference < 1e-4  # float32 rounding through 2 blocks of O(1) values
        else:
            assert difference > 1e-2


def test_relu2_mlp_is_relu_squared():
    model = build(ModernConfig(**SHAPE, relu2=True))
    mlp, h = model.transformer.h[0].mlp, torch.randn(5, SHAPE["n_embd"])
    expected = mlp.c_proj(torch.relu(mlp.c_fc(h)) ** 2)
    torch.testing.assert_close(mlp(h), expected, rtol=0, atol=0)


def test_untied_head_has_its_own_matrix():
    model = build(ModernConfig(**SHAPE, untie_head=True))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert "lm_head.weight" in model.state_dict()
    assert model.num_params() == build(GPTConfig(**SHAPE)).num_params() + 97 * 32
    assert (
        abs(model.lm_head.weight.std().item() - 0.02) < 0.002
    )  # GPT-2's init, 3,104 draws


def test_zero_init_projections_make_every_block_the_identity_at_init():
    model = build(ModernConfig(**SHAPE, zero_init_proj=True))
    x = tokens()
    t = model.transformer
    # blocks add 0 (c_proj weight 0, bias 0): logits are the head of ln_f of the embeddings
    expected = model.lm_head(t.ln_f(t.wte(x) + t.wpe(torch.arange(32))))
    torch.testing.assert_close(model(x)[0], expected, rtol=0, atol=0)


def test_zero_init_zeroes_exactly_the_output_projections():
    # Identity blocks do not say which weights are zero: c_attn or c_fc at zero give
    # them too. The switch zeroes attn.c_proj and mlp.c_proj of every block and changes
    # nothing else: every other parameter equals the same seed's model without it, which
    # has no zero matrix at all.
    off, on = (
        build(ModernConfig(**SHAPE, zero_init_proj=zero)).state_dict()
        for zero in (False, True)
    )
    projections = {
        f"transformer.h.{i}.{part}.c_proj.weight"
        for i in range(SHAPE["n_layer"])
        for part in ("attn", "mlp")
    }
    assert list(on) == list(off) and projections <= set(on)
    for name in on:
        if name in projections:
            assert torch.count_nonzero(on[name]) == 0, name
        else:
            assert torch.equal(on[name], off[name]), name
    matrices = [name for name, w in off.items() if w.dim() == 2]
    assert projections < set(matrices)
    assert not [name for name in matrices if torch.count_nonzero(off[name]) == 0]


def test_softcap_bounds_the_logits_and_is_tanh_of_the_uncapped_ones():
    x = tokens()
    capped = build(ModernConfig(**SHAPE, softcap=0.5))(x)[0]
    plain = build(ModernConfig(**SHAPE))(x)[0]  # same seed: same weights
    assert capped.abs().max() < 0.5
    # tanh and a division in float32 (a few ulps of O(0.5) values)
    torch.testing.assert_close(capped, 0.5 * torch.tanh(plain / 0.5), rtol=0, atol=1e-6)


def test_softcap_with_a_padded_vocabulary_keeps_padding_out():
    model = build(ModernConfig(**SHAPE, softcap=2.0, pad_vocab_to=64))
    logits, loss = model(tokens(), tokens())
    assert logits.shape[-1] == 97 and math.isfinite(loss.item())


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=math.inf), "softcap"),
        (dict(rope=True, n_embd=30, n_head=2), "even"),
        (dict(rope_base=1.0), "rope_base"),
    ],
)
def test_bad_configs_are_refused_with_the_setting_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ModernConfig(**{**SHAPE, **bad})


def random_modern(attn_impl="sdpa", seed=0, **switches):
    """A tiny modern model in float64 with every weight random (zero-initialised
    projections and unit gains included), so that any dependence shows."""
    torch.manual_seed(seed)
    config = ModernConfig(
        **{**SHAPE, "block_size": 16}, attn_impl=attn_impl, **switches
    )
    model = GPT(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


COMBINATIONS = [
    {name: (ON[name] if on else OFF[name]) for name, on in zip(SWITCHES, bits)}
    for bits in itertools.product((False, True), repeat=len(SWITCHES))
]


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_no_position_sees_the_future_with_any_switches_and_kernel(attn_impl):
    # All 64 combinations of the switches, each with both attention kernels: changing
    # the tokens from position 7 on leaves the logits of positions 0..6 unchanged, and
    # the KV cache (a prompt, single tokens, then a chunk) gives the full forward's
    # logits. float64: a position before the change sees the same operands (the masked
    # ones enter as exact zeros), and the cached path differs from the full one only by
    # the order of sums, ~1e-16 relative on logits of size ~10 through 2 blocks; 1e-10
    # leaves room, while a leak (QK-norm over positions, a wrong mask) moves them by
    # 0.01 or more.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (2, 12), generator=g)
    later = x.clone()
    later[:, 7:] = (x[:, 7:] + 1 + torch.randint(0, 96, (2, 5), generator=g)) % 97
    pieces = [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 12)]
    for switches in COMBINATIONS:
        model = random_modern(attn_impl, **switches)
        with torch.no_grad():
            full, changed = model(x)[0], model(later)[0]
            cache = KVCache(model.config)
            cached = torch.cat(
                [model(x[:, a:b], kv_cache=cache)[0] for a, b in pieces], 1
            )
        assert (changed[:, 7:] - full[:, 7:]).abs().max() > 1e-3, switches  # it reads
        torch.testing.assert_close(
            changed[:, :7],
            full[:, :7],
            rtol=1e-10,
            atol=1e-10,
            msg=lambda m, s=switches: f"{s}: {m}",
        )
        torch.testing.assert_close(
            cached, full, rtol=1e-10, atol=1e-10, msg=lambda m, s=switches: f"{s}: {m}"
        )


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_generation_with_the_kv_cache_equals_recomputing_the_context(attn_impl):
    # Rotary embeddings must rotate a cached step's query and key at its absolute
    # position: greedy tokens with the cache equal those of recomputing the whole context
    # every step, past block_size too (where the window slides and the cache is rebuilt).
    torch.manual_seed(0)
    model = GPT(
        ModernConfig(**{**SHAPE, "block_size": 8}, **ON, attn_impl=attn_impl)
    ).eval()
    with torch.no_grad():
        for (
            p
        ) in model.parameters():  # away from GPT-2's near-uniform init: no near-ties
            p.add_(0.2 * torch.randn_like(p))
    prompt = tokens(T=3)[:, :3]
    cached = model.generate(prompt, 12, top_k=1, use_cache=True)
    recomputed = model.generate(prompt, 12, top_k=1, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0].tolist())) > 2  # not one token repeated
