import subprocess
import sys

import pytest


def run_sample(*args):
    return subprocess.run(
        [sys.executable, "-m", "gpt2lib.sample", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_samples_are_printed_and_reproducible(gpt2_vocab_hf):
    _, path = gpt2_vocab_hf
    args = [
        "--model",
        str(path),
        "--prompt",
        "Hello",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "5",
        "--seed",
        "42",
    ]
    first, second = run_sample(*args), run_sample(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("> Hello") for line in lines)
    assert first.stdout == second.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir"], "/no/such/dir"),
        (["--model", "gpt3"], "gpt2-medium"),
    ],
)
def test_bad_model_is_one_line_not_a_traceback(args, message):
    result = run_sample(*args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_prompt_too_long(gpt2_vocab_hf):
    _, path = gpt2_vocab_hf
    result = run_sample(
        "--model", str(path), "--prompt", " word" * 100, "--max-new-tokens", "1"
    )
    assert result.returncode != 0
    assert "block_size=64" in result.stderr and "Traceback" not in result.stderr


def test_prompt_outside_the_vocabulary(tiny_hf):
    _, path = tiny_hf  # vocab_size 101: "Hello" is token 15496
    result = run_sample(
        "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "1"
    )
    assert result.returncode != 0
    assert "vocab_size is 101" in result.stderr and "Traceback" not in result.stderr


def test_samples_from_a_training_checkpoint_and_a_run_directory(tmp_path):
    """gpt2-sample takes what gpt2-evaluate and gpt2-export-hf take: checkpoints and run
    directories too."""
    from gpt2lib.checkpoint import list_checkpoints
    from gpt2lib.config import PRESETS
    from gpt2lib.train import train

    train(PRESETS["smoke"], tmp_path, device="cpu", progress=False)
    for model in (tmp_path, list_checkpoints(tmp_path)[0]):
        result = run_sample(
            "--model",
            str(model),
            "--prompt",
            "ROMEO:",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--seed",
            "1",
            "--device",
            "cpu",
        )
        assert result.returncode == 0, result.stderr
        assert [line[:8] for line in result.stdout.splitlines()] == ["> ROMEO:"] * 2
