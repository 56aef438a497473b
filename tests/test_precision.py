"""The GPU's bf16 path, run on a CPU with CPU bf16 autocast against fp32: the training
step and the loop (`precision="bf16"`), validation and HellaSwag scoring.

Tolerance: bf16 keeps an 8-bit significand, so every matrix multiply rounds its inputs
to a relative error of at most 2^-8; the loss, a mean over many tokens of log-softmax
values computed in fp32, moves by a fraction of that. We allow 4 x 2^-8 (1.6 %) of the
loss, the same bound as the speed ladder's bf16 rung. A bug of the bf16 path that
changes the math (logits left in bf16 for the softmax over 50,257 classes, the loss
scaled, a skipped update) moves the losses by more than that within a few steps: see
tests/test_bench.py."""

import dataclasses
from importlib.resources import files

import pytest
import torch

from gpt2lib.bench import REL_TOLERANCE
from gpt2lib.data import DataLoader, read_asset_text, tokenize
from gpt2lib.evaluate import (
    evaluate_hellaswag,
    read_hellaswag,
    render_example,
    score_example,
    validation_loss,
)
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.rundir import read_log
from gpt2lib.runtime import autocast_for
from gpt2lib.train import PRESETS, train

BF16 = REL_TOLERANCE["bf16"]
SMOKE = PRESETS["smoke"]


def measured(out):
    return [
        (e["step"], e.get("loss", e.get("val_loss")))
        for e in read_log(out / "log.jsonl")
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The smoke preset trained in fp32 and with bf16 autocast, on the CPU."
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = tmp_path_factory.mktemp(precision)
        train(
            dataclasses.replace(SMOKE, precision=precision),
            out[precision],
            device="cpu",
            progress=False,
        )
    return out


def test_training_with_bf16_autocast_follows_fp32(runs):
    fp32, bf16 = measured(runs["fp32"]), measured(runs["bf16"])
    assert [s for s, _ in fp32] == [s for s, _ in bf16]
    assert fp32 != bf16  # it did run in bf16
    for (_, a), (_, b) in zip(fp32, bf16):
        assert abs(a - b) <= BF16 * abs(a), (a, b)


def test_auto_precision_is_fp32_on_a_cpu(runs, tmp_path):
    train(SMOKE, tmp_path, device="cpu", progress=False)
    assert measured(tmp_path) == measured(runs["fp32"])


def test_validation_and_hellaswag_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    tokens = tokenize(read_asset_text("tinyshakespeare.txt")[:20_000])
    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        losses[name] = validation_loss(
            model, DataLoader(tokens, 4, 64), 4, "cpu", autocast_for("cpu", dtype)
        )
    assert (
        losses["fp32"] != losses["bf16"]
        and abs(losses["bf16"] - losses["fp32"]) <= BF16 * losses["fp32"]
    )

    examples = read_hellaswag(files("gpt2lib") / "assets" / "hellaswag_handmade.jsonl")
    for example in examples:
        tokens, mask, _ = render_example(example, max_len=64)
        fp32 = score_example(model, tokens, mask)
        with autocast_for("cpu", torch.bfloat16)():
            bf16 = score_example(model, tokens, mask)
        assert (
            bf16.sum_loss.dtype == torch.float32
        )  # the loss is taken in fp32 from bf16 logits
        torch.testing.assert_close(bf16.mean_loss, fp32.mean_loss, rtol=BF16, atol=0)
    scored = evaluate_hellaswag(
        model, examples, "cpu", autocast_for("cpu", torch.bfloat16), progress=False
    )
    assert scored["n"] == len(examples)
