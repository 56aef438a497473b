"""Resuming on another device: checkpoints are read onto the CPU, the optimizer runs as
this machine runs it, and a process saves and restores the random state of its own GPU
only."""

import copy
import dataclasses

import pytest
import torch

from gpt2lib import checkpoint
from gpt2lib.checkpoint import (
    Checkpointer,
    list_checkpoints,
    load_optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpt2lib.dist import DistEnv
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.optim import configure_optimizer
from gpt2lib.rundir import read_log
from gpt2lib.config import PRESETS
from gpt2lib.train import train

SMOKE = PRESETS["smoke"]
TINY = GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16)


def test_checkpoints_are_only_ever_read_onto_the_cpu(tmp_path, monkeypatch):
    """A checkpoint read onto a GPU puts the saved RNG states and the loader's position
    there, where torch.set_rng_state and NumPy fail: every read of the resume path must
    ask for the CPU."""
    train(SMOKE, tmp_path, device="cpu", stop_after=3, progress=False)
    asked, real_load = [], torch.load

    def spy(*args, **kwargs):
        asked.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    train(SMOKE, tmp_path, device="cpu", resume=True, progress=False)
    checkpoint.load_model(str(tmp_path))  # what evaluate, sample and export_hf read
    assert asked and set(asked) == {"cpu"}


def test_restoring_random_states_does_not_care_where_the_tensors_are():
    state = rng_state("cpu")
    expected = torch.rand(3)
    state = {**state, "torch": state["torch"].clone(), "numpy": list(state["numpy"])}
    set_rng_state(state, "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_a_process_saves_and_restores_only_its_own_gpu(monkeypatch):
    """Without a GPU: torch.cuda's RNG functions are stood in for, to see which ones are
    called."""
    saved, restored = [], []
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device: saved.append(device) or torch.arange(4).byte(),
    )
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU")
    )
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state",
        lambda s, device: restored.append((s.device.type, device)),
    )
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state_all",
        lambda states: pytest.fail("restored every visible GPU"),
    )
    state = rng_state("cuda:1")
    assert saved == ["cuda:1"] and torch.equal(state["cuda"], torch.arange(4).byte())
    set_rng_state(
        state, "cuda:0"
    )  # resumed by a process on another GPU, or on a machine with fewer
    set_rng_state(
        {**state, "cuda": [torch.zeros(4).byte()] * 8}, "cuda:0"
    )  # a 0.1 checkpoint: 8 GPUs' states
    assert restored == [("cpu", "cuda:0"), ("cpu", "cuda:0")]
    set_rng_state(
        state, "cpu"
    )  # a GPU checkpoint resumed on a CPU: the GPU state is not needed
    assert len(restored) == 2


@pytest.mark.parametrize("saved_fused, live_fused", [(False, True), (True, False)])
def test_the_machine_not_the_checkpoint_decides_fused_adamw(saved_fused, live_fused):
    torch.manual_seed(0)
    x, y = torch.randint(0, TINY.vocab_size, (2, 2, 16))
    model = GPT(TINY)
    opt = configure_optimizer(model, 1e-3, fused=saved_fused)
    opt.zero_grad()
    model(x, y)[1].backward()
    opt.step()
    state = copy.deepcopy(
        opt.state_dict()
    )  # as read from a checkpoint: no tensor shared with `opt`

    plain = configure_optimizer(model, 1e-3, fused=live_fused)
    plain.load_state_dict(copy.deepcopy(state))
    assert (
        plain.param_groups[0]["fused"] is saved_fused
    )  # what torch does: the checkpoint's choice wins

    resumed_model = GPT(TINY)
    resumed_model.load_state_dict(model.state_dict())
    resumed = configure_optimizer(resumed_model, 1e-3, fused=live_fused)
    load_optimizer_state(resumed, copy.deepcopy(state))
    assert all(g["fused"] is live_fused for g in resumed.param_groups)
    assert resumed.state_dict()["state"][0]["exp_avg"].equal(
        state["state"][0]["exp_avg"]
    )
    for m, o in (
        (model, opt),
        (resumed_model, resumed),
    ):  # the next step runs, and does the same
        o.zero_grad()
        m(x, y)[1].backward()
        o.step()
    a, b = (
        torch.cat([p.detach().flatten() for p in m.parameters()])
        for m in (model, resumed_model)
    )
    assert (
        a - b
    ).norm() / a.norm() < 1e-5  # fused and standard round differently (see test_bench)


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    model = GPT(TINY)
    opt = configure_optimizer(model)
    ckpt = Checkpointer(tmp_path, SMOKE, DistEnv(), {"model": model, "optimizer": opt})
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match="not saving step 7: the weights are not finite; no checkpoint was written",
    ):
        ckpt.save(7)
    assert list_checkpoints(tmp_path) == []


def test_keeping_no_checkpoint_is_refused_before_anything_is_deleted(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1})
    with pytest.raises(ValueError, match="keep must be at least 1"):
        save_checkpoint(tmp_path, 2, {"step": 2}, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000001.pt"]


def test_a_resumed_run_rewrites_its_log_up_to_the_checkpoint(tmp_path):
    straight = tmp_path / "straight"
    train(SMOKE, straight, device="cpu", progress=False)
    run = tmp_path / "run"
    train(
        SMOKE.replace(checkpoint_every=2),
        run,
        device="cpu",
        stop_after=3,
        progress=False,
    )
    # the log has steps 0-2, the newest checkpoint is after step 3; corrupt that
    # one: resume from step 2
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(ValueError, match="different settings \\(checkpoint_every\\)"):
        train(SMOKE, run, device="cpu", resume=True, progress=False)
    train(
        SMOKE.replace(checkpoint_every=2),
        run,
        device="cpu",
        resume=True,
        progress=False,
    )
    steps = [e["step"] for e in read_log(run / "log.jsonl") if "loss" in e]
    assert steps == list(range(SMOKE.max_steps))  # step 2 once, not twice
    assert [e["loss"] for e in read_log(run / "log.jsonl") if "loss" in e] == [
        e["loss"] for e in read_log(straight / "log.jsonl") if "loss" in e
    ]


def test_an_fp16_run_resumes_bit_for_bit_with_its_gradient_scale(tmp_path, monkeypatch):
    """fp16 autocast with its gradient scaler, on the CPU: the scale is part of the
    state. A scaler that grows every step (GradScaler's default waits 2,000) makes the
    scale of step 3 differ from a fresh scaler's, so a resume that forgot it would log
    another scale (and, once a gradient overflows, skip other steps)."""
    from gpt2lib import runtime

    monkeypatch.setattr(
        runtime,
        "grad_scaler",
        lambda device, chosen: torch.amp.GradScaler(
            "cpu", enabled=chosen == "fp16", growth_interval=1
        ),
    )
    fp16 = SMOKE.replace(precision="fp16")

    def steps(run):
        return [
            (e["step"], e["loss"], e["norm"], e["scale"])
            for e in read_log(run / "log.jsonl")
            if "loss" in e
        ]

    train(fp16, tmp_path / "straight", device="cpu", progress=False)
    run = tmp_path / "run"
    train(fp16, run, device="cpu", stop_after=3, progress=False)
    saved = checkpoint.read_checkpoint(list_checkpoints(run)[-1])
    # the scale for step 3 (logged after step 2's update), grown from 2**16
    assert saved["scaler"]["scale"] == steps(run)[-1][3] > 2.0**16
    train(fp16, run, device="cpu", resume=True, progress=False)
    assert steps(run) == steps(tmp_path / "straight")
    assert len({scale for *_, scale in steps(run)}) > 1  # the scale did change
