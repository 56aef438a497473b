"""Every notebook of the book opens with the install cell that makes it run in Colab or
Binder, and `tools/pin_commit.py` pins that cell to one commit."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import pin_commit  # noqa: E402


def first_code(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


NOTEBOOKS = pin_commit.book_notebooks()


def test_the_toc_lists_every_chapter():
    assert {p.name for p in ROOT.glob("nbs/*.ipynb")} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_starts_with_the_install_cell(path):
    "One cell everywhere (only the folder it works in differs), unpinned in the repo."
    canonical = first_code(ROOT / "nbs/01_hf_gpt2.ipynb")
    folder = path.parent.name
    code = first_code(path)
    if folder == "book":  # the About pages work in book/ and read results/ from there
        code = (
            code.replace(
                "its book/ folder (this page reads\n# results/",
                "its nbs/ folder (the chapters read\n# book/results/",
            )
            .replace('"gpt2-from-scratch/book"', '"gpt2-from-scratch/nbs"')
            .replace("clone's book/ folder", "clone's nbs/ folder")
        )
    assert code == canonical
    assert 'BOOK_COMMIT = "main"' in first_code(path)
    assert f'WORK_IN = "gpt2-from-scratch/{folder}"' in first_code(path)


def run_install_cell(monkeypatch, installed: bool, tmp_path: Path) -> list:
    "Execute chapter 1's install cell with subprocess and chdir recorded, not run."
    monkeypatch.chdir(tmp_path)  # a fresh Colab folder: no clone there yet
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[:2] == ["git", "clone"]:  # what a clone leaves
            (tmp_path / cmd[-1] / "nbs").mkdir(parents=True)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "chdir", lambda path: calls.append(["chdir", path]))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (real(name, *a) if installed else None)
            if name == "gpt2lib"
            else real(name, *a)
        ),
    )
    monkeypatch.delenv("GPT2LIB_REPO", raising=False)
    exec(first_code(ROOT / "nbs/01_hf_gpt2.ipynb"), {})
    return calls


def test_install_cell_does_nothing_where_gpt2lib_is_installed(monkeypatch, tmp_path):
    assert run_install_cell(monkeypatch, installed=True, tmp_path=tmp_path) == []


def test_install_cell_works_in_the_clone_after_a_restart(monkeypatch, tmp_path):
    """A restarted Colab runtime has gpt2lib installed but starts in /content again,
    beside the clone: the cell must still move into nbs/ (it used to do nothing, and
    chapters 4, 9 and 11 then said "not measured yet" for results that exist)."""
    (tmp_path / "gpt2-from-scratch/nbs").mkdir(parents=True)
    calls = run_install_cell(monkeypatch, installed=True, tmp_path=tmp_path)
    assert calls == [["chdir", "gpt2-from-scratch/nbs"]]


def test_install_cell_in_a_restarted_kernel(tmp_path):
    "The same in a real kernel: a new process, gpt2lib installed, started beside a clone."
    from jupyter_client.manager import start_new_kernel

    (tmp_path / "gpt2-from-scratch/nbs").mkdir(parents=True)
    km, kc = start_new_kernel(cwd=str(tmp_path))
    try:
        outputs = []
        cell = first_code(ROOT / "nbs/01_hf_gpt2.ipynb") + "\nprint(os.getcwd())"
        reply = kc.execute_interactive(
            cell, timeout=60, output_hook=lambda msg: outputs.append(msg)
        )
        assert reply["content"]["status"] == "ok"
        printed = "".join(m["content"].get("text", "") for m in outputs)
        assert printed.strip() == str((tmp_path / "gpt2-from-scratch/nbs").resolve())
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_install_cell_installs_the_pinned_commit(monkeypatch, tmp_path):
    calls = run_install_cell(monkeypatch, installed=False, tmp_path=tmp_path)
    clone, checkout, pip, chdir = calls
    assert clone[:3] == ["git", "clone", "-q"] and "github.com" in clone[3]
    assert checkout[-1] == "main"
    # not `-e`: an editable install is not importable by the kernel already running
    assert pip[1:] == ["-m", "pip", "install", "-q", "./gpt2-from-scratch"]
    assert chdir == ["chdir", "gpt2-from-scratch/nbs"]


def test_pin_commit_changes_only_the_pin(tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_bytes((ROOT / "nbs/01_hf_gpt2.ipynb").read_bytes())
    pin_commit.pin(path, "0123abc")
    before = (ROOT / "nbs/01_hf_gpt2.ipynb").read_text().splitlines()
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert 'BOOK_COMMIT = \\"0123abc\\"' in changed[0][1]


def test_pin_commit_refuses_a_notebook_without_the_cell(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = {"cells": [{"cell_type": "code", "source": ["print(1)"], "metadata": {}}]}
    path.write_text(json.dumps(nb))
    with pytest.raises(SystemExit, match="not the install cell"):
        pin_commit.pin(path, "0123abc")


def test_binder_installs_the_cpu_torch_and_the_package():
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "binder/requirements.txt").read_text().splitlines()
    ]
    torch_pin = [line for line in lines if line.startswith("torch")]
    # a +cpu local version exists only on PyTorch's CPU index: no CUDA build can match
    assert len(torch_pin) == 1 and torch_pin[0].endswith("+cpu")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert "-e ." in lines


def test_install_cell_rerun_keeps_the_clone(monkeypatch, tmp_path):
    "A rerun after a failed pip install must not fail on the existing clone."
    (tmp_path / "gpt2-from-scratch/nbs").mkdir(parents=True)
    calls = run_install_cell(monkeypatch, installed=False, tmp_path=tmp_path)
    assert [c[:2] for c in calls] == [
        ["git", "-C"],
        [sys.executable, "-m"],
        ["chdir", "gpt2-from-scratch/nbs"],
    ]


def test_a_chapter_leaves_no_temporary_files_behind(tmp_path):
    """book_setting() sends a chapter's temporary files, and those of the programs it
    starts, into one directory removed when the process (the kernel) ends: running the
    chapters again and again used to leave 0.5 GB of stand-in weights in /tmp each."""
    chapter = (
        "import subprocess, sys, tempfile\n"
        "from gpt2lib.book import book_setting\n"
        "book_setting()\n"
        "mine = tempfile.mkdtemp()\n"
        "open(mine + '/weights', 'w').write('x' * 10_000)\n"
        "child = subprocess.run([sys.executable, '-c', 'import tempfile; "
        "print(tempfile.mkdtemp())'], capture_output=True, text=True, check=True)\n"
        "print(mine)\n"
        "print(child.stdout.strip())\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "GPT2_BOOK_DEVICE": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", chapter], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    mine, child = out.stdout.splitlines()[-2:]
    scratch = Path(mine).parent
    assert scratch.parent == tmp_path and scratch.name.startswith("gpt2lib-book-")
    assert Path(child).parent == scratch  # the child was given TMPDIR
    assert list(tmp_path.iterdir()) == []  # all of it removed at exit


def test_pin_commit_points_the_launch_buttons_at_a_tag(tmp_path):
    config = tmp_path / "_config.yml"
    config.write_text((ROOT / "_config.yml").read_text())
    pin_commit.set_launch_ref(config, "book-0123abc")
    before = (ROOT / "_config.yml").read_text().splitlines()
    changed = [
        (a, b) for a, b in zip(before, config.read_text().splitlines()) if a != b
    ]
    assert changed == [("  branch: main", "  branch: book-0123abc")]
    config.write_text("title: x\n")
    with pytest.raises(SystemExit, match="no `branch:` under `repository:`"):
        pin_commit.set_launch_ref(config, "book-0123abc")


def test_the_pages_workflow_pushes_the_tag_the_launch_buttons_open():
    """Colab opens a notebook from GitHub at the launch buttons' ref: on `main` its
    install cell is unpinned, so the workflow must push the tag it points them at."""
    workflow = (ROOT / ".github/workflows/book.yml").read_text()
    pin = re.search(r'pin_commit\.py "\$GITHUB_SHA" --launch-ref "([^"]+)"', workflow)
    assert pin, "the workflow does not point the launch buttons at a pinned ref"
    ref = pin.group(1)
    assert f'git tag -f "{ref}"' in workflow
    assert f'git push -f origin "refs/tags/{ref}"' in workflow
    assert "contents: write" in workflow
    # pinned before the build, which writes the buttons' links into the pages
    assert workflow.index("--launch-ref") < workflow.index("jupyter-book build")


def test_pin_commit_refuses_a_launch_ref_that_is_not_a_name(capsys):
    with pytest.raises(SystemExit, match="'book tag!' is not a commit, tag or branch"):
        pin_commit.main(["0123abc", "--launch-ref", "book tag!"])
