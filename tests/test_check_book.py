"""tools/check_book.py on small built-book trees it must pass or fail (what a browser
sees is tools/check_browser.py's, tested in test_check_browser.py)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "check_book", Path(__file__).parent.parent / "tools" / "check_book.py"
)
check_book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_book)

PAGE = "nbs/01_hf_gpt2"  # a notebook of the book: its page must show cell outputs
OUTPUT = '<div class="cell_output docutils container"><pre>Running on cpu</pre></div>'
FIGURE = '<img src="plot.png">'  # chapter 1 has one cell that draws
LOGO = '<img src="../_static/images/logo_colab.png">'  # the theme's, not a figure
TRACEBACK = '<div class="output traceback highlight-ipythontb"><pre>Traceback (most recent call last):</pre></div>'


def built(tmp_path, body, image: bytes | None = None) -> Path:
    html = tmp_path / "html"
    (html / "nbs").mkdir(parents=True)
    (html / f"{PAGE}.html").write_text(f"<html><body>{body}</body></html>")
    (html / "_static/images").mkdir(parents=True)
    (html / "_static/images/logo_colab.png").write_bytes(b"\x89PNG a logo")
    if image is not None:
        (html / "nbs" / "plot.png").write_bytes(image)
    return html


def test_a_good_page_passes(tmp_path):
    html = built(tmp_path, OUTPUT + FIGURE, image=b"\x89PNG not empty")
    assert check_book.check_page(html, PAGE) == []


@pytest.mark.parametrize(
    "body, image, problem",
    [
        ("<p>prose only</p>" + FIGURE, b"png", "no cell outputs (did execution run?)"),
        (OUTPUT + TRACEBACK + FIGURE, b"png", "shows an error output"),
        (OUTPUT + '<img src="missing.png">', None, "missing image missing.png"),
        (OUTPUT + FIGURE, b"", "empty image plot.png"),
        (
            OUTPUT + LOGO,
            None,
            "shows 0 figures, but 1 of its cells draw one (a plot lost: its data "
            "missing, or its cell skipped it)",
        ),
    ],
)
def test_a_broken_page_fails_naming_the_problem(tmp_path, body, image, problem):
    problems = check_book.check_page(built(tmp_path, body, image), PAGE)
    assert problems == [f"{PAGE}: {problem}"]


def test_a_page_that_was_not_built_fails(tmp_path):
    assert check_book.check_page(tmp_path, PAGE) == [f"{PAGE}: not built"]


def test_every_page_of_the_table_of_contents_is_checked(tmp_path, capsys):
    pages = check_book.toc_files()
    assert "book/intro" in pages and PAGE in pages and "nbs/00_runtime" in pages
    assert check_book.main(str(tmp_path)) == 1  # nothing built
    assert capsys.readouterr().out.count("not built") == len(pages)


def test_only_cells_that_draw_at_their_top_level_count(tmp_path):
    def notebook(*sources):
        cells = [{"cell_type": "code", "source": [s]} for s in sources]
        path = tmp_path / "nb.ipynb"
        path.write_text(check_book.json.dumps({"cells": cells}))
        return path

    draws = "fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()"
    defines = "def plot(xs):\n    fig, ax = plt.subplots()\n    ax.plot(xs)"
    assert check_book.drawing_cells(notebook(draws, defines, "plot([1])")) == 1
