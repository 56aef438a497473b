"""What a reader sees of each page: the machinery off the page (cell tags hide it), each
chapter's visible code bounded, and no visible cell longer than a screen unless it is
the chapter's subject (issue 23)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pin_commit  # noqa: E402

# Jupyter Book's tags that keep a cell's code off the page (hide-*: folded behind a
# "show" button; remove-*: not rendered at all)
OFF_THE_PAGE = {"remove-cell", "remove-input", "hide-input", "hide-cell"}
MAX_PAGE_LINES = 700  # visible code lines of any page
MAX_LINES = {"09_train": 600}  # chapter 9 shows the run's parts, not its plumbing
MAX_CELL_LINES = 60  # about one screen
# the longer cells a reader should see whole, each the chapter's subject
SUBJECTS = {
    ("02_model", "c018b"): "the GPT class itself",
    ("04_speed", "c013p2"): "the timed training step that every rung runs",
    ("05_optimization", "c025m"): "the Muon optimizer, the section's subject",
    ("09_train", "r003"): "the Run: one run's parts and its step",
}
PAGES = pin_commit.book_notebooks()


def code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def visible(cell: dict) -> bool:
    return not OFF_THE_PAGE & set(cell.get("metadata", {}).get("tags", []))


def lines(cell: dict) -> int:
    return len("".join(cell["source"]).splitlines())


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_nbdevs_directives_and_the_install_cell_are_off_the_page(path):
    for cell in code_cells(path):
        source = "".join(cell["source"])
        if source.startswith("#| default_exp") or "BOOK_COMMIT = " in source:
            assert not visible(cell), f"{path.stem}: cell {cell['id']} is shown"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_each_page_shows_a_bounded_amount_of_code(path):
    shown = sum(lines(c) for c in code_cells(path) if visible(c))
    limit = MAX_LINES.get(path.stem, MAX_PAGE_LINES)
    assert shown <= limit, f"{path.stem} shows {shown} lines of code (at most {limit})"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_no_visible_cell_is_longer_than_a_screen_unless_the_subject(path):
    long = [
        (c["id"], lines(c))
        for c in code_cells(path)
        if visible(c)
        and lines(c) > MAX_CELL_LINES
        and (path.stem, c["id"]) not in SUBJECTS
    ]
    assert not long, f"{path.stem}: cells over {MAX_CELL_LINES} lines shown: {long}"


def test_every_listed_subject_is_a_visible_cell():
    "An entry of SUBJECTS that no longer names a shown cell is stale: remove it."
    shown = {(p.stem, c["id"]) for p in PAGES for c in code_cells(p) if visible(c)}
    assert set(SUBJECTS) <= shown, set(SUBJECTS) - shown


CHAPTERS = [p for p in PAGES if p.parent.name == "nbs" and p.stem[:2] != "00"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_opens_with_where_it_sits_in_the_book(path):
    install, first = code_cells(path)[:2]
    assert "BOOK_COMMIT" in "".join(install["source"])
    assert "".join(first["source"]).endswith(f"pipeline({int(path.stem[:2])})")
    assert "remove-input" in first["metadata"]["tags"]  # the picture, not its code


def test_the_pipeline_highlights_its_chapter_and_no_other(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    from gpt2lib.book import CHAPTERS as NAMES, pipeline
    from gpt2lib.runtime import UserError

    monkeypatch.setattr(plt, "show", lambda: None)
    for chapter in (1, 9, len(NAMES)):
        pipeline(chapter)
        boxes = [p for p in plt.gca().patches if isinstance(p, FancyBboxPatch)]
        plain = boxes[0].get_facecolor() if chapter != 1 else boxes[1].get_facecolor()
        lit = [i + 1 for i, box in enumerate(boxes) if box.get_facecolor() != plain]
        assert len(boxes) == len(NAMES) and lit == [chapter]
        plt.close("all")
    for wrong in (0, len(NAMES) + 1):
        with pytest.raises(UserError, match=f"chapter {wrong} is not one of 1-"):
            pipeline(wrong)
