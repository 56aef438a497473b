"""Measure how far a CPU result drifts: the ladder's GPT-2 rung, seed 0, run here at
each thread count given, compared with each other and with a committed ladder measured
elsewhere (another CPU, or the same one).

    python tools/drift.py --threads 1 1 2 --json book/results/drift-cpu.json

Each run is `python -m gpt2lib.ladder --size SIZE --seeds 1 --rungs 1 --threads N` in a
fresh process. The JSON holds every run's curves and provenance (CPU model, its vector
flags, torch, threads), the reference's, the command that made it, and per pair of runs:
whether the curves are bit-identical, the first training step that differs, and the
largest differences of the training and validation losses. `tolerance` is the largest
validation-loss difference among the pairs that are not bit-identical; the
reproducibility page states the measured tolerance from the pairs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = (
    "device",
    "cpu",
    "cpu_flags",
    "cpu_capability",
    "threads",
    "torch",
    "commit",
    "dirty",
    "date",
    "command",
)


def gpt2_seed0(ladder: dict) -> dict:
    "The first rung's (GPT-2's) seed-0 run of a ladder result."
    rung = ladder["rungs"][0]
    assert rung["name"] == "gpt2", rung["name"]
    return next(run for run in rung["runs"] if run["seed"] == 0)


def compare(a: dict, b: dict) -> dict:
    """How two runs' curves differ: bit-identical or not, the first training step whose
    loss differs, and the largest absolute differences (training loss, validation loss,
    final validation loss)."""
    train_a, train_b = dict(map(tuple, a["train"])), dict(map(tuple, b["train"]))
    val_a, val_b = dict(map(tuple, a["val"])), dict(map(tuple, b["val"]))
    steps = sorted(set(train_a) & set(train_b))
    tokens = sorted(set(val_a) & set(val_b))
    if not steps or not tokens:
        raise SystemExit("error: the two runs share no training step or evaluation")
    differing = [s for s in steps if train_a[s] != train_b[s]]
    return {
        "identical": not differing
        and all(val_a[t] == val_b[t] for t in tokens)
        and len(steps) == len(train_a) == len(train_b),
        "first_differing_step": differing[0] if differing else None,
        "max_abs_train_loss": max(abs(train_a[s] - train_b[s]) for s in steps),
        "max_abs_val_loss": max(abs(val_a[t] - val_b[t]) for t in tokens),
        "final_val_loss": [val_a[tokens[-1]], val_b[tokens[-1]]],
        "abs_final_val_loss": abs(val_a[tokens[-1]] - val_b[tokens[-1]]),
    }


def run_here(threads: int, size: str, max_steps: int | None, work: Path) -> dict:
    "One ladder run of GPT-2, seed 0, at `threads` threads; its ladder JSON."
    out = work / f"ladder-{len(list(work.iterdir()))}-{threads}.json"
    command = [
        sys.executable,
        "-m",
        "gpt2lib.ladder",
        "--size",
        size,
        "--seeds",
        "1",
        "--rungs",
        "1",
        "--threads",
        str(threads),
        "--device",
        "cpu",
        "--json",
        str(out),
        *([] if max_steps is None else ["--max-steps", str(max_steps)]),
    ]
    print(f"{threads} thread(s): {shlex.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: the ladder run failed: {done.stderr.strip()}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="one run per value; repeat a value to see whether a run repeats itself",
    )
    ap.add_argument(
        "--reference",
        default="book/results/ladder-cpu.json",
        help="a committed ladder result to compare with (its GPT-2 rung, seed 0)",
    )
    ap.add_argument("--size", default="cpu", help="the ladder's --size (default cpu)")
    ap.add_argument("--max-steps", type=int, default=None, help="the ladder's")
    ap.add_argument("--json", required=True, help="write the measurement here")
    ap.add_argument("--force", action="store_true", help="overwrite --json")
    args = ap.parse_args(argv)
    out = Path(args.json)
    if out.exists() and not args.force:
        raise SystemExit(f"error: --json {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise SystemExit(f"error: --json {out}: no directory {out.parent}")
    reference = json.loads((ROOT / args.reference).read_text())
    with tempfile.TemporaryDirectory(prefix="gpt2lib-drift-") as work:
        ladders = [
            run_here(n, args.size, args.max_steps, Path(work)) for n in args.threads
        ]
    runs = [
        {
            "name": f"here, {ladder['threads']} thread(s), run {i + 1}",
            **{k: ladder.get(k) for k in PROVENANCE},
            **gpt2_seed0(ladder),
        }
        for i, ladder in enumerate(ladders)
    ]
    same_settings = all(
        {**ladder["base"], "data": None} == {**reference["base"], "data": None}
        for ladder in ladders
    )
    ref = {
        "name": f"{args.reference} (committed)",
        **{k: reference.get(k) for k in PROVENANCE},
        **gpt2_seed0(reference),
    }
    candidates = runs + ([ref] if same_settings else [])
    pairs = [
        {"a": a["name"], "b": b["name"], **compare(a, b)}
        for i, a in enumerate(candidates)
        for b in candidates[i + 1 :]
    ]
    drifting = [p["max_abs_val_loss"] for p in pairs if not p["identical"]]
    command = "python tools/drift.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    result = {
        "command": command,
        "what": (
            "the ladder's GPT-2 rung, seed 0, run on this machine at each thread "
            "count, compared with each other and with the committed reference"
        ),
        "reference_compared": same_settings,
        "tolerance": max(drifting) if drifting else 0.0,
        "pairs": pairs,
        "runs": runs,
        "reference": ref,
    }
    text = json.dumps(result, indent=1) + "\n"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    for p in pairs:
        verdict = (
            "bit-identical"
            if p["identical"]
            else f"differ from step {p['first_differing_step']}: max |d val loss| "
            f"{p['max_abs_val_loss']:.5f}, final {p['abs_final_val_loss']:.5f}"
        )
        print(f"{p['a']} vs {p['b']}: {verdict}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
