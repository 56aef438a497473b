import hashlib
import inspect
import re
from importlib.resources import files

import pytest
import tiktoken
import tiktoken_ext.openai_public
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lib.tokenizer import (
    EOT_TOKEN,
    GPT2_SPLIT_PATTERN,
    RANKS_PATH,
    get_encoding,
    load_ranks,
)


def test_rank_file_is_the_one_tiktoken_publishes_for_gpt2():
    """The vendored file's SHA-256 against the hash tiktoken checks when it downloads
    r50k_base, GPT-2's ranks (tiktoken's "gpt2" encoding builds the same ranks from
    GPT-2's original files)."""
    source = inspect.getsource(tiktoken_ext.openai_public.r50k_base)
    published = re.search(r'expected_hash="([0-9a-f]{64})"', source).group(1)
    assert hashlib.sha256(RANKS_PATH.read_bytes()).hexdigest() == published


def test_known_ids():
    assert get_encoding().encode("Hello, I'm a language model,") == [
        15496,
        11,
        314,
        1101,
        257,
        3303,
        2746,
        11,
    ]


def test_same_ranks_and_pattern_as_tiktoken():
    # tiktoken's own loader of the same file, and the pattern tiktoken registers
    # for gpt2.
    assert load_ranks() == load_tiktoken_bpe(str(RANKS_PATH))
    assert GPT2_SPLIT_PATTERN == r50k_pat_str
    enc = get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN == 50256


def test_round_trip_on_vendored_text():
    enc = get_encoding()
    text = (files("gpt2lib") / "assets" / "tinyshakespeare.txt").read_text(
        encoding="utf-8"
    )
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert 0.2 < len(ids) / len(text) < 0.4  # English BPE: 3-4 characters per token


@pytest.mark.parametrize(
    "text", ["naïve café 北京 🤖", "  leading\tand\n\ntrailing   ", "x" * 5000, ""]
)
def test_round_trip_odd_text(text):
    enc = get_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_endoftext_is_special():
    enc = get_encoding()
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")
    # tiktoken refuses special tokens in text by default
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")


def test_damaged_rank_file_is_refused(tmp_path):
    data = bytearray(RANKS_PATH.read_bytes())
    data[10] ^= 1
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_ranks(bad)
