import io
import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gpt2lib import evaluate
from gpt2lib.checkpoint import load_model, save_checkpoint
from gpt2lib.data import DataLoader
from gpt2lib.evaluate import (
    batches,
    check_example,
    download_hellaswag,
    ending_losses,
    evaluate_hellaswag,
    main,
    read_hellaswag,
    reference_figures,
    render_example,
    score_example,
    validation_loss,
)
from gpt2lib.model import GPT, GPTConfig
from gpt2lib.tokenizer import get_encoding

# Hand-made examples in HellaSwag's format, with endings of different lengths (so rows
# are padded).
EXAMPLES = [
    {
        "ctx": "A man is sitting on a roof. He",
        "label": 3,
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    },
    {
        "ctx": "The cat jumped onto the table and",
        "label": 0,
        "endings": [
            "knocked over a glass of milk.",
            "flew.",
            "wrote a long letter to the bank about interest rates.",
            "sang.",
        ],
    },
    {
        "ctx": "She opened the oven,",
        "label": 2,
        "endings": [
            "and a whale came out.",
            "then closed it again and again and again and again.",
            "took out the bread and set it on the rack to cool.",
            "x",
        ],
    },
    {
        "ctx": "Rain fell all day, so the children",
        "label": 1,
        "endings": [
            "went swimming in the sky.",
            "stayed inside and played board games.",
            "ate the rain.",
            "melted.",
        ],
    },
    {
        "ctx": "To tie a shoe, first",
        "label": 0,
        "endings": [
            "cross the laces.",
            "boil the shoe.",
            "call a plumber.",
            "paint the laces green and wait a week.",
        ],
    },
]


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    return path


@pytest.fixture
def hellaswag_file(tmp_path):
    return write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)


@pytest.fixture(scope="module")
def models(gpt2_vocab_hf):
    "(HF GPT2LMHeadModel, our GPT with the same random weights, the HF dir)."
    hf, path = gpt2_vocab_hf
    return hf, GPT.from_pretrained(path), path


def hf_ending_losses(hf, example):
    """Independent reference: each ending run through HF's GPT-2 on its own (no padding,
    no mask); its loss is minus the log-probability of its tokens given context +
    earlier tokens."""
    enc = get_encoding()
    ctx = enc.encode_ordinary(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
        nll = [-logprobs[len(ctx) + j - 1, tok].item() for j, tok in enumerate(end)]
        sums.append(sum(nll))
        means.append(sum(nll) / len(nll))
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(
        means, dtype=torch.float64
    )


def test_scores_equal_an_independent_hf_computation(models):
    hf, ours, _ = models
    for example in EXAMPLES:
        tokens, mask, label = render_example(example)
        scores = score_example(ours, tokens, mask)
        ref_sum, ref_mean = hf_ending_losses(hf, example)
        torch.testing.assert_close(
            scores.sum_loss.double(), ref_sum, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            scores.mean_loss.double(), ref_mean, rtol=1e-5, atol=1e-5
        )
        assert scores.pred == int(ref_sum.argmin()) and scores.pred_norm == int(
            ref_mean.argmin()
        )
        assert label == example["label"]


def test_accuracies_equal_the_reference_counts(models, hellaswag_file):
    hf, ours, _ = models
    refs = [hf_ending_losses(hf, ex) for ex in EXAMPLES]
    correct = sum(int(s.argmin()) == ex["label"] for (s, _), ex in zip(refs, EXAMPLES))
    correct_norm = sum(
        int(m.argmin()) == ex["label"] for (_, m), ex in zip(refs, EXAMPLES)
    )
    result = evaluate_hellaswag(
        ours, read_hellaswag(hellaswag_file), "cpu", progress=False
    )
    assert result["n"] == len(EXAMPLES)
    assert result["acc"] == correct / len(EXAMPLES) and result[
        "acc_norm"
    ] == correct_norm / len(EXAMPLES)
    assert not ours.training  # from_pretrained gives eval mode; evaluation restores it


def test_rendering():
    enc = get_encoding()
    tokens, mask, label = render_example(EXAMPLES[1], enc)
    ctx = enc.encode_ordinary(EXAMPLES[1]["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in EXAMPLES[1]["endings"]]
    assert tokens.shape == (4, len(ctx) + max(map(len, endings))) and label == 0
    for row, m, end in zip(tokens, mask, endings):
        assert (
            row[: len(ctx)].tolist() == ctx
            and row[len(ctx) : len(ctx) + len(end)].tolist() == end
        )
        assert m.tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (
            len(row) - len(ctx) - len(end)
        )
        assert row[len(ctx) + len(end) :].eq(0).all()


def test_rendering_cuts_the_oldest_context_tokens_to_fit():
    full, full_mask, _ = render_example(EXAMPLES[2])
    cut, cut_mask, _ = render_example(EXAMPLES[2], max_len=full.size(1) - 3)
    assert torch.equal(cut, full[:, 3:]) and torch.equal(cut_mask, full_mask[:, 3:])
    assert cut_mask.sum() == full_mask.sum()  # no ending token lost
    with pytest.raises(ValueError, match="does not fit"):
        render_example(EXAMPLES[2], max_len=5)


def test_model_with_short_block_size_is_scored_on_the_last_tokens(monkeypatch):
    """A model shorter than an example sees the example's newest tokens: the end of the
    context and the endings."""
    short = GPT(
        GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)
    )
    scored, real = [], evaluate.ending_losses

    def recording(model, tokens, mask):
        scored.append((tokens, mask))
        return real(model, tokens, mask)

    monkeypatch.setattr(evaluate, "ending_losses", recording)
    result = evaluate_hellaswag(short, EXAMPLES[:2], "cpu", progress=False)
    assert result["n"] == 2 and len(scored) == 1  # both in one batch
    tokens, mask = scored[0]
    for k, example in enumerate(EXAMPLES[:2]):  # equal widths keep their order
        full, full_mask, _ = render_example(example)
        assert full.size(1) > 16
        assert torch.equal(tokens[4 * k : 4 * k + 4], full[:, -16:])
        assert torch.equal(mask[4 * k : 4 * k + 4], full_mask[:, -16:])


def test_rows_padded_into_a_batch_keep_their_losses(models):
    """Rows of several examples padded to one width and scored in one pass get the
    losses each example gets alone. Only rounding differs: matrix products of other
    shapes sum in another order, in fp32 (unit roundoff 6e-8) over at most 3,072 terms
    (the MLP), which bounds the relative change well below the 1e-4 allowed."""
    _, ours, _ = models
    alone = [render_example(example) for example in EXAMPLES]
    width = max(tokens.size(1) for tokens, _, _ in alone)
    tokens, mask = (
        torch.cat([F.pad(r[part], (0, width - r[part].size(1))) for r in alone])
        for part in (0, 1)
    )
    sum_loss, mean_loss = ending_losses(ours, tokens, mask)
    for k, (t, m, _) in enumerate(alone):
        scores = score_example(ours, t, m)
        torch.testing.assert_close(
            sum_loss[4 * k : 4 * k + 4], scores.sum_loss, rtol=1e-4, atol=0
        )
        torch.testing.assert_close(
            mean_loss[4 * k : 4 * k + 4], scores.mean_loss, rtol=1e-4, atol=0
        )


@pytest.mark.parametrize("max_tokens", [1, 100, 10**6])
def test_batched_scoring_picks_what_one_at_a_time_picks(models, max_tokens):
    """Any batch size (1: one example per pass; 10**6: all in one) picks each example's
    ending as scoring it alone does: with every label set to the ending picked alone,
    every example must count as right."""
    _, ours, _ = models
    picks = [score_example(ours, *render_example(ex)[:2]) for ex in EXAMPLES]
    for field, key in (("pred", "correct"), ("pred_norm", "correct_norm")):
        relabelled = [
            {**ex, "label": getattr(pick, field)} for ex, pick in zip(EXAMPLES, picks)
        ]
        result = evaluate_hellaswag(
            ours, relabelled, "cpu", progress=False, max_tokens=max_tokens
        )
        assert result[key] == len(EXAMPLES)


def test_a_batch_holds_each_examples_rows_then_padding(models, monkeypatch):
    """The rows go in as rendered, padding after them (where causal attention keeps
    every real token from seeing it), longest example first."""
    _, ours, _ = models
    fed, real = [], evaluate.ending_losses

    def recording(model, tokens, mask):
        fed.append((tokens, mask))
        return real(model, tokens, mask)

    monkeypatch.setattr(evaluate, "ending_losses", recording)
    evaluate_hellaswag(ours, EXAMPLES, "cpu", progress=False, max_tokens=10**6)
    [(tokens, mask)] = fed
    alone = [render_example(example) for example in EXAMPLES]
    order = sorted(range(len(alone)), key=lambda i: -alone[i][0].size(1))
    for j, i in enumerate(order):
        rows, row_mask, _ = alone[i]
        width = rows.size(1)
        assert torch.equal(tokens[4 * j : 4 * j + 4, :width], rows)
        assert torch.equal(mask[4 * j : 4 * j + 4, :width], row_mask)
        assert not tokens[4 * j : 4 * j + 4, width:].any()
        assert not mask[4 * j : 4 * j + 4, width:].any()


def test_batches_are_longest_first_within_the_budget():
    groups = batches([3, 10, 5, 10, 1], max_tokens=80)
    assert groups == [[1, 3], [2, 0, 4]]  # 4 rows x 10 x 2 = 80; then width 5: 3 fit
    assert batches([50], max_tokens=8) == [[0]]  # one example always goes alone
    assert sorted(i for g in batches([7] * 9, 100) for i in g) == list(range(9))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_every_example_once(models, world_size):
    _, ours, _ = models
    whole = evaluate_hellaswag(ours, EXAMPLES, "cpu", progress=False)
    parts = [
        evaluate_hellaswag(
            ours, EXAMPLES, "cpu", rank=r, world_size=world_size, progress=False
        )
        for r in range(world_size)
    ]
    assert sum(p["n"] for p in parts) == len(EXAMPLES)
    assert [p["n"] for p in parts] == [
        len(range(r, len(EXAMPLES), world_size)) for r in range(world_size)
    ]
    for key in ("correct", "correct_norm"):
        assert sum(p[key] for p in parts) == whole[key]


def test_validation_loss_is_the_mean_of_the_batch_losses():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=101, n_layer=1, n_head=2, n_embd=16)
    ).train()
    tokens = np.random.default_rng(0).integers(0, 101, 2000).astype(np.uint16)
    B, T, n = 3, 16, 4
    loader = DataLoader(tokens, B, T)
    # wherever the loader is, validation starts from the first batch
    loader.next_batch()
    got = validation_loss(model, loader, n, "cpu")
    data = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        direct = [
            F.cross_entropy(
                model(data[i * B * T : (i + 1) * B * T].view(B, T))[0].flatten(0, 1),
                data[i * B * T + 1 : (i + 1) * B * T + 1],
            )
            for i in range(n)
        ]
    assert got == pytest.approx(torch.stack(direct).mean().item(), rel=1e-6)
    assert model.training  # the mode it came in with
    assert validation_loss(model, loader, n, "cpu") == got


# --- bad input
# ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HellaSwag file"):
        read_hellaswag(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "line 3: "),
        (
            json.dumps({**EXAMPLES[0], "endings": ["a", "b", "c"]}),
            "line 3: endings must be a list of 4 non-empty texts",
        ),
        (
            json.dumps({**EXAMPLES[0], "endings": ["a", "b", "c", 4]}),
            "line 3: endings must be a list of 4 non-empty texts",
        ),
        (
            json.dumps({**EXAMPLES[0], "label": 4}),
            "line 3: label must be 0, 1, 2 or 3, got 4",
        ),
        (json.dumps({**EXAMPLES[0], "label": -1}), "line 3: label must be"),
        (json.dumps({**EXAMPLES[0], "label": "1"}), "line 3: label must be"),
        (json.dumps({**EXAMPLES[0], "label": True}), "line 3: label must be"),
        (
            json.dumps({"endings": EXAMPLES[0]["endings"], "label": 0}),
            "line 3: missing ctx",
        ),
        ("[1, 2]", "line 3: expected a JSON object"),
    ],
)
def test_malformed_line_is_named(tmp_path, bad, message):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [EXAMPLES[0], EXAMPLES[1], bad, EXAMPLES[2]]
    )
    with pytest.raises(ValueError) as err:
        read_hellaswag(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_empty_file_and_blank_lines(tmp_path):
    with pytest.raises(ValueError, match="holds no examples"):
        read_hellaswag(write_jsonl(tmp_path / "empty.jsonl", [""]))
    assert (
        len(
            read_hellaswag(
                write_jsonl(tmp_path / "gaps.jsonl", [EXAMPLES[0], "", EXAMPLES[1]])
            )
        )
        == 2
    )


def test_check_example_returns_the_example():
    assert check_example(EXAMPLES[0]) is EXAMPLES[0]


# --- download (no network: urlopen is replaced)
# --------------------------------------------------


def test_download_uses_the_cache(tmp_path, monkeypatch):
    cached = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    monkeypatch.setattr(
        evaluate.urllib.request,
        "urlopen",
        lambda *a, **k: pytest.fail("downloaded again"),
    )
    assert download_hellaswag("val", cache_dir=tmp_path) == cached


def test_download_writes_the_file_atomically(tmp_path, monkeypatch):
    body = "".join(json.dumps(e) + "\n" for e in EXAMPLES).encode()

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(body))}

    urls = []
    monkeypatch.setattr(
        evaluate.urllib.request,
        "urlopen",
        lambda url, timeout: urls.append(url) or Response(body),
    )
    path = download_hellaswag("val", cache_dir=tmp_path / "cache", progress=False)
    assert urls == [
        "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    ]
    assert path.read_bytes() == body and len(read_hellaswag(path)) == len(EXAMPLES)
    assert [p.name for p in path.parent.iterdir()] == ["hellaswag_val.jsonl"]


def test_offline_or_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(evaluate.urllib.request, "urlopen", offline)
    with pytest.raises(
        ConnectionError, match="Name or service not known.*--hellaswag PATH"
    ):
        download_hellaswag("val", cache_dir=tmp_path, progress=False)

    class Broken(io.BytesIO):
        headers = {}

        def read(self, n=-1):
            if self.tell():
                raise TimeoutError("timed out")
            return super().read(10)

    monkeypatch.setattr(
        evaluate.urllib.request, "urlopen", lambda url, timeout: Broken(b"x" * 100)
    )
    with pytest.raises(ConnectionError, match="timed out"):
        download_hellaswag("val", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial file, under any name
    with pytest.raises(ValueError, match="split"):
        download_hellaswag("test", cache_dir=tmp_path)


def test_reference_figures_have_sources():
    figures = reference_figures()
    gpt2 = [
        f for f in figures if f["model"] == "GPT-2 124M" and f["metric"] == "acc_norm"
    ]
    gpt3 = [f for f in figures if f["model"].startswith("GPT-3 Small")]
    assert gpt2 and gpt3 and 0.25 < gpt2[0]["value"] < gpt3[0]["value"] < 0.5
    assert all(f["source"] and f["url"].startswith("https://") for f in figures)


# --- command line
# ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_run(models, tmp_path):
    """A run directory with a training checkpoint of the HF weights, as gpt2lib.train
    writes it."""
    _, ours, _ = models
    config = {
        "data": "shakespeare",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 64,
        "vocab_size": 50257,
        "batch_size": 4,
        "max_lr": 1e-3,
    }  # a TrainConfig dict: more than the shape
    run = tmp_path / "run"
    run.mkdir()
    path = save_checkpoint(
        run, 10, {"model": ours.state_dict(), "config": config, "step": 10}
    )
    return run, path


def cli(capsys, *args):
    main([*args, "--device", "cpu", "--no-progress"])
    return capsys.readouterr().out


def hellaswag_line(out):
    return [
        line.split("examples): ")[1]
        for line in out.splitlines()
        if line.startswith("hellaswag")
    ]


def test_cli_on_hf_dir_checkpoint_and_run_dir_agree(
    models, checkpoint_run, hellaswag_file, capsys
):
    _, ours, hf_dir = models
    run, ckpt = checkpoint_run
    expected = evaluate_hellaswag(ours, EXAMPLES, "cpu", progress=False)
    outs = [
        cli(capsys, "--model", str(m), "--hellaswag", str(hellaswag_file))
        for m in (hf_dir, ckpt, run)
    ]
    assert f"checkpoint {ckpt}" in outs[1] and f"checkpoint {ckpt}" in outs[2]
    lines = [hellaswag_line(out) for out in outs]
    assert (
        lines[0]
        == lines[1]
        == lines[2]
        == [f"acc {expected['acc']:.4f}  acc_norm {expected['acc_norm']:.4f}"]
    )
    assert "hellaswag (" in outs[0] and f"{len(EXAMPLES)} examples" in outs[0]


def test_cli_limit_and_validation_loss(models, hellaswag_file, tmp_path, capsys):
    _, ours, hf_dir = models
    tokens = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "tok_val_000000.npy", tokens)
    np.save(tmp_path / "shards" / "tok_train_000001.npy", tokens[::-1].copy())
    out = cli(
        capsys,
        "--model",
        str(hf_dir),
        "--hellaswag",
        str(hellaswag_file),
        "--limit",
        "2",
        "--val",
        str(tmp_path / "shards"),
        "--val-batches",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    )
    assert "2 examples" in out
    expected = validation_loss(ours, DataLoader(tokens, 2, 32), 3, "cpu")
    assert f"validation loss (3 batches of 2x32): {expected:.4f}" in out


def test_cli_validation_loss_on_a_shipped_text_is_the_trainers_split(models, capsys):
    # `gpt2-train --data tinyshakespeare` holds out the text's end; `gpt2-evaluate
    # --val tinyshakespeare` refused the name. It now scores the same held-out tokens.
    from gpt2lib.config import TrainConfig
    from gpt2lib.run import load_data

    _, ours, hf_dir = models
    out = cli(
        capsys,
        *["--model", str(hf_dir), "--val", "tinyshakespeare", "--val-batches", "2"],
        *["--batch-size", "2", "--seq-len", "32"],
    )
    held_out = load_data(TrainConfig(data="tinyshakespeare"))[1]
    expected = validation_loss(ours, DataLoader(held_out, 2, 32), 2, "cpu")
    assert f"validation loss (2 batches of 2x32): {expected:.4f}" in out


def test_cli_errors_are_one_line(models, checkpoint_run, hellaswag_file, tmp_path):
    _, _, hf_dir = models
    garbage = tmp_path / "ckpt.pt"
    garbage.write_bytes(b"not a checkpoint")
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    wrong_dtype = tmp_path / "val.npy"
    np.save(wrong_dtype, np.arange(100, dtype=np.int64))
    bad_file = write_jsonl(
        tmp_path / "bad.jsonl", [EXAMPLES[0], {**EXAMPLES[1], "label": 7}]
    )
    (tmp_path / "empty").mkdir()
    cases = [
        (
            ["--model", str(tmp_path / "empty"), "--hellaswag", str(hellaswag_file)],
            "neither an HF-format model",
        ),
        (
            ["--model", str(tmp_path / "missing"), "--hellaswag", str(hellaswag_file)],
            "missing",
        ),
        (
            ["--model", str(garbage), "--hellaswag", str(hellaswag_file)],
            "cannot load as a checkpoint",
        ),
        (
            ["--model", str(not_ours), "--hellaswag", str(hellaswag_file)],
            "not a gpt2lib training checkpoint",
        ),
        (
            ["--model", str(hf_dir), "--hellaswag", str(tmp_path / "none.jsonl")],
            "no HellaSwag file",
        ),
        (
            ["--model", str(hf_dir), "--hellaswag", str(bad_file)],
            "bad.jsonl, line 2: label must be",
        ),
        (["--model", str(hf_dir), "--val", str(wrong_dtype)], "uint16"),
        (
            ["--model", str(hf_dir), "--val", str(tmp_path / "empty")],
            "contains no .npy token shards",
        ),
        (
            ["--model", str(hf_dir), "--val", str(tmp_path / "nowhere")],
            "no token file or directory",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main([*args, "--device", "cpu", "--no-progress"])
        assert str(stop.value).startswith("error: ") and message in str(stop.value), (
            args,
            stop.value,
        )


def test_checkpoint_that_does_not_fit_names_the_problem(models, tmp_path):
    _, ours, _ = models
    path = save_checkpoint(
        tmp_path,
        1,
        {
            "model": ours.state_dict(),
            "config": {
                "n_layer": 2,
                "n_head": 2,
                "n_embd": 32,
                "block_size": 64,
                "vocab_size": 50257,
            },
        },
    )
    with pytest.raises(ValueError, match="do not fit the model"):
        load_model(str(path))


def test_cli_process_exits_1_without_a_traceback(hellaswag_file):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2lib.evaluate",
            "--model",
            "/no/such/model",
            "--hellaswag",
            str(hellaswag_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.startswith("error: ")
        and "/no/such/model" in result.stderr
        and "Traceback" not in result.stderr
    )
