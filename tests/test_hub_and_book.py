import time

import pytest

from gpt2lib.book import book_setting
from gpt2lib.hub import GPT2_SHAPES, hub_reachable, load_hf_gpt2


def test_offline_is_decided_at_once():
    start = time.perf_counter()
    assert hub_reachable() is False  # conftest sets HF_HUB_OFFLINE=1
    assert time.perf_counter() - start < 0.1


def test_unreachable_endpoint_is_decided_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    start = time.perf_counter()
    assert hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - start < 5


def test_standin_has_the_released_shape():
    model, is_real = load_hf_gpt2("gpt2")
    if is_real:
        pytest.skip(
            "the released gpt2 is in this machine's HF cache, so no stand-in is made"
        )
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == tuple(GPT2_SHAPES["gpt2"].values())
    assert (cfg.n_positions, cfg.vocab_size) == (1024, 50257)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="gpt2-medium"):
        load_hf_gpt2("gpt3")


def test_book_setting(monkeypatch):
    monkeypatch.setenv("GPT2_BOOK_DEVICE", "cpu")
    monkeypatch.delenv("GPT2_BOOK_SCALE", raising=False)
    assert book_setting().small
    monkeypatch.setenv("GPT2_BOOK_SCALE", "full")
    assert not book_setting().small
    monkeypatch.setenv("GPT2_BOOK_SCALE", "huge")
    with pytest.raises(ValueError, match="full"):
        book_setting()
