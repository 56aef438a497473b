"""`gpt2lib.train --compile`: trains compiled, and still validates and samples correctly
(chapter 4)."""

import pytest

from gpt2lib.config import PRESETS

from gpt2lib.train import train
from gpt2lib.rundir import read_log

SMOKE = PRESETS["smoke"]


def log(out):
    entries = read_log(out / "log.jsonl")
    return [e["loss"] for e in entries if "loss" in e], [
        e["val_loss"] for e in entries if "val_loss" in e
    ]


def test_compiled_training_matches_eager(tmp_path):
    eager = train(SMOKE, tmp_path / "eager", device="cpu", progress=False)
    compiled = train(
        SMOKE, tmp_path / "compiled", device="cpu", compile=True, progress=False
    )
    (loss_e, val_e), (loss_c, val_c) = (
        log(tmp_path / "eager"),
        log(tmp_path / "compiled"),
    )
    assert (
        len(loss_c) == SMOKE.max_steps and len(val_c) == len(val_e) == 3
    )  # validated at steps 0, 3, 6
    assert loss_c == pytest.approx(
        loss_e, abs=1e-4
    )  # fused kernels round differently, nothing more
    assert val_c == pytest.approx(val_e, abs=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)
    # samples come from the uncompiled module, which shares the trained weights
    assert len(compiled["samples"]) == SMOKE.num_samples
    assert all(
        s.startswith(SMOKE.sample_prompt) and len(s) > len(SMOKE.sample_prompt)
        for s in compiled["samples"]
    )
