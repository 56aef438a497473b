"""gpt2lib: GPT-2 (124M) reproduced from scratch in PyTorch.

Every module except this one is generated from a chapter of the book in `nbs/`
(`python tools/export.py`); edit the chapter, not the module. Layers, lowest first (a
module imports only from layers below its own):

    0  runtime    device, autocast, atomic writes, locks, provenance, errors (nbs/00_runtime.ipynb)
    1  book       the chapters' setting and banner                          (nbs/00_runtime.ipynb)
       tokenizer  GPT-2's BPE from the vendored rank file                   (nbs/01_hf_gpt2.ipynb)
       hub        released model names, hub access, stand-ins               (nbs/01_hf_gpt2.ipynb)
       model      GPTConfig, GPT, generate                                  (nbs/02_model.ipynb)
       optim      AdamW groups, lr schedule, train_step                     (nbs/05_optimization.ipynb)
       dist       torchrun/DDP set-up, collectives                          (nbs/06_ddp.ipynb)
    2  hf         HF's GPT-2 format, both directions                        (nbs/02_model.ipynb)
       data       token files, shards, the DataLoader                       (nbs/03_data.ipynb)
    3  checkpoint checkpoint format, Checkpointer, load_model               (nbs/09_train.ipynb)
       config     TrainConfig, presets, setting checks, CLI options         (nbs/09_train.ipynb)
       rundir     a run's directory: lock, log writer and reader            (nbs/09_train.ipynb)
       bench      gpt2-bench: the speed ladder                              (nbs/04_speed.ipynb)
       fineweb    gpt2-fineweb: FineWeb-Edu shards                          (nbs/07_fineweb.ipynb)
    4  sample     gpt2-sample                                               (nbs/02_model.ipynb)
       evaluate   validation loss, HellaSwag, gpt2-evaluate                 (nbs/08_eval.ipynb)
       export_hf  gpt2-export-hf: HF-format export                          (nbs/10_beyond.ipynb)
    5  train      gpt2-train: the coordinator of a run                      (nbs/09_train.ipynb)
    6  preflight  gpt2-preflight: every part of a run tried in minutes      (nbs/09_train.ipynb)

`GPT.from_pretrained` (layer 1) hands over to `gpt2lib.hf` inside the method: the one
import that points up, so that the model class keeps HF's familiar entry point.
"""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"


def _started_as_command() -> bool:
    """Whether this process runs a gpt2lib command: `python -m gpt2lib.NAME` (argv[0] is '-m'
    while the package is imported) or a console script `gpt2-NAME`."""
    name = _os.path.basename(_sys.argv[0]) if _sys.argv and _sys.argv[0] else ""
    return name == "-m" or name.startswith("gpt2-")


if _started_as_command():  # Ctrl-C while PyTorch imports: exit 130 quietly, not with a traceback of importlib's
    _signal.signal(_signal.SIGINT, lambda signum, frame: _os._exit(130))  # runtime.run_command restores it
