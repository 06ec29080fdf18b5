"""The command line (cli): --help in sections (the method's options, then data, training, evaluation, run), every flag
under its own name, and a command parsed into the same flat Args as tyro parses the flat dataclass."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opsr  # noqa: E402
import osp  # noqa: E402
import sera  # noqa: E402
import srdpo  # noqa: E402

MODULES = {"sera": sera, "srdpo": srdpo, "opsr": opsr, "osp": osp}
COMMANDS = {
    "sera": [["--loss", "ipo", "--rho_2", "0.5", "--lr", "1e-6", "--resume", "--output_dir", "x", "--num_eval", "0"]],
    "srdpo": [["--lam", "0.3", "--loss", "sr_ipo", "--track", "--wandb_project", "p", "--max_length", "128"]],
    "opsr": [["--rejected_scores", "3", "3", "3", "--lrs", "1e-7", "1e-8", "--reward_fn", "f.py:g", "--seed", "7"]],
    "osp": [["--k", "5", "--verdict_tokens", "X", "Y", "--skip_augmentation", "--no-resume", "--eval_every", "3"]],
}


@pytest.mark.parametrize("script", MODULES)
def test_a_command_parses_to_the_flat_args(monkeypatch, script):
    module = MODULES[script]
    for argv in COMMANDS[script] + [[]]:
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
        grouped = module.cli(module.Args, module.MODELS, module.__doc__)
        assert type(grouped) is module.Args
        assert grouped == tyro.cli(module.Args, args=argv)


@pytest.mark.parametrize("script", MODULES)
def test_help_shows_every_option_once_in_its_section(script):
    module = MODULES[script]
    env = {**os.environ, "COLUMNS": "100"}  # one column of sections
    out = subprocess.run(
        [sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    sections = re.findall(r"╭─ (\w+) options ─", out.stdout)
    assert sections == ["method", "data", "training", "evaluation", "run"]
    parts = re.split(r"╭─ \w+ options ─", out.stdout)[1:]
    where = {}
    for section, text in zip(sections, parts):
        for flag in re.findall(r"│ --([a-z0-9-]+)", text):
            where.setdefault(flag.replace("-", "_").removeprefix("no_"), []).append(section)
    for field in dataclasses.fields(module.Args):
        expected = next((g for g, names in module.HELP_GROUPS.items() if field.name in names.split()), "method")
        assert set(where.get(field.name, [])) == {expected}, (field.name, where.get(field.name))
    assert set(where) == {f.name for f in dataclasses.fields(module.Args)}
