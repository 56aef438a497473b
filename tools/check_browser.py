"""Open every page of the built book in headless Chromium and fail on what a reader would see broken.

    python tools/check_browser.py [_build/html] [--toc _toc.yml] [--chromium /usr/bin/chromium]

A page fails on:

* an error output from a notebook cell (a traceback rendered by MyST-NB);
* a Markdown table output rendered as a paragraph of `|` text (MyST-NB's default
  CommonMark renderer has no tables);
* an image that does not load (`img.complete && img.naturalWidth == 0`, after the load settles);
* a broken internal link: a same-site target file that does not exist, or a `#anchor` that
  is not an id on the target page;
* a script error raised by the page itself (an uncaught exception; a failed local request);
* anything that scrolls sideways in a 1280 x 800 window (a laptop's): a code block or an
  output wider than its box, or the page wider than the window;
* math shown as its TeX source (MathJax, served with the book, did not typeset it).

The book is served over http from a local port under a sub-path, as GitHub Pages serves it.
Requests to any other host are aborted at once: the check needs no network, and the external
scripts and images it cannot fetch are not reported. One line per page, then every problem
with its page and detail; exit status 1 when there is a problem, 2 on bad usage.

Needs `pip install playwright` and a Chromium binary (Debian: `apt-get install chromium`);
never `playwright install`: the system browser is used.
"""

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

# MyST-NB renders an error output as <div class="output traceback ...">; older renderers
# (nbsphinx, jupyter-sphinx) used .output_error / .output.error.
ERROR_OUTPUT = "div.output.traceback, div.output.error, div.output_error"
# The book is served from this folder, as GitHub Pages serves a project's site from
# /REPO/:
# a link by absolute path works at the root of a server but not there.
SITE_PATH = "/site/"
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "jupyter_execute"}
# Messages the book's theme itself logs on every healthy page, offline or not: not
# failures.
KNOWN_HARMLESS = [
    # Jupyter Book 1.x writes sphinx-thebe's configuration <script> twice; the second
    # `const` declaration throws, the first has already set everything thebe needs.
    re.compile(r"Identifier 'THEBE_JS_URL' has already been declared"),
    # pydata-sphinx-theme on a first visit, before a light/dark mode is stored.
    re.compile(r"Got invalid theme mode: .*Resetting to auto"),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Runs in the page once it has loaded: wait for every image to settle (lazy ones made
# eager),
# then report images, links, ids and error outputs.
VIEWPORT = {"width": 1280, "height": 800}
INSPECT_JS = r"""async (selector) => {
  // MathJax typesets after the load event: wait for it (10 s at most)
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(done => setTimeout(done, 10000))]);
  }
  const imgs = Array.from(document.images);
  imgs.forEach(img => { img.loading = "eager"; });
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); setTimeout(done, 5000);
  })));
  const lastLine = el => el.innerText.trim().split("\n").filter(s => s.trim()).slice(-1)[0] || "";
  return {
    images: imgs.map(img => ({src: img.currentSrc || img.src, attr: img.getAttribute("src"),
                              complete: img.complete, width: img.naturalWidth})),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => ({url: a.href, attr: a.getAttribute("href")})),
    ids: Array.from(document.querySelectorAll("[id], a[name]")).map(e => e.id || e.getAttribute("name")),
    errors: Array.from(document.querySelectorAll(selector)).map(lastLine),
    rawTables: Array.from(document.querySelectorAll(".cell_output p"))
      .filter(p => /^\s*\|.*\|\s*$/m.test(p.textContent) && /^\s*\|[\s:|\-\u2013\u2014]+\|\s*$/m.test(p.textContent))
      .map(p => p.textContent.trim().split("\n")[0]),
    rawMath: Array.from(document.querySelectorAll(".math"))
      .filter(e => !e.querySelector("mjx-container") && !e.closest("mjx-container"))
      .map(e => e.textContent.trim().slice(0, 60)),
    sideways: Array.from((document.querySelector("article") || document.body).querySelectorAll("*"))
      .filter(e => e.scrollWidth > e.clientWidth + 1
                   && ["auto", "scroll"].includes(getComputedStyle(e).overflowX))
      .map(e => ({tag: e.tagName.toLowerCase(), wide: e.scrollWidth, box: e.clientWidth,
                  text: (e.innerText || "").trim().split("\n")[0].slice(0, 60)}))
      .concat(document.documentElement.scrollWidth > window.innerWidth + 1
        ? [{tag: "html", wide: document.documentElement.scrollWidth, box: window.innerWidth, text: "the page"}]
        : []),
  };
}"""


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def page_ids(path: Path) -> frozenset:
    "The anchors (`id`s, `<a name>`s) of an HTML file, read from disk."
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def toc_pages(toc: Path) -> list[str]:
    """The pages a Jupyter Book `_toc.yml` names (root and `file:` entries), as built
    .html paths."""
    text = toc.read_text()
    names = re.findall(r"^root:\s*(\S+)", text, re.M) + re.findall(
        r"file:\s*(\S+)", text
    )
    return [re.sub(r"\.(md|ipynb|rst)$", "", n) + ".html" for n in names]


def built_pages(html_dir: Path) -> list[str]:
    """Every page of the build, without the generated index/search pages and the asset
    folders."""
    return sorted(
        p.relative_to(html_dir).as_posix()
        for p in html_dir.rglob("*.html")
        if p.name not in SKIP_PAGES
        and not SKIP_DIRS & set(p.relative_to(html_dir).parts[:-1])
    )


def redirect_target(html: str) -> str | None:
    "The target of a `<meta http-equiv=refresh>` page (the book's index.html is one)."
    m = re.search(
        r"<meta[^>]+http-equiv=[\"']?refresh[\"']?[^>]+content=[\"'][^\"']*url=([^\"'>\s]+)",
        html,
        re.I,
    )
    return m.group(1) if m else None


def origin(base: str) -> str:
    "http://host:port/ of a site's base URL http://host:port/site/."
    return base[: -len(SITE_PATH) + 1]


def local_file(html_dir: Path, url: str, base: str) -> Path | None:
    "The file under `html_dir` that a URL under `base` names; None for another site."
    if not url.startswith(base):
        return None
    path = unquote(urlsplit(url).path)[len(SITE_PATH) :]
    target = html_dir / path
    return (
        target / "index.html"
        if path == "" or path.endswith("/") or target.is_dir()
        else target
    )


def check_link(
    html_dir: Path, base: str, page: str, url: str, attr: str, here_ids: set
) -> str | None:
    "The problem with one link of `page`, or None."
    if url.startswith(origin(base)) and not url.startswith(base):
        return f"broken link {attr!r}: outside the book (an absolute path breaks under GitHub Pages' /REPO/ prefix)"
    target = local_file(html_dir, url, base)
    if target is None:
        return None  # another site (or mailto:, javascript:): not checked
    if not target.is_file():
        return f"broken link {attr!r}: {target.relative_to(html_dir).as_posix()} does not exist"
    anchor = unquote(urlsplit(url).fragment)
    if not anchor:
        return None
    same_page = target.resolve() == (html_dir / page).resolve()
    ids = (
        here_ids
        if same_page
        else page_ids(target)
        if target.suffix == ".html"
        else None
    )
    if ids is not None and anchor not in ids:
        where = "this page" if same_page else target.relative_to(html_dir).as_posix()
        return f"broken link {attr!r}: no anchor #{anchor} on {where}"
    return None


def serve(html_dir: Path) -> http.server.ThreadingHTTPServer:
    """A quiet static server for `html_dir` under SITE_PATH on a free localhost port, in
    a background thread; anything outside SITE_PATH is a 404, as on GitHub Pages."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(html_dir), **kwargs)

        def translate_path(self, path):
            if not path.startswith(SITE_PATH):
                return str(html_dir / "__outside_the_site__" / "404")
            return super().translate_path("/" + path[len(SITE_PATH) :])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_page(
    browser_page, html_dir: Path, base: str, page: str
) -> tuple[list[str], str]:
    "(problems, one-line note) for one page, loaded in `browser_page`."
    path = html_dir / page
    if not path.is_file():
        return ["not built"], "missing"
    target = redirect_target(path.read_text(encoding="utf-8", errors="replace"))
    if (
        target is not None
    ):  # loading it would navigate away mid-inspection: check the target exists
        problem = check_link(
            html_dir, base, page, urljoin(base + page, target), target, set()
        )
        return ([problem] if problem else []), f"redirect to {target}"

    problems, statuses = [], {}
    on_response = lambda r: statuses.__setitem__(r.url, r.status)  # noqa: E731
    on_console = lambda m: (
        m.type == "error" and problems.append(f"console error: {m.text}")
    )  # noqa: E731
    on_error = lambda e: problems.append(f"script error: {e}")  # noqa: E731
    browser_page.on("response", on_response)
    browser_page.on("console", on_console)
    browser_page.on("pageerror", on_error)
    try:
        browser_page.goto(base + page, wait_until="load", timeout=30_000)
        info = browser_page.evaluate(INSPECT_JS, ERROR_OUTPUT)
    finally:
        browser_page.remove_listener("response", on_response)
        browser_page.remove_listener("console", on_console)
        browser_page.remove_listener("pageerror", on_error)

    # A failed request to a host we blocked is not the page's fault; one to our
    # server is.
    problems = [
        p
        for p in problems
        if not p.startswith("console error: Failed to load resource")
        and not any(known.search(p) for known in KNOWN_HARMLESS)
    ]
    problems += [f"error output: {line}" for line in info["errors"]]
    size = f"{VIEWPORT['width']} x {VIEWPORT['height']}"
    problems += [
        f"scrolls sideways at {size}: <{box['tag']}> {box['wide']} px wide in a "
        f"{box['box']} px box: {box['text']!r}"
        for box in info["sideways"]
    ]
    problems += [
        f"math shown as TeX, not typeset (is MathJax served with the book?): {tex}"
        for tex in info["rawMath"]
    ]
    problems += [
        "Markdown table output shown as text (set nb_render_markdown_format: gfm): "
        f"{line}"
        for line in info["rawTables"]
    ]
    broken_images = set()
    for img in info["images"]:
        if not img["src"].startswith((origin(base), "data:")):
            continue  # an image on another site: blocked here, not checked
        svg_ok = (
            img["src"].split("?")[0].endswith(".svg")
            and statuses.get(img["src"], 0) == 200
        )
        if not img["complete"] or (img["width"] == 0 and not svg_ok):
            problems.append(f"image does not load: {img['attr']}")
            broken_images.add(img["src"])
    # Any other file of the site that failed: a stylesheet, a script, a font.
    problems += [
        f"missing file {url[len(base) :] if url.startswith(base) else url} (HTTP "
        f"{status})"
        for url, status in statuses.items()
        if url.startswith(origin(base))
        and status >= 400
        and url not in broken_images
        and not url.endswith("/favicon.ico")
    ]
    here_ids = set(info["ids"]) | page_ids(path)
    for link in info["links"]:
        problem = check_link(html_dir, base, page, link["url"], link["attr"], here_ids)
        if problem:
            problems.append(problem)
    problems = list(
        dict.fromkeys(problems)
    )  # a link repeated in the sidebar counts once
    note = f"{len(info['images'])} images, {len(info['links'])} links, {len(info['errors'])} error outputs"
    return problems, note


def find_chromium(given: str | None) -> str:
    """The browser binary: `given`, else $CHROMIUM, else the first Chromium or Chrome on
    PATH."""
    given = given or os.environ.get("CHROMIUM")
    for candidate in (
        [given] if given else ["chromium", "chromium-browser", "google-chrome"]
    ):
        found = shutil.which(candidate) or (
            candidate if Path(candidate).is_file() else None
        )
        if found:
            return found
    raise FileNotFoundError(
        f"no Chromium at {given}"
        if given
        else "no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium PATH"
    )


def check_site(
    html_dir, pages=None, chromium=None, progress=print
) -> dict[str, list[str]]:
    """Problems of each page of the build in `html_dir` (all pages unless `pages` names
    some)."""
    html_dir = Path(html_dir).resolve()
    pages = list(pages) if pages is not None else built_pages(html_dir)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ImportError(
            "the browser check needs Playwright: pip install playwright "
            "(it drives the system Chromium; no `playwright install` needed)"
        ) from None
    executable = find_chromium(chromium)
    server = serve(html_dir)
    base = f"http://127.0.0.1:{server.server_address[1]}{SITE_PATH}"
    results = {}
    try:
        with sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(
                    executable_path=executable, args=CHROMIUM_ARGS
                )
            except (
                Exception
            ) as e:  # playwright's Error: the binary is not a working Chromium
                raise RuntimeError(
                    f"could not start {executable}: {str(e).splitlines()[0]}"
                ) from None
            context = browser.new_context(viewport=VIEWPORT)
            # No network: abort every request to another host at once, so
            # no page waits on a CDN.
            context.route(
                lambda url: (
                    not url.startswith(origin(base)) and not url.startswith("data:")
                ),
                lambda route: route.abort(),
            )
            browser_page = context.new_page()
            for page in pages:
                start = time.perf_counter()
                try:
                    problems, note = check_page(browser_page, html_dir, base, page)
                # a page that hangs or crashes the tab is a problem of
                # that page
                except Exception as e:
                    problems, note = (
                        [
                            f"could not be checked: {type(e).__name__}: "
                            f"{str(e).splitlines()[0]}"
                        ],
                        "error",
                    )
                    browser_page = context.new_page()
                results[page] = problems
                status = "FAIL" if problems else "ok  "
                progress(
                    f"{status} {page}: {note}, {time.perf_counter() - start:.1f} s"
                    + (f", {len(problems)} problems" if problems else "")
                )
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python tools/check_browser.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("html_dir", nargs="?", default="_build/html", help="the built book")
    ap.add_argument(
        "--toc",
        default=None,
        help="check the pages this _toc.yml names (a page not built fails); "
        "default: every built page",
    )
    ap.add_argument(
        "--chromium",
        default=None,
        help="the browser binary (default: $CHROMIUM, else chromium on PATH)",
    )
    args = ap.parse_args(argv)
    html_dir = Path(args.html_dir)
    if not html_dir.is_dir():
        print(
            f"error: {html_dir} is not a directory (build the book first: jupyter-book "
            "build .)",
            file=sys.stderr,
        )
        return 2
    if args.toc and not Path(args.toc).is_file():
        print(f"error: no table of contents at {args.toc}", file=sys.stderr)
        return 2
    pages = toc_pages(Path(args.toc)) if args.toc else None
    start = time.perf_counter()
    try:
        results = check_site(html_dir, pages, args.chromium)
    except (ImportError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = [(page, p) for page, ps in results.items() for p in ps]
    for page, p in problems:
        print(f"BROWSER CHECK FAILED: {page}: {p}")
    print(
        f"browser check: {len(results)} pages, {len(problems)} problems, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
