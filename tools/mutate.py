"""Plant known bugs in a copy of gpt2lib, one at a time, and check that the test suite catches each.

    python tools/mutate.py              # every mutant: exit 1 if one survives
    python tools/mutate.py --list       # the mutants and what each breaks
    python tools/mutate.py NAME ...     # only these mutants

A mutant replaces one exact piece of text in one module of `gpt2lib/` (the piece must occur
there exactly once: a mutant that no longer applies is an error, not a pass). The suite then
runs on a copy of the repository holding the mutated package, with `-x`: the test files named
by the mutant first, the rest of the suite after them, stopping at the first failure. A
mutant survives if the whole suite passes. `tests/test_export.py` is left out, since it
compares `gpt2lib/` with the notebooks and so would catch every edit whatever it breaks.

Each mutant is a bug a test claims to catch, or one that a real reproduction has shipped;
the list starts with the ones that once went unnoticed here (issue 13). A caught mutant
costs a pytest start and one test file; the whole list takes about five minutes on two CPU
cores, which would bring CI too close to its time budget: run it after changing a test or a
checked module, and before a release.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout_files() -> list[str]:
    """Every file of the checkout, tracked or new and not ignored: a mutant is planted
    in a copy of all of it, so that a test that reads the README or the book fails
    for the mutant only, never because the copy lacks a file (which would count every
    mutant as caught)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # gpt2lib/MODULE.py
    old: str
    new: str
    tests: tuple[str, ...]  # test files to run first (the ones meant to catch it)
    why: str


MUTANTS = [
    # The bugs that once went unnoticed (issue 13).
    Mutant(
        "fused-adamw-rung-never-updates",
        "bench",
        "                lr=6e-4,\n                grad_clip=1.0,",
        "                lr=0.0 if recipe.fused_adamw else 6e-4,\n                grad_clip=1.0,",
        ("test_bench",),
        "the ladder's fused-AdamW rung trains nothing, yet its first loss equals fp32's",
    ),
    Mutant(
        "generate-keeps-oldest-tokens",
        "model",
        "idx[:, -self.config.block_size :]",
        "idx[:, : self.config.block_size]",
        ("test_model",),
        "past block_size, generation reads the oldest tokens",
    ),
    Mutant(
        "hellaswag-scores-first-tokens",
        "evaluate",
        "ctx = ctx[cut:]",
        "ctx = ctx[: len(ctx) - cut]",
        ("test_evaluate",),
        "a long example keeps the start of its context instead of the end",
    ),
    Mutant(
        "validation-on-training-shards",
        "data",
        'val = [p for p in shards if "val" in p.name]',
        'val = [p for p in shards if "val" not in p.name]',
        ("test_train",),
        "the validation loss is measured on training shards",
    ),
    Mutant(
        "export-without-transpose",
        "hf",
        "tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)",
        "tensor = tensor  # nn.Linear (out, in) -> Conv1D (in, out)",
        ("test_export_hf",),
        "exported Conv1D weights keep nn.Linear's layout",
    ),
    Mutant(
        "tokenizer-without-contractions",
        "tokenizer",
        "'(?:[sdmt]|ll|ve|re)|",
        "",
        ("test_tokenizer",),
        "the pre-split pattern loses English contractions",
    ),
    Mutant(
        "bf16-path-is-fp32",
        "runtime",
        "    if dtype is None or dtype == torch.float32:\n",
        "    if True:\n",
        ("test_precision", "test_runtime"),
        "autocast is never entered, bf16 or not",
    ),
    # The recipe.
    Mutant(
        "init-residual-scale",
        "model",
        "std /= math.sqrt(2 * self.config.n_layer)",
        "std /= math.sqrt(self.config.n_layer)",
        ("test_data", "test_model"),
        "the residual projections' init ignores that a block adds twice",
    ),
    Mutant(
        "no-weight-tying",
        "model",
        "self.lm_head.weight = self.transformer.wte.weight  # weight tying",
        "pass  # weight tying",
        ("test_model",),
        "lm_head is a separate matrix",
    ),
    Mutant(
        "attention-unscaled",
        "model",
        "scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)",
        "scores = q @ k.transpose(-2, -1)",
        ("test_bench", "test_model"),
        "the written-out attention forgets 1/sqrt(d)",
    ),
    Mutant(
        "attention-sees-the-future",
        "model",
        "is_causal=True",
        "is_causal=False",
        ("test_model",),
        "flash attention is not causal",
    ),
    Mutant(
        "padding-rows-predicted",
        "model",
        "logits = mask_padding(logits, self.config.vocab_size)",
        "pass",
        ("test_bench",),
        "the padded vocabulary's extra rows take part in the softmax",
    ),
    Mutant(
        "hf-load-without-transpose",
        "hf",
        "        if key.endswith(CONV1D_WEIGHTS):\n            tensor = tensor.t()\n   "
        "     converted[name] = tensor",
        "        converted[name] = tensor",
        ("test_model",),
        "HF's Conv1D weights are loaded untransposed",
    ),
    Mutant(
        "targets-not-shifted",
        "data",
        "x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)",
        "x, y = buf[:-1].view(self.B, self.T), buf[:-1].view(self.B, self.T)",
        ("test_data",),
        "the model is asked to predict the token it is given",
    ),
    Mutant(
        "same-shard-order-every-epoch",
        "data",
        "rng = np.random.default_rng([self.seed, epoch])",
        "rng = np.random.default_rng([self.seed, 0])",
        ("test_data",),
        "the shards are not reshuffled per epoch",
    ),
    Mutant(
        "cosine-to-half",
        "optim",
        "0.5 * (1.0 + math.cos(math.pi * progress))",
        "0.5 * (1.0 + math.cos(math.pi * progress / 2))",
        ("test_optim",),
        "the cosine stops half-way down",
    ),
    Mutant(
        "no-clipping",
        "optim",
        "clip_grad_norm_(model.parameters(), grad_clip)",
        'clip_grad_norm_(model.parameters(), float("inf"))',
        ("test_optim",),
        "gradients are never clipped",
    ),
    Mutant(
        "decay-on-gains-and-biases",
        "optim",
        "p.dim() >= 2",
        "p.dim() >= 1",
        ("test_optim",),
        "weight decay also pulls LayerNorm gains and biases to zero",
    ),
    Mutant(
        "betas-of-adam",
        "optim",
        "betas=(0.9, 0.95)",
        "betas=(0.9, 0.999)",
        ("test_optim",),
        "AdamW's beta2 is PyTorch's default 0.999, not GPT-3's 0.95",
    ),
    Mutant(
        "accumulation-sums",
        "optim",
        "loss = loss / k",
        "loss = loss",
        ("test_optim",),
        "k micro-batches add up to k times the gradient",
    ),
    Mutant(
        "ddp-loss-summed",
        "dist",
        "return all_reduce_sum(tensor) / dist.get_world_size()",
        "return all_reduce_sum(tensor)",
        ("test_dist",),
        "the logged loss is the sum over ranks",
    ),
    Mutant(
        "acc-norm-is-acc",
        "evaluate",
        "return sum_loss, sum_loss / ending.sum(dim=1)",
        "return sum_loss, sum_loss / 4",
        ("test_evaluate",),
        "acc_norm does not divide by the ending's length",
    ),
    Mutant(
        "hellaswag-padded-in-front",
        "evaluate",
        "F.pad(mine[i][part], (0, width - mine[i][part].size(1)))",
        "F.pad(mine[i][part], (width - mine[i][part].size(1), 0))",
        ("test_evaluate",),
        "a batch's shorter rows are padded before their tokens, which then see the "
        "padding",
    ),
    Mutant(
        "fineweb-no-separator",
        "fineweb",
        "[EOT_TOKEN, *get_encoding().encode_ordinary(text)]",
        "[*get_encoding().encode_ordinary(text)]",
        ("test_fineweb",),
        "documents run into each other",
    ),
    # A run that cannot be lost (issue 12).
    Mutant(
        "resume-forgets-data-position",
        "checkpoint",
        "elif name in state:",
        'elif name in state and name != "loader":',
        ("test_train", "test_resume"),
        "a resumed run starts reading the data from the beginning",
    ),
    Mutant(
        "checkpoint-read-onto-the-device",
        "checkpoint",
        'return torch.load(path, map_location="cpu", weights_only=True)',
        "return torch.load(path, weights_only=True)",
        ("test_resume",),
        "checkpoints land wherever they were saved from (a GPU's RNG state stays on "
        "the GPU)",
    ),
    Mutant(
        "checkpoint-decides-fused",
        "checkpoint",
        'optimizer.load_state_dict({**state, "param_groups": groups})',
        "optimizer.load_state_dict(state)",
        ("test_resume",),
        "a run started on a CPU resumes on a GPU without fused AdamW",
    ),
    Mutant(
        "pruning-deletes-all-older",
        "checkpoint",
        "older[: max(0, len(older) - (keep - 1))]",
        "older[: len(older)]",
        ("test_train", "test_resume"),
        "only the newest checkpoint is kept",
    ),
    Mutant(
        "diverged-run-goes-on",
        "train",
        "            if result.diverged():",
        "            if False:",
        ("test_hostile",),
        "a nan loss is logged and the run continues, saving nan weights",
    ),
    Mutant(
        "no-lock",
        "runtime",
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        ("test_runtime", "test_hostile"),
        "two trainers write one directory",
    ),
    Mutant(
        "torn-log-line-fatal",
        "rundir",
        'if number == len(lines) and not data.endswith(b"\\n"):',
        "if False:",
        ("test_hostile",),
        "a line cut by a full disk blocks --resume for good",
    ),
    # Checks that could not see their bug (issue 20).
    Mutant(
        "qk-norm-over-positions",
        "modern",
        "q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))",
        "q, k = F.rms_norm(q, q.shape[-2:]), F.rms_norm(k, k.shape[-2:])",
        ("test_modern",),
        "QK-norm divides by the RMS over all positions: earlier ones see later ones",
    ),
    Mutant(
        "zero-init-c-attn",
        "modern",
        "self.c_proj.ZERO_INIT = config.zero_init_proj  # attention's output",
        "self.c_attn.ZERO_INIT = config.zero_init_proj  # attention's output",
        ("test_modern",),
        "zero_init_proj zeroes the attention's input projection, not its output one",
    ),
    Mutant(
        "zero-init-c-fc",
        "modern",
        "self.c_proj.ZERO_INIT = config.zero_init_proj  # the MLP's output",
        "self.c_fc.ZERO_INIT = config.zero_init_proj  # the MLP's output",
        ("test_modern",),
        "zero_init_proj zeroes the MLP's input projection, not its output one",
    ),
    Mutant(
        "rope-base-1000",
        "modern",
        "rope_base: float = checked(\n        10000.0,",
        "rope_base: float = checked(\n        1000.0,",
        ("test_modern",),
        "the model's rotary embeddings use base 1000, not RoFormer's 10000",
    ),
    Mutant(
        "newton-schulz-coefficient",
        "optim",
        "    -4.7750,\n",
        "    -4.7500,\n",
        ("test_muon",),
        "Muon's quintic has a wrong coefficient: the singular values miss their target",
    ),
    Mutant(
        "fp16-no-unscale",
        "optim",
        "scaler.unscale_(optimizer)",
        "pass",
        ("test_precision",),
        "fp16 measures and clips the gradients still multiplied by the loss scale",
    ),
    # Errors: the user's in one line, a bug with its traceback (issue 20).
    Mutant(
        "runtime-errors-are-user-errors",
        "runtime",
        "USER_ERRORS = (UserError, OSError)",
        "USER_ERRORS = (UserError, OSError, RuntimeError)",
        ("test_runtime",),
        "a shape bug or a CUDA error is shown as one tidy line, its traceback hidden",
    ),
    Mutant(
        "full-disk-checkpoint-is-a-bug",
        "checkpoint",
        "if isinstance(err.__context__, OSError):",
        "if False:",
        ("test_hostile",),
        "a full disk during torch.save is reported as a bug, not as the full disk",
    ),
    # The ladder and provenance (issue 20).
    Mutant(
        "ladder-records-a-cut-short-run",
        "ladder",
        'if not final.get("finished"):',
        "if False:",
        ("test_ladder",),
        "Ctrl-C ends a run early, the ladder records it as finished and goes on",
    ),
    Mutant(
        "ladder-json-overwritten",
        "ladder",
        "if path.exists() and not force:",
        "if False:",
        ("test_ladder",),
        "the ladder overwrites an existing --json after its first run",
    ),
    Mutant(
        "provenance-without-the-cpu",
        "runtime",
        "        **cpu_info(),\n",
        "",
        ("test_runtime",),
        "a CPU result does not say which CPU model gave its bits",
    ),
    Mutant(
        "stale-estimate-kept",
        "preflight",
        "saved = evaluations * examples * (cold - warm)",
        "saved = 0.0",
        ("test_preflight", "test_readme"),
        "a preflight estimate timed with HellaSwag's cold first call is shown as is",
    ),
    # The preflight's estimate and --batch-size auto on several ranks (issue 20).
    Mutant(
        "estimate-one-evaluation",
        "preflight",
        "events[name] * each.get(name, 0.0)",
        "each.get(name, 0.0)",
        ("test_preflight",),
        "the estimate counts one evaluation instead of all of them",
    ),
    Mutant(
        "estimate-hellaswag-one-example",
        "evaluations",
        "per_rank = len(self.examples) / world_size",
        "per_rank = len(some) / world_size",
        ("test_preflight",),
        "the estimate's HellaSwag time is one example's, not the whole set's",
    ),
    Mutant(
        "mfu-of-all-gpus",
        "preflight",
        "tokens_per_s / world_size * flops_per_token",
        "tokens_per_s * flops_per_token",
        ("test_preflight",),
        "the MFU of several GPUs is not divided by their number",
    ),
    Mutant(
        "estimate-misses-the-last-evaluation",
        "evaluations",
        "sum(cls(cfg).due(step) for step in steps)",
        "sum(cls(cfg).due(step) for step in steps[:-1])",
        ("test_preflight",),
        "the estimate counts 77 evaluations where gpt2-124m makes 78",
    ),
    Mutant(
        "estimate-one-checkpoint-too-many",
        "evaluations",
        '"checkpoints": sum(saves_after(cfg, done) for done in steps[1:])',
        '"checkpoints": sum(saves_after(cfg, done) for done in steps)',
        ("test_preflight",),
        "the estimate counts a checkpoint too many when the last is one of every N",
    ),
    Mutant(
        "hellaswag-timed-per-example-of-all-ranks",
        "evaluations",
        "len(some[::world_size])",
        "len(some)",
        ("test_preflight",),
        "on N ranks the HellaSwag time per example is N times too short",
    ),
    Mutant(
        "auto-micro-batch-for-one-process",
        "memory",
        "micro_batch_candidates(cfg, env.world_size, below)",
        "micro_batch_candidates(cfg, 1, below)",
        ("test_train",),
        "--batch-size auto on N ranks takes a micro-batch that divides the budget for 1",
    ),
    # The tools around training, used as a hostile user would (issue 20).
    Mutant(
        "export-files-private",
        "export_hf",
        "            os.chmod(path, 0o666 & ~umask)",
        "            pass",
        ("test_hostile_tools",),
        "an exported model's files stay 0600, as safetensors writes them",
    ),
    Mutant(
        "export-dir-private",
        "export_hf",
        "        os.chmod(tmp, 0o777 & ~umask)",
        "        pass",
        ("test_hostile_tools",),
        "an exported model's directory stays 0700, as mkdtemp makes it",
    ),
    Mutant(
        "export-into-run-with-force",
        "export_hf",
        "    if run:\n",
        "    if run and not force:\n",
        ("test_hostile_tools",),
        "--force exports into a run's directory, where it goes stale as the run goes on",
    ),
    Mutant(
        "ambiguous-dir-loads-the-export",
        "checkpoint",
        'if found and (path / "config.json").exists():',
        "if False:",
        ("test_hostile_tools",),
        "a directory with an export and checkpoints silently loads the export",
    ),
    Mutant(
        "untied-head-loaded-tied",
        "hf",
        "    if not hf_head_is_tied(model_dir):",
        "    if False:",
        ("test_hostile_tools",),
        "an exported untied head cannot be loaded: the loader ties it to wte",
    ),
    Mutant(
        "untied-head-filled-from-wte",
        "hf",
        'converted["lm_head.weight"] = lm_head',
        'converted["lm_head.weight"] = converted["transformer.wte.weight"]',
        ("test_hostile_tools",),
        "an untied head loads with the embedding's weights, not its own",
    ),
    Mutant(
        "fineweb-validation-only",
        "fineweb",
        "    if not shards:  # the only shard would be shard 0, the validation split",
        "    if False:",
        ("test_hostile_tools",),
        "a corpus of one shard or less gives a validation shard and nothing to train",
    ),
    Mutant(
        "manifest-finished-unchecked",
        "fineweb",
        'kinds = {"settings": dict, "shards": list, "finished": bool}',
        'kinds = {"settings": dict, "shards": list}',
        ("test_hostile_tools",),
        "a manifest without its finished key ends in a KeyError traceback",
    ),
    Mutant(
        "sample-range-is-usage",
        "sample",
        '            raise UserError(\n                f"--{name} must be {allowed}, got "',
        '            ap.error(\n                f"--{name} must be {allowed}, got "',
        ("test_hostile_tools",),
        "gpt2-sample --num-samples 0 prints the usage and exits 2, not one line and 1",
    ),
    Mutant(
        "evaluate-range-is-usage",
        "evaluate",
        "            raise UserError(\n"
        "                f\"--{name.replace('_', '-')} must be at least 1, got \"",
        "            ap.error(\n"
        "                f\"--{name.replace('_', '-')} must be at least 1, got \"",
        ("test_hostile_tools",),
        "gpt2-evaluate --limit 0 prints the usage and exits 2, not one line and 1",
    ),
    Mutant(
        "bench-device-is-usage",
        "bench",
        "    args.device = resolve_device(args.device)\n",
        "    try:\n"
        "        args.device = resolve_device(args.device)\n"
        "    except ValueError as err:\n"
        "        ap.error(str(err))\n",
        ("test_hostile_tools",),
        "gpt2-bench --device cuda:3 prints the usage and exits 2, not one line and 1",
    ),
    Mutant(
        "temperature-any-positive",
        "sample",
        "MIN_TEMPERATURE <= args.temperature < math.inf",
        "0 < args.temperature < math.inf",
        ("test_hostile_tools",),
        "--temperature 1e-40 is refused inside sampling, without naming the option",
    ),
    Mutant(
        "temperature-no-lowest",
        "model",
        "MIN_TEMPERATURE = 1e-4",
        "MIN_TEMPERATURE = 0.0",
        ("test_hostile_tools",),
        "a temperature of 1e-40 makes the logits infinite: torch.multinomial fails",
    ),
    # Nothing silently wrong: shards, checkpoints, the log, floats, Muon's settings and
    # the preflight's --out (issue 20, helper-4).
    Mutant(
        "zero-token-shard-accepted",
        "data",
        "    if len(tokens) == 0:  # nothing to train on, evaluate or check\n",
        "    if False:\n",
        ("test_hostile",),
        "a shard of 0 tokens trains, and fails the preflight with numpy's words",
    ),
    Mutant(
        "zero-byte-shard-traceback",
        "data",
        "except EOFError:  # a file of 0 bytes: no header to read",
        "except ZeroDivisionError:",
        ("test_hostile",),
        "a shard of 0 bytes ends every command in an EOFError traceback",
    ),
    Mutant(
        "damaged-checkpoint-counted",
        "checkpoint",
        "        set_aside_damaged(self.out_dir, after=path)\n",
        "",
        ("test_hostile",),
        "a damaged newest checkpoint counts among those kept: a good one is pruned",
    ),
    Mutant(
        "log-bare-nan",
        "rundir",
        "                f.write(log_line(entry))",
        '                f.write(json.dumps(entry) + "\\n")',
        ("test_hostile",),
        "a diverged step is logged as bare NaN or Infinity, which is not JSON",
    ),
    Mutant(
        "log-nan-read-as-text",
        "rundir",
        "NON_FINITE.get(value, value) if isinstance(value, str) else value",
        "value",
        ("test_hostile",),
        'a diverged step\'s loss reads back as the text "nan", not a number',
    ),
    Mutant(
        "max-lr-unbounded",
        "config",
        "math.isfinite(v) and 0 < v <= MAX_LR",
        "math.isfinite(v) and 0 < v",
        ("test_hostile",),
        "--max-lr 1e39 passes the check, then overflows float32 at step 0",
    ),
    Mutant(
        "muon-setting-ignored-with-adamw",
        "config",
        'if cfg.optimizer == "adamw" and name in changes:',
        "if False:",
        ("test_hostile",),
        "--optimizer adamw --muon-lr 0.5 runs, the Muon setting silently ignored",
    ),
    Mutant(
        "failed-first-steps-block-out",
        "rundir",
        "if failed is not None and self.resumable and not self.resumable():",
        "if False:",
        ("test_hostile",),
        "a fresh run that fails at step 0 leaves a log that blocks its --out",
    ),
    Mutant(
        "preflight-passes-a-finished-run",
        "preflight",
        "                refuse_to_overwrite(out, resume=False)\n"
        "                return str(",
        "                return str(",
        ("test_hostile",),
        "the preflight passes an --out that gpt2-train refuses (it holds a run)",
    ),
    Mutant(
        "preflight-into-a-locked-out",
        "preflight",
        "        dist.on_main(lambda: refuse_if_in_use(out))\n",
        "",
        ("test_hostile",),
        "the preflight runs and writes its report into an --out a trainer holds",
    ),
    Mutant(
        "preflight-report-needs-out",
        "preflight",
        "        if path.resolve().parent == out.resolve():",
        "        if not out.is_dir():\n"
        "            raise FileNotFoundError(2, 'No such file or directory')\n"
        "        if path.resolve().parent == out.resolve():",
        ("test_hostile",),
        "a preflight whose data check fails writes no report where --out is missing",
    ),
    Mutant(
        "cpu-allocator-not-out-of-memory",
        "runtime",
        '("out of memory", "can\'t allocate memory")',
        '("out of memory",)',
        ("test_hostile",),
        "a CPU out of memory reads as a bug, with the allocator's raw message",
    ),
    # One run, made of parts (issue 21): the Run, its precision and states, the checks.
    Mutant(
        "precision-decided-twice",
        "train",
        "run = build_run(cfg, env, compile, loaders, precision, parallel)",
        "run = build_run(cfg, env, compile, loaders, parallel=parallel)",
        ("test_run",),
        "the Run decides its precision again instead of taking the one train decided",
    ),
    Mutant(
        "checkpointer-restores-only-the-known-states",
        "checkpoint",
        "        for name, part in self.states.items():",
        "        for name, part in list(self.states.items())[:3]:",
        ("test_run",),
        "a part added to a run's states is saved but never restored",
    ),
    Mutant(
        "preflight-misspelt-need-skips-silently",
        "preflight",
        "        if unknown:",
        "        if False:",
        ("test_run",),
        "a check whose need is misspelt is skipped on every run, silently",
    ),
    Mutant(
        "memory-reaches-up-to-the-run",
        "memory",
        "from .config import TrainConfig, build_model\n",
        "from .config import TrainConfig, build_model\nfrom .run import Run\n",
        ("test_runtime",),
        "a part imports the layer built on it (the micro-batch search, the Run)",
    ),
    Mutant(
        "loggers-checked-after-the-run-directory",
        "train",
        "    require(tensorboard, wandb)  # the loggers' packages\n",
        "",
        ("test_run",),
        "a missing logger package is found after --out was made and claimed",
    ),
    # loggers (issue 21)
    Mutant(
        "loggers-tensorboard-without-purge-step",
        "loggers",
        "SummaryWriter(str(path), purge_step=start)",
        "SummaryWriter(str(path))",
        ("test_loggers",),
        "a resumed run's TensorBoard curves hold the steps after the checkpoint twice",
    ),
    Mutant(
        "loggers-tensorboard-tag-renamed",
        "loggers",
        'self.writer.add_scalar(key, value, entry["step"])',
        'self.writer.add_scalar(f"train/{key}", value, entry["step"])',
        ("test_loggers",),
        "TensorBoard's curves are not named as log.jsonl's keys",
    ),
    Mutant(
        "loggers-non-finite-values-dropped",
        "loggers",
        "and not isinstance(value, bool)",
        "and not isinstance(value, bool) and value == value",
        ("test_loggers",),
        "a diverged step's NaN loss is missing from TensorBoard and W&B",
    ),
    Mutant(
        "loggers-on-every-rank",
        "loggers",
        "    if not main:",
        "    if False:",
        ("test_loggers",),
        "every rank writes TensorBoard events and starts a W&B run",
    ),
    Mutant(
        "loggers-wandb-id-not-reused",
        "loggers",
        "run_id = read_wandb_id(id_file) if start > 0 and id_file.exists() else None",
        "run_id = None",
        ("test_loggers",),
        "a resumed run starts a second W&B run instead of continuing its own",
    ),
    Mutant(
        "loggers-wandb-rewinds-a-step-late",
        "loggers",
        "?_step={start - 1}",
        "?_step={start}",
        ("test_loggers",),
        "W&B keeps the first attempt's value at the checkpoint's step",
    ),
    Mutant(
        "loggers-wandb-fallback-sends-steps-again",
        "loggers",
        "self.first = max(start, self.run.starting_step)",
        "self.first = start",
        ("test_loggers",),
        "where W&B refuses the rewind, the steps it holds are sent again (ignored, "
        "with a warning each)",
    ),
    Mutant(
        "loggers-wandb-online-without-a-key",
        "loggers",
        "if not has_wandb_key(url.netloc):",
        "if False:",
        ("test_loggers",),
        "without an API key W&B is started online, which fails (or prompts)",
    ),
    Mutant(
        "loggers-close-stops-at-the-first-failure",
        "loggers",
        "stack.callback(logger.close, failed)",
        "logger.close(failed)",
        ("test_loggers",),
        "one logger failing to close leaves the others unclosed (a W&B run unfinished)",
    ),
    Mutant(
        "loggers-no-wandb-is-a-traceback",
        "loggers",
        "            raise UserError(NO_WANDB) from None",
        "            raise",
        ("test_loggers",),
        "--wandb without the package ends in an ImportError's traceback",
    ),
    Mutant(
        "loggers-damaged-wandb-id-used",
        "loggers",
        "if not re.fullmatch",
        "if False and not re.fullmatch",
        ("test_loggers",),
        "a damaged wandb-run-id is handed to W&B instead of being named",
    ),
    # one declaration of the architecture (issue 21)
    Mutant(
        "setting-without-rule-passes",
        "runtime",
        "        if rule is None:\n            raise TypeError(",
        "        if rule is None:\n            continue\n            raise TypeError(",
        ("test_config",),
        "a setting declared without a rule is never checked, and the tests say nothing",
    ),
    Mutant(
        "model-config-unchecked",
        "model",
        "        check_settings(self)  # each field's rule, as declared beside it",
        "        pass",
        ("test_modern", "test_model"),
        "ModernConfig(softcap=-1) or GPTConfig(n_layer=0) is made, and fails later",
    ),
    Mutant(
        "replace-drops-model-settings",
        "config",
        '            mine["model"] = dataclasses.replace(mine.get("model", self.model), **model)',
        "            pass",
        ("test_config",),
        "--n-layer 6 is accepted and the run trains the preset's model",
    ),
    Mutant(
        "settings-without-the-model",
        "config",
        '        return {**dataclasses.asdict(run.pop("model")), **run}',
        '        return {k: v for k, v in run.items() if k != "model"}',
        ("test_config",),
        "logs and checkpoints lose the model's shape; a resume with another n_layer passes",
    ),
    Mutant(
        "wandb-crash-reads-finished",
        "loggers",
        "self.run.finish(exit_code=1 if failed else 0)",
        "self.run.finish()",
        ("test_loggers",),
        "a run that crashed shows in W&B as finished, like one that completed",
    ),
    # faster to a better model (issue 22)
    Mutant(
        "rotary-table-from-position-0",
        "modern",
        "cos, sin = cos[start : start + T].to(x.dtype), sin[start : start + T].to(x.dtype)",
        "cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)",
        ("test_modern",),
        "with the KV cache, a new token is rotated as if it stood at position 0",
    ),
    Mutant(
        "training-forward-returns-logits",
        "optim",
        "_, loss = model(x, y, return_logits=False)",
        "_, loss = model(x, y)",
        ("test_step",),
        "a compiled step fills and copies a logits-sized gradient that feeds nothing",
    ),
    Mutant(
        "muon-one-norm-for-the-stack",
        "optim",
        "X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)",
        "X = X / (X.norm() + eps)",
        ("test_muon",),
        "batched Newton-Schulz scales a stack of matrices by one norm, not each by its own",
    ),
    Mutant(
        "muon-adamw-shared-count-counted-twice",
        "optim",
        'if state["step"].device != where or id(state["step"]) in seen:',
        'if state["step"].device != where:',
        ("test_muon",),
        "a step count shared by a loaded state is added to once per parameter",
    ),
    Mutant(
        "muon-adamw-never-fused",
        "optim",
        "            foreach=not self.fused,\n            fused=self.fused,\n",
        "            foreach=True,\n            fused=False,\n",
        ("test_muon",),
        "Muon's AdamW groups run the foreach path where the fused kernel was asked for",
    ),
    Mutant(
        "muon-newton-schulz-never-compiled",
        "run",
        "build_optimizer(cfg, model, env.device, compile)",
        "build_optimizer(cfg, model, env.device)",
        ("test_muon",),
        "a compiled run's Muon runs Newton-Schulz eager, kernel by kernel",
    ),
    Mutant(
        "baselines-weight-chosen-from-an-empty-tenth",
        "data",
        "    if len(train) - cut >= 2:\n",
        "    if True:\n",
        ("test_data",),
        "a tiny text's bigram weight is chosen from NaNs, with numpy's warning",
    ),
    Mutant(
        "compiled-padding-mask-is-a-wall",
        "model",
        "    if torch.compiler.is_compiling():\n        columns",
        "    if False:\n        columns",
        ("test_step",),
        "compiled, the padding mask stays an autograd Function: with the soft-cap the "
        "backward keeps two logits-sized tensors",
    ),
    Mutant(
        "max-autotune-rung-compiles-the-default",
        "bench",
        "torch.compile(model, mode=recipe.compile_mode)",
        "torch.compile(model)",
        ("test_bench",),
        "the max-autotune rung times the default compile under max-autotune's name",
    ),
    Mutant(
        "resumed-call-claims-the-whole-run",
        "cli",
        'ran = f", the last {steps - start} in this call," if start else ""',
        'ran = ""',
        ("test_train",),
        "after --resume the trainer says it ran every step of the run in this call",
    ),
    Mutant(
        "evaluate-refuses-shipped-texts",
        "evaluate",
        "    if data in SHIPPED_TEXTS:\n        return split_text(data)[1]\n",
        "",
        ("test_evaluate",),
        "gpt2-evaluate --val shakespeare refuses the name gpt2-train takes",
    ),
    Mutant(
        "cudnn-rung-runs-the-default-kernel",
        "bench",
        '    if recipe.attention == "any":\n        return nullcontext\n',
        "    if True:\n        return nullcontext\n",
        ("test_bench",),
        "the cuDNN-attention rung times PyTorch's default kernel under cuDNN's name",
    ),
    # parallel (issue 21): DDP or FSDP behind one seam, gpt2lib.parallel.
    Mutant(
        "fsdp-optimizer-built-before-sharding",
        "run",
        "    model = initial_model(cfg, env.device)\n"
        "    eval_model, step_model = wrap(model, compile, env, parallel)\n"
        "    # after wrapping: FSDP's sharding replaces the parameters the optimizer "
        "holds\n"
        "    optimizer = build_optimizer(cfg, model, env.device, compile)\n",
        "    model = initial_model(cfg, env.device)\n"
        "    optimizer = build_optimizer(cfg, model, env.device, compile)\n"
        "    eval_model, step_model = wrap(model, compile, env, parallel)\n",
        ("test_parallel",),
        "under FSDP the optimizer holds the parameters sharding replaced: no step "
        "would change the weights, and nothing would say so",
    ),
    Mutant(
        "fsdp-gradient-sync-left-off",
        "parallel",
        "    finally:\n        model.set_requires_gradient_sync(True)",
        "    finally:\n        model.set_requires_gradient_sync(False)",
        ("test_parallel",),
        "after the first accumulation, FSDP never reduce-scatters the gradients again",
    ),
    Mutant(
        "fsdp-optimizer-state-loaded-by-number",
        "parallel",
        "named = _renamed(state, self._names().__getitem__)",
        "named = state",
        ("test_parallel",),
        "a checkpoint's numbered optimizer state is given to FSDP as it is: a KeyError "
        "in torch 2.13 (an earlier study saw it load nothing, silently)",
    ),
    Mutant(
        "fsdp-checkpoint-optimizer-by-name",
        "parallel",
        "return _renamed(named, number.__getitem__) if named else {}",
        "return named",
        ("test_parallel",),
        "an FSDP checkpoint's optimizer state is keyed by names, not today's numbers",
    ),
    Mutant(
        "fsdp-samples-on-rank-0-alone",
        "evaluations",
        "if not (run.env.is_main or sharded(run.model)):",
        "if not run.env.is_main:",
        ("test_parallel",),
        "under FSDP rank 0 samples alone: its forward passes wait for the other ranks "
        "until the timeout",
    ),
    Mutant(
        "fsdp-hellaswag-sharded",
        "evaluations",
        "with unsharded(run.model):  # the ranks' shares of examples differ",
        "if True:",
        ("test_parallel",),
        "HellaSwag's unequal shares run sharded: a rank waits for a forward pass the "
        "other never makes",
    ),
    Mutant(
        "fsdp-unsharded-reshards-after-each-forward",
        "parallel",
        "        module.set_reshard_after_forward(False, recurse=False)\n"
        "        module.unshard()",
        "        module.unshard()",
        ("test_parallel",),
        "inside `unsharded` each forward pass gathers the weights again, a collective: "
        "unequal numbers of them deadlock",
    ),
    Mutant(
        "fsdp-finite-check-reads-one-shard",
        "parallel",
        "return not dist.any_rank(not finite, device=shards[0].device)",
        "return finite",
        ("test_parallel",),
        "a NaN in another rank's shard passes rank 0's check: a damaged checkpoint",
    ),
    Mutant(
        "fsdp-in-one-process-is-sharded",
        "parallel",
        'if not env.distributed or known(kind) == "ddp":',
        'if known(kind) == "ddp":',
        ("test_parallel",),
        "--parallel fsdp in a single process shards with no process group, and fails",
    ),
    Mutant(
        "parallel-unknown-kind-accepted",
        "parallel",
        "    if kind not in PARALLELS:\n        raise UserError(",
        "    if False:\n        raise UserError(",
        ("test_parallel",),
        "train(parallel='nonsense') runs unwrapped instead of naming the kinds",
    ),
    Mutant(
        "fsdp-muon-not-refused",
        "parallel",
        'if optimizer == "muon":',
        "if False:",
        ("test_parallel",),
        "Muon under FSDP is not refused: it would orthogonalise slices of matrices",
    ),
    Mutant(
        "fsdp-fp16-not-refused",
        "parallel",
        "if precision.scaled:",
        "if False:",
        ("test_parallel",),
        "fp16 under FSDP is not refused: each rank's scaler would see its own shard's "
        "overflows, and the ranks could disagree on skipping a step",
    ),
    Mutant(
        "fsdp-optimizer-of-other-parameters-unnamed",
        "parallel",
        "if not all(id(p) in names for p in held):",
        "if False:",
        ("test_parallel",),
        "an optimizer built before sharding ends in a KeyError of a number, not in what "
        "to do",
    ),
]


def apply(root: Path, mutant: Mutant) -> None:
    """Plant `mutant` in the copy at `root`; its text must occur exactly once in its
    module."""
    path = root / "gpt2lib" / f"{mutant.module}.py"
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name}: its text occurs {count} times in "
            f"gpt2lib/{mutant.module}.py, "
            "not once; update the mutant to the code"
        )
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def run_suite(root: Path, mutant: Mutant, timeout: float) -> tuple[bool, str, float]:
    """(caught, the first failing test or why not, seconds) for the suite on the mutated
    copy at `root`: the mutant's own test files first, then the rest (pytest would
    otherwise reorder the files into one directory walk)."""
    first = [f"tests/{name}.py" for name in mutant.tests]
    runs = [
        first,
        # not test_export (the notebooks are not mutated) nor test_mutate (it checks
        # that each mutant applies to the unmutated code): both fail on every mutant
        [
            "tests",
            "--ignore=tests/test_export.py",
            "--ignore=tests/test_mutate.py",
            *(f"--ignore={f}" for f in first),
        ],
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
    }  # the mutated copy wins over the installed package
    t0 = time.perf_counter()
    for paths in runs:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-rfE",
            "-p",
            "no:cacheprovider",
            *paths,
        ]
        try:
            result = subprocess.run(
                cmd,
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(1.0, timeout - (time.perf_counter() - t0)),
            )
        except subprocess.TimeoutExpired:
            return (
                True,
                f"(the suite hung past {timeout:.0f} s)",
                time.perf_counter() - t0,
            )
        if result.returncode != 0:
            failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
            detail = (
                failed.group(1)
                if failed
                else (result.stdout.strip().splitlines() or ["?"])[-1]
            )
            return True, detail, time.perf_counter() - t0
    return False, "survived: the whole suite passed", time.perf_counter() - t0


def check_copy_is_imported(root: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import gpt2lib; print(gpt2lib.__file__)"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )
    if not probe.stdout.strip().startswith(str(root)):
        raise SystemExit(
            f"the copy's gpt2lib is not the one imported ({probe.stdout.strip()}): "
            "is another gpt2lib ahead of PYTHONPATH?"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds the suite may take per mutant",
    )
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} gpt2lib/{m.module}.py: {m.why}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    chosen = [by_name[n] for n in args.names] or MUTANTS
    survivors, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt2lib-mutants-") as tmp:
        for i, mutant in enumerate(chosen, 1):
            root = Path(tmp) / mutant.name
            for name in checkout_files():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / name, root / name)
            if i == 1:
                check_copy_is_imported(root)
            apply(root, mutant)
            caught, detail, seconds = run_suite(root, mutant, args.timeout)
            print(
                f"[{i}/{len(chosen)}] {mutant.name}: "
                f"{'caught by ' if caught else ''}{detail} ({seconds:.0f} s)",
                flush=True,
            )
            if not caught:
                survivors.append(mutant.name)
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught in "
        f"{time.perf_counter() - t_all:.0f} s"
    )
    if survivors:
        print("SURVIVED (the suite does not catch them): " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
