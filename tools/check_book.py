"""Check a built book: every chapter in _toc.yml rendered, executed, error-free, images present.

    python tools/check_book.py [_build/html]

Jupyter Book can produce a page whose cells never ran or that shows an error output while
the build still "succeeds"; this fails loudly instead. It reads the HTML files and owns:
a page of the table of contents that was not built, a notebook page without any cell
output, an error output (a traceback), an image file that is missing or empty, and a
notebook page that shows fewer figures than it has cells that draw one (the theme's
Colab and Binder logos are not figures).

What only a browser sees is `tools/check_browser.py`'s: links to pages or anchors that do
not exist, images that do not decode, Markdown tables rendered as text, script errors.
CI runs both (`.ci/run`); tests/test_check_book.py and tests/test_check_browser.py run
each on small broken books.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a code cell that makes a matplotlib figure on a line of its own top level (each such
# cell shows at least one; a cell that only defines a plotting function draws nothing)
DRAWS = re.compile(r"^(?=\S).*?(plt\.(subplots|figure)\(|\.imshow\()", re.M)


def toc_files(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The pages named in the table of contents (root and `file:` entries), without
    suffix."""
    text = toc.read_text()
    return re.findall(r"^root:\s*(\S+)", text, re.M) + re.findall(
        r"file:\s*(\S+)", text
    )


def drawing_cells(notebook: Path) -> int:
    "How many code cells of `notebook` draw a figure."
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(
        1
        for c in cells
        if c["cell_type"] == "code" and DRAWS.search("".join(c["source"]))
    )


def figures(html: str) -> list[str]:
    "The images a page shows from its own files, without the theme's (`_static/`)."
    return [
        src
        for src in re.findall(r"<img[^>]+src=\"([^\"]+)\"", html)
        if not src.startswith(("http:", "https:")) and "_static/" not in src
    ]


def check_page(html_dir: Path, page: str) -> list[str]:
    path = html_dir / f"{page}.html"
    if not path.is_file():
        return [f"{page}: not built"]
    html = path.read_text(encoding="utf-8")
    problems = []
    is_notebook = (ROOT / f"{page}.ipynb").is_file()
    if is_notebook and "cell_output" not in html:
        problems.append(f"{page}: no cell outputs (did execution run?)")
    if re.search(
        r"Traceback \(most recent call last\)|class=\"[^\"]*\btraceback\b", html
    ):
        problems.append(f"{page}: shows an error output")
    for src in re.findall(r"<img[^>]+src=\"([^\"]+)\"", html):
        if src.startswith(("http:", "https:", "data:")):
            continue
        image = (path.parent / src).resolve()
        if not image.is_file():
            problems.append(f"{page}: missing image {src}")
        elif image.stat().st_size == 0:
            problems.append(f"{page}: empty image {src}")
    if is_notebook:
        drawn, shown = drawing_cells(ROOT / f"{page}.ipynb"), len(figures(html))
        if shown < drawn:
            problems.append(
                f"{page}: shows {shown} figures, but {drawn} of its cells draw one "
                "(a plot lost: its data missing, or its cell skipped it)"
            )
    return problems


def main(html_dir: str = "_build/html") -> int:
    html_dir = Path(html_dir)
    pages = toc_files()
    problems = [p for page in pages for p in check_page(html_dir, page)]
    for p in problems:
        print("BOOK CHECK FAILED:", p)
    if not problems:
        print(
            f"book check: {len(pages)} pages built, executed, no error outputs, images "
            "present, every drawing cell's figure shown"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
