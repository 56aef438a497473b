import os

# The suite never touches the network; set before huggingface_hub / transformers import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

# (n_layer, n_head, n_embd, vocab_size, block_size). "gpt2-widths" is GPT-2 124M with
# 2 of its
# 12 layers; the others keep each released model's head layout at a small vocabulary.
SHAPES = {
    "tiny": (2, 2, 32, 101, 64),
    "gpt2-widths": (2, 12, 768, 50257, 1024),
    "medium-widths": (1, 16, 1024, 503, 128),
    "xl-widths": (1, 25, 1600, 503, 128),
}


@pytest.fixture(scope="session", autouse=True)
def temporary_files_inside_pytest(tmp_path_factory):
    """What the suite and the programs it starts (torchrun, the CLIs) write to the
    system's temporary directory goes inside pytest's base directory instead, which is
    removed after a passing session: the suite leaves nothing in /tmp."""
    path = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:  # put back after the session
        patch.setattr(tempfile, "tempdir", str(path))
        patch.setenv("TMPDIR", str(path))
        yield path


# Every switch of chapter 11 and Muon: the TrainConfig fields of a fully modern run
MODERN_RECIPE = dict(
    arch="modern",
    rope=True,
    qk_norm=True,
    relu2=True,
    untie_head=True,
    zero_init_proj=True,
    softcap=15.0,
    optimizer="muon",
    muon_lr=0.02,
)


def as_cli(fields: dict) -> list[str]:
    "The command-line options of gpt2lib.train that set these TrainConfig fields."
    args = []
    for name, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{name.replace('_', '-')}", text]
    return args


def make_hf_model(n_layer, n_head, n_embd, vocab_size, block_size, seed=0):
    """An HF GPT-2 with random weights: HF's init, then noise on every parameter, so
    that biases and LayerNorm gains are not their trivial 0 and 1 and a mix-up cannot
    hide."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=block_size,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, fmt: str) -> Path:
    """Save `model` as HF-format dir: 'safetensors' (save_pretrained), 'bin'
    (pytorch_model.bin) or 'released' (the hub's layout: no `transformer.` prefix, mask
    buffers, no lm_head)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "bin":
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    elif fmt == "released":
        sd = {
            k.removeprefix("transformer."): v.clone().contiguous()
            for k, v in model.state_dict().items()
            if k != "lm_head.weight"
        }
        T = model.config.n_positions
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, path / "model.safetensors")
    else:
        raise ValueError(fmt)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    "(HF model, its safetensors dir) for the tiny shape."
    model = make_hf_model(*SHAPES["tiny"])
    return model, save_hf(model, tmp_path_factory.mktemp("tiny"), "safetensors")


@pytest.fixture(scope="session")
def gpt2_vocab_hf(tmp_path_factory):
    """(HF model, its dir) for a tiny model with GPT-2's vocabulary, for prompts made by
    the tokenizer."""
    model = make_hf_model(1, 2, 32, 50257, 64)
    return model, save_hf(model, tmp_path_factory.mktemp("gpt2vocab"), "safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished smoke run (checkpoints at steps 3 and 6, log, samples, summary), one
    per test module: the hostile tests copy it rather than change it."""
    from gpt2lib.config import PRESETS
    from gpt2lib.train import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(PRESETS["smoke"], out, device="cpu", progress=False)
    return out


# test_dist's and test_parallel's references, made once for the session: the smoke run
# of test_dist.SMOKE in one process, and the same on 2 gloo ranks under DDP
@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    from test_dist import SMOKE

    from gpt2lib.train import train

    out = tmp_path_factory.mktemp("one")
    train(SMOKE, out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    from test_dist import torchrun

    out = tmp_path_factory.mktemp("two")
    result = torchrun(2, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
