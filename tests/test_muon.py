"""Muon (chapter 5): the Newton-Schulz orthogonalisation against the SVD, Muon against
PyTorch's SGD and AdamW, and the groups `configure_muon` builds."""

import io
import math

import pytest
import torch

import gpt2lib.optim
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.optim import (
    Muon,
    configure_muon,
    newton_schulz5,
    train_step,
)


def quintic_5(s):
    """The scalar map that 5 Newton-Schulz steps apply to each singular value, with the
    quintic's coefficients from Keller Jordan's Muon (modded-nanogpt's
    `zeropower_via_newtonschulz5`) written here, not read from the module under test."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return s


def gradient_like(rows, cols, seed=0, dtype=torch.float32):
    "Noise in every direction plus three dominant ones, like a gradient."
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(rows, cols, generator=g, dtype=dtype)
    low_rank = torch.randn(rows, 3, generator=g, dtype=dtype) @ torch.randn(
        3, cols, generator=g, dtype=dtype
    )
    return G + 20 * low_rank / cols**0.5


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_newton_schulz_is_the_quintic_applied_to_the_singular_values(shape):
    # Reference: the SVD. The iteration is a polynomial in G G^T times G, so it must equal
    # U p(S / |G|_F) V^T. In float64 the only differences are rounding of O(1) entries over
    # 5 steps of 3 matrix products (~1e-15 each); 1e-10 leaves room, and a coefficient
    # off in its third digit (-4.750 for -4.775) moves entries by O(0.01). A tall matrix
    # left untransposed would not show, and is no error: G p(G^T G) = p(G G^T) G, so the
    # result is the same up to rounding (measured 1e-15 here); it only costs more, the
    # rows x rows Gram matrix instead of columns x columns (~10x the flops at 4:1).
    G = gradient_like(*shape, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = (
        U @ torch.diag(quintic_5(S / (G.norm() + 1e-7))) @ Vh
    )  # eps as in the code
    got = newton_schulz5(G, dtype=torch.float64)
    assert got.dtype == G.dtype and got.shape == G.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(128, 384), (384, 128), (512, 128), (256, 768)])
def test_newton_schulz_in_bf16_puts_singular_values_in_the_promised_band(shape):
    # The band: quintic_5 maps every normalised singular value in [0.01, 1] into
    # [0.68, 1.21] (checked below). Rectangular gradient-like matrices have normalised
    # singular values above 0.01 (asserted), so in exact arithmetic they land there. bf16
    # (8 bits of mantissa, ~0.4 % per rounding) moves them by a few percent, measured
    # 0.677 to 1.148; [0.5, 1.5] is the band modded-nanogpt states ("roughly U(0.5, 1.5)").
    s = torch.linspace(0.01, 1, 100_001, dtype=torch.float64)
    assert 0.68 < quintic_5(s).min() and quintic_5(s).max() < 1.21
    G = gradient_like(*shape)
    normalised = torch.linalg.svdvals(G) / G.norm()
    assert normalised.min() > 0.01
    after = torch.linalg.svdvals(newton_schulz5(G).float())
    before = torch.linalg.svdvals(G)
    assert (
        before.max() / before.min() > 20
    )  # the input was far from orthogonal (measured 28-43)
    assert 0.5 < after.min() and after.max() < 1.5


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_newton_schulz_maps_every_singular_value_into_the_quintics_band(shape):
    # A property, not a reference: Gaussian matrices 4:1, wide and tall, have normalised
    # singular values from about (sqrt(256) - sqrt(64)) / 128 = 0.0625 (the
    # Marchenko-Pastur edge; asserted above 0.06) to 1, and quintic_5 maps [0.06, 1]
    # into [0.68, 1.14] (checked on a fine grid; the extremes are flat, so the grid
    # misses ~1e-10), around 1 as Muon's "roughly U(0.5, 1.5)" promises. float64
    # rounding adds ~1e-15: the orthogonalised matrix's singular values lie in that
    # band.
    s = torch.linspace(0.06, 1, 100_001, dtype=torch.float64)
    assert 0.68 < quintic_5(s).min() and quintic_5(s).max() < 1.14
    G = torch.randn(
        *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    normalised = torch.linalg.svdvals(G) / G.norm()
    assert 0.06 < normalised.min() and normalised.max() / normalised.min() > 2.5
    after = torch.linalg.svdvals(newton_schulz5(G, dtype=torch.float64))
    assert 0.68 < after.min() and after.max() < 1.14


def test_muon_with_identity_orthogonalisation_is_sgd_with_nesterov_momentum():
    # The same floating-point operations in the same order as torch.optim.SGD's
    # single-tensor path: bitwise equal. A tall matrix steps with lr * sqrt(rows / cols).
    torch.manual_seed(0)
    weights = [torch.randn(8, 16), torch.randn(16, 16), torch.randn(32, 8)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    muon = Muon(
        [dict(params=ours, muon=True)],
        lr=0.1,
        momentum=0.9,
        orthogonalize=lambda g, steps: g,
    )
    sgd = torch.optim.SGD(
        [dict(params=ref[:2]), dict(params=ref[2:], lr=0.1 * 2)],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        foreach=False,
    )
    for _ in range(6):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        muon.step()
        sgd.step()
    for p, q, w in zip(ours, ref, weights):
        assert not torch.equal(p, w)  # it moved
        assert torch.equal(p, q)


def test_muon_without_nesterov_steps_along_the_orthogonalised_momentum():
    # Plain momentum: the first step is -lr * NS(g); the second -lr * NS(mu * g1 + g2).
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(16, 24))
    start = w.detach().clone()
    opt = Muon([dict(params=[w], muon=True)], lr=0.05, momentum=0.9, nesterov=False)
    g1, g2 = torch.randn(16, 24), torch.randn(16, 24)
    w.grad = g1.clone()
    opt.step()
    w.grad = g2.clone()
    opt.step()
    expected = start - 0.05 * newton_schulz5(g1) - 0.05 * newton_schulz5(0.9 * g1 + g2)
    torch.testing.assert_close(
        w.detach(), expected, rtol=0, atol=1e-6
    )  # float32 sums of O(0.05)


@pytest.mark.parametrize("fused", [False, True])
def test_muon_adamw_groups_step_like_torch_adamw(fused, monkeypatch):
    # The AdamW groups call torch.optim.AdamW's own update for a list of tensors: its
    # foreach path, or (fused) its one-kernel path, which PyTorch also has on a CPU.
    # The same function on the same numbers: bitwise equal to torch.optim.AdamW with
    # the same choice, over 20 steps, with and without weight decay.
    torch.manual_seed(2)
    weights = [torch.randn(8, 16), torch.randn(16)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    muon = Muon(
        [
            dict(params=ours[:1], weight_decay=0.1),
            dict(params=ours[1:], weight_decay=0.0),
        ],
        lr=1e-2,
        fused=fused,
    )
    adamw = torch.optim.AdamW(
        [
            dict(params=ref[:1], weight_decay=0.1),
            dict(params=ref[1:], weight_decay=0.0),
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        **(dict(fused=True) if fused else dict(foreach=True)),
    )
    # on a CPU both paths happen to give the same bits: the path asked for is seen
    asked = []
    update = gpt2lib.optim.adamw
    monkeypatch.setattr(
        gpt2lib.optim, "adamw", lambda *a, **kw: asked.append(kw) or update(*a, **kw)
    )
    for _ in range(20):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        muon.step()
        adamw.step()
    assert {(kw["fused"], kw["foreach"]) for kw in asked} == {(fused, not fused)}
    for p, q, w in zip(ours, ref, weights):
        assert not torch.equal(p, w)  # it moved
        assert torch.equal(p, q)
    assert [muon.state[p]["step"].item() for p in ours] == [20.0, 20.0]


def test_muon_adamw_counts_each_step_once_when_a_loaded_state_shares_a_count():
    # The update adds 1 to the step counts in place. A state whose parameters share
    # one count tensor (a state_dict can, once loaded) must still count each
    # parameter's steps once: bias correction reads the count.
    ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    muon = Muon([dict(params=ps)], lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    muon.step()
    shared = torch.tensor(1.0)
    for p in ps:
        muon.state[p]["step"] = shared
    muon.step()
    assert [muon.state[p]["step"].item() for p in ps] == [2.0, 2.0]


def test_muon_orthogonalises_each_shape_once_as_each_matrix_alone():
    # Matrices of one shape are orthogonalised together, in one batched iteration:
    # one call per shape, and each matrix's update as if it were alone. In float64
    # the batched and single products differ by rounding only (~1e-16 relative on
    # O(1) entries over 15 products); 1e-12 leaves room. A stack divided by one norm
    # for all its matrices instead of each its own would move them by O(0.1).
    torch.manual_seed(5)
    shapes = [(8, 16), (32, 8), (8, 16), (32, 8), (8, 16)]
    weights = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    grads = [
        gradient_like(*s, seed=i, dtype=torch.float64) * (i + 1)
        for i, s in enumerate(shapes)
    ]
    ps = [torch.nn.Parameter(w.clone()) for w in weights]
    calls = []

    def orthogonalize(g, steps):
        calls.append(tuple(g.shape))
        return newton_schulz5(g, steps, dtype=torch.float64)

    muon = Muon(
        [dict(params=ps, muon=True)],
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        orthogonalize=orthogonalize,
    )
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    muon.step()
    assert sorted(calls) == [(2, 32, 8), (3, 8, 16)]
    for p, w, g, s in zip(ps, weights, grads, shapes):
        scale = max(1.0, s[0] / s[1]) ** 0.5
        alone = w - 0.1 * scale * newton_schulz5(g, dtype=torch.float64)
        torch.testing.assert_close(p.detach(), alone, rtol=0, atol=1e-12)


def test_muon_refuses_vectors_in_a_muon_group():
    with pytest.raises(ValueError, match="matrices"):
        Muon([dict(params=[torch.nn.Parameter(torch.zeros(4))], muon=True)])


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


def test_configure_muon_puts_block_matrices_on_muon_and_the_rest_on_adamw():
    model = tiny_gpt()
    opt = configure_muon(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = (
        [names[id(p)] for p in g["params"]] for g in opt.param_groups
    )
    assert sorted(muon) == sorted(
        n
        for n, p in model.named_parameters()
        if n.startswith("transformer.h.") and p.dim() == 2
    )
    assert (
        len(muon) == 2 * 4
    )  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    assert sorted(decay) == [
        "transformer.wpe.weight",
        "transformer.wte.weight",
    ]  # the head is tied to wte
    assert all(model.get_parameter(n).dim() == 1 for n in no_decay)
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 3e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1, 0.0]


def test_train_step_scales_each_groups_lr_by_its_lr_scale():
    model = tiny_gpt()
    opt = configure_muon(model, lr=3e-3, muon_lr=0.03)
    x = torch.randint(0, 64, (2, 16))
    train_step(model, opt, [(x, x)], lr=1e-3, grad_clip=math.inf)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [1e-3 * 0.03 / 3e-3, 1e-3, 1e-3]
    )


def test_muon_state_dict_round_trips_and_continues_identically():
    # Checkpoint/resume: a fresh optimizer loaded from the state dict takes the same next step.
    torch.manual_seed(3)
    x = torch.randint(0, 64, (2, 16))
    a = tiny_gpt()
    opt_a = configure_muon(a)
    for _ in range(2):
        train_step(a, opt_a, [(x, x)], lr=3e-3)
    b = tiny_gpt()
    b.load_state_dict(a.state_dict())
    opt_b = configure_muon(b)
    buffer = io.BytesIO()  # through a file's bytes, as a checkpoint does
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    la, _ = train_step(a, opt_a, [(x, x)], lr=3e-3)
    lb, _ = train_step(b, opt_b, [(x, x)], lr=3e-3)
    assert la.item() == lb.item()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_compiled_newton_schulz_computes_the_eager_one():
    # float64: the fused kernels reorder sums, ~1e-16 relative per operation; five
    # iterations of a polynomial with slope at most a=3.4 grow that by < 3.4**5 (~450)
    G = torch.stack(
        [gradient_like(64, 160, seed=s, dtype=torch.float64) for s in (0, 1)]
    )
    muon = configure_muon(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64)), compile=True)
    assert getattr(muon.orthogonalize, "_torchdynamo_orig_callable", None) is (
        newton_schulz5
    )
    compiled = muon.orthogonalize(G, 5, torch.float64)
    torch.testing.assert_close(
        compiled, newton_schulz5(G, 5, torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("compile", [False, True])
def test_a_compiled_run_compiles_muons_newton_schulz(compile):
    from gpt2lib.config import PRESETS
    from gpt2lib.dist import DistEnv
    from gpt2lib.run import build_run

    cfg = PRESETS["smoke"].replace(optimizer="muon")
    run = build_run(cfg, DistEnv(), compile=compile)
    compiled = getattr(run.optimizer.orthogonalize, "_torchdynamo_orig_callable", None)
    assert compiled is (newton_schulz5 if compile else None)
