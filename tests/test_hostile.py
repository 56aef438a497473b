"""Every command used as a hostile user would: wrong values, missing and corrupt files,
a full disk, a diverging run, two processes on one directory, Ctrl-C. Each case must end
with a non-zero exit status and one line that names the problem, and leave everything on
disk as it was. Most cases call a command's `main` in this process (the same code a
console script runs, without a second's start-up each); the last ones run real
processes."""

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lib import bench, evaluate, export_hf, fineweb, rundir, sample
from gpt2lib import checkpoint as checkpoint_module
from gpt2lib import optim
from gpt2lib import train as train_module
from gpt2lib.checkpoint import list_checkpoints, read_checkpoint
from gpt2lib.rundir import read_log
from gpt2lib.runtime import lock_directory
from gpt2lib.config import PRESETS, config_from_args
from gpt2lib.train import train

SMOKE = PRESETS["smoke"]
HANDMADE = str(files("gpt2lib") / "assets" / "hellaswag_handmade.jsonl")
COMMANDS = {
    "train": train_module.main,
    "sample": sample.main,
    "evaluate": evaluate.main,
    "export_hf": export_hf.main,
    "fineweb": fineweb.main,
    "bench": bench.main,
}


def snapshot(root: Path) -> dict:
    """Every file and directory under `root` with a hash of its contents (the lock file
    aside)."""
    if not root.exists():
        return {}
    state = {}
    for path in sorted(root.rglob("*")):
        if path.name == ".lock":
            continue
        key = str(path.relative_to(root))
        state[key] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
    return state


def run(command: str, args: list, capsys) -> tuple[int, str]:
    """(exit status, the message it ended with) of a command's main, as its process
    would end."""
    try:
        status = COMMANDS[command]([str(a) for a in args]) or 0
        message = ""
    except SystemExit as exit:
        if isinstance(
            exit.code, str
        ):  # sys.exit("error: ..."): printed to stderr, status 1
            status, message = 1, exit.code
        else:
            status, message = exit.code or 0, ""
    err = capsys.readouterr().err.strip()
    if not message and err:
        message = err.splitlines()[-1]  # argparse: usage, then the error
    return status, message


def measured(run_dir: Path) -> list:
    """What a run's log measured, step by step (timings aside): equal for a resumed and
    an uninterrupted run."""
    return [
        (e["step"], e.get("loss"), e.get("val_loss"))
        for e in read_log(run_dir / "log.jsonl")
    ]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    "A smoke run stopped after 3 of its 6 steps (checkpoint at step 3)."
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(SMOKE, out, device="cpu", stop_after=3, progress=False)
    return out


@pytest.fixture
def world(tmp_path, finished_run, stopped_run):
    "Files a hostile user points the commands at, by the names the cases below use."
    places = {"TMP": tmp_path, "OUT": tmp_path / "out", "RUN": tmp_path / "run"}
    shutil.copytree(finished_run, places["RUN"])
    (tmp_path / "a_file").write_text("not a directory")
    places["FILE"] = tmp_path / "a_file"
    np.save(tmp_path / "int64.npy", np.arange(5000, dtype=np.int64))
    places["INT64"] = tmp_path / "int64.npy"
    np.save(tmp_path / "short.npy", np.arange(50, dtype=np.uint16))
    places["SHORT"] = tmp_path / "short.npy"
    (tmp_path / "only_val").mkdir()
    np.save(tmp_path / "only_val" / "x_val_000.npy", np.arange(5000, dtype=np.uint16))
    places["ONLY_VAL"] = tmp_path / "only_val"
    (tmp_path / "big_ids").mkdir()
    np.save(
        tmp_path / "big_ids" / "x_train_001.npy", np.full(5000, 60000, dtype=np.uint16)
    )  # > vocab_size
    places["BIG_IDS"] = tmp_path / "big_ids"
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04 not a checkpoint")
    places["CORRUPT_PT"] = tmp_path / "corrupt.pt"
    (tmp_path / "empty_dir").mkdir()
    places["EMPTY_DIR"] = tmp_path / "empty_dir"
    for name in (
        "log.jsonl",
        "samples.jsonl",
        "summary.json",
    ):  # an earlier run's files, no checkpoint
        (tmp_path / f"has_{name}").mkdir()
        (tmp_path / f"has_{name}" / name).write_text('{"step": 0, "loss": 10.0}\n')
        places[f"HAS_{name}"] = tmp_path / f"has_{name}"
    (tmp_path / "ckpts_only").mkdir()
    shutil.copy(list_checkpoints(places["RUN"])[-1], tmp_path / "ckpts_only")
    places["CKPTS_ONLY"] = tmp_path / "ckpts_only"
    (tmp_path / "all_corrupt").mkdir()
    for step in (3, 6):
        (tmp_path / "all_corrupt" / f"ckpt_{step:07d}.pt").write_bytes(b"truncated")
    places["ALL_CORRUPT"] = tmp_path / "all_corrupt"
    damaged = tmp_path / "damaged_log"
    shutil.copytree(stopped_run, damaged)
    lines = (damaged / "log.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]  # damage in the middle: not a torn last line
    (damaged / "log.jsonl").write_text("\n".join(lines) + "\n")
    places["DAMAGED_LOG"] = damaged
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    places["NONEMPTY"] = tmp_path / "nonempty"
    hf = tmp_path / "hf"
    export_hf.main([str(places["RUN"]), str(hf)])
    for name, change in {
        "hf_truncated": lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:10000]
        ),
        "hf_config_list": lambda d: (d / "config.json").write_text("[1, 2]"),
        "hf_config_not_json": lambda d: (d / "config.json").write_text("{n_layer: 2"),
        "hf_config_no_layers": lambda d: (d / "config.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((d / "config.json").read_text()).items()
                    if k != "n_layer"
                }
            )
        ),
        "hf_config_text_width": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "n_embd": "32"})
        ),
    }.items():
        shutil.copytree(hf, tmp_path / name)
        change(tmp_path / name)
        places[name.upper()] = tmp_path / name
    not_a_state = (
        tmp_path / "list_ckpt"
    )  # a torch file that is not a checkpoint, the only one of a run
    not_a_state.mkdir()
    torch.save([1, 2, 3], not_a_state / "ckpt_0000004.pt")
    (not_a_state / "log.jsonl").write_text('{"step": 0, "loss": 10.0}\n')
    places["LIST_CKPT"] = not_a_state
    no_loader = tmp_path / "no_loader"
    shutil.copytree(stopped_run, no_loader)
    state = torch.load(list_checkpoints(no_loader)[-1], weights_only=True)
    del state["loader"]
    torch.save(state, list_checkpoints(no_loader)[-1])
    places["NO_LOADER"] = no_loader
    dir_log = tmp_path / "dir_log"
    shutil.copytree(stopped_run, dir_log)
    (dir_log / "samples.jsonl").unlink(missing_ok=True)
    (dir_log / "samples.jsonl").mkdir()
    places["DIR_SAMPLES"] = dir_log
    whole = gzip.compress(
        "".join(
            json.dumps({"text": f"{i} {i * 7919 % 10007}"}) + "\n" for i in range(3000)
        ).encode()
    )
    (tmp_path / "truncated.jsonl.gz").write_bytes(
        whole[: len(whole) // 2]
    )  # a download cut in the middle
    places["TRUNCATED_GZ"] = tmp_path / "truncated.jsonl.gz"
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not gzipped"}\n')
    places["NOT_GZ"] = tmp_path / "plain.jsonl.gz"
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    places["LATIN1"] = tmp_path / "latin1.jsonl"
    (tmp_path / "empty_endings.jsonl").write_text(
        json.dumps({"ctx": "A man", "endings": ["", "", "", ""], "label": 0})
    )
    places["EMPTY_ENDINGS"] = tmp_path / "empty_endings.jsonl"
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"document {i} " * 20, "body": f"other {i}"}) + "\n"
            for i in range(40)
        )
    )
    places["DOCS"] = docs
    shards = tmp_path / "shards"
    fineweb.main(
        [
            "--out",
            str(shards),
            "--local",
            str(docs),
            "--shard-size",
            "500",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    places["SHARDS"] = shards
    return places


# (command, arguments, exit status, fragments of the last line)
CASES = {
    # settings out of range: refused before anything is read, built or written
    "batch size 0": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--batch-size", "0"],
        1,
        ["batch_size = 0", "at least 1", "--batch-size"],
    ),
    "lr nan": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--max-lr", "nan"],
        1,
        ["max_lr = nan", "finite"],
    ),
    "lr negative": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--max-lr=-1e-3"],
        1,
        ["max_lr", "above 0"],
    ),
    "keep no checkpoint": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--keep-checkpoints", "-1"],
        1,
        ["keep_checkpoints = -1", "at least 1"],
    ),
    "no validation batch": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--eval-batches", "0"],
        1,
        ["eval_batches = 0"],
    ),
    "budget not divisible": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--total-batch-size", "1000"],
        1,
        ["total_batch_size = 1000", "multiple of"],
    ),
    "warm-up longer than run": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--warmup-steps", "500"],
        1,
        ["warmup_steps = 500", "at most max_steps"],
    ),
    "fraction out of range": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--val-fraction", "1.5"],
        1,
        ["val_fraction = 1.5"],
    ),
    "prompt too long": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--sample-prompt", "word " * 40],
        1,
        ["sample_prompt", "block_size=32"],
    ),
    "vocabulary too small": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--vocab-size", "1000"],
        1,
        ["vocab_size = 1000", "whole vocabulary"],
    ),
    "heads do not divide": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--n-head", "3"],
        1,
        ["divisible by n_head = 3"],
    ),
    "negative seed": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--seed", "-1"],
        1,
        ["seed = -1"],
    ),
    "missing hellaswag": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--hellaswag", "TMP/none.jsonl"],
        1,
        ["hellaswag", "existing .jsonl"],
    ),
    "not a number": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--batch-size", "four"],
        2,
        ["--batch-size", "expected a whole number or auto, got 'four'"],
    ),
    "stop after 0": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--stop-after", "0"],
        2,
        ["--stop-after"],
    ),
    "negative timeout": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--dist-timeout", "-5"],
        2,
        ["--dist-timeout"],
    ),
    "unknown preset": (
        "train",
        ["--preset", "gpt5", "--out", "OUT"],
        2,
        ["invalid choice: 'gpt5'"],
    ),
    "unknown device": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--device", "tpu"],
        1,
        ["'tpu' is not a device"],
    ),
    # data: refused before the run directory is touched
    "missing data": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--data", "TMP/nowhere"],
        1,
        ["no training data at", "gpt2lib.fineweb"],
    ),
    "wrong dtype": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--data", "INT64"],
        1,
        ["int64.npy", "uint16"],
    ),
    "data shorter than a batch": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--data", "SHORT"],
        1,
        ["shorter than one batch"],
    ),
    "only validation shards": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--data", "ONLY_VAL"],
        1,
        ["only validation shards"],
    ),
    "ids beyond the vocabulary": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--data", "BIG_IDS"],
        1,
        ["x_train_001.npy", "token id 60000", "vocab_size 50257"],
    ),
    "more validation than data": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--eval-batches", "100000"],
        1,
        ["eval_batches = 100000", "more than the validation data holds"],
    ),
    # the run directory: an earlier run is never overwritten
    "earlier log": (
        "train",
        ["--preset", "smoke", "--out", "HAS_log.jsonl"],
        1,
        ["already holds a run (log.jsonl)", "no checkpoint to resume from"],
    ),
    "earlier samples": (
        "train",
        ["--preset", "smoke", "--out", "HAS_samples.jsonl"],
        1,
        ["samples.jsonl"],
    ),
    "earlier summary": (
        "train",
        ["--preset", "smoke", "--out", "HAS_summary.json"],
        1,
        ["summary.json"],
    ),
    "earlier checkpoints": (
        "train",
        ["--preset", "smoke", "--out", "CKPTS_ONLY"],
        1,
        ["already holds checkpoints"],
    ),
    "finished run": (
        "train",
        ["--preset", "smoke", "--out", "RUN"],
        1,
        ["already holds a run"],
    ),
    "out is a file": (
        "train",
        ["--preset", "smoke", "--out", "FILE"],
        1,
        ["cannot write to --out"],
    ),
    "out under a file": (
        "train",
        ["--preset", "smoke", "--out", "FILE/run"],
        1,
        ["cannot write to --out"],
    ),
    "resume, other settings": (
        "train",
        ["--preset", "smoke", "--out", "RUN", "--resume", "--max-lr", "0.01"],
        1,
        ["different settings (max_lr)"],
    ),
    "resume, no readable checkpoint": (
        "train",
        ["--preset", "smoke", "--out", "ALL_CORRUPT", "--resume"],
        1,
        ["none of the 2 checkpoints"],
    ),
    "resume, damaged log": (
        "train",
        ["--preset", "smoke", "--out", "DAMAGED_LOG", "--resume"],
        1,
        ["log.jsonl, line 3: not a log entry"],
    ),
    "resume, a log but no checkpoint": (
        "train",
        ["--preset", "smoke", "--out", "HAS_log.jsonl", "--resume"],
        1,
        ["already holds a run (log.jsonl)", "no checkpoint to resume from"],
    ),
    "timeout inf": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--dist-timeout", "inf"],
        2,
        ["--dist-timeout"],
    ),
    "HellaSwag endings too long": (
        "train",
        [
            "--preset",
            "smoke",
            "--out",
            "OUT",
            "--block-size",
            "8",
            "--hellaswag",
            HANDMADE,
        ],
        1,
        ["HellaSwag examples have an ending too long", "block_size 8"],
    ),
    # the other commands take the same model specifications, with the same errors
    "sample, missing model": (
        "sample",
        ["--model", "TMP/nowhere"],
        1,
        ["neither a directory nor a released"],
    ),
    "sample, corrupt checkpoint": (
        "sample",
        ["--model", "CORRUPT_PT"],
        1,
        ["cannot load as a checkpoint"],
    ),
    "sample, empty run directory": (
        "sample",
        ["--model", "EMPTY_DIR"],
        1,
        ["holds neither an HF-format model"],
    ),
    "sample, prompt too long": (
        "sample",
        ["--model", "RUN", "--prompt", "word " * 40, "--device", "cpu"],
        1,
        ["41 tokens long", "block_size=32"],
    ),
    "sample, 0 samples": (
        "sample",
        ["--model", "RUN", "--num-samples", "0"],
        1,
        ["--num-samples must be 1 to 10,000"],
    ),
    "sample, temperature 0": (
        "sample",
        ["--model", "RUN", "--temperature", "0"],
        1,
        ["--temperature must be a finite number of at least 0.0001"],
    ),
    "sample, unknown device": (
        "sample",
        ["--model", "RUN", "--device", "tpu"],
        1,
        ["'tpu' is not a device"],
    ),
    "evaluate, missing model": (
        "evaluate",
        ["--model", "TMP/nowhere", "--val", "SHARDS"],
        1,
        ["nowhere"],
    ),
    "evaluate, 0 batches": (
        "evaluate",
        ["--model", "RUN", "--val", "SHARDS", "--val-batches", "0"],
        1,
        ["--val-batches must be at least 1"],
    ),
    "evaluate, too many batches": (
        "evaluate",
        [
            "--model",
            "RUN",
            "--val",
            "SHARDS",
            "--val-batches",
            "1000",
            "--device",
            "cpu",
        ],
        1,
        ["--val-batches 1000 is more than"],
    ),
    "evaluate, sequence too long": (
        "evaluate",
        ["--model", "RUN", "--val", "SHARDS", "--seq-len", "999", "--device", "cpu"],
        1,
        ["--seq-len 999 is longer"],
    ),
    "export, into a non-empty directory": (
        "export_hf",
        ["RUN", "NONEMPTY"],
        1,
        ["is not empty", "--force"],
    ),
    "export, onto a file": (
        "export_hf",
        ["RUN", "FILE"],
        1,
        ["exists and is not a directory"],
    ),
    "export, corrupt checkpoint": (
        "export_hf",
        ["CORRUPT_PT", "OUT"],
        1,
        ["cannot load as a checkpoint"],
    ),
    "fineweb, 0 workers": (
        "fineweb",
        ["--out", "OUT", "--local", "DOCS", "--workers", "0"],
        1,
        ["--workers"],
    ),
    "fineweb, missing input": (
        "fineweb",
        ["--out", "OUT", "--local", "TMP/none.jsonl"],
        1,
        ["no such file"],
    ),
    "fineweb, resume with another field": (
        "fineweb",
        [
            "--out",
            "SHARDS",
            "--local",
            "DOCS",
            "--shard-size",
            "500",
            "--text-field",
            "body",
            "--workers",
            "1",
        ],
        1,
        ["text_field='text' (now 'body')"],
    ),
    "fineweb, verify a non-shard dir": (
        "fineweb",
        ["--out", "EMPTY_DIR", "--verify"],
        1,
        ["manifest.json"],
    ),
    "sample, damaged safetensors": (
        "sample",
        ["--model", "HF_TRUNCATED", "--device", "cpu"],
        1,
        ["model.safetensors: cannot be read", "damaged or incomplete"],
    ),
    "evaluate, damaged safetensors": (
        "evaluate",
        ["--model", "HF_TRUNCATED", "--hellaswag", HANDMADE],
        1,
        ["model.safetensors: cannot be read"],
    ),
    "export, damaged safetensors": (
        "export_hf",
        ["HF_TRUNCATED", "OUT"],
        1,
        ["model.safetensors: cannot be read"],
    ),
    "sample, config a list": (
        "sample",
        ["--model", "HF_CONFIG_LIST"],
        1,
        ["config.json: expected a JSON object"],
    ),
    "sample, config not JSON": (
        "sample",
        ["--model", "HF_CONFIG_NOT_JSON"],
        1,
        ["config.json: not a JSON config"],
    ),
    "sample, config without n_layer": (
        "sample",
        ["--model", "HF_CONFIG_NO_LAYERS"],
        1,
        ["config.json: n_layer=None"],
    ),
    "sample, config with text width": (
        "sample",
        ["--model", "HF_CONFIG_TEXT_WIDTH"],
        1,
        ["n_embd='32'"],
    ),
    "sample, a log as the model": (
        "sample",
        ["--model", "RUN/log.jsonl"],
        1,
        ["log.jsonl: cannot load as a checkpoint", "not a checkpoint written by"],
    ),
    "sample, 10^11 samples": (
        "sample",
        ["--model", "RUN", "--num-samples", "100000000000"],
        1,
        ["1 to 10,000"],
    ),
    "sample, endless tokens": (
        "sample",
        ["--model", "RUN", "--max-new-tokens", "10" + "0" * 30],
        1,
        ["0 to 100,000"],
    ),
    "sample, seed too large": (
        "sample",
        ["--model", "RUN", "--seed", "9" * 25],
        1,
        ["--seed must be 0 to 2**63"],
    ),
    "resume, only a torch list": (
        "train",
        ["--preset", "smoke", "--out", "LIST_CKPT", "--resume"],
        1,
        ["none of the 1 checkpoints"],
    ),
    "resume, checkpoint without loader": (
        "train",
        ["--preset", "smoke", "--out", "NO_LOADER", "--resume"],
        1,
        ["none of the 1 checkpoints"],
    ),
    "resume, samples is a directory": (
        "train",
        ["--preset", "smoke", "--out", "DIR_SAMPLES", "--resume"],
        1,
        ["samples.jsonl is not a file"],
    ),
    "empty --out": ("train", ["--preset", "smoke", "--out", ""], 1, ["--out is empty"]),
    "padding beyond reason": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--pad-vocab-to", "1000000000000"],
        1,
        ["pad_vocab_to = 1000000000000", "1 to 1024"],
    ),
    "model larger than memory": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--n-embd", "2000000", "--n-head", "1"],
        1,
        ["parameters", "more than this machine's memory"],
    ),
    "evaluate, empty endings": (
        "evaluate",
        ["--model", "RUN", "--hellaswag", "EMPTY_ENDINGS"],
        1,
        ["line 1: endings must be a list of 4 non-empty texts"],
    ),
    "export under a file": (
        "export_hf",
        ["RUN", "FILE/sub"],
        1,
        ["a_file is a file, not a directory"],
    ),
    "fineweb, truncated gzip": (
        "fineweb",
        ["--out", "OUT", "--local", "TRUNCATED_GZ", "--workers", "1"],
        1,
        ["truncated.jsonl.gz: the gzip file is damaged or incomplete"],
    ),
    "fineweb, not gzip": (
        "fineweb",
        ["--out", "OUT", "--local", "NOT_GZ", "--workers", "1"],
        1,
        ["plain.jsonl.gz: the gzip file is damaged"],
    ),
    "fineweb, not UTF-8": (
        "fineweb",
        ["--out", "OUT", "--local", "LATIN1", "--workers", "1"],
        1,
        ["latin1.jsonl, line 2: not UTF-8 text"],
    ),
    "fineweb into a run directory": (
        "fineweb",
        ["--out", "RUN", "--local", "DOCS", "--workers", "1"],
        1,
        ["is not empty and holds no manifest.json"],
    ),
    "bench, 0 steps": (
        "bench",
        ["--steps", "0", "--device", "cpu"],
        1,
        ["--steps must be at least 1"],
    ),
    "bench, unknown device": (
        "bench",
        ["--device", "tpu"],
        1,
        ["'tpu' is not a device"],
    ),
}
CASES["train, a precision that does not exist"] = (
    "train",
    ["--preset", "smoke", "--out", "OUT", "--precision", "fp8"],
    1,
    ["precision = 'fp8' is not allowed", "bf16, fp16 or fp32"],
)
CASES["train, a batch size that is not a number or auto"] = (
    "train",
    ["--preset", "smoke", "--out", "OUT", "--batch-size", "many"],
    2,
    ["--batch-size", "'many'"],
)
if not torch.cuda.is_available():
    CASES["no GPU"] = (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--device", "cuda"],
        1,
        ["no CUDA GPU"],
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_a_non_zero_exit_and_changes_nothing(case, world, capsys):
    command, args, expected_status, fragments = CASES[case]
    args = [str(world[a]) if a in world else a for a in args]
    args = [
        a.replace("TMP/", f"{world['TMP']}/")
        .replace("FILE/", f"{world['FILE']}/")
        .replace("RUN/", f"{world['RUN']}/")
        for a in args
    ]
    if command == "train":
        args += ["--no-progress", *([] if "--device" in args else ["--device", "cpu"])]
    before = snapshot(world["TMP"])
    status, message = run(command, args, capsys)
    assert status == expected_status, message
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert (
        snapshot(world["TMP"]) == before
    )  # nothing lost, nothing changed, nothing half-written


def test_batch_size_auto_where_not_even_one_sequence_fits(world, capsys, monkeypatch):
    def no_memory(*args, **kwargs):  # as if the device had no memory to spare
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(optim, "train_step", no_memory)
    before = snapshot(world["TMP"])
    status, message = run(
        "train",
        ["--preset", "smoke", "--out", world["OUT"], "--batch-size", "auto"]
        + ["--device", "cpu", "--no-progress"],
        capsys,
    )
    assert status == 1 and "\n" not in message
    assert message.startswith(
        "error: --batch-size auto: not even one sequence of 32 tokens fits"
    )
    assert snapshot(world["TMP"]) == before  # refused before anything was written


def test_a_precision_the_device_cannot_run_is_refused_first(world, capsys, monkeypatch):
    """fp16 or bf16 on Apple's mps (trained in fp32 there), refused before the data is
    read: run on any machine by letting the command believe it has mps."""
    from gpt2lib import dist

    from gpt2lib import cli

    for module in (cli, train_module, dist):
        monkeypatch.setattr(module, "resolve_device", lambda name: name)
    monkeypatch.setattr(train_module, "make_loaders", None)  # never reached
    before = snapshot(world["TMP"])
    for precision in ("fp16", "bf16"):
        status, message = run(
            "train",
            ["--preset", "smoke", "--out", world["OUT"], "--device", "mps"]
            + ["--precision", precision, "--no-progress"],
            capsys,
        )
        assert (status, message) == (
            1,
            f"error: --precision {precision} on mps: gpt2lib trains in fp32 on "
            "Apple's mps; use --precision fp32 (or auto)",
        )
    assert snapshot(world["TMP"]) == before


def test_resuming_a_finished_run_does_nothing_and_changes_nothing(world, capsys):
    before = snapshot(world["TMP"])
    train_module.main(
        [
            "--preset",
            "smoke",
            "--out",
            str(world["RUN"]),
            "--resume",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert (
        "nothing to do" in capsys.readouterr().out
    )  # and the exit status is 0: main returned
    assert (
        snapshot(world["TMP"]) == before
    )  # summary.json keeps the provenance of the run that made it


def test_a_second_command_on_a_directory_in_use_is_refused(world, capsys):
    for command, args in [
        (
            "train",
            ["--preset", "smoke", "--out", world["RUN"], "--resume", "--device", "cpu"],
        ),
        (
            "fineweb",
            ["--out", world["SHARDS"], "--local", world["DOCS"], "--shard-size", "500"],
        ),
    ]:
        target = args[args.index("--out") + 1]
        before = snapshot(world["TMP"])
        with lock_directory(target, "test"):  # as the first process would hold it
            status, message = run(command, args, capsys)
        assert (
            status == 1 and "is in use by another" in message and "pid " in message
        ), message
        assert snapshot(world["TMP"]) == before


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(
    tmp_path, monkeypatch, capsys
):
    real_save, saves = torch.save, []

    class FullDisk:
        "A file on a disk that fills up after a few bytes."

        def __init__(self, f):
            self.f, self.room = f, 1000

        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def fills_the_disk(obj, f):
        saves.append(obj["step"])
        # torch's own writer meets the full disk: it raises a RuntimeError
        # ("[enforce fail at inline_container.cc...]"), the OSError its context
        real_save(obj, FullDisk(f) if len(saves) == 2 else f)

    monkeypatch.setattr(checkpoint_module.torch, "save", fills_the_disk)
    status, message = run(
        "train",
        [
            "--preset",
            "smoke",
            "--out",
            tmp_path / "run",
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert (
        status == 1
        and "checkpoint of step 6" in message
        and "No space left on device" in message
    )
    assert "earlier checkpoints are kept" in message and "--resume" in message
    assert [
        p.name
        for p in (tmp_path / "run").iterdir()
        if p.name.startswith(".") and p.name != ".lock"
    ] == []
    assert read_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"] == 3


def test_a_full_disk_during_a_log_append_stops_cleanly_and_resumes_exactly(
    tmp_path, finished_run, monkeypatch, capsys
):
    real_open, appends = open, []

    def fills_the_disk(path, mode="r", *args, **kwargs):
        if "a" in mode and Path(path).name == "log.jsonl":
            appends.append(path)
            if len(appends) == 6:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", fills_the_disk, raising=False)
    status, message = run(
        "train",
        [
            "--preset",
            "smoke",
            "--out",
            tmp_path / "run",
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert (
        status == 1
        and "cannot append to" in message
        and "No space left" in message
        and "--resume" in message
    )
    monkeypatch.undo()
    train(SMOKE, tmp_path / "run", device="cpu", resume=True, progress=False)
    assert measured(tmp_path / "run") == measured(finished_run)


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, finished_run, capsys):
    train(SMOKE, tmp_path, device="cpu", stop_after=3, progress=False)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(
            '{"step": 3, "loss": 10.7'
        )  # the disk filled up in the middle of this line
    train(SMOKE, tmp_path, device="cpu", resume=True, progress=False)
    assert "dropped an incomplete last line" in capsys.readouterr().err
    assert measured(tmp_path) == measured(finished_run)


def test_a_diverging_run_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    status, message = run(
        "train",
        [
            "--preset",
            "smoke",
            "--out",
            tmp_path,
            "--max-lr",
            "100",
            "--warmup-steps",
            "10",
            "--max-steps",
            "40",
            "--checkpoint-every",
            "3",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 1 and "the run diverged" in message and "--max-lr" in message
    log = read_log(tmp_path / "log.jsonl")
    bad = log[-1]["step"]
    assert not all(np.isfinite([log[-1]["loss"], log[-1]["norm"]]))
    assert all(np.isfinite([e["loss"], e["norm"]]).all() for e in log[:-1])
    saved = list_checkpoints(tmp_path)
    assert saved and f"the last checkpoint, {saved[-1].name}, is kept" in message
    for (
        path
    ) in saved:  # only finite weights were ever written, all from before the bad step
        state = read_checkpoint(path)
        assert state["step"] <= bad and all(
            torch.isfinite(t).all() for t in state["model"].values()
        )


# Real processes: what a shell sees.


def test_two_trainers_on_one_directory(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2lib.train",
            "--preset",
            "smoke",
            "--max-steps",
            "100000",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (out / "log.jsonl").exists() and len(read_log(out / "log.jsonl")) >= 2
        ):
            time.sleep(0.2)
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpt2lib.train",
                "--preset",
                "smoke",
                "--max-steps",
                "100000",
                "--out",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
                "--resume",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert (
            f"is in use by another training run (pid {first.pid} on " in second.stderr
        )
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130
    steps = [e["step"] for e in read_log(out / "log.jsonl") if "loss" in e]
    assert steps == list(range(len(steps)))  # one writer: no step twice, none missing


@pytest.mark.parametrize(
    "script, args, status",
    [
        ("gpt2-train", ["--preset", "smoke", "--device", "tpu"], 1),
        ("gpt2-sample", ["--model", "/no/such/model"], 1),
        (
            "gpt2-evaluate",
            ["--model", "/no/such/model", "--hellaswag", "/no/such.jsonl"],
            1,
        ),
        ("gpt2-export-hf", ["/no/such/model", "OUT"], 1),
        ("gpt2-fineweb", ["--out", "OUT", "--local", "/no/such.jsonl"], 1),
        ("gpt2-bench", ["--steps", "0"], 1),
    ],
)
def test_console_scripts_end_bad_input_in_one_line(script, args, status, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = subprocess.run(
        [str(Path(sys.executable).parent / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == status and "Traceback" not in result.stderr, (
        result.stderr
    )
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"{script}: error: " if status == 2 else "error: "
    ) and (status == 2 or len(lines) == 1)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_fineweb_workers_promptly_and_the_rerun_resumes(tmp_path):
    """Seen before: with several workers, Ctrl-C sometimes hung in Pool.terminate or
    printed worker tracebacks."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"document {i}: " + "words and more words " * 300})
            + "\n"
            for i in range(3000)
        )
    )
    command = [
        sys.executable,
        "-m",
        "gpt2lib.fineweb",
        "--out",
        str(tmp_path / "shards"),
        "--local",
        str(docs),
        "--shard-size",
        "50000",
        "--workers",
        "2",
        "--no-progress",
    ]
    for attempt in range(
        3
    ):  # a terminal's Ctrl-C reaches the whole process group, workers included
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 60
        manifest = tmp_path / "shards" / "manifest.json"
        shards_before = (
            len(json.loads(manifest.read_text())["shards"]) if manifest.exists() else 0
        )
        while (
            time.time() < deadline
            and proc.poll() is None
            and (
                not manifest.exists()
                or len(json.loads(manifest.read_text())["shards"]) <= shards_before
            )
        ):
            time.sleep(0.05)
        if proc.poll() is not None:
            break  # finished before it could be interrupted
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        _, stderr = proc.communicate(timeout=30)  # a hang fails here
        assert time.time() - t0 < 10 and proc.returncode == 130, stderr
        assert (
            "Traceback" not in stderr and "rerun the same command to resume" in stderr
        )
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = subprocess.run(
        [*command[:4], str(tmp_path / "fresh"), *command[5:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.npy")}
    straight = {p.name: p.read_bytes() for p in (tmp_path / "fresh").glob("*.npy")}
    assert (
        resumed == straight
    )  # stopped three times and resumed: the same shards as one run


def test_a_failed_fineweb_run_does_not_bind_the_corrected_rerun(
    tmp_path, world, capsys
):
    out = tmp_path / "fw"
    status, message = run(
        "fineweb",
        [
            "--out",
            out,
            "--local",
            world["DOCS"],
            "--text-field",
            "content",
            "--workers",
            "1",
        ],
        capsys,
    )
    assert status == 1 and "not an object with a 'content' field" in message
    status, message = run(
        "fineweb",
        [
            "--out",
            out,
            "--local",
            world["DOCS"],
            "--shard-size",
            "500",
            "--workers",
            "1",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0, message
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == {
        p.name: p.read_bytes() for p in world["SHARDS"].glob("*.npy")
    }


@pytest.mark.parametrize(
    "value, words",
    [("0", "WORLD_SIZE=0; it must be at least 1"), ("abc", "WORLD_SIZE='abc'")],
)
def test_a_broken_torchrun_environment_is_named(
    value, words, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", value)
    status, message = run(
        "train",
        ["--preset", "smoke", "--out", tmp_path / "run", "--device", "cpu"],
        capsys,
    )
    assert status == 1 and words in message and not (tmp_path / "run").exists()


def test_ctrl_c_on_the_last_step_still_stops_with_130_and_resume_finishes(
    tmp_path, finished_run, monkeypatch, capsys
):
    real_step, calls = optim.train_step, []

    def interrupted_at_the_last_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == SMOKE.max_steps:
            os.kill(
                os.getpid(), signal.SIGINT
            )  # as a user's Ctrl-C during the last step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(optim, "train_step", interrupted_at_the_last_step)
    status, _ = run(
        "train",
        ["--preset", "smoke", "--out", tmp_path, "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert (
        status == 130 and not (tmp_path / "summary.json").exists()
    )  # no final evaluation after Ctrl-C
    monkeypatch.undo()
    train(SMOKE, tmp_path, device="cpu", resume=True, progress=False)
    assert measured(tmp_path) == measured(finished_run)
    assert json.loads((tmp_path / "summary.json").read_text())["finished"]


def test_a_log_that_lacks_steps_before_the_checkpoint_is_reported_on_resume(
    tmp_path, stopped_run, finished_run, capsys
):
    shutil.copytree(stopped_run, tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(
        "".join(line + "\n" for line in log.read_text().splitlines()[:2])
    )  # steps 1 and 2 lost
    train(SMOKE, tmp_path / "run", device="cpu", resume=True, progress=False)
    assert (
        "has no entry for 2 of the 3 steps before the checkpoint (steps 1 to 2)"
        in capsys.readouterr().err
    )


def test_a_run_killed_while_writing_its_first_checkpoint(tmp_path, stopped_run, capsys):
    """A log, no checkpoint, and the temporary file of the write that was killed: one
    consistent answer."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(stopped_run / "log.jsonl", out)
    (out / ".ckpt_0000003.pt.x1y2.tmp").write_bytes(b"half")
    for resume in ([], ["--resume"]):
        status, message = run(
            "train",
            ["--preset", "smoke", "--out", out, "--device", "cpu", *resume],
            capsys,
        )
        assert (
            status == 1
            and "no checkpoint to resume from; choose another --out" in message
        )
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "log.jsonl",
    ]  # our temporary file is gone, the log kept


def test_a_shard_added_between_stop_and_resume_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x_val_0.npy", "x_train_1.npy", "x_train_2.npy"):
        np.save(data / name, rng.integers(0, 50257, 3000, dtype=np.uint16))
    args = [
        "--preset",
        "smoke",
        "--out",
        tmp_path / "run",
        "--data",
        data,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert run("train", [*args, "--stop-after", "3"], capsys)[0] == 0
    np.save(data / "x_train_3.npy", rng.integers(0, 50257, 3000, dtype=np.uint16))
    status, message = run("train", [*args, "--resume"], capsys)
    assert (
        status == 1
        and "saved data position is in 2 shards, but the data now has 3" in message
    )


def test_ctrl_c_while_python_starts_is_quiet(tmp_path):
    for delay in (0.2, 0.5):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpt2lib.train",
                "--preset",
                "smoke",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)  # torch is still being imported
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    "signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_a_signal_finishes_the_step_saves_and_exits_128_plus_its_number(
    signum, status, tmp_path
):
    "Ctrl-C, or the SIGTERM a scheduler sends before it stops a job."
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2lib.train",
            "--no-progress",
            "--device",
            "cpu",
            "--preset",
            "smoke",
            "--max-steps",
            "100000",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "log.jsonl").exists() and len(read_log(out / "log.jsonl")) >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    steps = len([e for e in read_log(out / "log.jsonl") if "loss" in e])
    assert f"stopped after step {steps}" in stdout and "--resume" in stdout
    assert list_checkpoints(out)[-1].name == f"ckpt_{steps:07d}.pt"


# Issue 20, "nothing silently wrong": shards, checkpoints, the log, floats, Muon's
# settings and the preflight.

import dataclasses
import math

from gpt2lib import preflight as preflight_module

REMAKE = "re-make the shards with gpt2-fineweb, or remove that file"


def run_preflight(args, capsys) -> tuple[int, str, list[str]]:
    """(exit status, the error line it ended with if any, the lines it printed) of
    gpt2-preflight's main, on the CPU."""
    args = [str(a) for a in args] + ["--device", "cpu", "--no-progress"]
    try:
        status, message = preflight_module.main(args), ""
    except SystemExit as exit:
        status, message = (
            (1, exit.code) if isinstance(exit.code, str) else (exit.code, "")
        )
    return status, message, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("command", ["train", "evaluate", "preflight"])
@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda path: path.write_bytes(b""), "an empty file, not a token shard"),
        (lambda path: np.save(path, np.zeros(0, np.uint16)), "a shard of 0 tokens"),
    ],
    ids=["zero bytes", "zero tokens"],
)
def test_an_empty_shard_is_refused_alike_by_every_command(
    command, bad, words, world, capsys
):
    data = world["TMP"] / "data"
    shutil.copytree(world["SHARDS"], data)
    # evaluate reads the validation shards only; the others read both splits
    shard = data / ("fineweb_val_000009.npy" if command == "evaluate" else "z_099.npy")
    bad(shard)
    expected = f"{shard}: {words}; {REMAKE}"
    out = world["TMP"] / "new_out"
    before = snapshot(world["TMP"])
    if command == "preflight":
        status, _, lines = run_preflight(
            ["--preset", "smoke", "--data", data, "--out", out], capsys
        )
        assert status == 1 and f"failed  data: {expected}" in lines
        # an early check failed and --out did not exist: the report is written there
        assert lines[-1] == f"preflight FAILED: data; report in {out}/preflight.json"
        assert not json.loads((out / "preflight.json").read_text())["passed"]
        shutil.rmtree(out)
    else:
        args = {
            "train": ["--preset", "smoke", "--data", data, "--out", out]
            + ["--device", "cpu", "--no-progress"],
            "evaluate": ["--model", world["RUN"], "--val", data, "--device", "cpu"],
        }[command]
        assert run(command, args, capsys) == (1, f"error: {expected}")
    assert snapshot(world["TMP"]) == before


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_good_ones_kept(
    tmp_path, capsys
):
    keep_two = SMOKE.replace(keep_checkpoints=2)
    out = tmp_path / "run"
    train(keep_two, out, device="cpu", stop_after=4, progress=False)  # 3 and 4
    newest = out / "ckpt_0000004.pt"
    damaged = newest.read_bytes()[: newest.stat().st_size // 2]  # a cut copy
    newest.write_bytes(damaged)
    capsys.readouterr()
    train_module.main(
        ["--preset", "smoke", "--keep-checkpoints", "2", "--out", str(out)]
        + ["--resume", "--device", "cpu", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert (
        f"warning: {newest} cannot be used: moved aside as ckpt_0000004.pt.damaged"
        in err
    )
    # the two newest readable ones are kept; the damaged file too, as it was
    assert [read_checkpoint(p)["step"] for p in list_checkpoints(out)] == [3, 6]
    assert (out / "ckpt_0000004.pt.damaged").read_bytes() == damaged


def strict(line: str) -> dict:
    "A line of JSON as the standard has it: no NaN, no Infinity."

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_diverging_run_writes_a_log_of_strict_json(tmp_path, capsys):
    status, message = run(
        "train",
        ["--preset", "smoke", "--out", tmp_path, "--max-lr", "100"]
        + ["--warmup-steps", "10", "--max-steps", "40", "--checkpoint-every", "3"]
        + ["--eval-every", "0", "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert status == 1 and "the run diverged" in message
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [strict(line) for line in lines]  # each line parses as strict JSON
    # read back, the bad step's numbers are floats again, for the plots and the checks
    last = read_log(tmp_path / "log.jsonl")[-1]
    assert isinstance(last["loss"], float) and isinstance(last["norm"], float)
    assert not (math.isfinite(last["loss"]) and math.isfinite(last["norm"]))


ISSUE_20_CASES = {
    "lr beyond float32": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--max-lr", "1e39"],
        1,
        ["max_lr = 1e+39 is not allowed", "at most 100", "--max-lr"],
    ),
    "weight decay beyond reason": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--weight-decay", "1e39"],
        1,
        ["weight_decay = 1e+39 is not allowed", "at most 10"],
    ),
    "softcap beyond float32": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--arch", "modern", "--softcap", "1e39"],
        1,
        ["softcap = 1e+39 is not allowed", "at most 1000"],
    ),
    "Muon's lr with AdamW": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--optimizer", "adamw"]
        + ["--muon-lr", "0.5"],
        1,
        ["muon_lr = 0.5 is not allowed", "with --optimizer adamw", "--optimizer muon"],
    ),
    "Muon's momentum with AdamW": (
        "train",
        ["--preset", "smoke", "--out", "OUT", "--muon-momentum", "0.9"],
        1,
        ["muon_momentum = 0.9 is not allowed", "add --optimizer muon"],
    ),
}


@pytest.mark.parametrize("case", ISSUE_20_CASES)
def test_floats_out_of_reason_and_ignored_muon_settings_are_refused(
    case, world, capsys, monkeypatch
):
    monkeypatch.setitem(CASES, case, ISSUE_20_CASES[case])
    test_bad_input_is_one_line_a_non_zero_exit_and_changes_nothing(case, world, capsys)


def test_a_presets_muon_settings_do_not_stop_adamw():
    "Only a Muon setting the user gives is refused with AdamW, not a preset's own."
    args = train_module.parse_args(
        ["--preset", "gpt2-124m-speedrun", "--optimizer", "adamw"]
    )
    cfg = config_from_args(args).validate()
    assert (
        cfg.optimizer == "adamw"
        and cfg.muon_lr == PRESETS["gpt2-124m-speedrun"].muon_lr
    )


def test_a_run_that_fails_before_its_first_checkpoint_leaves_out_free(
    tmp_path, monkeypatch, capsys
):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug at step 0")

    out = tmp_path / "run"
    args = ["--preset", "smoke", "--out", out, "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(optim, "train_step", bug)
    records = []
    for attempt in (1, 2):  # a second failure keeps the first one's record
        status, message = run("train", args, capsys)
        assert status == 1 and "a bug in gpt2lib" in message, message
        records.append((out / f"log.failed-{attempt}.jsonl").read_text())
        assert not (out / "log.jsonl").exists()
    assert records[0] == records[1] and '"val_loss"' in records[0]  # step 0's
    monkeypatch.undo()
    assert run("train", args, capsys) == (0, "")  # the same command, now at work
    assert (out / "log.failed-1.jsonl").read_text() == records[0]
    assert json.loads((out / "summary.json").read_text())["finished"]


def test_preflight_in_a_finished_run_fails_with_the_trainers_reason(world, capsys):
    before = snapshot(world["TMP"])
    _, trainer = run(
        "train", ["--preset", "smoke", "--out", world["RUN"], "--device", "cpu"], capsys
    )
    status, _, lines = run_preflight(
        ["--preset", "smoke", "--out", world["RUN"]], capsys
    )
    assert status == 1 and trainer.startswith("error: ")
    assert f"failed  checkpoint: {trainer.removeprefix('error: ')}" in lines
    assert (
        f"the report was not written: {world['RUN']} holds an earlier run; give "
        "--json PATH to keep the report elsewhere" in lines
    )
    assert lines[-1] == "preflight FAILED: checkpoint"
    assert snapshot(world["TMP"]) == before  # nothing of the run's touched


def test_preflight_refuses_an_out_that_a_run_holds(world, capsys):
    before = snapshot(world["TMP"])
    with lock_directory(world["EMPTY_DIR"], "training run"):  # as the trainer holds it
        status, message, lines = run_preflight(
            ["--preset", "smoke", "--out", world["EMPTY_DIR"]], capsys
        )
    assert status == 1 and lines == []
    assert message.startswith(
        f"error: {world['EMPTY_DIR']} is in use by another training run (pid "
    )
    assert snapshot(world["TMP"]) == before  # no report, no scratch directory


def test_a_cpu_out_of_memory_is_named_by_the_preflight_and_the_trainer(
    tmp_path, monkeypatch, capsys
):
    """What the CPU allocator raises (a RuntimeError, not torch.OutOfMemoryError) is
    out of memory too: the preflight names the micro-batch that fits, gpt2-train ends
    with its out-of-memory line."""
    real_step = optim.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if batches[0][0].size(0) > 2:  # as if only 2 sequences fitted
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 3221225472 bytes. Error code "
                "12 (Cannot allocate memory)"
            )
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(optim, "train_step", small_memory)
    status, _, lines = run_preflight(
        ["--preset", "smoke", "--out", tmp_path / "preflight"], capsys
    )
    assert (
        status == 1
        and (
            "failed  step: out of memory at micro-batch 4; 2 fits Fix: --batch-size 2 "
            "(gradient accumulation of 4 micro-steps keeps total_batch_size 256)"
        )
        in lines
    )
    status, message = run(
        "train",
        ["--preset", "smoke", "--out", tmp_path / "run", "--device", "cpu"]
        + ["--no-progress"],
        capsys,
    )
    assert (status, message) == (
        1,
        "error: out of memory: ask for less (fewer samples, a smaller batch or model)",
    )
