import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt2lib import checkpoint
from gpt2lib.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    load_model,
    save_checkpoint,
)
from gpt2lib.data import DataLoader
from gpt2lib.evaluate import validation_loss
from gpt2lib.config import PRESETS
from gpt2lib.train import train
from gpt2lib.rundir import read_log
from gpt2lib.runtime import Precision, UserError

SMOKE = PRESETS["smoke"]
FP32 = Precision.of("cpu", "fp32")  # the micro-batch search's, where a test decides


def losses(out):
    entries = read_log(out / "log.jsonl")
    return [e["loss"] for e in entries if "loss" in e], [
        e["val_loss"] for e in entries if "val_loss" in e
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    "The smoke preset's 6 steps in one go."
    out = tmp_path_factory.mktemp("straight")
    summary = train(SMOKE, out, device="cpu", progress=False)
    return out, summary


def test_log_has_the_promised_fields(straight):
    out, summary = straight
    entries = read_log(out / "log.jsonl")
    steps = [e for e in entries if "loss" in e]
    assert [e["step"] for e in steps] == list(range(SMOKE.max_steps))
    assert all(
        {"step", "loss", "lr", "norm", "dt", "tokens_per_s"} <= e.keys() for e in steps
    )
    assert [e["step"] for e in entries if "val_loss" in e] == [0, 3, 6]
    assert summary["finished"] and summary["val_loss"] == entries[-1]["val_loss"]
    assert len(summary["samples"]) == SMOKE.num_samples
    assert all(s.startswith(SMOKE.sample_prompt) for s in summary["samples"])


def test_stop_and_resume_give_identical_losses(straight, tmp_path):
    out, _ = straight
    first = train(SMOKE, tmp_path, device="cpu", stop_after=3, progress=False)
    assert first == {
        "steps": 3,
        "finished": False,
        "precision": "fp32",  # what "auto" chose on the CPU
        "batch_size": SMOKE.batch_size,
    }
    train(SMOKE, tmp_path, device="cpu", resume=True, progress=False)
    assert losses(tmp_path) == losses(out)  # exactly equal, not approximately


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    straight, tmp_path, capsys
):
    out, _ = straight
    train(SMOKE, tmp_path, device="cpu", progress=False)  # checkpoints at steps 3 and 6
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(
        newest.read_bytes()[:1000]
    )  # truncated, as by a crash during a copy
    state, path = load_latest_checkpoint(tmp_path)
    assert state["step"] == 3 and "cannot be used" in capsys.readouterr().err
    train(
        SMOKE, tmp_path, device="cpu", resume=True, progress=False
    )  # redoes steps 3-5
    assert losses(tmp_path) == losses(out)


def test_no_readable_checkpoint_is_an_error(tmp_path):
    (tmp_path / "ckpt_0000003.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 1 checkpoints"):
        load_latest_checkpoint(tmp_path)


def test_checkpoint_is_atomic_and_old_ones_survive_a_failed_write(
    tmp_path, monkeypatch
):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(3)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0000003.pt",
        "ckpt_0000004.pt",
    ]

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, {"step": 5}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_0000003.pt",
        "ckpt_0000004.pt",
    ]


def test_checkpoint_holds_the_whole_state_and_loads_weights_only(straight):
    out, _ = straight
    path = list_checkpoints(out)[-1]
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "loader", "step", "config", "rng"} <= state.keys()
    assert state["config"] == SMOKE.settings() and state["step"] == SMOKE.max_steps


def test_resume_with_another_config_is_refused(straight, tmp_path):
    train(SMOKE, tmp_path, device="cpu", stop_after=3, progress=False)
    with pytest.raises(ValueError, match="different settings \\(max_lr\\)"):
        train(
            SMOKE.replace(max_lr=1.0),
            tmp_path,
            device="cpu",
            resume=True,
            progress=False,
        )


def test_existing_checkpoints_need_resume(tmp_path):
    train(SMOKE, tmp_path, device="cpu", stop_after=3, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(SMOKE, tmp_path, device="cpu", progress=False)


def cli(*args, cwd=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2lib.train",
            "--no-progress",
            "--device",
            "cpu",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_smoke_run(tmp_path):
    result = cli(
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--n-layer",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "validation loss:" in result.stdout and "ROMEO:" in result.stdout
    assert (
        torch.load(list_checkpoints(tmp_path / "run")[-1], weights_only=True)["config"][
            "n_layer"
        ]
        == 1
    )


def one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_unknown_preset():
    one_line_error(
        cli("--preset", "gpt5"),
        "invalid choice: 'gpt5'",
        "gpt2-124m",
        "shakespeare",
        "smoke",
    )


def test_cli_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(
        cli("--preset", "smoke", "--out", str(tmp_path / "file" / "run")),
        "cannot write to --out",
    )


def test_cli_budget_not_divisible(tmp_path):
    one_line_error(
        cli("--preset", "smoke", "--out", str(tmp_path), "--total-batch-size", "1000"),
        "total_batch_size = 1000 is not allowed",
        "multiple of batch_size × block_size",
    )


def test_cli_data_shorter_than_a_batch(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(50, dtype=np.uint16))
    one_line_error(
        cli(
            "--preset",
            "smoke",
            "--out",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "tokens.npy"),
        ),
        "shorter than one batch",
    )


def test_cli_wrong_token_dtype(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(5000, dtype=np.int64))
    one_line_error(
        cli(
            "--preset",
            "smoke",
            "--out",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "tokens.npy"),
        ),
        "must be a 1-D uint16 array, got 1-D int64",
    )


def test_cli_gpt2_124m_without_fineweb(tmp_path):
    one_line_error(
        cli("--preset", "gpt2-124m", "--out", str(tmp_path / "run"), cwd=tmp_path),
        "no training data at data/fineweb10B",
        "gpt2lib.fineweb",
    )


def test_training_on_token_shards(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "shard_val_000.npy", rng.integers(0, 50257, 3000, dtype=np.uint16))
    np.save(data / "shard_train_001.npy", rng.integers(0, 50257, 5000, dtype=np.uint16))
    np.save(data / "shard_train_002.npy", rng.integers(0, 50257, 5000, dtype=np.uint16))
    cfg = SMOKE.replace(data=str(data))
    summary = train(cfg, tmp_path / "run", device="cpu", progress=False)
    # the final validation loss is the validation shard's, computed with the final
    # weights
    model, _ = load_model(str(tmp_path / "run"))
    loader = DataLoader(
        [data / "shard_val_000.npy"], cfg.batch_size, cfg.model.block_size
    )
    assert summary["finished"] and summary["val_loss"] == validation_loss(
        model, loader, cfg.eval_batches, "cpu"
    )
    # and training read the training shards: its first batch is the start of one of them
    first = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=True)[
        "loader"
    ]
    assert first["n_sources"] == 2


def test_hellaswag_during_training_equals_chapter_8s_evaluation(tmp_path):
    from importlib.resources import files

    from gpt2lib.checkpoint import load_model
    from gpt2lib.evaluate import evaluate_hellaswag, read_hellaswag

    path = str(files("gpt2lib") / "assets" / "hellaswag_handmade.jsonl")
    cfg = SMOKE.replace(hellaswag=path, hellaswag_limit=4)
    summary = train(cfg, tmp_path, device="cpu", progress=False)
    evals = [e for e in read_log(tmp_path / "log.jsonl") if "hellaswag_acc" in e]
    assert [e["step"] for e in evals] == [0, 3, 6] and all(
        "val_loss" in e for e in evals
    )
    model, _ = load_model(str(tmp_path), "cpu")  # the final checkpoint
    expected = evaluate_hellaswag(
        model, read_hellaswag(path)[:4], "cpu", progress=False
    )
    assert (summary["hellaswag_acc"], summary["hellaswag_acc_norm"]) == (
        expected["acc"],
        expected["acc_norm"],
    )


def test_missing_hellaswag_file_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "gpt2lib.train",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "run"),
        "--hellaswag",
        str(tmp_path / "nope.jsonl"),
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert (
        result.returncode == 1
        and "error:" in result.stderr
        and "nope.jsonl" in result.stderr
    )
    assert "Traceback" not in result.stderr and not list_checkpoints(tmp_path / "run")


def test_fineweb_preset_without_shards_says_what_to_run(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "gpt2lib.train",
        "--preset",
        "gpt2-124m",
        "--out",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "fineweb"),
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert (
        result.returncode == 1
        and f"python -m gpt2lib.fineweb --out {tmp_path / 'fineweb'}" in result.stderr
    )


def test_the_micro_batch_search_tries_the_divisors_of_the_budget_largest_first():
    from gpt2lib.dist import DistEnv
    from gpt2lib.memory import (
        CPU_AUTO_LIMIT,
        largest_micro_batch,
        micro_batch_candidates,
    )

    # 256 tokens of 32: 8 sequences per step, in micro-batches of 8, 4, 2 or 1
    assert micro_batch_candidates(SMOKE, 1) == [8, 4, 2, 1]
    assert micro_batch_candidates(SMOKE, 2) == [4, 2, 1]
    assert micro_batch_candidates(SMOKE, 1, below=4) == [2, 1]
    big = SMOKE.replace(total_batch_size=32 * 96)
    assert micro_batch_candidates(big, 1)[:4] == [96, 48, 32, 24]
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 5

    assert largest_micro_batch(SMOKE, DistEnv(), FP32, fits=fits) == 4 and tried == [
        8,
        4,
    ]
    # off a GPU: none above the limit is tried
    tried.clear()
    assert largest_micro_batch(
        big, DistEnv(), FP32, fits=lambda b: tried.append(b) or 1
    )
    assert max(tried) <= CPU_AUTO_LIMIT
    assert largest_micro_batch(SMOKE, DistEnv(), FP32, fits=lambda b: False) is None


@pytest.mark.parametrize("world_size", [2, 8])
def test_the_micro_batch_divides_the_budget_on_every_rank(world_size):
    """A budget of 120 sequences of 1,024 tokens: one process may take micro-batches
    of 8, but 8 on each of 2 ranks (16) or 8 ranks (64) do not divide 120. Under a
    made-up memory limit of 9 sequences, 2 ranks take 6 (60 each, 10 micro-steps) and
    8 ranks take 5 (15 each, 3 micro-steps); under every limit, the largest that
    divides and fits."""
    from gpt2lib.dist import DistEnv
    from gpt2lib.memory import largest_micro_batch

    cfg = PRESETS["gpt2-124m"].replace(total_batch_size=120 * 1024)
    env = DistEnv(world_size=world_size, device="cuda")  # `fits` decides: no GPU used
    assert (
        largest_micro_batch(cfg, env, FP32, fits=lambda b: b <= 9)
        == {2: 6, 8: 5}[world_size]
    )
    for limit in range(1, 122):
        chosen = largest_micro_batch(cfg, env, FP32, fits=lambda b: b <= limit)
        assert cfg.total_batch_size % (chosen * world_size * cfg.model.block_size) == 0
        # by hand: every micro-batch of at most `limit` whose ranks divide the 120
        assert chosen == max(
            b for b in range(1, limit + 1) if 120 % (b * world_size) == 0
        ), limit


def test_batch_size_auto_keeps_the_budget_by_accumulation(
    straight, tmp_path, monkeypatch
):
    """On out of memory above 2 sequences, "auto" trains with micro-batches of 2 and 4
    micro-steps: the same steps as the smoke preset's 4 × 2, up to fp32 rounding of
    the other order of summation (bench's fp32 tolerance, 1e-5 of the loss)."""
    from gpt2lib import optim

    real_step = optim.train_step

    def small_memory(model, optimizer, batches, *args, **kwargs):
        if batches[0][0].size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(optim, "train_step", small_memory)
    auto = SMOKE.replace(batch_size="auto")
    summary = train(auto, tmp_path, device="cpu", progress=False)
    assert summary["batch_size"] == 2
    assert (
        checkpoint.read_checkpoint(list_checkpoints(tmp_path)[-1])["config"][
            "batch_size"
        ]
        == 2
    )  # what ran, so that --resume compares like with like
    for a, b in zip(losses(tmp_path)[0], losses(straight[0])[0]):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)


def test_a_resumed_call_says_how_many_steps_it_ran(capsys):
    # "done: 130 steps in 2.0 min" after a --resume that ran 110 of them read as if
    # the call had trained the whole run in that time
    from gpt2lib.cli import report_training

    fresh = {"finished": True, "steps": 130, "samples": [], "resumed_from_step": 0}
    assert report_training(fresh, "runs/x", 2.0) == 0
    assert capsys.readouterr().out == "done: 130 steps in 2.0 min; output in runs/x/\n"
    resumed = {**fresh, "resumed_from_step": 20}
    assert report_training(resumed, "runs/x", 2.0) == 0
    assert capsys.readouterr().out == (
        "done: 130 steps, the last 110 in this call, in 2.0 min; output in runs/x/\n"
    )
