"""FSDP behind chapter 6's seam, `gpt2lib.parallel` (issue 21): `--parallel fsdp` on two
gloo ranks computes what one process computes, samples and scores what it does, and its
checkpoints move to and from DDP and a single process; the seam's promises on two ranks;
and what it refuses."""

import dataclasses
import json
import subprocess
import sys
from contextlib import nullcontext
from importlib.resources import files

import pytest
import torch
from test_dist import (
    CLI,
    SMOKE,
    largest_difference,
    log,
    losses,
    rank_env,
    resume_from_step_3,
    torchrun,
)

from gpt2lib import dist
from gpt2lib.checkpoint import list_checkpoints
from gpt2lib.parallel import check_parallel
from gpt2lib.rundir import read_log
from gpt2lib.runtime import Precision, UserError
from gpt2lib.train import train


# FSDP (issue 21): `--parallel fsdp` behind chapter 6's seam, gpt2lib.parallel. The FSDP
# run also scores HellaSwag's first 3 handmade examples, which the 2 ranks share 2 and
# 1: unequal numbers of forward passes, which deadlock unless they run `unsharded`.
HELLASWAG = str(files("gpt2lib") / "assets" / "hellaswag_handmade.jsonl")
SCORED = ["--hellaswag", HELLASWAG, "--hellaswag-limit", "3"]
FSDP = ["--parallel", "fsdp", "--dist-timeout", "60"]  # a deadlock fails in a minute


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = torchrun(2, "--out", str(out), *FSDP, *SCORED)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_fsdp_on_two_ranks_equals_one_process(one_process, fsdp_ranks):
    (one_train, one_val), (two_train, two_val) = (
        losses(one_process),
        losses(fsdp_ranks[0]),
    )
    train_diff = largest_difference(one_train, two_train)
    val_diff = largest_difference(one_val, two_val)
    print(
        f"\nFSDP, largest loss difference, 2 ranks vs 1 process: {train_diff:.2e}, "
        f"{val_diff:.2e}"
    )
    # DDP's tolerance, for DDP's reason: the same sums in another order, fp32 rounding
    # (9.5e-7 measured, as under DDP; the logged gradient norms differ by up to 1.3e-4
    # relative, since a float32 norm of wte's 1.6M gradients is itself off by 2.5e-4
    # from the float64 one in 1 process and half that summed in halves, so the norms
    # are not compared). Gradients never reduce-scattered after the first accumulation
    # move the losses by 1.4e-2 from step 1 on (measured).
    assert train_diff < 1e-5 and val_diff < 1e-5
    assert one_train[-1] < one_train[0] - 0.1  # it trained


def test_fsdp_samples_equal_one_process(one_process, fsdp_ranks):
    "Every rank samples under FSDP; rank 0 writes them once, the tokens of 1 process."
    one = read_log(one_process / "samples.jsonl")
    two = read_log(fsdp_ranks[0] / "samples.jsonl")
    assert len(two) == 1 and two == one
    assert fsdp_ranks[1].stdout.count("done: 6 steps") == 1


def test_fsdp_hellaswag_in_unequal_shares_equals_one_process(fsdp_ranks):
    "HellaSwag under FSDP scores what chapter 8's evaluation does on the same weights."
    from gpt2lib.checkpoint import load_model
    from gpt2lib.evaluate import evaluate_hellaswag, read_hellaswag

    out = fsdp_ranks[0]
    model, _ = load_model(str(out))
    expected = evaluate_hellaswag(
        model, read_hellaswag(HELLASWAG)[:3], "cpu", progress=False
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["hellaswag_acc"], summary["hellaswag_acc_norm"]) == (
        expected["acc"],
        expected["acc_norm"],
    )


def test_an_fsdp_checkpoint_has_the_format_of_a_ddp_one(two_ranks, fsdp_ranks):
    """The whole state dicts, the optimizer's numbered as an unsharded AdamW numbers
    them (gpt2lib.load_model and older checkpoints read it)."""
    ddp, fsdp = (
        torch.load(list_checkpoints(out)[0], weights_only=True)
        for out in (two_ranks[0], fsdp_ranks[0])
    )
    assert ddp.keys() == fsdp.keys() and ddp["model"].keys() == fsdp["model"].keys()
    a, b = ddp["optimizer"], fsdp["optimizer"]
    assert list(a["state"]) == list(b["state"]) == list(range(len(a["state"])))
    assert [g["params"] for g in a["param_groups"]] == [
        g["params"] for g in b["param_groups"]
    ]
    assert all(a["state"][i].keys() == b["state"][i].keys() for i in a["state"])


def test_a_ddp_checkpoint_resumes_under_fsdp(one_process, two_ranks, tmp_path):
    out = resume_from_step_3(two_ranks[0], tmp_path)
    result = torchrun(2, "--out", str(out), "--resume", *FSDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert [e["step"] for e in log(out)[0]] == list(range(SMOKE.max_steps))
    # as the equality above; an optimizer state that does not reach FSDP (the moments
    # restarting from zero) moves the next losses by 3.2e-3 (measured)
    assert largest_difference(losses(out)[0], losses(one_process)[0]) < 1e-5


def test_an_fsdp_checkpoint_resumes_in_one_process(one_process, fsdp_ranks, tmp_path):
    out = resume_from_step_3(fsdp_ranks[0], tmp_path)
    scored = SMOKE.replace(hellaswag=HELLASWAG, hellaswag_limit=3)
    train(scored, out, device="cpu", resume=True, progress=False)
    assert [e["step"] for e in log(out)[0]] == list(range(SMOKE.max_steps))
    assert largest_difference(losses(out)[0], losses(one_process)[0]) < 1e-5
    assert largest_difference(losses(out)[1], losses(one_process)[1]) < 1e-5


# The seam's own promises, on 2 ranks: an optimizer built before sharding is named at
# once (it would step nothing, silently); `unsharded` lets the ranks make unequal numbers
# of forward passes; the weights are shards again afterwards (and after a forward pass
# outside it, once `reshard`ed); `all_finite` sees a NaN in the other rank's shard.
SEAM = r"""
import json
import sys
from pathlib import Path

import torch
from gpt2lib import dist, parallel
from gpt2lib.model import GPT, GPTConfig

env = dist.setup("cpu", timeout=60)
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32))
early = torch.optim.AdamW(model.parameters())  # built before sharding: holds none
eval_model, step_model = parallel.wrap(model, False, env, "fsdp")
seen_early = False
try:
    parallel.checkpoint_parts(model, early)
except RuntimeError as err:
    seen_early = "build it after parallel.wrap" in str(err)
x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
shards = lambda: all(hasattr(p, "to_local") for p in model.parameters())
seen = {"sharded": parallel.sharded(model), "one": eval_model is step_model is model}
seen["early_refused"] = seen_early
with torch.no_grad(), parallel.unsharded(model):
    seen["losses"] = [model(x, x)[1].item() for _ in range(2 - env.rank)]
seen["shards_after"] = shards()
with torch.no_grad():
    model(x, x)
parallel.reshard(model)
seen["shards_after_reshard"] = shards()
seen["finite"] = parallel.all_finite(model)
if env.rank == 1:
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.to_local()[0, 0] = float("nan")
seen["finite_after_nan"] = parallel.all_finite(model)
# a file per rank: two processes printing to one pipe interleave their lines
Path(sys.argv[1], f"rank{env.rank}.json").write_text(json.dumps(seen))
dist.teardown()
"""


def test_the_seam_on_two_ranks(tmp_path):
    from gpt2lib.model import GPT, GPTConfig

    script = tmp_path / "seam.py"
    script.write_text(SEAM)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=rank_env(), check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x, x)[1].item()
    for rank, s in enumerate(seen):
        assert s["sharded"] and s["one"] and s["early_refused"]
        # the whole weights, gathered: the same numbers, summed in the same order
        assert s["losses"] == [expected] * (2 - rank)
        assert s["shards_after"] and s["shards_after_reshard"]
        assert s["finite"] and not s["finite_after_nan"]


def test_fsdp_in_one_process_is_the_unwrapped_run(one_process, tmp_path):
    "Nothing to shard in a single process: --parallel fsdp runs what ddp runs."
    train(SMOKE, tmp_path, device="cpu", progress=False, parallel="fsdp")
    assert losses(tmp_path) == losses(one_process)  # exact: the same process's math


def test_an_unknown_kind_of_parallelism(tmp_path, capsys):
    from gpt2lib.train import main

    with pytest.raises(SystemExit) as exit:
        main([*CLI, "--out", str(tmp_path / "run"), "--parallel", "nonsense"])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --parallel: invalid choice: 'nonsense'" in last
    with pytest.raises(
        UserError, match="--parallel 'nonsense' is not a kind .* ddp or"
    ):
        train(
            SMOKE, tmp_path / "api", device="cpu", progress=False, parallel="nonsense"
        )
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()


def test_what_fsdp_cannot_do_is_refused_before_any_work(tmp_path):
    two = dist.DistEnv(rank=0, world_size=2, backend="gloo")  # before any collective
    muon = SMOKE.replace(optimizer="muon")
    with pytest.raises(
        UserError, match="--parallel fsdp cannot run Muon.*--parallel ddp"
    ):
        train(muon, tmp_path / "run", progress=False, env=two, parallel="fsdp")
    assert not (tmp_path / "run").exists()
    # fp16's scaler would check this rank's shard for overflows only (a GPU without
    # bf16 gets fp16; the CPU's own scaler stands in for it here)
    fp16 = Precision("cuda", "fp16", nullcontext, torch.amp.GradScaler("cpu"))
    with pytest.raises(UserError, match="--parallel fsdp cannot scale fp16 gradients"):
        check_parallel("fsdp", two, fp16, "adamw")
    check_parallel("ddp", two, fp16, "muon")  # DDP does both


def test_fsdp_on_a_pytorch_without_fully_shard_is_one_clear_line(monkeypatch):
    "PyTorch 2.4-2.5 (which pyproject allows) have no public fully_shard."
    import types

    two = dist.DistEnv(rank=0, world_size=2, backend="gloo")
    fp32 = Precision("cpu", "fp32", nullcontext, None)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", types.ModuleType("old"))
    with pytest.raises(UserError, match="needs PyTorch 2.6 or newer.*--parallel ddp"):
        check_parallel("fsdp", two, fp32, "adamw")
