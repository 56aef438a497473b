"""The sample-efficiency ladder (chapter 11): its arithmetic against hand-computed values,
its rungs, its corpus, and the command end to end on a tiny size."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2lib.data import read_asset_text, tokenize
from gpt2lib.ladder import (
    RUNGS,
    SIZES,
    corpus_shards,
    main,
    mean_curve,
    rung_configs,
    summarise,
    tokens_to_reach,
)
from gpt2lib.modern import SWITCHES


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 10.0), (100, 8.0), (200, 6.0), (300, 5.0)]
    assert tokens_to_reach(curve, 7.0) == 150  # halfway from 8 to 6
    assert tokens_to_reach(curve, 5.5) == 250
    assert tokens_to_reach(curve, 6.0) == 200  # reached exactly at an evaluation
    assert tokens_to_reach(curve, 10.0) == 0
    assert tokens_to_reach(curve, 4.9) is None  # never
    assert (
        tokens_to_reach([(0, 9.0), (10, 7.0), (20, 8.0), (30, 6.0)], 7.5) == 7.5
    )  # the first crossing


def fake_run(finals, scale=1.0):
    return {
        "runs": [
            {"val": [[0, 10.0], [100, 10.0 - scale * (10.0 - f) / 2], [200, f]]}
            for f in finals
        ]
    }


def test_summary_is_mean_std_and_range_over_seeds_against_the_baselines_final_mean():
    result = {
        "rungs": [
            {"name": "gpt2", **fake_run([6.0, 6.2, 6.4])},
            {"name": "+x", **fake_run([5.0, 5.2, 5.3])},
            {"name": "+y", **fake_run([7.0, 7.1, 7.2])},
        ]
    }
    base, better, worse = summarise(result)
    assert base["target"] == pytest.approx(6.2) and base["val_loss"] == pytest.approx(
        6.2
    )
    assert base["std"] == pytest.approx(
        0.2
    )  # sample standard deviation of 6.0, 6.2, 6.4
    assert (better["min"], better["max"]) == (5.0, 5.3)
    # +x's mean curve: 10 -> 7.5833 (at 100) -> 5.1667 (at 200); it crosses 6.2 at
    # 100 + 100 * (7.5833 - 6.2) / (7.5833 - 5.1667)
    assert better["tokens_to_target"] == pytest.approx(
        100 + 100 * (7.58333 - 6.2) / (7.58333 - 5.16667), rel=1e-4
    )
    assert base["tokens_to_target"] == pytest.approx(200)
    assert (
        worse["tokens_to_target"] is None
        and worse["tokens_to_target_per_seed"] == [None] * 3
    )
    assert mean_curve(result["rungs"][0]["runs"])[-1] == [200, pytest.approx(6.2)]


def test_rungs_add_one_change_each_to_everything_before():
    configs = rung_configs(SIZES["tiny"])
    assert [name for name, _ in configs] == [name for name, _ in RUNGS]
    first, last = configs[0][1], configs[-1][1]
    assert (
        first == SIZES["tiny"] and first.arch == "gpt2" and first.optimizer == "adamw"
    )
    assert (
        last.arch == "modern"
        and last.optimizer == "muon"
        and all(getattr(last.model, s) for s in SWITCHES)
    )
    for (_, before), (name, after) in zip(configs, configs[1:]):
        changed = {
            name
            for name, value in after.settings().items()
            if value != before.settings()[name]
        }
        assert changed == set(dict(RUNGS)[name]) - {"arch"} or changed == set(
            dict(RUNGS)[name]
        ), name


def test_corpus_shards_renumber_the_same_tokens(tmp_path):
    V = corpus_shards(tmp_path)
    original = tokenize(read_asset_text("tinyshakespeare.txt"))
    used = np.unique(original)
    train, val = np.load(tmp_path / "train_000.npy"), np.load(tmp_path / "val_000.npy")
    assert V == len(used) and max(train.max(), val.max()) == V - 1
    assert np.array_equal(
        used[np.concatenate([train, val])], original
    )  # renumbering undone: the text
    assert len(val) == int(len(original) * 0.1)


def ladder(*args):
    return subprocess.run(
        [sys.executable, "-m", "gpt2lib.ladder", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_writes_curves_and_provenance(tmp_path):
    out = tmp_path / "ladder.json"
    result = ladder(
        "--size",
        "tiny",
        "--seeds",
        "2",
        "--rungs",
        "3",
        "--max-steps",
        "4",
        "--threads",
        "1",
        "--json",
        out,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {"command", "device", "torch", "commit", "date", "threads"} <= data.keys()
    assert data["command"].startswith(
        "python -m gpt2lib.ladder --size tiny --seeds 2 --rungs 3"
    )
    assert [r["name"] for r in data["rungs"]] == ["gpt2", "+rope", "+muon"]
    assert data["rungs"][2]["changes"] == {
        "arch": "modern",
        "rope": True,
        "optimizer": "muon",
    }
    for rung in data["rungs"]:
        assert [run["seed"] for run in rung["runs"]] == [0, 1]
        for run in rung["runs"]:
            assert [t for t, _ in run["val"]] == [
                0,
                4 * 128,
            ]  # evaluations at step 0 and the end
            assert len(run["train"]) == 4 and all(
                math.isfinite(loss) for _, loss in run["train"]
            )
    seeds = data["rungs"][0]["runs"]
    assert seeds[0]["val"][-1] != seeds[1]["val"][-1]  # the seeds are different runs
    assert data["base"]["vocab_size"] < 50257  # the renumbered corpus
    assert [row["rung"] for row in data["summary"]] == ["gpt2", "+rope", "+muon"]
    assert data["complete"] is True and data["missing"] == []
    assert "| gpt2 |" in result.stdout
    # the file is there now: a second ladder does not overwrite it without --force
    before = out.read_bytes()
    status = ladder_main("--size", "tiny", "--json", out)
    assert (
        status == f"error: --json {out} exists: pass --force to overwrite it (a "
        "ladder does not resume), or choose another file"
    )
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seeds", "0"], "--seeds 0"),
        (["--rungs", "9"], "--rungs 9"),
        (["--threads", "0"], "--threads 0"),
        (["--muon-lr", "5"], "muon_lr = 5.0 is not allowed"),
        (["--max-lr", "-1"], "max_lr = -1.0 is not allowed"),
    ],
)
def test_bad_input_is_one_line_before_any_run(tmp_path, args, fragment):
    result = ladder("--size", "tiny", "--json", tmp_path / "x.json", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "x.json").exists()


def ladder_main(*args):
    "Run the command in this process: (its exit status or error line, nothing else)."
    with pytest.raises(SystemExit) as exit:
        main(list(map(str, args)))
    return exit.value.code


@pytest.mark.parametrize("case", ["exists", "directory", "no parent", "read-only"])
def test_a_json_path_that_cannot_take_the_result_is_refused_before_any_run(
    tmp_path, case, monkeypatch
):
    target = {
        "exists": tmp_path / "old.json",
        "directory": tmp_path,
        "no parent": tmp_path / "missing" / "x.json",
        "read-only": tmp_path / "locked" / "x.json",
    }[case]
    if case == "exists":
        target.write_text("an earlier ladder")
    if case == "read-only":
        target.parent.mkdir()
        target.parent.chmod(0o500)
        if os.geteuid() == 0:  # root writes anywhere: the check is asked instead
            access = os.access
            monkeypatch.setattr(
                os,
                "access",
                lambda path, mode: access(path, mode) and Path(path) != target.parent,
            )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    status = ladder_main("--size", "tiny", "--json", target)
    assert isinstance(status, str) and status.startswith(f"error: --json {target}")
    assert "\n" not in status
    fragment = {
        "exists": "pass --force to overwrite it",
        "directory": "is a directory",
        "no parent": f"there is no directory {target.parent}",
        "read-only": f"cannot write to the directory {target.parent}",
    }[case]
    assert fragment in status, status
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "exists":
        assert target.read_text() == "an earlier ladder"


@pytest.mark.parametrize(
    "signum, status, wait_for, delay",
    [
        # after the first run: the signal lands in the second one's training (or
        # just before it), which is dropped
        (signal.SIGINT, 130, "seed 0:", 1.0),
        (signal.SIGTERM, 143, "seed 0:", 0.0),
        # in the first run: nothing finished, nothing is written
        (signal.SIGINT, 130, "precision:", 0.0),
    ],
)
def test_a_signal_stops_the_ladder_and_saves_only_finished_runs_marked_incomplete(
    tmp_path, signum, status, wait_for, delay
):
    out = tmp_path / "ladder.json"
    # a run of 240 steps takes seconds even on a fast, idle CPU (60 took about one,
    # and a second's delay let all four runs finish: exit 0 instead of the signal's)
    steps = 240
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2lib.ladder",
            *("--size", "tiny", "--seeds", "2", "--rungs", "2"),
            *("--max-steps", str(steps), "--threads", "1", "--json", str(out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or (wait_for not in lines[-1] and lines[-1]):
        lines.append(proc.stdout.readline())
    assert wait_for in lines[-1], (lines, proc.stderr.read())
    time.sleep(delay)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    finished = sum("seed " in line for line in lines + stdout.splitlines())
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    name = signal.Signals(signum).name
    assert stderr.startswith(f"{name}: the ladder stopped; ")
    assert "A ladder does not resume: rerun the command" in stderr
    if wait_for == "precision:":
        assert finished == 0 and not out.exists()
        assert f"no run had finished, {out} not written" in stderr
        return
    assert finished >= 1
    assert f"saved the {finished} of 4 runs that finished to {out}" in stderr
    assert "rerun the command with --force" in stderr
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["stopped_by"] == name
    assert "summary" not in data  # no verdict from part of a ladder
    runs = [(rung["name"], run) for rung in data["rungs"] for run in rung["runs"]]
    assert len(runs) == finished < 4
    done = [(name, run["seed"]) for name, run in runs]
    assert done == [("gpt2", 0), ("gpt2", 1), ("+rope", 0)][:finished]
    missing = [(m["rung"], s) for m in data["missing"] for s in m["seeds"]]
    assert sorted(done + missing) == sorted(
        (r, s) for r in ("gpt2", "+rope") for s in (0, 1)
    )
    for _, run in runs:  # every recorded run is whole: all its steps, its last eval
        assert len(run["train"]) == steps and run["val"][-1][0] == steps * 128
