#!/usr/bin/env bash
# The GPU results under book/results/, measured in one go on one GPU machine: chapter 4's
# speed ladder and the preflight of the two 124M presets (chapters 9 and 11). Each stage
# has its own time limit and is stopped with Ctrl-C's signal, so a slow or failing stage
# still leaves what it measured and the later stages their time.
#
#   bash tools/gpu_check.sh OUT_DIR NAME     NAME names the GPU in the files, e.g. h200
#
# No network is assumed. The preflights read stand-in data made here: Tiny Shakespeare's
# tokens repeated to the size of FineWeb's validation shard (160 batches of 64 x 1,024),
# and chapter 8's 8 handmade HellaSwag examples repeated to the 10,042 of the real
# validation set. Time per step and per example does not depend on the tokens; the losses
# in these reports are those of the stand-in, not of FineWeb. Set GPU_CHECK_SMALL=1 to
# try the script on a CPU in a minute (tiny model, no compile).
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR NAME}
name=${2:?usage: bash tools/gpu_check.sh OUT_DIR NAME}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import torch, tiktoken, transformers" 2>/dev/null; then
  echo "error: python3 here lacks torch, tiktoken or transformers: pip install -e ." \
    "in this checkout first" >&2
  exit 1
fi
if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  device=(--device cpu --no-compile)
  shrink=(--n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --batch-size 4
          --total-batch-size 512 --eval-batches 2 --steps 2 --hellaswag-examples 2)
  bench=(--model tiny --device cpu --no-compile --steps 2 --warmup 1)
  limits=(60 120)  # seconds: each preflight and HellaSwag, the ladder
else
  if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA GPU here: run this on a GPU machine, or set GPU_CHECK_SMALL=1" \
      "to try the script on a CPU" >&2
    exit 1
  fi
  device=(--device cuda)
  shrink=()
  bench=(--device cuda --max-batch-size 64)
  limits=(120 180)  # seconds: each preflight and HellaSwag, the ladder
fi

mkdir -p "$out"
exec > >(tee "$out/gpu_check-$name.log") 2>&1  # the log is a result too
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
stage() {  # stage NAME SECONDS COMMAND...: run it, report how it ended and how long
  local what=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $what (at most $limit s)"
  timeout -s INT -k 20 "$limit" "$@"
  status=$?
  echo "== $what: exit $status after $((SECONDS - start)) s"
  [ "$status" = 0 ] || failed+=("$what")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0],
'| torch', torch.__version__, '| cuda', torch.version.cuda,
'| transformers', transformers.__version__)"
git rev-parse HEAD && git status --short | head

python3 - "$work" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from gpt2lib.data import read_asset_text, tokenize

work = Path(sys.argv[1])
tokens = tokenize(read_asset_text("tinyshakespeare.txt"))
(work / "data").mkdir()
for split, n in (("train", 40_000_000), ("val", 64 * 1024 * 160 + 1)):
    np.save(work / "data" / f"standin_{split}_000000.npy", np.resize(tokens, n))
lines = read_asset_text("hellaswag_handmade.jsonl").splitlines()
(work / "hellaswag_val.jsonl").write_text(
    "\n".join(lines[i % len(lines)] for i in range(10_042)) + "\n"
)
print(f"stand-in data: {len(tokens):,} Shakespeare tokens repeated; 10,042 examples")
EOF

for preset in gpt2-124m gpt2-124m-speedrun; do
  stage "preflight $preset" "${limits[0]}" python3 -m gpt2lib.preflight \
    --preset "$preset" --data "$work/data" --hellaswag "$work/hellaswag_val.jsonl" \
    --out "$work/runs/$preset" --json "$out/preflight-$name-$preset.json" \
    --no-progress "${device[@]}" "${shrink[@]}"
done
# HellaSwag one example per forward pass (as gpt2lib scored it before) and in batches of a
# training micro-batch's tokens: GPT-2 124M as initialised, the same examples, twice each
stage "hellaswag" "${limits[0]}" python3 - "$work/hellaswag_val.jsonl" \
  "$out/hellaswag-$name.json" "${device[1]}" <<'EOF'
import json, sys, time
import torch
from gpt2lib.evaluate import evaluate_hellaswag, read_hellaswag, render_example
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.runtime import atomic_write, autocast_for, provenance

source, report, device = sys.argv[1:]
small = device == "cpu"
examples = read_hellaswag(source)[: 16 if small else 400]
torch.manual_seed(1337)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64) if small else GPTConfig())
model.to(device)
autocast, runs = autocast_for(device), []
for max_tokens in (1, 64 * 1024) * 2:  # the first of each warms up
    t0 = time.perf_counter()
    scores = evaluate_hellaswag(
        model, examples, device, autocast, progress=False, max_tokens=max_tokens
    )
    runs.append({"max_tokens": max_tokens, "seconds": time.perf_counter() - t0,
                 "examples": len(examples), **scores})
    print(runs[-1])
widths = [render_example(example)[0].size(1) for example in examples]
result = {**provenance(device), "model": "GPT-2 124M's shape, random weights",
          "row_tokens": [min(widths), max(widths)], "runs": runs[2:]}
atomic_write(report, json.dumps(result, indent=2) + "\n")
EOF
stage "bench" "${limits[1]}" \
  python3 -m gpt2lib.bench "${bench[@]}" --json "$out/bench-$name.json"
ls -l "$out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: failed: ${failed[*]} (see above; what they measured is in $out)" >&2
  exit 1
fi
