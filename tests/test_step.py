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
