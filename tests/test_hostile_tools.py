"""The tools around training used as a hostile user would (issue 20): an export into a
run's own directory, a directory that holds both a model and a run, an untied head
exported and read back, a corpus too small for one shard, a damaged manifest, and
values that parse but are out of range. Each case ends with its exit status, one line
naming the problem and the fix, and everything on disk as it was."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hostile import run, snapshot

from gpt2lib import evaluate, export_hf, sample
from gpt2lib.checkpoint import (
    list_checkpoints,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
)
from gpt2lib.fineweb import MANIFEST, tokenize_doc
from gpt2lib.model import MIN_TEMPERATURE, sample_next
from gpt2lib.runtime import UserError
from gpt2lib.config import PRESETS
from gpt2lib.train import train

SMOKE = PRESETS["smoke"]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    "A finished smoke run of chapter 11's model with only its head untied."
    out = tmp_path_factory.mktemp("untied") / "run"
    config = SMOKE.replace(arch="modern", untie_head=True)
    train(config, out, device="cpu", progress=False)
    return out


@pytest.fixture
def places(tmp_path, finished_run):
    "What the cases point the commands at: a run (a copy), documents, a few files."
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "a_file").write_text("not a directory")
    np.save(tmp_path / "val.npy", np.arange(2000, dtype=np.uint16))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40))
    )
    return {
        "TMP": tmp_path,
        "RUN": tmp_path / "run",
        "OUT": tmp_path / "out",
        "FILE": tmp_path / "a_file",
        "VAL": tmp_path / "val.npy",
        "DOCS": docs,
    }


def resolve(args: list, places: dict) -> list[str]:
    "`args` with the names of `places` (RUN, OUT, FILE/x, ...) made paths."
    out = []
    for arg in map(str, args):
        head, _, tail = arg.partition("/")
        out.append(
            str(places[head] / tail if tail else places[head])
            if head in places
            else arg
        )
    return out


def assert_refused(command, args, places, capsys, status, words) -> str:
    """Run `command`: it exits with `status` and one line holding `words`, and leaves
    the files of `places` as they were. Returns the line."""
    before = snapshot(places["TMP"])
    got, message = run(command, resolve(args, places), capsys)
    assert (got, "\n" in message) == (status, False), message
    assert message.startswith("error: " if status == 1 else ""), message
    assert all(word in message for word in words), message
    assert snapshot(places["TMP"]) == before  # nothing the user had, changed
    return message


# --- 1. an export into a run's directory, and a directory holding both


@pytest.mark.parametrize("force", [["--force"], []])
def test_an_export_into_a_run_directory_is_refused_even_with_force(
    force, places, capsys
):
    """`gpt2-export-hf RUN RUN --force` once wrote the model into the run: after a
    --resume, `gpt2-evaluate --model RUN` read that stale export, not the newest
    checkpoint. Without --force the refusal must not suggest it either."""
    message = assert_refused(
        "export_hf",
        ["RUN", "RUN", *force],
        places,
        capsys,
        1,
        ["holds a training run (ckpt_0000006.pt, log.jsonl", "a directory of its own"],
    )
    assert "pass --force" not in message


def test_a_run_without_checkpoints_yet_is_a_run_too(places, capsys):
    shutil.move(places["RUN"] / "ckpt_0000006.pt", places["TMP"] / "model.pt")
    for name in ("ckpt_0000003.pt", "summary.json"):
        (places["RUN"] / name).unlink()
    assert_refused(
        "export_hf",
        ["TMP/model.pt", "RUN", "--force"],
        places,
        capsys,
        1,
        ["holds a training run (log.jsonl, samples.jsonl)"],
    )


@pytest.mark.parametrize(
    "command, args",
    [
        ("sample", ["--model", "RUN", "--max-new-tokens", "1"]),
        ("evaluate", ["--model", "RUN", "--val", "VAL", "--val-batches", "1"]),
        ("export_hf", ["RUN", "OUT"]),
    ],
)
def test_a_directory_with_a_model_and_checkpoints_is_ambiguous(
    command, args, places, capsys
):
    """An HF export beside a run's checkpoints (written by an older gpt2lib, or copied
    there): which did the user mean? Loading refuses to guess and names both."""
    export_hf.main([str(places["RUN"]), str(places["TMP"] / "hf")])
    for path in (places["TMP"] / "hf").iterdir():
        shutil.copy(path, places["RUN"])
    newest = list_checkpoints(places["RUN"])[-1]
    assert_refused(
        command,
        args,
        places,
        capsys,
        1,
        ["both an HF-format model (config.json)", f"give {newest} for the checkpoint"],
    )
    # what the message says to do works
    status, message = run(
        "sample", ["--model", newest, "--max-new-tokens", "1"], capsys
    )
    assert status == 0, message


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_get_the_permissions_the_umask_gives(umask, places, capsys):
    "They were 0600 in a 0700 directory (mkdtemp's and safetensors' private modes)."
    old = os.umask(umask)
    try:
        fresh, replaced = places["TMP"] / "fresh", places["TMP"] / "replaced"
        replaced.mkdir()
        (replaced / "notes.txt").write_text("mine")
        assert run("export_hf", [places["RUN"], fresh], capsys)[0] == 0
        assert run("export_hf", [places["RUN"], replaced, "--force"], capsys)[0] == 0
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in [
        *fresh.iterdir(),
        *replaced.glob("*.json"),
        replaced / "model.safetensors",
    ]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# --- 2. an untied head, exported and read back by every command that loads a model


def test_an_exported_untied_head_loads_with_its_own_weights(untied, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run("export_hf", [untied, out], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    newest = list_checkpoints(untied)[-1]
    original = model_from_checkpoint(read_checkpoint(newest), newest).eval()
    loaded, _ = load_model(str(out))  # what gpt2-sample and gpt2-evaluate call
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)
    idx = torch.randint(0, SMOKE.model.vocab_size, (2, SMOKE.model.block_size))
    with torch.no_grad():
        # the same fp32 weights through the same operations on the same shapes (no
        # padded vocabulary, the other switches off): equal bit for bit
        assert torch.equal(loaded(idx)[0], original(idx)[0])

    def sampled(model):
        args = ["--model", str(model), "--seed", "3", "--num-samples", "2"]
        sample.main([*args, "--max-new-tokens", "12"])
        return capsys.readouterr().out

    np.save(tmp_path / "val.npy", np.arange(3000, dtype=np.uint16))

    def evaluated(model):
        args = ["--model", str(model), "--val", str(tmp_path / "val.npy")]
        return evaluate.run(evaluate.parse_args([*args, "--val-batches", "2"]))

    # gpt2-sample and gpt2-evaluate give what the checkpoint gives
    assert sampled(out) == sampled(untied)
    assert evaluated(out) == evaluated(untied)


def test_a_tie_flag_that_is_not_true_or_false_is_named(untied, tmp_path, capsys):
    out = tmp_path / "hf"
    export_hf.main([str(untied), str(out)])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": 0}))
    status, message = run("sample", ["--model", out, "--max-new-tokens", "1"], capsys)
    assert status == 1 and "tie_word_embeddings is 0, not true or false" in message


# --- 3. fineweb: a corpus of one shard or less, a damaged manifest


def corpus_tokens(docs: Path) -> int:
    return sum(
        len(tokenize_doc(json.loads(line)["text"]))
        for line in docs.read_text().splitlines()
    )


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("out", ["OUT", "EMPTY"])
def test_a_corpus_of_one_shard_or_less_is_refused(exact, out, places, capsys):
    """It wrote only the validation shard and said "done: 1 shards"; training then
    found no training data. `exact`: the corpus fills the shard to its last token."""
    (places["TMP"] / "empty").mkdir()
    places["EMPTY"] = places["TMP"] / "empty"
    n = corpus_tokens(places["DOCS"])
    size = n if exact else 10 * n
    fineweb = ["fineweb", "--local", "DOCS", "--workers", "1", "--no-progress"]
    assert_refused(
        fineweb[0],
        ["--out", out, *fineweb[1:], "--shard-size", size],
        places,
        capsys,
        1,
        [f"holds {n:,} tokens, no more than one shard", f"--shard-size below {n:,}"],
    )
    # as the message says: a smaller shard size gives a training shard too
    args = resolve(["--out", out, *fineweb[1:], "--shard-size", n // 2], places)
    assert run("fineweb", args, capsys)[0] == 0
    names = sorted(p.name for p in places[out].glob("*.npy"))
    assert names[0].startswith("fineweb_train_") and names[-1].startswith(
        "fineweb_val_"
    )


def test_a_manifest_without_finished_is_named_with_the_fix(places, capsys):
    shards = ["--out", "TMP/shards", "--local", "DOCS", "--shard-size", "500"]
    args = resolve([*shards, "--workers", "1", "--no-progress"], places)
    assert run("fineweb", args, capsys)[0] == 0
    path = places["TMP"] / "shards" / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["finished"]
    path.write_text(json.dumps(manifest))
    words = [f"{path} is damaged (no valid finished)", "delete", "and start again"]
    assert_refused("fineweb", [*shards, "--workers", "1"], places, capsys, 1, words)
    assert_refused("fineweb", [*shards[:2], "--verify"], places, capsys, 1, words)


# --- 4. values that parse but are out of range: one line and status 1, not usage

OUT_OF_RANGE = {
    "sample, 0 samples": (
        ["sample", "--model", "RUN", "--num-samples", "0"],
        "--num-samples must be 1 to 10,000, got 0",
    ),
    "sample, -1 new tokens": (
        ["sample", "--model", "RUN", "--max-new-tokens", "-1"],
        "--max-new-tokens must be 0 to 100,000, got -1",
    ),
    "sample, seed -5": (
        ["sample", "--model", "RUN", "--seed", "-5"],
        "--seed must be 0 to 2**63 - 1, got -5",
    ),
    "sample, top-k 0": (
        ["sample", "--model", "RUN", "--top-k", "0"],
        "--top-k must be at least 1, got 0",
    ),
    "sample, device cuda:3": (
        ["sample", "--model", "RUN", "--device", "cuda:3"],
        "--device cuda:3",
    ),
    "evaluate, limit 0": (
        ["evaluate", "--model", "RUN", "--val", "VAL", "--limit", "0"],
        "--limit must be at least 1, got 0",
    ),
    "evaluate, batch size -2": (
        ["evaluate", "--model", "RUN", "--val", "VAL", "--batch-size", "-2"],
        "--batch-size must be at least 1, got -2",
    ),
    "evaluate, sequence length 0": (
        ["evaluate", "--model", "RUN", "--val", "VAL", "--seq-len", "0"],
        "--seq-len must be at least 1, got 0",
    ),
    "evaluate, device cuda:3": (
        ["evaluate", "--model", "RUN", "--val", "VAL", "--device", "cuda:3"],
        "--device cuda:3",
    ),
    "bench, device cuda:3": (["bench", "--device", "cuda:3"], "--device cuda:3"),
    "bench, warm-up 0": (
        ["bench", "--device", "cpu", "--warmup", "0"],
        "--warmup must be at least 1, got 0",
    ),
    "bench, batch size -1": (
        ["bench", "--device", "cpu", "--batch-size", "-1"],
        "--batch-size must be at least 1, got -1",
    ),
    "bench, longer than the model": (
        ["bench", "--device", "cpu", "--model", "tiny", "--seq-len", "100000"],
        "--seq-len 100000 is longer than the model's block_size",
    ),
    "bench, json into a directory": (
        ["bench", "--device", "cpu", "--json", "TMP"],
        "a directory; give the path of a file to write",
    ),
    "bench, json under a file": (
        ["bench", "--device", "cpu", "--json", "FILE/bench.json"],
        "a_file is a file; give the path of a file to write",
    ),
    "fineweb, shard size 0": (
        ["fineweb", "--out", "OUT", "--local", "DOCS", "--shard-size", "0"],
        "--shard-size must be at least 1, got 0",
    ),
    "fineweb, 0 workers": (
        ["fineweb", "--out", "OUT", "--local", "DOCS", "--workers", "0"],
        "--workers must be at least 1, got 0",
    ),
}
for value in ("1e-40", "1e-5", "0", "-1", "nan", "inf"):
    OUT_OF_RANGE[f"sample, temperature {value}"] = (
        ["sample", "--model", "RUN", "--temperature", value],
        f"--temperature must be a finite number of at least {MIN_TEMPERATURE:g}",
    )


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_a_value_out_of_range_is_one_line_and_status_1(case, places, capsys):
    (command, *args), words = OUT_OF_RANGE[case]
    if "cuda:3" in args and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    assert_refused(command, args, places, capsys, 1, [words])
    assert not places["OUT"].exists()


def test_a_value_that_does_not_parse_is_still_usage(places, capsys):
    assert_refused(
        "sample",
        ["--model", "RUN", "--num-samples", "five"],
        places,
        capsys,
        2,
        ["--num-samples: invalid int value: 'five'"],
    )


def test_the_lowest_temperature_keeps_the_logits_finite_and_is_greedy():
    """At MIN_TEMPERATURE logits far beyond a model's (1e4 in size) stay finite, and
    two 0.01 apart are a factor e^100 apart: always the larger. Below it, a UserError
    naming the temperature, not a failure inside torch.multinomial."""
    logits = torch.full((64, 50), -1e4)
    logits[:, 7], logits[:, 3] = 1e4, 1e4 - 0.01
    generator = torch.Generator().manual_seed(0)
    picked = sample_next(logits, MIN_TEMPERATURE, top_k=None, generator=generator)
    assert (picked == 7).all()
    with pytest.raises(UserError, match="temperature must be a finite number"):
        sample_next(logits, 1e-40)
