import json

import pytest
import torch
from conftest import SHAPES, make_hf_model, save_hf
from safetensors.torch import load_file, save_file

from gpt2lib.hf import read_hf_state_dict
from gpt2lib.model import GPT, GPTConfig, sample_next


def compare_with_hf(model: GPT, hf, B=2, T=None, seed=1):
    """Logits of both models on the same random tokens, and both losses on the same
    predictions."""
    T = T or min(hf.config.n_positions, 64)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, hf.config.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        logits, _ = model(seq)
        _, loss = model(seq[:, :-1], seq[:, 1:])  # predict token t+1 from tokens <= t
        out = hf(seq, labels=seq)  # HF shifts the labels itself: the same predictions
    return logits, out.logits, loss, out.loss


# Every shape from save_pretrained; the other two file layouts on two shapes.
CASES = [(shape, "safetensors") for shape in SHAPES] + [
    (shape, fmt) for shape in ("tiny", "gpt2-widths") for fmt in ("bin", "released")
]


@pytest.mark.parametrize("shape, fmt", CASES)
def test_logits_and_loss_equal_hf(shape, fmt, tmp_path):
    hf = make_hf_model(*SHAPES[shape])
    model = GPT.from_pretrained(save_hf(hf, tmp_path / shape, fmt))
    ours, theirs, loss, hf_loss = compare_with_hf(model, hf)
    # Both compute in fp32, summing the same products in another order (HF's Conv1D
    # is addmm on the transposed weight; the order also follows the CPU's vector width
    # and the thread count). A logit is a sum of n_embd products after n_layer blocks:
    # reordering moves it by about sqrt(n_embd) unit roundoffs (2^-24) of its own
    # size, 40 of them at n_embd 1600 (seen: 11 at 1 thread). 1e-5 of the logits'
    # scale is 168 roundoffs; a real bug (a transpose, the scale, the mask) moves the
    # logits by their own size. The loss averages the logits: the same bound.
    scale = max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < 1e-5 * scale
    assert abs(loss.item() - hf_loss.item()) < 1e-5 * max(1.0, hf_loss.item())
    assert model.num_params() == hf.num_parameters()


def test_full_block_size(tiny_hf):
    hf, path = tiny_hf
    ours, theirs, _, _ = compare_with_hf(
        GPT.from_pretrained(path), hf, T=hf.config.n_positions
    )
    assert (ours - theirs).abs().max().item() < 1e-5


def test_config_read_from_dir(tiny_hf):
    _, path = tiny_hf
    n_layer, n_head, n_embd, vocab, block = SHAPES["tiny"]
    assert GPT.from_pretrained(path).config == GPTConfig(
        block, vocab, n_layer, n_head, n_embd
    )


def test_greedy_generation_equals_hf(tiny_hf):
    hf, path = tiny_hf
    model = GPT.from_pretrained(path)
    prompt = torch.tensor([[5, 17, 42, 7], [1, 2, 3, 4]])
    ours = model.generate(prompt, max_new_tokens=12, top_k=1)
    theirs = hf.generate(
        prompt,
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(ours, theirs)


def test_generation_past_block_size_reads_the_newest_tokens(tiny_hf):
    """Past block_size the model must see the newest block_size tokens (the oldest ones
    are dropped)."""
    _, path = tiny_hf
    model = GPT.from_pretrained(path)
    block, vocab = model.config.block_size, model.config.vocab_size
    prompt = torch.randint(
        0, vocab, (2, block), generator=torch.Generator().manual_seed(0)
    )
    out = model.generate(
        prompt, max_new_tokens=6, top_k=None, generator=torch.Generator().manual_seed(1)
    )

    def sampled(window):  # what generate should do, with the context cut by `window`
        idx, generator = prompt, torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(6):
                logits = model(window(idx))[0][:, -1]
                next_token = sample_next(logits, top_k=None, generator=generator)
                idx = torch.cat([idx, next_token], 1)
        return idx

    assert torch.equal(out, sampled(lambda idx: idx[:, -block:]))
    # the test tells the two apart
    assert not torch.equal(out, sampled(lambda idx: idx[:, :block]))


def test_sampling_is_reproducible_and_respects_top_k():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    draw = lambda seed: sample_next(
        logits, top_k=5, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(7), draw(7))
    top5 = logits.topk(5).indices
    for seed in range(50):
        assert (draw(seed) == top5).any(dim=1).all()


def test_prompt_longer_than_block_size(tiny_hf):
    _, path = tiny_hf
    model = GPT.from_pretrained(path)
    with pytest.raises(ValueError, match="block_size 64"):
        model.generate(torch.zeros(1, 65, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 10), temperature=0)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        GPT.from_pretrained(tmp_path / "nope")
    assert (
        "nope" in str(err.value)
        and "gpt2-xl" in str(err.value)
        and "config.json" in str(err.value)
    )


def test_unknown_name():
    with pytest.raises(
        FileNotFoundError, match="neither a directory nor a released GPT-2 name"
    ):
        GPT.from_pretrained("gpt3")


def test_released_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        GPT.from_pretrained("gpt2")


def test_directory_without_weights(tmp_path, tiny_hf):
    hf, _ = tiny_hf
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)


def test_unsupported_activation(tmp_path, tiny_hf):
    _, path = tiny_hf
    cfg = json.loads((path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="relu"):
        GPT.from_pretrained(tmp_path)


def rewrite_weights(src, dst, edit):
    "Copy the HF dir `src` to `dst`, passing its state dict through `edit`."
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = {k: v.clone() for k, v in load_file(src / "model.safetensors").items()}
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_wrong_key_is_named(tmp_path, tiny_hf):
    _, path = tiny_hf

    def rename(sd):
        sd["transformer.h.1.mlp.c_fcc.weight"] = sd.pop(
            "transformer.h.1.mlp.c_fc.weight"
        )

    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(rewrite_weights(path, tmp_path / "bad", rename))
    assert "transformer.h.1.mlp.c_fc.weight" in str(err.value) and "c_fcc" in str(
        err.value
    )


def test_wrong_shape_names_key_and_shapes(tmp_path, tiny_hf):
    _, path = tiny_hf

    def widen(sd):  # HF layout (in, out); (32, 128) expected
        sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)

    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(rewrite_weights(path, tmp_path / "bad", widen))
    msg = str(err.value)
    assert (
        "transformer.h.0.mlp.c_fc.weight" in msg
        and "(32, 100)" in msg
        and "(128, 32)" in msg
    )


def test_untied_lm_head_is_refused(tmp_path, tiny_hf):
    _, path = tiny_hf

    def untie(sd):
        sd["lm_head.weight"] = torch.randn_like(sd["transformer.wte.weight"])

    with pytest.raises(ValueError, match="lm_head"):
        GPT.from_pretrained(rewrite_weights(path, tmp_path / "bad", untie))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=64, vocab_size=1000, n_layer=8, n_head=4, n_embd=256)
    )
    std = lambda t: t.detach().std().item()
    assert abs(std(model.transformer.wte.weight) - 0.02) < 0.001
    assert abs(std(model.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.001
    # 1/sqrt(2 * n_layer) = 1/4
    assert abs(std(model.transformer.h[0].mlp.c_proj.weight) - 0.02 / 4) < 0.0005
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    assert model.lm_head.weight is model.transformer.wte.weight


def test_from_pretrained_fills_the_class_it_is_called_on(tiny_hf):
    """A chapter that defines its own GPT checks that class, not the exported one."""
    _, path = tiny_hf

    class Mine(GPT):
        pass

    assert type(Mine.from_pretrained(path)) is Mine
    assert type(GPT.from_pretrained(path)) is GPT
