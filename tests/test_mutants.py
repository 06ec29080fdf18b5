"""The mutation check's list stays runnable and is the rule table of tests/README.md (tests/mutants.py runs it)."""

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import mutants  # noqa: E402


def test_every_mutant_applies_once_and_names_existing_tests():
    names = [m.name for m in mutants.MUTANTS]
    assert len(set(names)) == len(names)
    for m in mutants.MUTANTS:
        text = (ROOT / m.file).read_text()
        assert text.count(m.old) == 1, (m.name, m.file)
        assert m.old != m.new and text.replace(m.old, m.new) != text, m.name
        paths = [t.split("::")[0] for t in shlex.split(m.tests) if t.startswith("tests/")]
        assert paths and all((ROOT / p).is_file() for p in paths), (m.name, m.tests)


def test_readme_rule_table_is_the_mutant_list():
    readme = (ROOT / "tests" / "README.md").read_text()
    assert mutants.table() in readme, "tests/README.md: paste `python tests/mutants.py --table`"
