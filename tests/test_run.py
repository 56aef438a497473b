"""The `Run` and the parts built around it: the precision decided once, the
checkpointer's `states`, and the preflight's list of checks."""

import dataclasses
import sys

import pytest
import torch

from gpt2lib import evaluations, runtime
from gpt2lib.checkpoint import Checkpointer
from gpt2lib.config import PRESETS
from gpt2lib.dist import DistEnv
from gpt2lib.evaluations import Evaluation
from gpt2lib.preflight import Check, Preflight, preflight, run_checks
from gpt2lib.run import build_run
from gpt2lib.rundir import read_log
from gpt2lib.train import train

SMOKE = PRESETS["smoke"]


def test_a_run_decides_its_precision_once(tmp_path, monkeypatch):
    """`choose_precision` is asked once for a whole run (the loop, the evaluations, the
    checkpointer and the scaler all read the `Run`'s `Precision`)."""
    asked = []
    real = runtime.choose_precision

    def counted(device, precision="auto"):
        asked.append(precision)
        return real(device, precision)

    monkeypatch.setattr(runtime, "choose_precision", counted)
    train(SMOKE, tmp_path / "run", device="cpu", progress=False)
    assert asked == ["auto"]
    # the micro-batch search of --batch-size auto tries in the run's precision too
    asked.clear()
    train(
        SMOKE.replace(batch_size="auto"),
        tmp_path / "auto",
        device="cpu",
        progress=False,
    )
    assert asked == ["auto"]


class Counter:
    "A made-up part of a run's state: what a new kind of state would be."

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def test_a_new_part_of_the_state_is_one_entry_of_states(tmp_path):
    """The checkpointer saves and restores whatever `states` it is given: a part added
    to a run's states round-trips with the model, optimizer and loader."""
    env = DistEnv()
    run = build_run(SMOKE, env, compile=False)
    run.take_step()
    saved = Checkpointer(tmp_path, SMOKE, env, run.states() | {"counter": Counter(7)})
    saved.save(run.step)
    fresh = build_run(SMOKE, env, compile=False)
    counter = Counter()
    restored = Checkpointer(tmp_path, SMOKE, env, fresh.states() | {"counter": counter})
    assert restored.restore(announce=False) == 1 and counter.n == 7
    # and the run's own parts: the next step is the same step
    assert fresh.loader.state_dict() == run.loader.state_dict()
    fresh.step = 1
    assert fresh.take_step().loss == run.take_step().loss  # exact: the same CPU math


def test_a_preflight_check_with_a_misspelt_need_is_an_error_not_a_skip(tmp_path):
    "A need that names no earlier check fails at once (it would skip its check forever)."
    pf = Preflight(SMOKE, DistEnv(), False, tmp_path)
    checks = (
        ("first", lambda pf: "fine", ()),
        ("second", lambda pf: "fine", ("frist",)),
    )
    with pytest.raises(ValueError, match=r"check second needs \['frist'\]"):
        run_checks(pf, checks, echo=lambda line: None)
    # spelt right, it runs; after a failure, it is skipped
    right = (checks[0], ("second", lambda pf: "fine", ("first",)))
    assert [c.status for c in run_checks(pf, right, echo=print)] == ["ok", "ok"]

    def fails(pf):
        raise runtime.UserError("no")

    failing = (("first", fails, ()), right[1])
    assert run_checks(pf, failing, echo=lambda line: None) == [
        Check("first", "failed", "no"),
        Check("second", "skipped", "an earlier check failed"),
    ]


class Toy(Evaluation):
    "A made-up evaluation: the number of the step it is called at, every 2 steps."

    name, every = "toy", "checkpoint_every"

    def __call__(self, run, step: int) -> dict:
        return {"toy": float(step)}


def test_an_evaluation_plugs_in_with_one_registration(tmp_path, monkeypatch):
    """A new evaluation is a class and a line in EVALUATIONS: the trainer logs it at its
    cadence, the preflight times it, and the estimate counts it, with no change to
    `train` or `preflight`."""
    monkeypatch.setattr(evaluations, "EVALUATIONS", [*evaluations.EVALUATIONS, Toy])
    cfg = SMOKE.replace(max_steps=5, checkpoint_every=2)
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    logged = [e for e in read_log(tmp_path / "run" / "log.jsonl") if "toy" in e]
    assert [(e["step"], e["toy"]) for e in logged] == [
        (s, float(s)) for s in (0, 2, 4, 5)
    ]
    report = preflight(cfg, tmp_path / "pre", device="cpu", echo=lambda line: None)
    assert report["passed"] and "toy" in report["measured"]["evaluation_s"]
    assert report["estimate"]["events"]["toy"] == 4
    toy_s = report["measured"]["evaluation_s"]["toy"]
    assert report["estimate"]["parts"]["toy"] == 4 * toy_s


def test_tensorboard_holds_the_logged_losses_once_after_a_resume(tmp_path):
    """TensorBoard's scalars, read back from its event files, are log.jsonl's losses,
    each step once after a run stopped at step 3 and resumed (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    run = tmp_path / "run"
    train(SMOKE, run, device="cpu", stop_after=3, progress=False, tensorboard=True)
    train(SMOKE, run, device="cpu", resume=True, progress=False, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = read_log(run / "log.jsonl")
    for key in ("loss", "val_loss"):
        board = [(e.step, e.value) for e in events.Scalars(key)]
        jsonl = [(e["step"], e[key]) for e in logged if key in e]
        steps = [step for step, _ in board]
        assert sorted(steps) == sorted(set(steps)), f"{key}: a step twice"
        # TensorBoard stores scalars as float32: each value rounded to 24 bits
        assert sorted(board) == [(s, pytest.approx(v, rel=2**-23)) for s, v in jsonl]


@pytest.mark.parametrize(
    "args, hidden, words",
    [
        (["--tensorboard"], "torch.utils.tensorboard", "pip install 'gpt2lib[tensorb"),
        (["--wandb", "proj"], "wandb", "pip install 'gpt2lib[wandb]'"),
        (["--wandb", " "], None, "--wandb is empty: give the W&B project"),
    ],
)
def test_a_logger_that_cannot_open_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, args, hidden, words
):
    "A missing package or an empty project: one line, exit 1, no --out made."
    from test_hostile import run

    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)  # import raises ImportError
    out = tmp_path / "run"
    status, message = run(
        "train",
        ["--preset", "smoke", "--out", out, "--device", "cpu", "--no-progress", *args],
        capsys,
    )
    assert status == 1 and words in message and "\n" not in message, message
    assert not out.exists()
