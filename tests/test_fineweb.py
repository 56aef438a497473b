"""gpt2lib.fineweb: local documents -> uint16 token shards, exact, resumable, atomic."""

import errno
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2lib import fineweb
from gpt2lib.data import DataLoader, load_tokens, read_asset_text
from gpt2lib.fineweb import (
    document_files,
    local_documents,
    read_manifest,
    verify_shards,
    write_shards,
)
from gpt2lib.runtime import UserError
from gpt2lib.tokenizer import EOT_TOKEN, get_encoding
from gpt2lib.config import TrainConfig
from gpt2lib.run import load_data

SHARD = 1000  # tokens per shard: small, so documents cross shard boundaries


@pytest.fixture(scope="module")
def docs():
    """Documents of random lengths cut from Tiny Shakespeare, plus edge cases: an empty
    one, one longer than two shards, non-ASCII text, and a literal "<|endoftext|>" that
    must stay text."""
    text = read_asset_text("tinyshakespeare.txt")
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 40_000), size=60, replace=False))
    docs = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    docs[5] = ""
    docs[10] = text[50_000:62_000]  # ~3,000 tokens: spans at least three shards
    docs[20] = "Café naïve — 日本語 ✓ and emoji 🙂"
    docs[30] = "a page that quotes <|endoftext|> literally"
    return docs


def expected_tokens(docs):
    """The reference: each document tokenized directly, `<|endoftext|>` first,
    concatenated."""
    enc = get_encoding()
    return np.concatenate(
        [np.array([EOT_TOKEN, *enc.encode_ordinary(d)], dtype=np.int64) for d in docs]
    )


def write_parquet(path, docs, row_group_size=7):
    pq.write_table(
        pa.table({"id": list(range(len(docs))), "text": docs}),
        path,
        row_group_size=row_group_size,
    )
    return path


def shard_stream(out):
    "All tokens of a shard directory in shard order (manifest order: val first)."
    manifest = read_manifest(out)
    return np.concatenate(
        [load_tokens(out / s["name"]) for s in manifest["shards"]]
    ).astype(np.int64)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, docs):
    "The documents as two parquet files (several row groups each) in a directory."
    d = tmp_path_factory.mktemp("parquet")
    write_parquet(d / "part_0.parquet", docs[:25])
    write_parquet(d / "part_1.parquet", docs[25:])
    return d


@pytest.fixture(scope="module")
def straight(tmp_path_factory, parquet_dir):
    "An uninterrupted run over the parquet files with two worker processes."
    out = tmp_path_factory.mktemp("straight")
    summary = write_shards(
        local_documents(document_files([parquet_dir])),
        out,
        SHARD,
        workers=2,
        source="fixture",
        progress=False,
    )
    return out, summary


def test_parquet_shards_hold_exactly_the_documents_tokens(straight, docs):
    out, summary = straight
    expected = expected_tokens(docs)
    assert len(expected) > 5 * SHARD  # the fixture really crosses boundaries
    assert np.array_equal(shard_stream(out), expected)
    manifest = read_manifest(out)
    sizes = [s["tokens"] for s in manifest["shards"]]
    assert sizes[:-1] == [SHARD] * (len(sizes) - 1) and 0 < sizes[-1] <= SHARD
    assert (
        manifest["finished"]
        and manifest["docs"] == len(docs)
        and manifest["tokens"] == len(expected)
    )
    assert summary["finished"] and summary["tokens"] == summary["new_tokens"] == len(
        expected
    )
    # a literal "<|endoftext|>" in a document is text: only the separators are EOT
    assert (shard_stream(out) == EOT_TOKEN).sum() == len(docs)


def test_names_dtype_checksums_and_resume_points(straight, docs):
    out, _ = straight
    manifest = read_manifest(out)
    names = [s["name"] for s in manifest["shards"]]
    assert names[0] == "fineweb_val_000000.npy"
    assert names[1:] == [f"fineweb_train_{i:06d}.npy" for i in range(1, len(names))]
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        names
    )  # no stray (temporary) files
    assert not [
        p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no temporary files
    for s in manifest["shards"]:
        arr = np.load(out / s["name"])
        assert arr.dtype == np.uint16 and arr.ndim == 1 and len(arr) == s["tokens"]
        assert s["sha256"] == fineweb.sha256_file(out / s["name"])
    assert verify_shards(out) == []
    # each (next_doc, next_offset) is where the shard's end falls in the document stream
    lengths = [len(get_encoding().encode_ordinary(d)) + 1 for d in docs]
    ends = np.cumsum([s["tokens"] for s in manifest["shards"]])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for s, end in zip(manifest["shards"], ends):
        assert starts[s["next_doc"]] + s["next_offset"] == end


def test_training_loader_reads_the_shards(straight):
    out, _ = straight
    train, val = load_data(TrainConfig(data=str(out)))
    assert [p.name for p in val] == ["fineweb_val_000000.npy"]
    assert len(train) == len(read_manifest(out)["shards"]) - 1
    loader = DataLoader(train, B=2, T=16, seed=0)
    x, y = loader.next_batch()
    first = np.load(train[loader.order[0]]).astype(np.int64)
    assert x.shape == (2, 16) and np.array_equal(x.flatten().numpy(), first[:32])
    assert np.array_equal(y.flatten().numpy(), first[1:33])


def test_jsonl_and_gzip_give_the_same_shards_in_process(tmp_path, docs, straight):
    lines = [json.dumps({"text": d, "url": f"u{i}"}) for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(lines[:30]) + "\n\n"
    )  # a blank line is skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[30:]) + "\n")
    out = tmp_path / "out"
    write_shards(
        local_documents(
            document_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"])
        ),
        out,
        SHARD,
        workers=1,
        source="fixture",
        progress=False,
    )
    assert np.array_equal(shard_stream(out), expected_tokens(docs))
    # workers=1 (in-process) and workers=2 (pool) write identical files
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [
        s["sha256"] for s in read_manifest(straight[0])["shards"]
    ]


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, parquet_dir, straight):
    files = document_files([parquet_dir])
    out = tmp_path / "out"
    first = write_shards(
        local_documents(files),
        out,
        SHARD,
        workers=2,
        source="fixture",
        stop_after=2,
        progress=False,
    )
    assert (
        not first["finished"]
        and first["shards"] == 2
        and len(list(out.glob("*.npy"))) == 2
    )
    second = write_shards(
        local_documents(files), out, SHARD, workers=2, source="fixture", progress=False
    )
    assert second["finished"] and second["new_shards"] == straight[1]["shards"] - 2
    assert (out / "manifest.json").read_text() == (
        straight[0] / "manifest.json"
    ).read_text()
    assert np.array_equal(shard_stream(out), shard_stream(straight[0]))
    # a finished directory is left alone
    again = write_shards(
        local_documents(files), out, SHARD, workers=2, source="fixture", progress=False
    )
    assert again["finished"] and again["new_tokens"] == 0


def test_disk_full_mid_shard_leaves_no_complete_looking_shard_and_resumes(
    tmp_path, parquet_dir, straight, monkeypatch
):
    files = document_files([parquet_dir])
    out = tmp_path / "out"
    real_save, calls = np.save, []

    def save_then_fill_the_disk(f, arr, **kw):
        calls.append(1)
        if len(calls) == 3:  # the third shard: half its bytes, then ENOSPC
            f.write(b"\x93NUMPY" + bytes(arr.nbytes // 2))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr, **kw)

    monkeypatch.setattr(fineweb.np, "save", save_then_fill_the_disk)
    with pytest.raises(
        UserError, match="No space left on device.*partial file was removed.*resume"
    ):
        write_shards(
            local_documents(files),
            out,
            SHARD,
            workers=2,
            source="fixture",
            progress=False,
        )
    monkeypatch.setattr(fineweb.np, "save", real_save)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "fineweb_train_000001.npy",
        "fineweb_val_000000.npy",
        "manifest.json",
    ]
    assert [s["name"] for s in read_manifest(out)["shards"]] == [
        "fineweb_val_000000.npy",
        "fineweb_train_000001.npy",
    ]
    assert not read_manifest(out)["finished"]
    write_shards(
        local_documents(files), out, SHARD, workers=2, source="fixture", progress=False
    )
    assert (out / "manifest.json").read_text() == (
        straight[0] / "manifest.json"
    ).read_text()


def test_resume_refuses_other_settings_or_damaged_shards(tmp_path, parquet_dir):
    files = document_files([parquet_dir])
    out = tmp_path / "out"
    write_shards(
        local_documents(files),
        out,
        SHARD,
        workers=1,
        source="fixture",
        stop_after=2,
        progress=False,
    )
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(
            local_documents(files),
            out,
            SHARD * 2,
            workers=1,
            source="fixture",
            progress=False,
        )
    np.save(
        out / "fineweb_train_000001.npy", np.zeros(10, dtype=np.uint16)
    )  # truncated by someone
    with pytest.raises(
        ValueError, match="fineweb_train_000001.npy is missing or has the wrong size"
    ):
        write_shards(
            local_documents(files),
            out,
            SHARD,
            workers=1,
            source="fixture",
            progress=False,
        )
    assert verify_shards(out) == [
        "fineweb_train_000001.npy: SHA-256 differs from the manifest"
    ]
    stray = tmp_path / "stray"
    stray.mkdir()
    np.save(stray / "tokens.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="no manifest.json"):
        write_shards(
            local_documents(files),
            stray,
            SHARD,
            workers=1,
            source="fixture",
            progress=False,
        )


def test_limit_docs(tmp_path, docs, parquet_dir):
    out = tmp_path / "out"
    write_shards(
        local_documents(document_files([parquet_dir])),
        out,
        SHARD,
        workers=1,
        source="fixture",
        limit_docs=12,
        progress=False,
    )
    assert np.array_equal(shard_stream(out), expected_tokens(docs[:12]))
    assert read_manifest(out)["docs"] == 12


def test_bad_local_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        document_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .parquet"):
        document_files([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a .parquet"):
        document_files([tmp_path / "notes.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        write_shards(
            local_documents([bad]),
            tmp_path / "o1",
            SHARD,
            workers=2,
            source="bad",
            progress=False,
        )
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: not an object with a 'text' field"):
        list(local_documents([nofield]))
    notparquet = tmp_path / "fake.parquet"
    notparquet.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        list(local_documents([notparquet]))
    wrongcol = write_parquet(tmp_path / "wrongcol.parquet", ["a"])
    with pytest.raises(ValueError, match="no 'body' column"):
        list(local_documents([wrongcol], text_field="body"))
    empty = tmp_path / "nothing.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        write_shards(
            local_documents([empty]),
            tmp_path / "o2",
            SHARD,
            workers=1,
            source="nothing",
            progress=False,
        )


def test_token_ids_must_fit_uint16(monkeypatch):
    class WideTokenizer:
        def encode_ordinary(self, text):
            return [70_000]

    monkeypatch.setattr(fineweb, "get_encoding", lambda: WideTokenizer())
    with pytest.raises(ValueError, match="70000 does not fit in uint16"):
        fineweb.tokenize_doc("x")


def test_loader_rejects_wrong_dtype_shard(tmp_path):
    np.save(tmp_path / "fineweb_train_000001.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(ValueError, match="must be a 1-D uint16 array, got 1-D int32"):
        DataLoader(tmp_path, B=1, T=8)


def test_hub_unreachable_fails_fast():
    # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(
        ConnectionError, match="cannot reach the Hugging Face hub.*--local"
    ):
        fineweb.hub_documents()


def run_cli(*args):
    "`python -m gpt2lib.fineweb ARGS` in a fresh process."
    return subprocess.run(
        [sys.executable, "-m", "gpt2lib.fineweb", *map(str, args)],
        capture_output=True,
        text=True,
    )


def main_in_process(capsys, *args):
    """(exit message or None, stdout) of fineweb.main(ARGS), without the cost of a new
    process."""
    try:
        fineweb.main([str(a) for a in args])
        code = None
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().out


def test_cli_shards_and_verifies(tmp_path, parquet_dir, straight):
    out = tmp_path / "out"
    r = run_cli(
        "--out",
        out,
        "--local",
        parquet_dir,
        "--shard-size",
        SHARD,
        "--workers",
        2,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout and "tokens/s per worker" in r.stdout
    assert np.array_equal(shard_stream(out), shard_stream(straight[0]))


def test_cli_stop_resume_verify(tmp_path, parquet_dir, straight, capsys):
    out = tmp_path / "out"
    common = [
        "--out",
        out,
        "--local",
        parquet_dir,
        "--shard-size",
        SHARD,
        "--workers",
        1,
        "--no-progress",
    ]
    code, stdout = main_in_process(capsys, *common, "--stop-after", 1)
    assert (
        code is None and "stopped" in stdout and len(read_manifest(out)["shards"]) == 1
    )
    code, stdout = main_in_process(capsys, *common)
    assert code is None and "done" in stdout
    assert np.array_equal(shard_stream(out), shard_stream(straight[0]))
    code, stdout = main_in_process(capsys, "--out", out, "--verify")
    assert code is None and "match the manifest" in stdout
    (out / "fineweb_val_000000.npy").write_bytes(b"damaged")
    code, _ = main_in_process(capsys, "--out", out, "--verify")
    assert code == "error: fineweb_val_000000.npy: SHA-256 differs from the manifest"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--local", "MISSING"], "error: no such file or directory"),
        ([], "error: cannot reach the Hugging Face hub"),
        (["--verify"], "error: .*manifest.json does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, parquet_dir, args, message, capsys):
    args = [
        {"MISSING": tmp_path / "missing", "PARQUET": parquet_dir}.get(a, a)
        for a in args
    ]
    code, _ = main_in_process(capsys, "--out", tmp_path / "out", *args)
    assert isinstance(code, str) and "\n" not in code and re.match(message, code), code


@pytest.mark.parametrize(
    "option, value",
    [
        ("--shard-size", "0"),
        ("--workers", "0"),
        ("--limit-docs", "-1"),
        ("--stop-after", "0"),
    ],
)
def test_cli_out_of_range_options_are_one_line_errors(
    tmp_path, parquet_dir, option, value
):
    "A value that parses but is out of range: `error: ...` and status 1, not usage."
    with pytest.raises(SystemExit) as exit:
        fineweb.main(
            ["--out", str(tmp_path / "out"), "--local", str(parquet_dir), option, value]
        )
    low = 0 if option == "--limit-docs" else 1
    assert exit.value.code == f"error: {option} must be at least {low}, got {value}"
    assert not (tmp_path / "out").exists()


def test_cli_error_exit_status(tmp_path):
    r = run_cli("--out", tmp_path / "out", "--local", tmp_path / "missing")
    assert (
        r.returncode == 1
        and r.stderr.startswith("error: no such file or directory")
        and "Traceback" not in r.stderr
    )


def test_the_same_files_named_another_way_resume_the_same_run(
    tmp_path, parquet_dir, straight, capsys
):
    """A relative and an absolute path to the same input are the same source: the run
    resumes."""
    relative = os.path.relpath(parquet_dir, tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _ = main_in_process(
            capsys,
            "--out",
            "out",
            "--local",
            relative,
            "--shard-size",
            SHARD,
            "--workers",
            "1",
            "--stop-after",
            "1",
            "--no-progress",
        )
    finally:
        os.chdir(cwd)
    assert code is None
    code, out = main_in_process(
        capsys,
        "--out",
        tmp_path / "out",
        "--local",
        parquet_dir,
        "--shard-size",
        SHARD,
        "--workers",
        "1",
        "--no-progress",
    )
    assert code is None and out.startswith("done:"), out
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.npy")} == {
        p.name: p.read_bytes() for p in straight[0].glob("*.npy")
    }
