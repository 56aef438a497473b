"""The code reads on the page: formatted by ruff, no line wider than the page, and the
Pages workflow (which cannot run on these machines) at least valid against its schema."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The book's page shows about 88 columns of code before a block scrolls sideways.
WIDTH = 88


def code_lines(path: Path):
    "(line number or cell index, line) of the code in a notebook or a module."
    if path.suffix == ".ipynb":
        for n, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code":
                for line in "".join(cell["source"]).splitlines():
                    yield f"cell {n}", line
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"line {n}", line


def book_code() -> list[Path]:
    "The chapters, the book's notebooks and the package exported from them."
    return sorted(
        [
            *ROOT.glob("nbs/*.ipynb"),
            *ROOT.glob("book/*.ipynb"),
            *ROOT.glob("gpt2lib/*.py"),
        ]
    )


def test_book_code_fits_the_page():
    wide = [
        f"{path.relative_to(ROOT)}, {where}: {len(line)} columns"
        for path in book_code()
        for where, line in code_lines(path)
        if len(line) > WIDTH
    ]
    assert not wide, f"{len(wide)} lines wider than {WIDTH}:\n" + "\n".join(wide[:20])


def test_width_check_sees_a_wide_line(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("x = 1\n" + "y = '" + "a" * WIDTH + "'\n")
    assert [w for w, line in code_lines(module) if len(line) > WIDTH] == ["line 2"]


def test_code_is_ruff_formatted():
    "ruff format (configured in pyproject.toml) would change nothing."
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("check-jsonschema"), reason="dev extra missing")
def test_pages_workflow_is_a_valid_workflow():
    "GitHub's workflow schema (vendored by check-jsonschema: no network needed)."
    workflows = sorted(str(p) for p in (ROOT / ".github/workflows").glob("*.yml"))
    assert workflows
    done = subprocess.run(
        ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# Jupyter Book's cell tags that keep a cell's code off the page (collapsed behind a
# button, or removed): the machinery a reader can open but does not have to read.
HIDDEN_TAGS = {"hide-input", "hide-cell", "remove-input", "remove-cell"}


def visible_code(path: Path) -> list[int]:
    "The line counts of the code cells a reader of the rendered chapter sees."
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [
        len("".join(cell["source"]).splitlines())
        for cell in cells
        if cell["cell_type"] == "code"
        and not HIDDEN_TAGS & set(cell.get("metadata", {}).get("tags", []))
    ]


def test_chapter_9_shows_the_parts_not_the_machinery():
    """Chapter 9 shows under 600 lines of code (the loop, the `Run`, the evaluation
    part, the coordinator and the demonstrations), no cell over 80; the rest of what
    it exports is one click away."""
    shown = visible_code(ROOT / "nbs" / "09_train.ipynb")
    assert sum(shown) < 600 and max(shown) <= 80, (sum(shown), max(shown))


def test_visible_code_counts_only_what_is_not_hidden(tmp_path):
    cell = {"cell_type": "code", "source": ["a = 1\n", "b = 2"], "metadata": {}}
    hidden = {**cell, "metadata": {"tags": ["hide-input"]}}
    text = {"cell_type": "markdown", "source": ["# a\n", "b"], "metadata": {}}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": [cell, hidden, text]}))
    assert visible_code(path) == [2]
