"""A training step moves no logits-sized data that the loss does not need (issue 22): the
forward returns no logits to a step, so autograd has no logits-shaped gradient to fill
with zeros and copy into the padded layout, compiled or not."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gpt2lib.model import GPT, GPTConfig
from gpt2lib.optim import configure_optimizer, train_step

B, T = 2, 16
# ops that write a whole tensor: a zero-fill, a fill, a copy, a new zero tensor
WRITES = {"aten::zero_", "aten::fill_", "aten::copy_", "aten::zeros", "aten::new_zeros"}


class AsksForLogits(nn.Module):
    "The bug: a step whose forward also returns the logits (which it then drops)."

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, return_logits=False):
        return self.model(x, y)


def logits_shaped_writes(compiled: bool, pad_vocab_to: int, asks: bool) -> list:
    """The whole-tensor writes of one training step on (B, T, vocabulary)-shaped
    tensors: the logits' own shape, not the loss's (B*T, vocabulary) gradient."""
    config = GPTConfig(
        n_layer=1, n_head=2, n_embd=32, block_size=T, pad_vocab_to=pad_vocab_to
    )
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = configure_optimizer(model, 1e-3, device_type="cpu")
    step_model = AsksForLogits(model) if asks else model
    step_model = torch.compile(step_model) if compiled else step_model
    x, y = torch.randint(0, config.vocab_size, (2, B, T))
    train_step(step_model, optimizer, [(x, y)], 1e-3)  # compiles; AdamW's moments
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(step_model, optimizer, [(x, y)], 1e-3)
    shapes = ([B, T, config.vocab_size], [B, T, config.padded_vocab_size])
    return [
        (event.name, event.input_shapes)
        for event in prof.events()
        if event.name in WRITES
        and any(list(shape) in shapes for shape in event.input_shapes)
    ]


@pytest.mark.parametrize("pad_vocab_to", [1, 64])
def test_a_compiled_step_writes_no_logits_shaped_tensor(pad_vocab_to):
    assert logits_shaped_writes(True, pad_vocab_to, asks=False) == []
    # and the profile does see the bug: a step that returns the logits writes them
    assert logits_shaped_writes(True, pad_vocab_to, asks=True) != []


def test_an_eager_step_writes_no_logits_shaped_tensor():
    assert logits_shaped_writes(False, 64, asks=False) == []


def test_the_loss_alone_is_the_loss_that_comes_with_the_logits():
    # return_logits changes what is returned, not what is computed
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, pad_vocab_to=64)
    torch.manual_seed(0)
    model = GPT(config)
    x, y = torch.randint(0, config.vocab_size, (2, B, T))
    logits, loss = model(x, y)
    nothing, alone = model(x, y, return_logits=False)
    assert nothing is None and logits.shape == (B, T, config.vocab_size)
    assert torch.equal(loss, alone)


def saved_logits(compiled: bool, softcap: float, pad_vocab_to: int = 64) -> int:
    """How many logits-sized tensors (B * T * vocabulary numbers, in any shape) a
    training forward keeps for its backward, for chapter 11's model with its logits
    soft-capped (or not)."""
    from gpt2lib.modern import ModernConfig

    config = ModernConfig(
        n_layer=1,
        n_head=2,
        n_embd=48,
        block_size=T,
        softcap=softcap,
        pad_vocab_to=pad_vocab_to,
    )
    torch.manual_seed(0)
    model = GPT(config)
    step_model = torch.compile(model) if compiled else model
    x, y = torch.randint(0, config.vocab_size, (2, B, T))
    for _ in range(2):  # the second call runs the compiled graph as compiled
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel()) or t, lambda t: t
        ):
            _, loss = step_model(x, y, return_logits=False)
        loss.backward()
    return sizes.count(B * T * config.padded_vocab_size)


@pytest.mark.parametrize("pad_vocab_to", [1, 64])
def test_a_compiled_softcap_keeps_no_second_logits_buffer(pad_vocab_to):
    # Issue 22: "the soft-capped logits are a second logits-sized buffer". Compiled,
    # with no logits returned, tanh sits inside the loss's fused kernel: the backward
    # keeps one logits-sized tensor, as without the cap. With a padded vocabulary it
    # kept two while the padding was masked by an autograd Function (measured 2),
    # which the compiler cannot fuse across. Eager, the capped logits are a tensor of
    # their own beside the loss's (measured 3 against 2): the count does see them.
    assert saved_logits(True, 15.0, pad_vocab_to) == 1
    assert saved_logits(True, 0.0, pad_vocab_to) == 1
    assert saved_logits(False, 15.0, pad_vocab_to) > saved_logits(
        False, 0.0, pad_vocab_to
    )


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_the_compiled_padding_mask_computes_the_eager_one(softcap):
    # The compiled mask (out of place) against the eager one (MaskPadding, in place):
    # the same loss and gradients up to the fused kernels' rounding (float32 sums of
    # ~50k terms: ~1e-6 relative), padding columns at -inf, padding rows untrained.
    from gpt2lib.modern import ModernConfig

    config = ModernConfig(
        n_layer=1, n_head=2, n_embd=48, block_size=T, softcap=softcap, pad_vocab_to=64
    )
    x, y = torch.randint(0, config.vocab_size, (2, B, T))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        run = torch.compile(model) if compiled else model
        logits, loss = run(x, y)
        loss.backward()
        wte = model.transformer.wte.weight
        results.append((loss.detach(), wte.grad.clone()))
        assert logits.shape[-1] == config.vocab_size  # the padding is not returned
        assert torch.all(wte.grad[config.vocab_size :] == 0)  # padding rows untrained
    (loss_e, grad_e), (loss_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-7)
