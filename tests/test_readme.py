"""The README says what the code does: its commands are the ones the book gives and the
package has."""

from pathlib import Path

from gpt2lib.cli import GPT2_124M_COMMANDS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_gpt2_run_commands_are_chapter_9s():
    lines = [line.split("  #")[0].strip() for line in README.splitlines()]
    for command in GPT2_124M_COMMANDS:
        assert command in lines, command


NUMBER_WORDS = "no one two three four five six seven eight nine ten".split()


def project_scripts() -> list[str]:
    "The console scripts pyproject.toml installs."
    return [
        line.split("=")[0].strip()
        for line in (Path(__file__).parent.parent / "pyproject.toml")
        .read_text()
        .split("[project.scripts]")[1]
        .split("[")[0]
        .splitlines()
        if "=" in line
    ]


def test_the_readme_names_every_console_script():
    scripts = project_scripts()
    assert len(scripts) == 7
    for script in scripts:
        assert script in README, script


# Every figure the README quotes comes from a committed result or from the code; these
# tests recompute each from its source and fail when the README says something else.
ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "book" / "results"
FLAT = " ".join(README.split())  # the prose without its line breaks


def says(phrase: str) -> str:
    "`phrase` (as computed from the files), which the README must contain verbatim."
    assert " ".join(phrase.split()) in FLAT, f"the README does not say: {phrase}"
    return phrase


def quoted_figures() -> list[str]:
    "The README's sentences that carry a number, each computed from its source."
    import json

    from gpt2lib.bench import REL_TOLERANCE
    from gpt2lib.config import PRESETS
    from gpt2lib.data import baseline_losses, split_text
    from gpt2lib.fineweb import SHARD_SIZE
    from gpt2lib.ladder import RUNGS, parse_args
    from gpt2lib.preflight import duration, restate_hellaswag
    from gpt2lib.rundir import read_log

    # the shakespeare preset's run on a CPU
    summary = json.loads((RESULTS / "shakespeare-cpu" / "summary.json").read_text())
    log = read_log(RESULTS / "shakespeare-cpu" / "log.jsonl")
    at_init = next(e["val_loss"] for e in log if "val_loss" in e and e["step"] == 0)
    run, threads = summary["config"], summary["device"].split(", ")[-1]
    assert summary["finished"] and threads == "2 threads)", summary["device"]
    torch_version = summary["torch"].replace("+cpu", "")
    shakespeare = PRESETS["shakespeare"]
    # the default preset as it is now, in every field the run recorded
    assert {k: v for k, v in run.items() if k != "data"} == {
        k: shakespeare.settings()[k] for k in run if k != "data"
    }
    # where the run ends against the baselines of its split (chapter 3)
    train_tokens, val_tokens = split_text("shakespeare", shakespeare.val_fraction)
    baselines = baseline_losses(train_tokens, val_tokens)
    unigram, bigram = baselines["unigram"], baselines["bigram"]
    assert bigram < summary["val_loss"] < unigram, "the README says between the two"
    # the sweep's lowest run (chapter 9)
    sweep_dir = RESULTS / "shakespeare-sweep"
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    lowest = min(
        sweep["runs"],
        key=lambda run: json.loads((sweep_dir / run / "summary.json").read_text())[
            "val_loss"
        ],
    )
    low = json.loads((sweep_dir / lowest / "summary.json").read_text())
    assert low["val_loss"] > bigram, "the README says no run of the sweep beat it"
    # the default's recipe, trained four times as long
    longest = json.loads((sweep_dir / "steps-1360" / "summary.json").read_text())
    longest_log = read_log(sweep_dir / "steps-1360" / "log.jsonl")
    assert {
        k: v
        for k, v in longest["config"].items()
        if k not in ("max_steps", "checkpoint_every", "data")
    } == {
        k: v
        for k, v in shakespeare.settings().items()
        if k in longest["config"] and k not in ("max_steps", "checkpoint_every", "data")
    }, "the README calls it the default's recipe"
    lowest_val = min(
        (e for e in longest_log if "val_loss" in e), key=lambda e: e["val_loss"]
    )
    last_train = [e["loss"] for e in longest_log if "loss" in e][-40:]
    tokens = longest["steps"] * longest["config"]["total_batch_size"]
    speeds = sorted(e["tokens_per_s"] for e in log if "dt" in e)  # the default run's
    final_train = sum(last_train) / len(last_train)
    assert final_train < bigram < lowest_val["val_loss"], "the README says so"
    figures = [
        f"Measured on a 2-core CPU (the CI machine type, torch {torch_version} CPU): "
        f"{summary['steps']} steps ({summary['steps'] * run['total_batch_size']:,} "
        f"tokens) in {summary['seconds_this_invocation'] / 60:.1f} minutes, final "
        f"validation loss {summary['val_loss']:.2f} (from {at_init:.2f} at "
        f"initialisation): below the unigram baseline of its split ({unigram:.2f}), "
        f"above the bigram baseline ({bigram:.2f})",
        f"the lowest, `{lowest}` ({low['steps']:,} steps, "
        f"{low['steps'] * low['config']['total_batch_size']:,} tokens), ended at "
        f"{low['val_loss']:.2f}",
        f"`steps-1360` ({longest['steps']:,} steps, {tokens:,} tokens, "
        f"{tokens / len(train_tokens):.1f} passes over the training text, about "
        f"{tokens / speeds[len(speeds) // 2] / 60:.0f} minutes at the default run's "
        f"speed) reached its lowest validation loss, {lowest_val['val_loss']:.2f}, at "
        f"step {lowest_val['step']:,} and ended at {longest['val_loss']:.2f}, while its "
        f"training loss fell to {final_train:.2f} (the mean of its last "
        f"{len(last_train)} steps)",
        f"a {shakespeare.model.n_layer}-layer, {shakespeare.model.n_embd}-wide GPT",
        f"the last {shakespeare.val_fraction:.0%}".replace("%", " %"),
        f"checkpoints (the last {shakespeare.keep_checkpoints})",
        f"prints the validation loss and {NUMBER_WORDS[shakespeare.num_samples]} "
        "samples",
    ]
    # the GPT-2 124M recipe
    gpt2 = PRESETS["gpt2-124m"]
    figures.append(
        f"(B={gpt2.batch_size}, T={gpt2.model.block_size}, {gpt2.total_batch_size:,} tokens "
        f"per step, {gpt2.max_steps:,} steps, max lr {gpt2.max_lr:.0e} with "
        f"{gpt2.warmup_steps} warm-up steps, weight decay {gpt2.weight_decay}), "
        f"validating and scoring HellaSwag every {gpt2.eval_every} steps".replace(
            "e-04", "e-4"
        )
    )
    assert gpt2.eval_every == gpt2.sample_every
    padded = (
        -(-gpt2.model.vocab_size // gpt2.model.pad_vocab_to) * gpt2.model.pad_vocab_to
    )
    figures.append(f"vocabulary padded to {padded:,}")
    figures.append(f"{SHARD_SIZE // 10**6}M-token uint16 shards")
    # the preflight's estimate, stale: HellaSwag timed on its first call
    preflight = json.loads((RESULTS / "preflight-h200-gpt2-124m.json").read_text())
    warm = json.loads((RESULTS / "hellaswag-h200.json").read_text())
    restated = restate_hellaswag(preflight, warm)
    if restated is not None:
        figures.append(
            f"so its estimate is stale: {duration(preflight['estimate']['seconds'])}, "
            f"about {duration(restated['seconds'])} with the warm time"
        )
    assert preflight["device"] == "NVIDIA H200" and preflight["world_size"] == 1
    # the speed ladder on one H200
    bench = json.loads((RESULTS / "bench-h200.json").read_text())
    first, last = bench["rungs"][0], bench["rungs"][-1]
    assert bench["device"] == "NVIDIA H200" and all(
        r["status"] == "ran" for r in bench["rungs"]
    )
    figures.append(
        f"the ladder went from {first['tokens_per_s']:,.0f} tokens/s in "
        f"{first['rung']} to {last['tokens_per_s']:,.0f} tokens/s (MFU "
        f"{last['mfu']:.0%}) with every rung and a micro-batch of "
        f"{last['recipe']['batch_size']}".replace("%", " %")
    )
    # the benchmark's tolerances
    assert REL_TOLERANCE["fp32"] == 1e-5
    assert REL_TOLERANCE["tf32"] == 4 * 2**-11 and REL_TOLERANCE["bf16"] == 4 * 2**-8
    figures.append(
        "allowing what the precision explains (1e-5 of the loss in fp32, four times "
        "the unit roundoff in TF32 and bf16)"
    )
    # the node the 124M presets are launched on
    nproc = GPT2_124M_COMMANDS[1].split("--nproc_per_node=")[1].split()[0]
    figures.append(f"the same at GPT-2 124M's size for {nproc} GPUs")
    # the ladder command's defaults
    figures.append(f"# {len(RUNGS)} rungs x {parse_args([]).seeds} seeds on a CPU")
    # the console scripts
    scripts = project_scripts()
    figures.append(
        f"Installing puts {NUMBER_WORDS[len(scripts)]} commands on your `PATH`"
    )
    # the versions the package requires
    project = (ROOT / "pyproject.toml").read_text()
    python = project.split('requires-python = ">=')[1].split('"')[0]
    torch_min = project.split('"torch>=')[1].split('"')[0]
    from gpt2lib.parallel import FSDP_MIN_TORCH

    figures.append(
        f"Python ≥ {python}, PyTorch ≥ {torch_min} (≥ {FSDP_MIN_TORCH} for "
        "`--parallel fsdp`)"
    )
    return figures


def test_every_figure_the_readme_quotes_is_the_committed_one():
    for phrase in quoted_figures():
        says(phrase)


# Numbers in the README's prose that are not measurements: chapter numbers, exit
# statuses, the model's name, the machine the suite is described on, the page width.
STRUCTURAL = [
    r"\| \d+ \|",  # the chapter table's numbers
    r"chapter \d+",
    r"status \d+( or \d+)?",
    r"\(\d for an option",
    r"124M",
    r"\d processes = \d",
    r"\d gloo processes against \d process",
    r"\d-core",
    r"\(\d+ columns\)",
]


def test_every_number_in_the_readme_is_tied_to_its_source():
    """A number in the README's prose (outside code) is in one of the computed figures
    above or a structural one: a new figure needs a source and a line in
    `quoted_figures`."""
    import re

    text = FLAT
    for phrase in quoted_figures():  # what the test above ties to the files
        text = text.replace(" ".join(phrase.split()), "")
    text = re.sub(r"```.*?```", "", text)  # commands: their options, not figures
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|<https?://[^>]*>", "", text)
    for pattern in STRUCTURAL:
        text = re.sub(pattern, "", text)
    numbers = re.findall(r"(?<![\w.])\d[\d,.]*\d(?:e-\d+)?|(?<![\w.-])\d(?!\w)", text)
    assert not numbers, f"numbers in the README that no test ties to a file: {numbers}"


def first_bash_block(text: str) -> str:
    return text.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_readme_setup_and_the_books_pages_give_one_install():
    """A newcomer's set-up: clone, then a venv and one install, with PyTorch's CPU
    index named (PyPI's torch is the CUDA build, several GB, on a CPU-only Linux box);
    the intro and setup pages give the same lines, not another install."""
    root = Path(__file__).parent.parent
    install = first_bash_block(README.split("## Install", 1)[1])
    commands = install.splitlines()
    assert commands[0].startswith("git clone https://github.com/")
    assert commands[1] == "cd gpt2-from-scratch"
    assert len(commands) == 4 and commands[-1].startswith(
        'pip install -e ".[book,dev]"'
    )
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in commands[-1]
    for page in ("book/intro.md", "book/setup.md"):
        assert first_bash_block((root / page).read_text()) == install, page
