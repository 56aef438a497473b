import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2lib.bench import (
    LADDER,
    build_model,
    flops_per_token,
    peak_tflops,
    run_ladder,
)
from gpt2lib.data import read_asset_text, tokenize
from gpt2lib.model import GPTConfig
from gpt2lib.optim import configure_optimizer

TINY = GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32)


def tiny_ladder(tokens, T=32, steps=2, compile=False, **options):
    """The ladder for a 1-layer, 32-wide model on micro-batches of 2 x T tokens, on this
    CPU, without a progress bar."""
    return run_ladder(
        GPTConfig(n_layer=1, n_head=2, n_embd=32),
        B=2,
        T=T,
        steps=steps,
        warmup=1,
        device="cpu",
        compile=compile,
        tokens=tokens,
        progress=False,
        **options,
    )


def test_flops_per_token_of_gpt2_124m():
    with torch.device("meta"):
        n = sum(
            p.numel() for p in GPT2LMHeadModel(GPT2Config()).transformer.parameters()
        )  # HF counts wte once
    n -= 1024 * 768  # the position embedding is a lookup, not a matmul
    assert flops_per_token(GPTConfig(), 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(GPTConfig(pad_vocab_to=64), 1024) == flops_per_token(
        GPTConfig(), 1024
    )


def test_flops_per_token_count_matmuls_not_lookups_for_the_modern_model():
    # rotary embeddings drop wpe (a lookup, no FLOPs); an untied head is the same matmul
    # as a tied one, and its own wte is a lookup: the same FLOPs as GPT-2's
    from gpt2lib.modern import ModernConfig

    gpt2 = flops_per_token(GPTConfig(), 1024)
    for switches in (dict(rope=True), dict(untie_head=True), dict(relu2=True)):
        assert flops_per_token(ModernConfig(**switches), 1024) == gpt2, switches


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert (
        peak_tflops("CPU (x86_64, 2 threads)") is None
        and peak_tflops("Some Future GPU") is None
    )


def test_flash_attention_equals_manual():
    x = torch.randint(0, TINY.vocab_size, (3, 32))
    manual = build_model(GPTConfig(**{**TINY.__dict__, "attn_impl": "manual"}), seed=0)
    sdpa = build_model(TINY, seed=0)
    torch.testing.assert_close(sdpa(x)[0], manual(x)[0], rtol=1e-5, atol=1e-5)


def test_padded_vocabulary_keeps_function_and_gradients():
    x, y = torch.randint(0, TINY.vocab_size, (2, 2, 32))
    plain = build_model(TINY, seed=0)
    padded = build_model(GPTConfig(**{**TINY.__dict__, "pad_vocab_to": 64}), seed=0)
    assert (
        padded.transformer.wte.weight.shape[0] == 1024
        and padded.config.padded_vocab_size == 1024
    )
    (lp, loss_p), (l, loss) = padded(x, y), plain(x, y)
    assert lp.shape == l.shape and torch.equal(lp, l) and torch.equal(loss_p, loss)
    loss_p.backward(), loss.backward()
    gp, g = padded.transformer.wte.weight.grad, plain.transformer.wte.weight.grad
    torch.testing.assert_close(gp[:1000], g, rtol=0, atol=1e-7)
    assert gp[1000:].abs().max() == 0  # the padding rows never learn


def test_fused_adamw_equals_standard():
    """Fused and standard AdamW compute the same update with different vectorised code,
    which differs between CPUs, so they round differently: compare how far each moved
    the weights in three steps, not the weights to a fixed number of digits.

    Rounding alone: each update is a few dozen fp32 operations (about 1e-7 relative
    error each), except where a gradient is near zero and m / (sqrt(v) + eps) is
    ill-conditioned; even there it stays far below 1e-4 of the distance moved (measured:
    4e-6 on one CPU, whose largest single-weight difference, 1e-6, failed the old fixed
    bound elsewhere). Any real difference in the update is far above it: without weight
    decay the distance changes by 2e-3 of itself, with a learning rate 1 % off by 1e-2.
    So 1e-4 separates the two."""
    moved = []
    for fused in (False, True):
        model = build_model(TINY, seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = configure_optimizer(model, 1e-3, weight_decay=0.1, fused=fused)
        assert opt.defaults["fused"] is fused
        x, y = torch.randint(
            0, TINY.vocab_size, (2, 2, 32), generator=torch.Generator().manual_seed(1)
        )
        for _ in range(3):
            opt.zero_grad()
            model(x, y)[1].backward()
            opt.step()
        moved.append(
            torch.cat([p.detach().flatten() for p in model.parameters()]) - start
        )
    assert (moved[0] - moved[1]).norm() / moved[0].norm() < 1e-4


@pytest.fixture(scope="module")
def tokens():
    return tokenize(read_asset_text("tinyshakespeare.txt")[:20_000])


def test_ladder_on_cpu_has_every_rung(tokens):
    rows = tiny_ladder(tokens)
    assert [r["rung"] for r in rows] == [r.name for r in LADDER]
    by_name = {r["rung"]: r for r in rows}
    assert by_name["+ TF32 matmuls"] == {
        "rung": "+ TF32 matmuls",
        "status": "skipped",
        "reason": "needs an NVIDIA GPU",
    }
    assert (
        by_name["+ torch.compile"]["status"] == "skipped"
        and "--no-compile" in by_name["+ torch.compile"]["reason"]
    )
    ran = [r for r in rows if r["status"] == "ran"]
    assert [r["rung"] for r in ran] == [
        "fp32",
        "+ flash attention",
        "+ vocab 50304",
        "+ fused AdamW",
    ]
    assert all(
        r["tokens_per_s"] > 0
        and r["ms_per_step"] > 0
        and r["mfu"] is None
        and len(r["losses"]) == 3
        for r in ran
    )
    assert "same_math" not in ran[0] and all(
        r["same_math"] for r in ran[1:]
    )  # compared with the rung below
    assert ran[-1]["recipe"] == {
        "tf32": False,
        "bf16": False,
        "fp16": False,
        "compile": False,
        "attn_impl": "sdpa",
        "pad_vocab_to": 64,
        "fused_adamw": True,
        "batch_size": None,
        "compile_mode": "default",
        "attention": "any",
    }


def test_the_math_check_is_discriminating(tokens):
    """The steps compared make progress far beyond the fp32 tolerance, so a rung that
    changes them shows."""
    rows = tiny_ladder(tokens)
    losses, last = rows[0]["losses"], [r for r in rows if r["status"] == "ran"][-1]
    assert min(abs(a - b) for a, b in zip(losses, losses[1:])) > 10 * last["tolerance"]


@pytest.mark.parametrize(
    "bug", ["no update", "padding in the softmax", "two updates per step"]
)
def test_a_rung_that_changes_the_math_is_caught(bug, tokens, monkeypatch):
    "Bugs planted in one rung of the ladder: check_math must call that rung DIFFERENT."
    import gpt2lib.bench as bench

    real_optimizer, real_gpt = bench.configure_optimizer, bench.GPT

    def broken_optimizer(model, lr, *args, fused=False, **kwargs):
        opt = real_optimizer(model, lr, *args, fused=fused, **kwargs)
        once = opt.step
        opt.step = (
            (lambda *a, **k: None)
            if bug == "no update"
            else (lambda *a, **k: (once(), once()))
        )
        return opt

    class LeakyPadding(real_gpt):
        def forward(self, idx, targets=None, return_logits=True):
            x = self.transformer.wte(idx) + self.transformer.wpe(
                torch.arange(idx.size(1))
            )
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten()
            )

    if bug == "padding in the softmax":
        monkeypatch.setattr(
            bench,
            "GPT",
            lambda config: (LeakyPadding if config.pad_vocab_to > 1 else real_gpt)(
                config
            ),
        )
    else:
        monkeypatch.setattr(
            bench,
            "configure_optimizer",
            lambda model, lr, *a, fused=False, **k: (
                broken_optimizer(model, lr, *a, fused=fused, **k)
                if fused
                else real_optimizer(model, lr, *a, **k)
            ),
        )
    rows = tiny_ladder(tokens)
    verdicts = {r["rung"]: r.get("same_math") for r in rows if r["status"] == "ran"}
    broken_rung = (
        "+ vocab 50304" if bug == "padding in the softmax" else "+ fused AdamW"
    )
    assert verdicts[broken_rung] is False
    assert all(
        v
        for name, v in verdicts.items()
        if name not in (broken_rung, "fp32", "+ fused AdamW")
    ), verdicts


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_the_autocast_rung_on_a_cpu_stays_within_its_tolerance(tokens, autocast):
    """The ladder's autocast rung (bf16, or fp16 with a gradient scaler on a GPU without
    native bf16) runs on a CPU too, against fp32."""
    from gpt2lib.bench import REL_TOLERANCE, Recipe, check_math, time_recipe

    config, cpu = GPTConfig(n_layer=1, n_head=2, n_embd=32), torch.device("cpu")
    rows = [
        {
            "status": "ran",
            "recipe": dataclasses.asdict(recipe),
            **time_recipe(recipe, config, tokens, 2, 32, steps=3, warmup=1, device=cpu),
        }
        for recipe in (Recipe(), Recipe(**{autocast: True}))
    ]
    check_math(rows)
    assert rows[1]["tolerance"] == pytest.approx(
        REL_TOLERANCE[autocast] * rows[0]["losses"][0]
    )
    # it did run in 16 bits: not bit-equal to fp32
    assert rows[1]["same_math"] and rows[1]["loss_diff"] > 0


def test_the_rungs_follow_the_device(monkeypatch):
    """The autocast rung is fp16 on a GPU without native bf16 (as gpt2lib.train runs
    there); Apple's mps skips what it does not run, as a CPU skips CUDA's rungs."""
    from gpt2lib.bench import autocast_rung, skip_reason

    autocast = next(r for r in LADDER if r.change.get("bf16"))
    cuda = torch.device("cuda")
    for capability, name in [((7, 5), "+ fp16 autocast"), ((9, 0), "+ bf16 autocast")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
        assert autocast_rung(autocast, cuda).name == name
    assert autocast_rung(autocast, torch.device("cpu")) == autocast
    mps = torch.device("mps")
    reasons = {r.name: skip_reason(r, mps, True, 8) for r in LADDER}
    assert reasons == {
        "fp32": None,
        "+ TF32 matmuls": "needs an NVIDIA GPU",
        "+ bf16 autocast": "needs an NVIDIA GPU",
        "+ torch.compile": "torch.compile is not used on Apple's mps",
        "+ flash attention": None,
        "+ vocab 50304": None,
        "+ fused AdamW": "fused AdamW is not used on Apple's mps",
        "+ larger micro-batch": None,
        "+ cuDNN attention": "needs an NVIDIA GPU",
        "+ max-autotune": "needs an NVIDIA GPU",
    }


def test_the_max_autotune_rung_runs_only_when_asked_for(tokens, monkeypatch):
    """On a GPU the max-autotune rung is skipped unless `--max-autotune` asks for it
    (and never without compiling); asked for, its step is compiled in that mode and
    checked against the rung below. torch.compile is replaced by a stand-in that
    notes the mode: a CPU need not autotune to show that the mode is passed."""
    import gpt2lib.bench as bench
    from gpt2lib.bench import skip_reason

    rung = next(r for r in LADDER if "compile_mode" in r.change)
    cuda = torch.device("cuda")
    assert skip_reason(rung, cuda, True, None).startswith("not asked for")
    assert skip_reason(rung, cuda, False, None, max_autotune=True).startswith(
        "turned off"
    )
    assert skip_reason(rung, cuda, True, None, max_autotune=True) is None
    modes = []
    monkeypatch.setattr(
        torch, "compile", lambda model, mode="default": modes.append(mode) or model
    )
    compiled = next(r for r in LADDER if "compile" in r.change)
    here = bench.Rung(rung.name, rung.change)  # not CUDA-only: it runs on this CPU
    monkeypatch.setattr(bench, "LADDER", [LADDER[0], compiled, here])
    rows = tiny_ladder(tokens, T=16, steps=1, compile=True, max_autotune=True)
    assert [r["status"] for r in rows] == ["ran"] * 3
    assert modes == ["default", "max-autotune"] and rows[2]["same_math"]


def test_ladder_with_compile_and_larger_batch(tokens):
    """The compiled rungs run on CPU too (slow to compile, so a 1-layer model and 2
    steps each)."""
    rows = tiny_ladder(tokens, T=16, steps=1, compile=True, max_batch_size=4)
    by_name = {r["rung"]: r for r in rows}
    assert (
        by_name["+ torch.compile"]["status"] == "ran"
        and by_name["+ torch.compile"]["recipe"]["compile"]
    )
    assert by_name["+ torch.compile"][
        "same_math"
    ]  # compiled kernels: the same losses within fp32 rounding
    assert (
        by_name["+ larger micro-batch"]["batch_size"] == 4
        and "same_math" not in by_name["+ larger micro-batch"]
    )
    assert all(r["same_math"] for r in rows if "same_math" in r)


def test_ladder_restores_the_tf32_flags_and_keeps_rows_after_a_failure(
    tokens, monkeypatch
):
    import gpt2lib.bench as bench

    torch.backends.cuda.matmul.allow_tf32 = True
    calls = []

    def fails_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the third rung broke")
        return real(*args, **kwargs)

    real = bench.time_recipe
    monkeypatch.setattr(bench, "time_recipe", fails_on_the_third)
    try:
        with pytest.raises(RuntimeError, match="third rung"):
            tiny_ladder(tokens, T=16, steps=1)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "gpt2lib.bench",
        "--device",
        "cpu",
        "--no-compile",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {
        "device",
        "torch",
        "commit",
        "dirty",
        "date",
        "model",
        "flops_per_token",
        "rungs",
    } <= data.keys()
    # the command that measures it again, recorded with it (the book prints it),
    # --no-compile included
    assert data["command"] == (
        f"python -m gpt2lib.bench --model tiny --batch-size 2 --seq-len 16 --steps 1 "
        f"--warmup 1 --device cpu --no-compile --json {out}"
    )
    assert (
        data["model"] == "tiny"
        and data["device"].startswith("CPU")
        and data["peak_bf16_tflops"] is None
    )
    assert [r["rung"] for r in data["rungs"]] == [r.name for r in LADDER]
    assert "| fp32 |" in result.stdout


@pytest.mark.parametrize(
    "args, status, message",
    [
        (
            ["--seq-len", "2048", "--model", "gpt2"],
            1,
            "longer than the model's block_size",
        ),
        (["--steps", "0"], 1, "--steps must be at least 1"),
        (["--device", "cuda"], 1, "no CUDA GPU is visible"),
        (["--model", "huge"], 2, "invalid choice"),  # does not parse: usage
    ],
)
def test_cli_bad_input(args, status, message):
    "A value out of range is one line and status 1; one that does not parse, usage, 2."
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lib.bench", *args], capture_output=True, text=True
    )
    assert (
        result.returncode == status
        and message in result.stderr
        and "Traceback" not in result.stderr
    )


def test_a_failing_rung_keeps_the_measured_ones_in_the_json(
    tmp_path, monkeypatch, capsys
):
    import gpt2lib.bench as bench

    real, calls = bench.time_recipe, []

    def fails_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "time_recipe", fails_on_the_second)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit:
        bench.main(
            [
                "--device",
                "cpu",
                "--no-compile",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--json",
                str(out),
            ]
        )
    assert "illegal memory access" in str(exit.value.code)
    rows = json.loads(out.read_text())["rungs"]
    assert [r["rung"] for r in rows if r["status"] == "ran"] == [
        "fp32"
    ]  # measured before the failure, kept


def test_a_max_batch_size_larger_than_the_text_fails_before_any_rung(capsys):
    import gpt2lib.bench as bench

    with pytest.raises(SystemExit) as exit:
        bench.main(
            [
                "--device",
                "cpu",
                "--no-compile",
                "--seq-len",
                "64",
                "--max-batch-size",
                "100000",
            ]
        )
    assert "needs 6,400,001 tokens, but the benchmark's text has" in str(
        exit.value.code
    )


def test_check_math_compares_the_first_math_steps_and_not_the_chaos_after():
    """On an H200 the rungs agreed to rounding for 19 steps, then a loss spike took
    them apart by up to 1.3: a difference after the first MATH_STEPS losses is the
    chaos of training, one inside them is a change of the math."""
    from gpt2lib.bench import MATH_STEPS, check_math

    reference = [10.0 - 0.1 * step for step in range(25)]

    def verdict(losses):
        fp32 = {"bf16": False, "tf32": False}
        rows = [
            {"status": "ran", "batch_size": 16, "recipe": fp32, "losses": reference},
            {"status": "ran", "batch_size": 16, "recipe": fp32, "losses": losses},
        ]
        check_math(rows)
        return rows[1]["same_math"]

    spike_after = reference[:MATH_STEPS] + [x + 1.0 for x in reference[MATH_STEPS:]]
    assert verdict(spike_after)
    # 1e-3 is 100 times fp32's allowance (1e-5 of the loss)
    inside = [
        x + (1e-3 if step == MATH_STEPS - 1 else 0) for step, x in enumerate(reference)
    ]
    assert not verdict(inside)


def test_an_attention_kernel_that_cannot_run_here_is_a_skipped_rung(
    tokens, monkeypatch
):
    # SDPA refuses cuDNN's kernel for these inputs (here: a CPU): the rung says so and
    # the ladder goes on, as where cuDNN attention does not take the shapes on a GPU
    import gpt2lib.bench as bench

    rung = bench.Rung("+ cuDNN attention", {"attention": "cudnn", "attn_impl": "sdpa"})
    monkeypatch.setattr(bench, "LADDER", [bench.LADDER[0], rung])
    rows = tiny_ladder(tokens, steps=1)
    assert rows[0]["status"] == "ran" and rows[1]["status"] == "skipped"
    assert rows[1]["reason"].startswith("cudnn attention does not run here: No viable")
