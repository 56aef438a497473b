"""The loggers of a run (gpt2lib.loggers): TensorBoard holds what log.jsonl holds, a
resume leaves each step once in every logger, only the main process logs, and W&B runs
offline here (no network, no API key: as in CI), continuing its run on resume."""

import json
import math
import socket
import struct
import sys
import time
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as PluginEventAccumulator,
)
from tensorboard.util import tensor_util

from gpt2lib.loggers import (
    NO_TENSORBOARD,
    NO_WANDB,
    WANDB_ID,
    Logger,
    Loggers,
    TensorBoardLogger,
    WandbLogger,
    open_loggers,
    wandb_mode,
)
from gpt2lib.rundir import RunDir, read_log
from gpt2lib.runtime import UserError

# What the trainer logs: training steps (an fp16 step that overflowed has no norm and a
# `skipped` flag), an evaluation, and a diverged step's NaN loss.
ENTRIES = [
    {
        "step": 0,
        "loss": 10.9,
        "lr": 6e-5,
        "norm": 3.5,
        "dt": 0.25,
        "tokens_per_s": 2048,
    },
    {
        "step": 1,
        "loss": 9.5,
        "lr": 1.2e-4,
        "norm": None,
        "scale": 32768.0,
        "skipped": True,
    },
    {"step": 2, "val_loss": 9.1, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.5},
    {
        "step": 2,
        "loss": 8.25,
        "lr": 1.8e-4,
        "norm": 2.0,
        "dt": 0.25,
        "tokens_per_s": 2048,
    },
    {"step": 3, "loss": math.nan, "lr": 2.4e-4, "norm": math.inf, "dt": 0.5},
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No W&B credentials and no W&B settings of the user's: W&B must choose offline.
    Its own files (settings, cache) go to a temporary home."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # absent
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    return home


def run_dir(path) -> RunDir:
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    run.claim()
    return run


def as_float32(value: float) -> float:
    "A value as an event file stores a scalar: a float32 (NaN stays NaN)."
    return float(np.float32(value))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def tensorboard_scalars(path) -> dict:
    "{(tag, step): value} of every scalar TensorBoard shows from the event files in path."
    events = EventAccumulator(str(path), size_guidance={SCALARS: 0}).Reload()
    found = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in found, f"{tag} twice at step {event.step}"
            found[tag, event.step] = event.value
    return found


def tensorboard_texts(path, tag="samples/text_summary") -> dict:
    """{step: text} of the samples TensorBoard shows. Read as its server reads (the
    plugin accumulator, which applies the purge mark to texts too: the older reader
    above purges only scalars, histograms, images and audio)."""
    events = PluginEventAccumulator(str(path), size_guidance={TENSORS: 0}).Reload()
    steps = [event.step for event in events.Tensors(tag)]
    assert len(steps) == len(set(steps)), f"samples twice at a step: {steps}"
    return {
        event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode()
        for event in events.Tensors(tag)
    }


def next_second():
    """TensorBoard reads a directory's event files in the order of their names, which
    begin with the second the file was opened and end with a counter of the process:
    two writers opened in the same second of one process (only a test does that) could
    be read in the wrong order once that counter passes 9."""
    time.sleep(1 - time.time() % 1)


def test_tensorboard_holds_the_scalars_of_the_jsonl_log(tmp_path):
    run = run_dir(tmp_path / "run")
    with open_loggers(run, 0, tensorboard=True) as loggers:
        assert [type(logger) for logger in loggers] == [RunDir, TensorBoardLogger]
        assert all(isinstance(logger, Logger) for logger in loggers)
        for entry in ENTRIES:
            loggers.log(entry)
        loggers.log_samples(3, ["To be, *or* not", "# not a heading\nsecond line"])
    # each number of the log (bools, None and strings aside) is one scalar, its key the
    # tag; the event file stores float32, so the log's value rounded to float32 exactly
    logged = {
        (key, entry["step"]): as_float32(value)
        for entry in read_log(run.log_path)
        for key, value in entry.items()
        if key != "step" and type(value) in (int, float)
    }
    assert ("loss", 3) in logged and math.isnan(logged["loss", 3])
    shown = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert shown.keys() == logged.keys()
    assert all(same(shown[key], logged[key]) for key in logged), (shown, logged)
    # the samples verbatim (indented: Markdown leaves a code block alone)
    text = tensorboard_texts(tmp_path / "run" / "tensorboard")[3]
    assert (
        "    To be, *or* not" in text and "    # not a heading\n    second line" in text
    )


def test_a_resumed_run_shows_each_step_once_with_the_values_of_the_resume(tmp_path):
    run = run_dir(tmp_path / "run")
    with open_loggers(run, 0, tensorboard=True) as loggers:
        for step in range(10):
            loggers.log({"step": step, "loss": 100.0 + step})
        loggers.log_samples(7, ["first attempt"])
    # the run stopped after step 9 and resumes from its checkpoint of step 5
    next_second()
    run.rewind(5)
    with open_loggers(run, 5, tensorboard=True) as loggers:
        for step in range(5, 10):
            loggers.log({"step": step, "loss": 200.0 + step})
        loggers.log_samples(7, ["the resume"])
    expected = {("loss", s): 100.0 + s if s < 5 else 200.0 + s for s in range(10)}
    assert tensorboard_scalars(tmp_path / "run" / "tensorboard") == expected
    assert [e["loss"] for e in read_log(run.log_path)] == [v for v in expected.values()]
    assert tensorboard_texts(tmp_path / "run" / "tensorboard") == {7: "    the resume"}


def test_only_the_main_process_logs(tmp_path, offline, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for run in (RunDir(out, main=False), RunDir(out)):
        loggers = open_loggers(
            run, 0, tensorboard=True, wandb_project="gpt2", config={}, main=False
        )
        assert loggers == []
        loggers.log({"step": 0, "loss": 1.0})
        loggers.log_samples(0, ["text"])
        loggers.close()
    assert list(out.iterdir()) == [] and capsys.readouterr().err == ""


def test_a_missing_package_is_one_line_that_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb: ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = run_dir(tmp_path / "run")
    for options, message in [
        (dict(tensorboard=True), NO_TENSORBOARD),
        (dict(wandb_project="gpt2"), NO_WANDB),
    ]:
        with pytest.raises(UserError) as err:
            open_loggers(run, 0, config={}, **options)
        assert str(err.value) == message and "\n" not in message
    assert message == "--wandb needs the wandb package: pip install 'gpt2lib[wandb]'"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


# A W&B run offline is a directory wandb/offline-run-TIME-ID holding run-ID.wandb, the
# records W&B would send: a leveldb-style log of protobuf `Record`s after a 7-byte header
# (":W&B", a magic number, a version). Each record is split in chunks that never cross a
# 32 KiB block, each chunk with a 7-byte header: checksum, length, type (1 full, 2 first,
# 3 middle, 4 last).
def wandb_records(data: bytes):
    from wandb.proto import wandb_internal_pb2

    pos, chunks, block = 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            return  # still being written
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def finished_records(path, seconds=60) -> list:
    """The records of a W&B run that has finished. `finish()` returns once W&B's
    service has the run's last record, which it may write to the file a moment later."""
    (file,) = path.glob("run-*.wandb")
    deadline = time.monotonic() + seconds
    while True:
        records = list(wandb_records(file.read_bytes()))
        if any(record.HasField("exit") for record in records):
            return records
        assert time.monotonic() < deadline, f"{file} has no exit record"
        time.sleep(0.1)


def wandb_segment(path) -> tuple:
    """(the run's id, its branch point (run, step) or None, {step: {key: value}}) of one
    offline W&B run directory."""
    run_id, branch, history = None, None, {}
    for record in finished_records(path):
        if record.HasField("run"):
            run_id = record.run.run_id
            if record.run.branch_point.run:
                point = record.run.branch_point
                branch = (point.run, point.metric, point.value)
        elif record.HasField("history"):
            # a table is several items under its key ("samples", "_type"): its name
            items = {
                item.key or item.nested_key[0]: json.loads(item.value_json)
                for item in record.history.item
            }
            history[items.pop("_step")] = {
                k: v for k, v in items.items() if not k.startswith("_")
            }
    return run_id, branch, history


def test_wandb_logs_offline_into_the_run_and_a_resume_rewinds_the_same_run(
    tmp_path, offline, capsys
):
    run = run_dir(tmp_path / "run")
    config = {"lr": 6e-4, "preset": "smoke"}
    with open_loggers(run, 0, wandb_project="gpt2", config=config) as loggers:
        assert [type(logger) for logger in loggers] == [RunDir, WandbLogger]
        for step in range(10):
            loggers.log({"step": step, "loss": 100.0 + step, "norm": None})
            if step == 4:
                loggers.log_samples(step, ["a sample"])
    err = capsys.readouterr().err
    assert "W&B logs offline (no W&B API key" in err
    assert f"wandb sync {tmp_path / 'run' / 'wandb'}/offline-run-*" in err
    run_id = (tmp_path / "run" / WANDB_ID).read_text().strip()
    # resumed from the checkpoint of step 5: the same W&B run, rewound to step 4
    run.rewind(5)
    with open_loggers(run, 5, wandb_project="gpt2", config=config) as loggers:
        for step in range(5, 10):
            loggers.log({"step": step, "loss": 200.0 + step})
    assert (tmp_path / "run" / WANDB_ID).read_text().strip() == run_id
    # offline-run-TIME-ID, or offline-run-TIME-ID-1 if both started in the same second
    first, resumed = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert wandb_segment(first)[:2] == (run_id, None)
    assert {s: h["loss"] for s, h in wandb_segment(first)[2].items()} == {
        s: 100.0 + s for s in range(10)
    }
    assert "samples" in wandb_segment(first)[2][4]
    assert wandb_segment(resumed) == (
        run_id,
        (run_id, "_step", 4.0),  # W&B keeps steps 0..4 and goes on at 5
        {s: {"loss": 200.0 + s} for s in range(5, 10)},
    )
    # a fresh run there (an earlier attempt failed before its first checkpoint): a new
    # W&B run, not the old one
    with open_loggers(run, 0, wandb_project="gpt2", config=config):
        pass
    assert (tmp_path / "run" / WANDB_ID).read_text().strip() != run_id


def test_wandb_goes_offline_without_a_key_or_a_route_to_the_server(
    tmp_path, offline, monkeypatch
):
    assert wandb_mode() == (
        "offline",
        "no W&B API key: run `wandb login`, or set WANDB_API_KEY",
    )
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        (offline / ".netrc").write_text(
            f"machine 127.0.0.1:{port} login user password {'k' * 40}\n"
        )
        assert wandb_mode() == ("online", "")  # `wandb login`'s key, server reachable
    # the server gone: nothing listens on that port any more
    mode, why = wandb_mode()
    assert mode == "offline" and why.startswith(f"127.0.0.1:{port} cannot be reached")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == (None, "")  # the user's choice, which W&B reads itself


def test_a_damaged_wandb_id_is_one_line_and_kept(tmp_path, offline):
    run = run_dir(tmp_path / "run")
    (tmp_path / "run" / WANDB_ID).write_text("../not an id?\n")
    with pytest.raises(UserError) as err:
        open_loggers(run, 5, wandb_project="gpt2", config={})
    assert str(err.value) == (
        f"{tmp_path / 'run' / WANDB_ID} does not hold a W&B run id: delete it to log "
        "to a new W&B run"
    )
    assert (tmp_path / "run" / WANDB_ID).read_text() == "../not an id?\n"
    assert not (tmp_path / "run" / "wandb").exists()


class FakeWandbError(Exception):
    pass


def fake_wandb(calls: list, rewind_refused: bool, last_step: int = 8):
    """A stand-in for the wandb package online, whose server has the run up to
    `last_step - 1` and refuses a rewind (a preview feature) if `rewind_refused`."""

    class Run:
        def __init__(self, id, starting_step):
            self.id, self.starting_step, self.logged = id, starting_step, []

        def log(self, values, step):
            self.logged.append(step)

        def finish(self):
            pass

    def init(**options):
        calls.append(options)
        if "resume_from" in options and rewind_refused:
            raise FakeWandbError("failed to rewind run: permission denied\n(details)")
        resumed = options.get("resume") == "allow"
        return Run(options.get("id", "fresh"), last_step if resumed else 0)

    module = types.ModuleType("wandb")
    module.init, module.Settings, module.Table = init, dict, lambda **table: table
    module.errors = types.SimpleNamespace(Error=FakeWandbError)
    return module


def test_where_wandb_refuses_the_rewind_the_run_goes_on_without_repeating_steps(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "online")
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls, rewind_refused=True))
    (tmp_path / WANDB_ID).write_text("abc123\n")
    logger = WandbLogger(tmp_path, "gpt2", "run", 5, {})
    assert calls[0]["resume_from"] == "abc123?_step=4"
    assert calls[1]["id"] == "abc123" and calls[1]["resume"] == "allow"
    assert (
        "warning: W&B cannot rewind run abc123 to step 4 (failed to rewind run: "
        in (capsys.readouterr().err)
    )
    for step in range(5, 10):
        logger.log({"step": step, "loss": 1.0})
    logger.log_samples(7, ["text"])
    # W&B has steps 0..7 from the first attempt (equal: a resume is exact)
    assert logger.run.logged == [8, 9]


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    module = fake_wandb([], rewind_refused=True)

    def refused(**options):
        raise FakeWandbError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(module, "init", refused)
    monkeypatch.setitem(sys.modules, "wandb", module)
    with pytest.raises(UserError) as err:
        WandbLogger(tmp_path, "gpt2", "run", 0, {})
    assert str(err.value) == (
        "W&B cannot start the run (No API key configured. Use `wandb login` to log "
        "in.): fix that, or set WANDB_MODE=offline"
    )
    assert not (tmp_path / WANDB_ID).exists()


def test_closing_closes_every_logger_even_after_a_failure():
    closed = []

    class Failing:
        def close(self, failed=False):
            closed.append("failing")
            raise OSError("disk full")

    class Fine:
        def close(self, failed=False):
            closed.append("fine")

    with pytest.raises(OSError, match="disk full"):
        Loggers([Fine(), Failing(), Fine()]).close()
    assert sorted(closed) == ["failing", "fine", "fine"]


def test_a_run_that_stops_on_an_error_is_marked_failed_in_wandb(tmp_path, offline):
    # W&B shows a run's outcome from its exit record: a crash must not read "finished"
    run = run_dir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="a bug"):
        with open_loggers(run, 0, wandb_project="gpt2") as loggers:
            loggers.log({"step": 0, "loss": 1.0})
            raise RuntimeError("a bug")
    crashed = (tmp_path / "run" / WANDB_ID).read_text().strip()
    run.rewind(0)
    with open_loggers(run, 0, wandb_project="gpt2") as loggers:  # a new W&B run
        loggers.log({"step": 0, "loss": 1.0})
    outcomes = {}
    for path in (tmp_path / "run" / "wandb").glob("offline-run-*"):
        records = finished_records(path)
        run_id = next(r.run.run_id for r in records if r.HasField("run"))
        outcomes[run_id] = next(r.exit.exit_code for r in records if r.HasField("exit"))
    assert outcomes.pop(crashed) == 1 and list(outcomes.values()) == [0]
