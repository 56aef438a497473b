"""gpt2lib.export_hf: a GPT written in HF's format loads into transformers with equal
logits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2lib.checkpoint import load_model
from gpt2lib.export_hf import export_hf, main
from gpt2lib.hf import convert_hf_state_dict, hf_config, to_hf_state_dict
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.config import PRESETS
from gpt2lib.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    "A real training run: the smoke preset on CPU (6 steps, checkpoints at 3 and 6)."
    out = tmp_path_factory.mktemp("run")
    train(PRESETS["smoke"], out, device="cpu", progress=False)
    return out


def hf_load(path):
    model, info = GPT2LMHeadModel.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


def tokens(vocab_size, B=3, T=32, seed=0):
    return torch.randint(
        0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed)
    )


def perturbed(model: GPT, seed=0) -> GPT:
    """Noise on every parameter, so biases and LayerNorm gains are not their trivial 0
    and 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("noise", [False, True], ids=["as-trained", "perturbed"])
def test_trained_checkpoint_loads_in_transformers_with_equal_logits(
    run_dir, tmp_path, noise
):
    """After 6 steps the weights are still small; noise makes the activations large
    enough to tell GELUs apart."""
    model, _ = load_model(str(run_dir))
    model = perturbed(model) if noise else model
    out = export_hf(model, tmp_path / "hf")
    hf, info = hf_load(out)
    assert (
        not info["missing_keys"]
        and not info["unexpected_keys"]
        and not info["mismatched_keys"]
    )
    assert (
        hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    )  # tied on load
    idx = tokens(50257)
    with torch.no_grad():
        ours, hf_logits = model(idx)[0], hf(idx).logits
    assert ours.shape == hf_logits.shape == (3, 32, 50257)
    assert (ours - hf_logits).abs().max().item() < 1e-5
    # and the loss transformers computes (its labels shift by one) is ours on
    # shifted targets
    with torch.no_grad():
        assert hf(idx, labels=idx).loss.item() == pytest.approx(
            model(idx[:, :-1], idx[:, 1:])[1].item(), abs=1e-5
        )


def test_greedy_generation_is_the_same(run_dir, tmp_path):
    model, _ = load_model(str(run_dir))
    hf, _ = hf_load(export_hf(model, tmp_path / "hf"))
    prompt = tokens(50257, B=1, T=5, seed=1)
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=50256,
        )
    assert theirs.tolist() == model.generate(prompt, 10, top_k=1).tolist()


def test_config_describes_the_model(tmp_path):
    model = GPT(
        GPTConfig(block_size=48, vocab_size=50257, n_layer=3, n_head=4, n_embd=32)
    )
    config = json.loads((export_hf(model, tmp_path / "hf") / "config.json").read_text())
    assert (
        config["architectures"] == ["GPT2LMHeadModel"]
        and config["model_type"] == "gpt2"
    )
    assert (
        config["n_layer"],
        config["n_head"],
        config["n_embd"],
        config["vocab_size"],
    ) == (3, 4, 32, 50257)
    assert config["n_positions"] == config["n_ctx"] == 48
    assert (
        config["activation_function"] == "gelu_new"
        and config["layer_norm_epsilon"] == 1e-5
    )
    assert config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 50256


def test_padded_vocabulary_is_cut_to_the_real_one(tmp_path):
    model = perturbed(
        GPT(
            GPTConfig(
                block_size=32,
                vocab_size=50257,
                n_layer=1,
                n_head=2,
                n_embd=16,
                pad_vocab_to=64,
            )
        )
    )
    assert model.transformer.wte.weight.size(0) == 50304
    hf_sd = to_hf_state_dict(model)
    assert hf_sd["transformer.wte.weight"].shape == (50257, 16)
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    hf, info = hf_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    idx = tokens(50257)
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "shape", [(2, 2, 32, 101, 64), (1, 12, 96, 50257, 256)], ids=["tiny", "gpt2-vocab"]
)
def test_round_trip_is_exact(tmp_path, shape):
    n_layer, n_head, n_embd, vocab_size, block_size = shape
    model = perturbed(
        GPT(
            GPTConfig(
                block_size=block_size,
                vocab_size=vocab_size,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
            )
        )
    )
    again = GPT.from_pretrained(export_hf(model, tmp_path / "hf"))
    assert again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_inverse_of_convert_hf_state_dict(tiny_hf):
    "HF weights -> our GPT -> HF names again gives back HF's tensors exactly."
    hf_model, path = tiny_hf
    model = GPT.from_pretrained(path)
    hf_sd = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    exported = to_hf_state_dict(model)
    assert exported.keys() == hf_sd.keys()
    for key in hf_sd:
        assert torch.equal(exported[key], hf_sd[key]), key
    back = convert_hf_state_dict(
        exported, model.state_dict()
    )  # and back to our names and layouts, exactly
    ours = {
        k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied to wte
    assert back.keys() == ours.keys() and all(
        torch.equal(back[k], ours[k]) for k in ours
    )


def test_small_vocabulary_has_no_end_token():
    config = hf_config(GPTConfig(vocab_size=101))
    assert config["bos_token_id"] is None and config["eos_token_id"] is None


def test_existing_directory(tmp_path):
    model = GPT(
        GPTConfig(block_size=16, vocab_size=101, n_layer=1, n_head=2, n_embd=16)
    )
    (tmp_path / "empty").mkdir()
    export_hf(model, tmp_path / "empty")  # an empty directory is fine
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model, tmp_path / "empty")
    (tmp_path / "empty" / "README.md").write_text("mine")
    export_hf(
        perturbed(model), tmp_path / "empty", force=True
    )  # replaces the model files...
    assert (
        tmp_path / "empty" / "README.md"
    ).read_text() == "mine"  # ...and nothing else
    again = GPT.from_pretrained(tmp_path / "empty")
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_hf(model, tmp_path / "file")
    assert not [
        p for p in tmp_path.iterdir() if ".tmp" in p.name
    ]  # no temporary directories left behind


def test_cli_exports_a_run_directory(run_dir, tmp_path, capsys):
    main([str(run_dir), str(tmp_path / "out")])
    assert "ckpt_0000006.pt" in capsys.readouterr().out  # the newest checkpoint
    model, _ = load_model(str(run_dir))
    hf, _ = hf_load(tmp_path / "out")
    idx = tokens(50257)
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5


def test_cli_exports_a_checkpoint_file(run_dir, tmp_path):
    main([str(run_dir / "ckpt_0000003.pt"), str(tmp_path / "out")])
    model, _ = load_model(str(run_dir / "ckpt_0000003.pt"))
    again = GPT.from_pretrained(tmp_path / "out")
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "gpt2lib.export_hf", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_process_prints_one_line_and_exits_1(tmp_path):
    missing = cli(tmp_path / "no-such.pt", tmp_path / "out")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error:") and "no-such.pt" in missing.stderr
    assert not (tmp_path / "out").exists()


def exit_message(*argv) -> str:
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    return str(exit.value.code)


def test_cli_refuses_a_non_empty_directory_without_force(run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    message = exit_message(run_dir, tmp_path / "full")
    assert (
        message.startswith("error:") and "not empty" in message and "--force" in message
    )
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x.txt"]
    main([str(run_dir), str(tmp_path / "full"), "--force"])
    assert (tmp_path / "full" / "model.safetensors").is_file() and (
        tmp_path / "full" / "x.txt"
    ).is_file()


def test_cli_bad_inputs(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert exit_message(junk, tmp_path / "out").startswith(f"error: {junk}")
    assert "neither a directory nor a released GPT-2 name" in exit_message(
        "gpt3", tmp_path / "out"
    )
    (tmp_path / "empty-run").mkdir()
    assert "checkpoints" in exit_message(tmp_path / "empty-run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
