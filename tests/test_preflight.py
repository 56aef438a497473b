"""gpt2-preflight: every check passes on the smoke preset, and every failing check fails
with its reason and its fix (missing validation shard, too few tokens, out of memory, an
unwritable --out, a checkpoint that does not round-trip, a run already at work in
--out)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2lib.checkpoint as checkpoint_module
import gpt2lib.optim as optim
from gpt2lib.preflight import preflight
from gpt2lib.runtime import lock_directory
from gpt2lib.config import PRESETS
from gpt2lib.train import train

SMOKE = PRESETS["smoke"]
CHECKS = [
    "environment",
    "precision",
    "data",
    "evaluations",
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
    report = quiet(SMOKE.replace(max_steps=2000, warmup_steps=2), tmp_path / "run")
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
    check = failed(quiet(SMOKE.replace(data=data), tmp_path / "run"), "data")
    assert (
        "has no validation split" in check["detail"]
        and "--eval-every 0" in check["fix"]
    )


def test_too_few_tokens(tmp_path):
    data = shards(tmp_path, [("x_val_0.npy", 5000), ("x_train_1.npy", 100)])
    report = quiet(SMOKE.replace(data=data), tmp_path / "run")
    assert "shorter than one batch" in failed(report, "data")["detail"]
    assert statuses(report)["step"] == "skipped" and not report["passed"]


def test_out_of_memory_names_the_micro_batch_that_fits(tmp_path, monkeypatch):
    real_step = optim.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if (
            batches[0][0].size(0) > 2
        ):  # as if a micro-batch of more than 2 sequences did not fit
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(optim, "train_step", small_memory)
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
    real_step = optim.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if batches[0][0].size(0) > 2:  # as if more than 2 sequences did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(optim, "train_step", small_memory)
    report = quiet(SMOKE.replace(batch_size="auto"), tmp_path / "run")
    check = next(c for c in report["checks"] if c["name"] == "precision")
    assert check["detail"] == "fp32; micro-batch 2 (auto: the largest that fits)"
    assert report["passed"] and report["config"]["batch_size"] == 2


def test_a_report_that_timed_hellaswag_cold_is_restated_with_the_warm_time():
    "The committed H200 preflight timed HellaSwag's first call (compiling included)."
    from pathlib import Path

    from gpt2lib.preflight import restate_hellaswag

    results = Path(__file__).resolve().parent.parent / "book" / "results"
    report = json.loads((results / "preflight-h200-gpt2-124m.json").read_text())
    warm = json.loads((results / "hellaswag-h200.json").read_text())
    restated = restate_hellaswag(report, warm)
    # by hand: the report's 19,073 // 250 + 1 evaluations of HellaSwag's 10,042
    # examples, each at the batched pass's time instead of the first call's
    batched = next(r for r in warm["runs"] if r["max_tokens"] == 64 * 1024)
    cold, hot = report["measured"]["hellaswag_s_per_example"], 0.18645254799997701 / 400
    assert batched["seconds"] / batched["examples"] == pytest.approx(hot)
    assert (restated["evaluations"], restated["examples"]) == (77, 10042)
    assert restated["cold_s"] == cold and restated["warm_s"] == pytest.approx(hot)
    assert restated["seconds"] == pytest.approx(
        report["estimate"]["seconds"] - 77 * 10042 * (cold - hot)
    )
    assert 5.8 * 3600 < restated["seconds"] < 5.9 * 3600  # 7 h 02 min -> 5 h 50 min
    # a report timed warm, or no warm figure of its GPU: nothing to restate
    timed_warm = {**report, "measured": {**report["measured"], "hellaswag_warm": True}}
    assert restate_hellaswag(timed_warm, warm) is None
    assert restate_hellaswag(report, {**warm, "device": "NVIDIA H100"}) is None
    assert restate_hellaswag(report, None) is None


def test_the_estimate_counts_what_the_training_loop_does(tmp_path):
    """A run of 7 steps that validates every 3, samples every 2 and saves every 7: its
    validation entries, sample sets and checkpoints are the `run_events` that the
    estimate multiplies (the end evaluates, samples and saves once more)."""
    from gpt2lib.checkpoint import checkpoint_step, list_checkpoints
    from gpt2lib.rundir import read_log
    from gpt2lib.evaluations import run_events

    cfg = SMOKE.replace(max_steps=7, eval_every=3, sample_every=2, checkpoint_every=7)
    train(cfg, tmp_path, device="cpu", progress=False)
    evaluated = [e["step"] for e in read_log(tmp_path / "log.jsonl") if "val_loss" in e]
    sampled = [e["step"] for e in read_log(tmp_path / "samples.jsonl")]
    saved = [checkpoint_step(p) for p in list_checkpoints(tmp_path)]
    assert (evaluated, sampled, saved) == ([0, 3, 6, 7], [2, 4, 6, 7], [7])
    assert run_events(cfg) == {
        "val_loss": 4,
        "hellaswag": 0,  # off
        "samples": 4,
        "checkpoints": 1,
    }


def test_the_estimate_adds_up_every_term_by_hand():
    "A made-up measurement of 8 GPUs, each part of the estimate computed by hand."
    from gpt2lib.preflight import run_time

    measured = {
        "step_s": 0.25,
        "first_step_s": 40.0,
        # a validation pass; HellaSwag's 10,042 examples at 0.004 s each, 10,042 / 8
        # on each rank (`HellaSwag.trial` scales so); a set of samples
        "evaluation_s": {"val_loss": 20.0, "hellaswag": 5.021, "samples": 0.5},
        "save_s": 3.0,
    }
    # gpt2-124m, 19,073 steps: evaluations at steps 0, 250, ..., 19,000 (77) and at
    # the end (78); samples at 250, ..., 19,000 (76) and at the end (77); checkpoints
    # after 5,000, 10,000, 15,000 and 19,073 (4).
    full = run_time(PRESETS["gpt2-124m"], measured)
    assert full["events"] == {
        "val_loss": 78,
        "hellaswag": 78,
        "samples": 77,
        "checkpoints": 4,
    }
    by_hand = {
        "steps": 4768.25,  # 19,073 × 0.25
        "val_loss": 1560.0,  # 78 × 20
        "hellaswag": 391.638,  # 78 × 5.021
        "samples": 38.5,  # 77 × 0.5
        "checkpoints": 12.0,  # 4 × 3
        "start-up": 40.0,
    }
    # about ten float64 operations, each off by at most 2**-53 of its result
    assert full["parts"] == pytest.approx(by_hand, rel=1e-12)
    assert full["seconds"] == pytest.approx(6810.388, rel=1e-12)
    # the speedrun, 5,000 steps: evaluations at 0, 125, ..., 4,875 (40) and the end
    # (41); samples at 1,000, ..., 4,000 and the end (5); checkpoints after 1,000,
    # ..., 5,000 (5: the last is one of them)
    fast = run_time(PRESETS["gpt2-124m-speedrun"], measured)
    assert fast["events"] == {
        "val_loss": 41,
        "hellaswag": 41,
        "samples": 5,
        "checkpoints": 5,
    }
    assert fast["parts"] == pytest.approx(
        {
            "steps": 1250.0,  # 5,000 × 0.25
            "val_loss": 820.0,  # 41 × 20
            "hellaswag": 205.861,  # 41 × 5.021
            "samples": 2.5,
            "checkpoints": 15.0,
            "start-up": 40.0,
        },
        rel=1e-12,  # as above
    )
    # no validation split and no HellaSwag: the evaluations cost nothing
    bare = {**measured, "evaluation_s": {"samples": 0.5}}
    assert set(run_time(PRESETS["gpt2-124m"], bare)["parts"]) == {
        "steps",
        "samples",
        "checkpoints",
        "start-up",
    }


def test_mfu_is_per_gpu_by_hand():
    """524,288 tokens in 0.25 s on 8 GPUs of 1,000 TFLOP/s, at a made-up 1e9 FLOPs per
    token: 2,097,152 tokens/s, 262,144 per GPU, 2.62144e14 FLOP/s of 1e15."""
    from gpt2lib.preflight import step_rates

    tokens_per_s, mfu = step_rates(524288, 0.25, 8, 1e9, 1000.0)
    assert tokens_per_s == 2097152.0  # exact: a power of two divides it
    assert mfu == pytest.approx(0.262144, rel=1e-12)  # three float64 operations
    assert step_rates(524288, 0.25, 8, 1e9, None) == (2097152.0, None)


def test_hellaswag_is_timed_per_example_on_one_rank(monkeypatch):
    """On 2 ranks, rank 0 scores examples 0, 2 and 4 of a trial of 5: at a made-up
    0.5 s each, 1.5 s, which is 0.5 s per example of its share (not 0.3 s, per example
    of all); the whole set of 7 takes 3.5 examples' time on each rank: 1.75 s."""
    from types import SimpleNamespace

    import gpt2lib.evaluations as evaluations_module
    import gpt2lib.preflight as preflight_module
    from gpt2lib.dist import DistEnv
    from gpt2lib.evaluations import HellaSwag

    clock = [0.0]

    def score(model, examples, device, autocast, rank, world_size, **kwargs):
        clock[0] += 0.5 * len(examples[rank::world_size])
        return {"n": len(examples), "acc": 0.0, "acc_norm": 0.0}

    monkeypatch.setattr(evaluations_module, "evaluate_hellaswag", score)
    monkeypatch.setattr(
        preflight_module, "time", SimpleNamespace(perf_counter=lambda: clock[0])
    )
    env = DistEnv(world_size=2)
    run = SimpleNamespace(model=None, env=env, precision=SimpleNamespace(autocast=None))
    pf = preflight_module.Preflight(SMOKE, env, False, Path("."), hellaswag_examples=5)
    pf.run = run
    _, seconds = preflight_module.time_evaluation(pf, HellaSwag(SMOKE, [{}] * 7))
    assert seconds == 1.75  # exact: 1.5 / 3 × 3.5, binary halves
