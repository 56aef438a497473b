"""The README says what the code does: its commands are the ones the book gives and the
package has."""

from pathlib import Path

from gpt2lib.train import GPT2_124M_COMMANDS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_gpt2_run_commands_are_chapter_9s():
    lines = [line.split("  #")[0].strip() for line in README.splitlines()]
    for command in GPT2_124M_COMMANDS:
        assert command in lines, command


def test_the_readme_names_every_console_script():
    scripts = [
        line.split("=")[0].strip()
        for line in (Path(__file__).parent.parent / "pyproject.toml")
        .read_text()
        .split("[project.scripts]")[1]
        .split("[")[0]
        .splitlines()
        if "=" in line
    ]
    assert len(scripts) == 7
    for script in scripts:
        assert script in README, script
