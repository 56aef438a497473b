"""Training chapter 11's modern model with Muon through gpt2lib.train (chapter 9): settings,
exact resume, loading for sampling and evaluation, and export_hf's refusal."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from conftest import MODERN_RECIPE, as_cli
from gpt2lib.checkpoint import (
    Checkpointer,
    list_checkpoints,
    load_model,
    read_checkpoint,
)
from gpt2lib.modern import ModernConfig
from gpt2lib.optim import Muon
from gpt2lib.rundir import read_log
from gpt2lib.config import PRESETS, build_model
from gpt2lib.train import train

# The smoke preset with every switch of chapter 11 and Muon, and how the CLI asks for it
MODERN = PRESETS["smoke"].replace(**MODERN_RECIPE)
MODERN_CLI = as_cli(MODERN_RECIPE)


def losses(out):
    entries = read_log(out / "log.jsonl")
    return [e["loss"] for e in entries if "loss" in e], [
        e["val_loss"] for e in entries if "val_loss" in e
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("modern")
    return out, train(MODERN, out, device="cpu", progress=False)


def test_build_model_makes_the_modern_model_and_muon():
    model, optimizer = build_model(MODERN, "cpu")
    assert isinstance(model.config, ModernConfig) and model.config.changes() == [
        "rope",
        "qk_norm",
        "relu2",
        "untie_head",
        "zero_init_proj",
        "softcap",
    ]
    assert isinstance(optimizer, Muon) and optimizer.param_groups[0]["muon"]
    assert optimizer.param_groups[0]["lr_scale"] == pytest.approx(0.02 / MODERN.max_lr)
    gpt2_model, adamw = build_model(PRESETS["smoke"], "cpu")
    assert type(adamw) is torch.optim.AdamW and gpt2_model.config.changes() == []


def test_the_modern_run_trains(straight):
    out, summary = straight
    train_losses, val_losses = losses(out)
    assert summary["finished"] and len(train_losses) == MODERN.max_steps
    # it learned: measured 10.84 -> 10.69 at the smoke preset's lr 1e-3; a run whose steps did
    # nothing would give the same validation loss again (the same batches, deterministic)
    assert val_losses[-1] < val_losses[0] - 0.05


def test_stop_and_resume_give_identical_losses(straight, tmp_path):
    out, _ = straight
    train(MODERN, tmp_path, device="cpu", stop_after=3, progress=False)
    state = read_checkpoint(list_checkpoints(tmp_path)[-1])
    assert "momentum_buffer" in state["optimizer"]["state"][0]  # Muon's state is saved
    train(MODERN, tmp_path, device="cpu", resume=True, progress=False)
    assert losses(tmp_path) == losses(out)  # exactly equal, not approximately


def test_resume_with_another_optimizer_is_refused(straight, tmp_path):
    train(MODERN, tmp_path, device="cpu", stop_after=3, progress=False)
    with pytest.raises(ValueError, match="different settings \\(optimizer\\)"):
        train(
            MODERN.replace(optimizer="adamw"),
            tmp_path,
            device="cpu",
            resume=True,
            progress=False,
        )


def test_a_checkpoint_from_before_these_settings_resumes(tmp_path):
    # Checkpoints written before arch/optimizer existed hold no such keys: they were GPT-2 with
    # AdamW, which the defaults say, so resuming them must not be refused as "different".
    smoke = PRESETS["smoke"]
    train(smoke, tmp_path, device="cpu", stop_after=3, progress=False)
    path = list_checkpoints(tmp_path)[-1]
    state = read_checkpoint(path)
    for key in (
        "arch",
        "rope",
        "qk_norm",
        "relu2",
        "untie_head",
        "zero_init_proj",
        "softcap",
        "optimizer",
        "muon_lr",
        "muon_momentum",
    ):
        del state["config"][key]
    torch.save(state, path)
    assert train(smoke, tmp_path, device="cpu", resume=True, progress=False)["finished"]


def test_load_model_rebuilds_the_modern_model_from_its_checkpoint(straight):
    out, _ = straight
    model, what = load_model(str(out))
    assert isinstance(model.config, ModernConfig) and "checkpoint" in what
    assert model.config.rope and model.config.softcap == 15.0
    state = read_checkpoint(list_checkpoints(out)[-1])
    trained, _ = build_model(MODERN, "cpu")
    trained.load_state_dict(state["model"])
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(model(x)[0], trained.eval()(x)[0])


def cli(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"gpt2lib.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_reads_a_modern_checkpoint(straight):
    out, _ = straight
    result = cli(
        "sample",
        "--model",
        out,
        "--prompt",
        "ROMEO:",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "4",
        "--seed",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "ROMEO:" in result.stdout


def test_export_hf_refuses_a_modern_model_in_one_line_and_writes_nothing(
    straight, tmp_path
):
    out, _ = straight
    result = cli("export_hf", out, tmp_path / "hf")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and "Traceback" not in result.stderr
    )
    assert "rotary position embeddings" in lines[0] and "cannot represent" in lines[0]
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


def test_export_hf_takes_a_modern_run_whose_switches_only_change_the_init(tmp_path):
    # zero_init_proj changes only the initial weights: the trained model is GPT-2's function
    cfg = PRESETS["smoke"].replace(arch="modern", zero_init_proj=True, max_steps=2)
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    result = cli("export_hf", tmp_path / "run", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_export_hf_writes_an_untied_head_that_transformers_computes_equally(tmp_path):
    "An untied head is GPT2LMHeadModel with tie_word_embeddings false: same logits."
    from transformers import GPT2LMHeadModel

    cfg = PRESETS["smoke"].replace(
        arch="modern", untie_head=True, pad_vocab_to=64, max_steps=2
    )
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    result = cli("export_hf", tmp_path / "run", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    ours, _ = load_model(str(tmp_path / "run"), device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert not hf.config.tie_word_embeddings
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    idx = torch.randint(
        0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = ours(idx)[0][..., : cfg.model.vocab_size]
        got = hf(idx).logits
    # the same fp32 operations in another order (HF's Conv1D is addmm): rounding of
    # about 1e-7 relative, far below 1e-5 for logits of magnitude ~1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def train_cli(*args):
    return cli("train", "--no-progress", "--device", "cpu", "--preset", "smoke", *args)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--rope", "true"],
            "rope = True is not allowed: it must be off (false, 0) with --arch gpt2",
        ),
        (["--arch", "llama"], "arch = 'llama' is not allowed"),
        (["--arch", "modern", "--softcap", "-1"], "softcap = -1.0 is not allowed"),
        (
            ["--arch", "modern", "--rope", "true", "--n-embd", "30", "--n-head", "2"],
            "odd head size",
        ),
        (["--optimizer", "muon", "--muon-lr", "3"], "muon_lr = 3.0 is not allowed"),
        (["--optimizer", "muon", "--muon-lr", "nan"], "muon_lr = nan is not allowed"),
        (["--optimizer", "sgd"], "optimizer = 'sgd' is not allowed"),
        (
            ["--optimizer", "muon", "--muon-momentum", "1"],
            "muon_momentum = 1.0 is not allowed",
        ),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, args, fragment):
    result = train_cli("--out", tmp_path / "run", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_the_cli_trains_the_modern_model_with_muon(tmp_path):
    result = train_cli("--out", tmp_path / "run", "--max-steps", "2", *MODERN_CLI)
    assert result.returncode == 0, result.stderr
    state = read_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["config"]["optimizer"] == "muon" and state["config"]["rope"] is True
    assert (
        "transformer.wpe.weight" not in state["model"]
        and "lm_head.weight" in state["model"]
    )


def test_preflight_passes_on_the_modern_model_with_muon(tmp_path):
    # every check of chapter 9's preflight, including the checkpoint round trip (whose next
    # two losses must be identical) and the sample, with the modern model and Muon
    from gpt2lib.preflight import preflight

    report = preflight(MODERN, tmp_path / "run", device="cpu", echo=lambda line: None)
    assert report["passed"], report["checks"]
    assert {c["status"] for c in report["checks"]} == {"ok"}
    assert train(MODERN, tmp_path / "run", device="cpu", progress=False)["finished"]
