"""tools/check_browser.py on small built-book trees it must pass or fail: real Chromium,
no network."""

import importlib.util
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip(
    "playwright", reason="the browser check needs Playwright (pip install playwright)"
)
CHROMIUM = (
    os.environ.get("CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("google-chrome")
)
if CHROMIUM is None:
    pytest.skip(
        "no Chromium on PATH and no $CHROMIUM (apt-get install chromium); CI installs "
        "it",
        allow_module_level=True,
    )

spec = importlib.util.spec_from_file_location(
    "check_browser", Path(__file__).parent.parent / "tools" / "check_browser.py"
)
check_browser = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_browser)


def png(width=2, height=2) -> bytes:
    "A valid RGB PNG, written by hand so the test needs no imaging library."

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\0" + b"\x80\x40\x20" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def page(title, body):
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>"


# The markup MyST-NB (Jupyter Book 1.x) renders for a cell that raised, as built from
# a real notebook.
TRACEBACK = (
    '<div class="cell_output docutils container"><div class="output traceback '
    'highlight-ipythontb notranslate">'
    '<div class="highlight"><pre><span></span><span class="gt">-----------</span>\n'
    '<span class="ne">ZeroDivisionError</span>: division by '
    "zero</pre></div></div></div>"
)
# A printed (stream) table is text on purpose; a text/markdown table rendered as a
# paragraph is not.
PRINTED_TABLE = (
    '<div class="cell_output docutils container"><div class="output stream '
    'highlight-myst-ansi notranslate">'
    '<div class="highlight"><pre>| rung | ms/step |\n|---|---:|\n| fp32 | 1.0 '
    "|</pre></div></div></div>"
)
RAW_TABLE = (
    '<div class="cell_output docutils container"><p>| preset | seed '
    "|\n|\u2014|\u2014:|\n"
    "| <code>shakespeare</code> | 1337 |</p></div>"
)
STDERR = (
    '<div class="cell_output docutils container"><div class="output stderr '
    'highlight-myst-ansi notranslate">'
    '<div class="highlight"><pre>100%|##########| 10/10 '
    "[00:01&lt;00:00]</pre></div></div></div>"
)

GOOD = {
    "index.html": '<html><head><meta http-equiv="Refresh" content="0; url=good.html" /></head></html>',
    "good.html": page(
        "good",
        '<h1 id="top">Good</h1><img src="_images/plot.png" alt="plot">'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=">'
        '<img src="https://example.com/badge.png" alt="another site: not checked">'
        '<a href="#top">self</a> <a href="#">top</a> <a '
        'href="other/page.html#sec">other</a> '
        '<a href="other/">folder</a> <a href="https://example.com/x">external</a> '
        '<a href="mailto:a@example.com">mail</a>' + STDERR + PRINTED_TABLE,
    ),
    "other/page.html": page(
        "other", '<h2 id="sec">Section</h2><a href="../good.html#top">back</a>'
    ),
    "other/index.html": page("other index", "<p>folder index</p>"),
    "genindex.html": page("index", '<a href="nowhere.html">skipped page</a>'),
}
BAD = {
    "missing_image.html": page(
        "missing image", '<img src="_images/nothere.png" alt="gone">'
    ),
    "corrupt_image.html": page(
        "corrupt image", '<img src="_images/corrupt.png" alt="not a png">'
    ),
    "broken_link.html": page(
        "broken link",
        '<a href="nowhere.html">a</a> <a href="good.html#no-such-anchor">b</a> '
        '<a href="#missing-here">c</a> <a href="/good.html">d</a>',
    ),
    "error_output.html": page("error output", "<p>a cell</p>" + TRACEBACK),
    "script_error.html": page(
        "script error", "<script>throw new Error('boom from the page')</script>"
    ),
    "raw_table.html": page("raw table", RAW_TABLE),
    # a code line longer than a laptop's main column: it scrolls sideways
    "wide_code.html": page(
        "wide code",
        '<article><div style="width: 600px"><pre style="overflow-x: auto">'
        + "x = 1  # "
        + "w" * 200
        + "</pre></div></article>",
    ),
    # math as Sphinx writes it, with no MathJax on the page to typeset it
    "raw_math.html": page(
        "raw math",
        '<p><span class="math notranslate nohighlight">\\(G = U S V^\\top\\)</span></p>',
    ),
    "missing_css.html": '<html><head><link rel="stylesheet" href="_static/gone.css"></head><body>text</body></html>',
}


def write_tree(root: Path, pages: dict) -> Path:
    for name, html in pages.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(html)
    (root / "_images").mkdir(exist_ok=True)
    (root / "_images" / "plot.png").write_bytes(png())
    (root / "_images" / "corrupt.png").write_bytes(b"this is not a PNG")
    return root


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("html"), {**GOOD, **BAD})
    lines = []
    return check_browser.check_site(
        root, chromium=CHROMIUM, progress=lines.append
    ), lines


def test_good_pages_pass(verdicts):
    results, lines = verdicts
    for name in ["index.html", "good.html", "other/page.html", "other/index.html"]:
        assert results[name] == [], (name, results[name])
    assert "genindex.html" not in results  # generated pages are not checked
    assert len(lines) == len(results)  # one line per page
    assert any(line.startswith("ok   good.html: 3 images") for line in lines), lines


def test_missing_and_corrupt_images_fail(verdicts):
    results, _ = verdicts
    assert any(
        "image does not load: _images/nothere.png" in p
        for p in results["missing_image.html"]
    )
    assert results["corrupt_image.html"] == ["image does not load: _images/corrupt.png"]


def test_missing_stylesheet_fails(verdicts):
    assert verdicts[0]["missing_css.html"] == [
        "missing file _static/gone.css (HTTP 404)"
    ]


def test_broken_links_fail(verdicts):
    problems = verdicts[0]["broken_link.html"]
    assert "broken link 'nowhere.html': nowhere.html does not exist" in problems
    assert (
        "broken link 'good.html#no-such-anchor': no anchor #no-such-anchor on good.html"
        in problems
    )
    assert (
        "broken link '#missing-here': no anchor #missing-here on this page" in problems
    )
    assert any(
        p.startswith("broken link '/good.html': outside the book") for p in problems
    )
    assert len(problems) == 4


def test_error_output_and_script_error_fail(verdicts):
    results, _ = verdicts
    assert results["error_output.html"] == [
        "error output: ZeroDivisionError: division by zero"
    ]
    assert any("boom from the page" in p for p in results["script_error.html"])


def test_markdown_table_rendered_as_text_fails(verdicts):
    assert verdicts[0]["raw_table.html"] == [
        "Markdown table output shown as text (set nb_render_markdown_format: gfm): | "
        "preset | seed |"
    ]


def test_code_wider_than_its_box_at_1280_px_fails(verdicts):
    [problem] = verdicts[0]["wide_code.html"]
    assert problem.startswith("scrolls sideways at 1280 x 800: <pre> ")
    assert "px wide in a 600 px box: 'x = 1  # www" in problem


def test_math_left_as_tex_fails(verdicts):
    assert verdicts[0]["raw_math.html"] == [
        "math shown as TeX, not typeset (is MathJax served with the book?): "
        "\\(G = U S V^\\top\\)"
    ]


def test_cli_exit_status(tmp_path, capsys):
    good = write_tree(tmp_path / "good", GOOD)
    assert check_browser.main([str(good), "--chromium", CHROMIUM]) == 0
    assert "browser check: 4 pages, 0 problems" in capsys.readouterr().out

    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: good\nchapters:\n  - file: other/page\n  - file: "
        "other/unbuilt\n"
    )
    assert (
        check_browser.main([str(good), "--toc", str(toc), "--chromium", CHROMIUM]) == 1
    )
    out = capsys.readouterr().out
    assert "BROWSER CHECK FAILED: other/unbuilt.html: not built" in out
    assert "browser check: 3 pages, 1 problems" in out

    bad = write_tree(tmp_path / "bad", {"error_output.html": BAD["error_output.html"]})
    assert check_browser.main([str(bad), "--chromium", CHROMIUM]) == 1
    assert (
        "BROWSER CHECK FAILED: error_output.html: error output: ZeroDivisionError"
        in capsys.readouterr().out
    )

    assert check_browser.main([str(tmp_path / "nothing-here")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert (
        check_browser.main([str(good), "--chromium", str(tmp_path / "no-browser")]) == 2
    )
    assert "error: no Chromium at" in capsys.readouterr().err
