"""gpt2lib: GPT-2 (124M) reproduced from scratch in PyTorch.

Every module except this one is generated from a chapter of the book in `nbs/`
(`python tools/export.py`); edit the chapter, not the module. Layers, lowest first (a
module imports only from layers below its own; the chapter that owns it):

    0  runtime    device, autocast, atomic writes, locks, provenance, errors  ch. 0
    1  book       the chapters' setting and banner  ch. 0
       tokenizer  GPT-2's BPE from the vendored rank file  ch. 1
       hub        released model names, hub access, stand-ins  ch. 1
       model      GPTConfig, GPT, generate  ch. 2
       optim      AdamW groups, lr schedule, train_step  ch. 5
       dist       torchrun/DDP set-up, collectives  ch. 6
       rundir     a run's directory: lock, log writer and reader  ch. 9
    2  hf         HF's GPT-2 format, both directions  ch. 2
       data       token files, shards, the DataLoader  ch. 3
       modern     GPT-2 with the speedrun's changes, each behind a switch  ch. 11
       parallel   DDP or FSDP behind one seam: wrap, checkpoints, evaluation  ch. 6
    3  checkpoint checkpoint format, Checkpointer, load_model  ch. 9
       config     TrainConfig, presets, setting checks, CLI options  ch. 9
       bench      gpt2-bench: the speed ladder  ch. 4
       fineweb    gpt2-fineweb: FineWeb-Edu shards  ch. 7
    4  sample     gpt2-sample  ch. 2
       evaluate   validation loss, HellaSwag, gpt2-evaluate  ch. 8
       export_hf  gpt2-export-hf: HF-format export  ch. 10
       loggers    log.jsonl, TensorBoard and W&B, as parts  ch. 9
       memory     the model's memory, the micro-batch search  ch. 9
       run        the Run: what one run holds, built once  ch. 9
       cli        the command line gpt2-train and gpt2-preflight share  ch. 9
    5  evaluations  validation loss, HellaSwag, samples as parts  ch. 9
    6  train      gpt2-train: the loop over a Run  ch. 9
       preflight  gpt2-preflight: every part of a run tried in minutes  ch. 9
    7  ladder     python -m gpt2lib.ladder: the speedrun's changes, measured  ch. 11

`GPT.from_pretrained` (layer 1) hands over to `gpt2lib.hf` inside the method: the one
import that points up, so that the model class keeps HF's familiar entry point.
"""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"


def _started_as_command() -> bool:
    """Whether this process runs a gpt2lib command: `python -m gpt2lib.NAME` (argv[0] is
    '-m' while the package is imported) or a console script `gpt2-NAME`."""
    name = _os.path.basename(_sys.argv[0]) if _sys.argv and _sys.argv[0] else ""
    return name == "-m" or name.startswith("gpt2-")


if _started_as_command():
    # Ctrl-C while PyTorch imports: exit 130 quietly, not with a traceback of
    # importlib's; runtime.run_command restores the handler
    _signal.signal(_signal.SIGINT, lambda signum, frame: _os._exit(130))
