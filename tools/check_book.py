"""Check a built book: every chapter in _toc.yml rendered, executed, error-free, images present.

    python tools/check_book.py [_build/html]

Jupyter Book can produce a page whose cells never ran or that shows an error output while
the build still "succeeds"; this fails loudly instead. It reads the HTML files and owns:
a page of the table of contents that was not built, a notebook page without any cell
output, an error output (a traceback), and an image file that is missing or empty.

What only a browser sees is `tools/check_browser.py`'s: links to pages or anchors that do
not exist, images that do not decode, Markdown tables rendered as text, script errors.
CI runs both (`.ci/run`); tests/test_check_book.py and tests/test_check_browser.py run
each on small broken books.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def toc_files(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The pages named in the table of contents (root and `file:` entries), without
    suffix."""
    text = toc.read_text()
    return re.findall(r"^root:\s*(\S+)", text, re.M) + re.findall(
        r"file:\s*(\S+)", text
    )


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
            "present"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
