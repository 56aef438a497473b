import math

import pytest
import torch

from gpt2lib.model import GPT, GPTConfig
from gpt2lib.optim import (
    configure_optimizer,
    grad_accum_steps,
    lr_at,
    param_groups,
    train_step,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32))


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    torch.manual_seed(1)
    x = torch.randint(0, 97, (8, 32))
    y = torch.randint(0, 97, (8, 32))

    def grads(micro_batches):
        model = tiny_model()
        train_step(
            model, configure_optimizer(model), micro_batches, lr=0.0, grad_clip=math.inf
        )
        return {n: p.grad for n, p in model.named_parameters()}

    big = grads([(x, y)])
    for k in (2, 4, 8):
        m = 8 // k
        small = grads([(x[i : i + m], y[i : i + m]) for i in range(0, 8, m)])
        for name in big:
            torch.testing.assert_close(
                small[name], big[name], rtol=1e-5, atol=1e-7, msg=f"{name}, k={k}"
            )


def test_train_step_returns_mean_loss_and_unclipped_norm():
    model = tiny_model()
    torch.manual_seed(2)
    batches = [
        (torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))) for _ in range(3)
    ]
    with torch.no_grad():
        expected = sum(model(x, y)[1] for x, y in batches) / 3
    reference = tiny_model()
    for x, y in batches:
        (reference(x, y)[1] / 3).backward()
    true_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
    loss, norm = train_step(
        model, configure_optimizer(model), batches, lr=1e-3, grad_clip=0.01
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(norm, true_norm)
    clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert clipped.item() == pytest.approx(
        0.01, rel=1e-4
    )  # the step used clipped gradients


def test_train_step_sets_the_learning_rate():
    model = tiny_model()
    opt = configure_optimizer(model, lr=1.0)
    train_step(
        model,
        opt,
        [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))],
        lr=0.123,
    )
    assert all(g["lr"] == 0.123 for g in opt.param_groups)


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert (
        sum(p.numel() for g in (decay, no_decay) for p in g["params"])
        == model.num_params()
    )
    opt = configure_optimizer(model)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_lr_schedule():
    lr = lambda s: lr_at(s, max_lr=6e-4, warmup_steps=10, max_steps=100)
    assert lr(0) == pytest.approx(6e-5) and lr(9) == pytest.approx(6e-4)
    assert lr(10) == pytest.approx(6e-4)
    assert lr(55) == pytest.approx(
        6e-5 + 0.5 * (6e-4 - 6e-5)
    )  # halfway down the cosine
    assert lr(100) == pytest.approx(6e-5) and lr(10_000) == pytest.approx(6e-5)
    after = [lr(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_grad_accum_steps():
    assert grad_accum_steps(524288, 64, 1024) == 8
    assert grad_accum_steps(524288, 64, 1024, world_size=8) == 1
    with pytest.raises(
        ValueError, match="not divisible by B\\*T\\*world_size = 48\\*1024\\*1"
    ):
        grad_accum_steps(524288, 48, 1024)
