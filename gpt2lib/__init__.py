"""gpt2lib: GPT-2 (124M) reproduced from scratch in PyTorch.

Every module except this one is generated from a chapter of the book in `nbs/`
(`python tools/export.py`); edit the chapter, not the module.

    tokenizer  GPT-2's BPE from the vendored rank file       (nbs/01_hf_gpt2.ipynb)
    hub        released model names, hub access, stand-ins    (nbs/01_hf_gpt2.ipynb)
    book       helpers the chapters share                     (nbs/01_hf_gpt2.ipynb)
    model      GPTConfig, GPT, loading HF weights, generate   (nbs/02_model.ipynb)
    sample     python -m gpt2lib.sample                       (nbs/02_model.ipynb)
    data       token batches, the shard-aware DataLoader      (nbs/03_data.ipynb)
    bench      python -m gpt2lib.bench: the speed ladder      (nbs/04_speed.ipynb)
    optim      AdamW groups, lr schedule, train_step          (nbs/05_optimization.ipynb)
    dist       torchrun/DDP set-up, all-reduce helpers        (nbs/06_ddp.ipynb)
    fineweb    python -m gpt2lib.fineweb: FineWeb-Edu shards   (nbs/07_fineweb.ipynb)
    evaluate   validation loss, HellaSwag, python -m gpt2lib.evaluate (nbs/08_eval.ipynb)
    train      python -m gpt2lib.train, presets               (nbs/09_train.ipynb)
    checkpoint atomic checkpoints, exact resume               (nbs/09_train.ipynb)
    export_hf  python -m gpt2lib.export_hf: HF-format export  (nbs/10_beyond.ipynb)
"""

__version__ = "0.1.0"
