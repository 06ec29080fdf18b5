"""The checked copies between the scripts (tests/check_copies.py): no drift, and drift is caught and fixed."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "tests" / "check_copies.py"
SCRIPTS = ("sera", "srdpo", "opsr", "osp")


def check(*argv):
    return subprocess.run([sys.executable, str(CHECKER), *argv], capture_output=True, text=True)


def test_copies_are_identical_to_their_originals():
    res = check()
    assert res.returncode == 0, res.stdout + res.stderr
    # the runtime block of three scripts, three Args tails and the method-level copies: not an empty pass
    assert int(res.stdout.split()[0]) >= 10


def test_every_script_ends_with_the_same_runtime():
    """From its fence to the end of the file, the runtime is one text in all four scripts, and it holds the
    shared runtime: nothing of it stays above the fence in any script."""
    blocks = set()
    for script in SCRIPTS:
        text = (ROOT / f"{script}.py").read_text()
        head, fence, block = text.partition("# RUNTIME: written in sera.py")
        blocks.add(fence + block)
        assert "def load_model(" not in head and "def load_model(" in block
        assert "# Copied from sera.load_model" not in text  # no per-function markers in the block
    assert len(blocks) == 1


def test_drift_is_reported_and_fixed(tmp_path):
    for script in SCRIPTS:
        shutil.copy(ROOT / f"{script}.py", tmp_path / f"{script}.py")
    path = tmp_path / "osp.py"
    original = path.read_text()
    line = '        raise InputError(f"{where} must be a string, got {type(value).__name__}")\n'
    assert original.count(line) == 1
    path.write_text(original.replace(line, line.replace("must be a string", "must be text")))
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "osp.py" in res.stderr and "the runtime block differs from sera.py's" in res.stderr
    assert "must be text" in res.stderr
    res = check("--root", str(tmp_path), "--fix")
    assert res.returncode == 0, res.stderr
    assert path.read_text() == original


def test_method_level_copies_and_misplaced_markers(tmp_path):
    for script in SCRIPTS:
        shutil.copy(ROOT / f"{script}.py", tmp_path / f"{script}.py")
    path = tmp_path / "opsr.py"
    text = path.read_text()
    assert "# Copied from sera.train_iteration\n" in text
    line = "    grad_accum, per_step = accumulation(args.global_batch, args.batch_size), args.global_batch\n"
    assert text.count(line) == 1
    path.write_text(text.replace(line, line.replace("per_step = ", "per_step = 2 * ")))
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "train_iteration differs from sera.py's" in res.stderr
    path.write_text(text.replace("# Copied from sera.train_iteration\n", "# Copied from sera.train_iterationz\n"))
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "is not directly above a top-level train_iterationz" in res.stderr


def test_an_unmarked_repeat_is_an_error(tmp_path):
    """A definition repeated to the letter without a marker would drift unseen: the checker refuses it."""
    for script in SCRIPTS:
        shutil.copy(ROOT / f"{script}.py", tmp_path / f"{script}.py")
    path = tmp_path / "osp.py"
    path.write_text(path.read_text().replace("# Copied from sera.HH_TEMPLATE\n", ""))
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "osp.py" in res.stderr and "HH_TEMPLATE is the same as in" in res.stderr


def test_shared_options_in_args_are_checked(tmp_path):
    """The options every script shares close each Args: drift there is reported and fixed like any copy."""
    for script in SCRIPTS:
        shutil.copy(ROOT / f"{script}.py", tmp_path / f"{script}.py")
    path = tmp_path / "opsr.py"
    original = path.read_text()
    line = "    max_grad_norm: float = 1.0\n"
    head, tail = original.split("    # Options all four scripts share", 1)
    assert tail.count(line) == 1
    path.write_text(
        head + "    # Options all four scripts share" + tail.replace(line, "    max_grad_norm: float = 10.0\n")
    )
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "opsr.py" in res.stderr and "Args's shared options differs" in res.stderr
    assert check("--root", str(tmp_path), "--fix").returncode == 0 and path.read_text() == original
    path.write_text(original.replace("    # Options all four scripts share", "    # Options"))
    res = check("--root", str(tmp_path))
    assert res.returncode == 1 and "opsr.py: Args has no line" in res.stderr


def test_readme_line_figures_are_the_checkers():
    """README "How the code is organised" states each script's figures as the checker prints them."""
    import re

    out = check().stdout
    printed = dict(re.findall(r"(\w+)\.py: (\d+ lines, \d+) before the runtime block", out))
    readme = (ROOT / "README.md").read_text()
    stated = {name: f"{total} lines, {own}" for name, total, own in re.findall(r"`(\w+)\.py` (\d+) / (\d+)", readme)}
    assert set(printed) == set(SCRIPTS), out  # both patterns match, for every script: not {} == {}
    assert stated == printed
