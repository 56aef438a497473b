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
COPIED = ("gpt2lib", "tests", "tools", "nbs", "book", "pyproject.toml", "_toc.yml")


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
        "[batch], lr=6e-4, grad_clip=1.0",
        "[batch], lr=0.0 if recipe.fused_adamw else 6e-4, grad_clip=1.0",
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
        "logits = MaskPadding.apply(logits, self.config.vocab_size)",
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
        'self.loader.load_state_dict(state["loader"])',
        "pass",
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
        "if not (math.isfinite(loss) and math.isfinite(norm)):",
        "if False:",
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
        ["tests", "--ignore=tests/test_export.py", *(f"--ignore={f}" for f in first)],
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
            for name in COPIED:
                source = ROOT / name
                (shutil.copytree if source.is_dir() else shutil.copy)(
                    source, root / name
                )
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
