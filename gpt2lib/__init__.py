"""gpt2lib: GPT-2 (124M) reproduced from scratch in PyTorch.

Every module except this one is generated from a chapter of the book in `nbs/`
(`python tools/export.py`); edit the chapter, not the module.

    tokenizer  GPT-2's BPE from the vendored rank file       (nbs/01_hf_gpt2.ipynb)
    hub        released model names, hub access, stand-ins    (nbs/01_hf_gpt2.ipynb)
    book       helpers the chapters share                     (nbs/01_hf_gpt2.ipynb)
    model      GPTConfig, GPT, loading HF weights, generate   (nbs/02_model.ipynb)
    sample     python -m gpt2lib.sample                       (nbs/02_model.ipynb)
"""

__version__ = "0.1.0"
