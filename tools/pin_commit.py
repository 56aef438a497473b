"""Pin the install cell of every notebook of the book to one commit.

Each chapter opens with a cell that, where `gpt2lib` is not installed (Colab, Binder),
clones the repository at `BOOK_COMMIT` and installs it. In the repository the value is
"main"; the Pages workflow runs this before building, so that the notebooks the
published book offers for download install the code its prose was built from.

The launch buttons open a notebook on GitHub at `repository.branch` of _config.yml
("main", whose install cell is not pinned). `--launch-ref TAG` points them at TAG
instead: the workflow commits the pinned notebooks, tags that commit TAG and pushes it,
so Colab opens the notebook pinned to the commit its page was built from.

    python tools/pin_commit.py            # the checkout's commit (git rev-parse HEAD)
    python tools/pin_commit.py SHA --launch-ref book-SHA
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r'^BOOK_COMMIT = "[^"]*"', re.MULTILINE)
# the branch line of _config.yml's `repository:` section, which the launch buttons open
LAUNCH_REF = re.compile(
    r"^(repository:\n(?:[ \t]+.*\n)*?[ \t]+branch:[ \t]*)(\S+)", re.M
)


def book_notebooks(root: Path = ROOT) -> list[Path]:
    "The notebooks of the book's table of contents (chapters, appendix, about pages)."
    toc = (root / "_toc.yml").read_text(encoding="utf-8")
    files = re.findall(r"^\s*-?\s*file:\s*(\S+)", toc, re.MULTILINE)
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").exists()]


def install_cell(nb: dict) -> dict | None:
    "The notebook's first code cell if it is the install cell, else None."
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    if code and PIN.search("".join(code[0]["source"])):
        return code[0]
    return None


def pin(path: Path, commit: str) -> None:
    "Set `BOOK_COMMIT` in the install cell of notebook `path` to `commit`."
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = install_cell(nb)
    if cell is None:
        raise SystemExit(f"error: {path}: the first code cell is not the install cell")
    source = PIN.sub(f'BOOK_COMMIT = "{commit}"', "".join(cell["source"]), count=1)
    cell["source"] = source.splitlines(keepends=True)
    text = json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")


def set_launch_ref(config: Path, ref: str) -> None:
    "Point the launch buttons of the book `config` (_config.yml) builds at `ref`."
    text = config.read_text(encoding="utf-8")
    if not LAUNCH_REF.search(text):
        raise SystemExit(f"error: {config}: no `branch:` under `repository:`")
    config.write_text(LAUNCH_REF.sub(rf"\g<1>{ref}", text, count=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", nargs="?", help="default: the checkout's HEAD")
    ap.add_argument(
        "--launch-ref",
        help="the tag or branch the launch buttons open (default: as is)",
    )
    args = ap.parse_args(argv)
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for name in (commit, args.launch_ref or "main"):
        if not re.fullmatch(r"[0-9a-f]{7,40}|[\w./-]+", name):
            sys.exit(f"error: {name!r} is not a commit, tag or branch name")
    for path in book_notebooks():
        pin(path, commit)
    print(f"pinned {len(book_notebooks())} notebooks to {commit}")
    if args.launch_ref:
        set_launch_ref(ROOT / "_config.yml", args.launch_ref)
        print(f"the launch buttons open {args.launch_ref}")


if __name__ == "__main__":
    main()
