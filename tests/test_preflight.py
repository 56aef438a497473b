"""gpt2-preflight: every check passes on the smoke preset, and every failing check fails
with its reason and its fix (missing validation shard, too few tokens, out of memory, an
unwritable --out, a checkpoint that does not round-trip, a run already at work in
--out)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2lib.checkpoint as checkpoint_module
import gpt2lib.train as train_module
from gpt2lib.preflight import preflight
from gpt2lib.runtime import lock_directory
from gpt2lib.train import PRESETS, train

SMOKE = PRESETS["smoke"]
CHECKS = [
    "environment",
    "precision",
    "data",
    "hellaswag",
    "step",
    "checkpoint",
    "evaluation",
    "estimate",
]


def statuses(report) -> dict:
    return {c["name"]: c["status"] for c in report["checks"]}


def failed(report, name) -> dict:
    check = next(c for c in report["checks"] if c["name"] == name)
    assert check["status"] == "failed", report["checks"]
    return check


def quiet(cfg, out, **kwargs):
    return preflight(cfg, out, device="cpu", echo=lambda line: None, **kwargs)


def test_the_smoke_preset_passes_and_leaves_nothing_that_stops_the_run(tmp_path):
    out = tmp_path / "run"
    report = quiet(SMOKE, out)
    assert report["passed"] and list(statuses(report)) == CHECKS
    assert set(statuses(report).values()) == {"ok"}
    measured, estimate = report["measured"], report["estimate"]
    assert (
        measured["step_s"] > 0
        and measured["checkpoint_bytes"] > 0
        and measured["tokens_per_s"] > 0
    )
    assert estimate["seconds"] >= SMOKE.max_steps * measured["step_s"]
    assert (
        estimate["disk_bytes"] == SMOKE.keep_checkpoints * measured["checkpoint_bytes"]
    )
    assert {"device", "torch", "commit", "dirty", "date"} <= report.keys()
    assert json.loads((out / "preflight.json").read_text())["passed"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "preflight.json",
    ]  # no checkpoint, no scratch left
    assert train(SMOKE, out, device="cpu", progress=False)[
        "finished"
    ]  # the real run starts there


def test_data_beyond_one_epoch_is_a_warning(tmp_path):
    report = quiet(
        dataclasses.replace(SMOKE, max_steps=2000, warmup_steps=2), tmp_path / "run"
    )
    assert report["passed"] and statuses(report)["data"] == "warning"
    data = next(c for c in report["checks"] if c["name"] == "data")
    assert "more than one pass over the data" in data["detail"]


def shards(tmp_path, names_and_sizes) -> str:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, size in names_and_sizes:
        np.save(data / name, rng.integers(0, 50257, size, dtype=np.uint16))
    return str(data)


def test_a_missing_validation_shard(tmp_path):
    data = shards(tmp_path, [("x_train_1.npy", 5000)])
    check = failed(
        quiet(dataclasses.replace(SMOKE, data=data), tmp_path / "run"), "data"
    )
    assert (
        "has no validation split" in check["detail"]
        and "--eval-every 0" in check["fix"]
    )


def test_too_few_tokens(tmp_path):
    data = shards(tmp_path, [("x_val_0.npy", 5000), ("x_train_1.npy", 100)])
    report = quiet(dataclasses.replace(SMOKE, data=data), tmp_path / "run")
    assert "shorter than one batch" in failed(report, "data")["detail"]
    assert statuses(report)["step"] == "skipped" and not report["passed"]


def test_out_of_memory_names_the_micro_batch_that_fits(tmp_path, monkeypatch):
    real_step = train_module.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if (
            batches[0][0].size(0) > 2
        ):  # as if a micro-batch of more than 2 sequences did not fit
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", small_memory)
    check = failed(quiet(SMOKE, tmp_path / "run"), "step")
    assert check["detail"] == "out of memory at micro-batch 4; 2 fits"
    assert (
        check["fix"]
        == "--batch-size 2 (gradient accumulation of 4 micro-steps keeps total_batch_size 256)"
    )


def test_an_unwritable_out(tmp_path):
    (tmp_path / "a_file").write_text("x")
    report = quiet(SMOKE, tmp_path / "a_file" / "run")
    check = failed(report, "checkpoint")
    assert (
        "cannot write to --out" in check["detail"] and "writable --out" in check["fix"]
    )
    assert "path" not in report  # the report could not be written there either


def test_a_checkpoint_that_does_not_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(
        checkpoint_module, "load_optimizer_state", lambda optimizer, state: None
    )  # moments lost
    check = failed(quiet(SMOKE, tmp_path / "run"), "checkpoint")
    assert "the steps after a resume compute losses" in check["detail"]


def test_a_run_at_work_in_out(tmp_path):
    with lock_directory(tmp_path / "run", "training run"):
        check = failed(quiet(SMOKE, tmp_path / "run"), "checkpoint")
    assert "is in use by another training run" in check["detail"]


def test_command_line_and_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2lib.preflight",
            "--preset",
            "smoke",
            "--out",
            str(tmp_path / "one"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith(
        "preflight passed"
    ), ok.stderr
    assert [line.split()[0] for line in ok.stdout.splitlines()[: len(CHECKS)]] == [
        "ok"
    ] * len(CHECKS)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "gpt2lib.preflight",
            "--preset",
            "smoke",
            "--out",
            str(tmp_path / "two"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("preflight passed") == 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2lib.preflight",
            "--preset",
            "smoke",
            "--batch-size",
            "0",
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: batch_size = 0 is not allowed: it must be at least 1, or auto (the "
        "largest that fits in memory) (--batch-size)"
    ]


def test_batch_size_auto_is_chosen_by_the_same_search_as_the_run(tmp_path, monkeypatch):
    real_step = train_module.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if batches[0][0].size(0) > 2:  # as if more than 2 sequences did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", small_memory)
    report = quiet(dataclasses.replace(SMOKE, batch_size="auto"), tmp_path / "run")
    check = next(c for c in report["checks"] if c["name"] == "precision")
    assert check["detail"] == "fp32; micro-batch 2 (auto: the largest that fits)"
    assert report["passed"] and report["config"]["batch_size"] == 2
