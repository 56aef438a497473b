"""tools/gpu_check.sh, which measures the GPU results under book/results/, tried on the
CPU in its small setting: every stage runs and writes what the chapters read."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_writes_every_result_the_chapters_read(tmp_path):
    out, scratch = tmp_path / "results", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "TMPDIR": str(scratch)}
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out), "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for preset in ("gpt2-124m", "gpt2-124m-speedrun"):
        report = json.loads((out / f"preflight-cpu-{preset}.json").read_text())
        assert report["passed"] and report["estimate"]["seconds"] > 0
    bench = json.loads((out / "bench-cpu.json").read_text())
    assert any(r["status"] == "ran" for r in bench["rungs"])
    alone, together = json.loads((out / "hellaswag-cpu.json").read_text())["runs"]
    assert alone["max_tokens"] == 1 and together["max_tokens"] > 1
    assert (alone["correct"], alone["correct_norm"]) == (
        together["correct"],
        together["correct_norm"],
    )
    log = (out / "gpu_check-cpu.log").read_text()
    assert log.count(": exit 0 after") == 4  # both preflights, HellaSwag, the ladder
    # its stand-in data is gone with it
    assert not [
        p for p in Path(os.environ["TMPDIR"]).iterdir() if p.name.startswith("tmp")
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out), "h100"],
        env={k: v for k, v in os.environ.items() if k != "GPU_CHECK_SMALL"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA GPU here: run this on a GPU machine, or set GPU_CHECK_SMALL=1 "
        "to try the script on a CPU"
    ]
    assert not out.exists()
