"""tools/mutate.py stays usable: every planted bug still applies to the code (its text
occurs exactly once in its module), so a change of the code cannot quietly turn a mutant
into a no-op."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(spec)
sys.modules["mutate"] = mutate  # dataclasses look their module up there
spec.loader.exec_module(mutate)


@pytest.mark.parametrize("mutant", mutate.MUTANTS, ids=[m.name for m in mutate.MUTANTS])
def test_every_mutant_applies_once_and_changes_the_code(mutant):
    text = (ROOT / "gpt2lib" / f"{mutant.module}.py").read_text()
    assert text.count(mutant.old) == 1 and mutant.old != mutant.new
    assert all((ROOT / "tests" / f"{name}.py").is_file() for name in mutant.tests)


def test_mutant_names_are_unique():
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names))
