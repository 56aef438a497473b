import subprocess
import sys

import pytest


def run_sample(*args):
    return subprocess.run([sys.executable, "-m", "gpt2lib.sample", *args],
                          capture_output=True, text=True, timeout=120)


def test_samples_are_printed_and_reproducible(gpt2_vocab_hf):
    _, path = gpt2_vocab_hf
    args = ["--model", str(path), "--prompt", "Hello", "--num-samples", "3", "--max-new-tokens", "5", "--seed", "42"]
    first, second = run_sample(*args), run_sample(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("> Hello") for line in lines)
    assert first.stdout == second.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--model", "gpt3"], "gpt2-medium"),
])
def test_bad_model_is_one_line_not_a_traceback(args, message):
    result = run_sample(*args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_prompt_too_long(gpt2_vocab_hf):
    _, path = gpt2_vocab_hf
    result = run_sample("--model", str(path), "--prompt", " word" * 100, "--max-new-tokens", "1")
    assert result.returncode != 0
    assert "block_size=64" in result.stderr and "Traceback" not in result.stderr


def test_prompt_outside_the_vocabulary(tiny_hf):
    _, path = tiny_hf  # vocab_size 101: "Hello" is token 15496
    result = run_sample("--model", str(path), "--prompt", "Hello", "--max-new-tokens", "1")
    assert result.returncode != 0
    assert "vocab_size is 101" in result.stderr and "Traceback" not in result.stderr
