"""The README and docs/ say only what the scripts accept: every command in them that runs one of the four scripts is
parsed by that script's own command line and `resolve`, in process (no training runs); the Quickstart's commands are
the ones CI runs; the dataset schemas' example rows parse; the relative links lead somewhere."""

import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICKSTART = ("pip install -e . && python sera.py", 'pip install -c constraints.txt -e ".[dev]" && python -m pytest -q')

# Files a README command names that the user makes, and the shipped stand-ins the test parses the command with
# (each one must still be named by some command: the table stays in step with the README).
STAND_INS = {
    "./my-sft": "assets/toy/model",  # your SFT model, a save_pretrained folder
    "./pairs.jsonl": "assets/toy/data/prefs.jsonl",  # your preference pairs
    "uf_test.jsonl": "assets/toy/data/eval.jsonl",  # held-out UltraFeedback prompts (the README's one-liner writes it)
    "./simpo-ckpt": "assets/toy/model",  # a SimPO checkpoint (opsr --init_checkpoint)
}
PREFIX_STAND_INS = {}  # e.g. {"/path/to/selfpo/": ""}: a checkout of this project -> this checkout
# Options whose value is a file or folder (or a preset of the script, or a hub id org/name).
PATH_OPTIONS = (
    "model dataset eval_prompts init_checkpoint reward_model chat_template reward_chat_template sft_data prompts "
    "judge_template reward_fn"
).split()


def code_lines(text: str):
    """(line number, command text) of every line a reader would run: fenced code blocks (backslash continuations
    joined), indented code lines, and inline code spans that start with `python` or `torchrun`."""
    fenced, pending = False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            if pending is not None:
                line = pending[1] + " " + line.strip()
                number = pending[0]
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1])
                continue
            pending = None
            yield number, line.strip()
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith(("python ", "torchrun ")):
                    yield number, span


def script_commands(line: str) -> list[tuple[str, list[str], int]]:
    """(script, its arguments, ranks) for each part of a shell line (`a && b; c`) that runs one of the four scripts
    with python or torchrun."""
    out = []
    tokens = shlex.split(line, comments=True)
    parts, part = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            parts.append(part)
            part = []
        else:
            part.append(token)
    parts.append(part)
    for part in parts:
        while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):  # VAR=value before the command
            part = part[1:]
        if len(part) >= 2 and Path(part[0]).name.startswith("python") and part[1] in {f"{s}.py" for s in SCRIPTS}:
            out.append((part[1][:-3], part[2:], 1))
        elif part and part[0] == "torchrun":
            ranks, i = 1, 1
            while i < len(part) and not part[i].endswith(".py"):
                name, _, value = part[i].partition("=")
                if name in ("--nproc-per-node", "--nproc_per_node"):
                    if not value:
                        i += 1
                        value = part[i]
                    ranks = int(value)
                i += 1
            assert i < len(part) and part[i] in {f"{s}.py" for s in SCRIPTS}, f"torchrun of what? {line!r}"
            out.append((part[i][:-3], part[i + 1 :], ranks))
    return out


def documented_commands():
    found = []
    for doc in DOCS:
        for number, line in code_lines(doc.read_text()):
            for script, argv, ranks in script_commands(line):
                found.append(pytest.param(script, argv, ranks, id=f"{doc.relative_to(ROOT)}:{number}:{script}"))
    return found


COMMANDS = documented_commands()


def cli_call(script: str):
    """The expression the script's `if __name__ == "__main__":` block parses its command line with (its cli(...)
    call), compiled: the test parses as the script does, whatever that call's arguments."""
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "cli":
                    return compile(ast.Expression(call), f"{script}.py", "eval")
    raise AssertionError(f"{script}.py: no cli(...) call in its __main__ block")


def swap(value: str) -> str:
    for prefix, replacement in PREFIX_STAND_INS.items():
        if value.startswith(prefix):
            value = replacement + value[len(prefix) :]
    return STAND_INS.get(value, value)


def is_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".jsonl", ".json", ".parquet", ".py", ".jinja", ".txt"))


def check_command(script: str, argv: list[str], ranks: int, monkeypatch) -> object:
    """Parse `script.py argv` with the script's own command line, then `resolve` it, as `ranks` torchrun ranks; every
    file it names exists (after the stand-ins) and --dataset is a preset or a file. Returns the resolved Args."""
    mod = importlib.import_module(script)
    argv = [swap(a) for a in argv]
    if torch.cuda.device_count() < ranks and not any(a.split("=")[0] == "--device" for a in argv):
        argv += ["--device", "cpu"]  # the command is for GPUs; this machine resolves it on the CPU
    monkeypatch.chdir(ROOT)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, str(ranks)) if ranks > 1 else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    annotations = dict(mod.Args.__annotations__)  # cli() annotates the options' help in place
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            args = eval(cli_call(script), vars(mod))
    except SystemExit as exit:
        if exit.code == 0 and ("--help" in argv or "-h" in argv):
            return None
        raise AssertionError(f"{script}.py {shlex.join(argv)}: its command line refuses it:\n{said.getvalue()}")
    finally:
        mod.Args.__annotations__.clear()
        mod.Args.__annotations__.update(annotations)
    try:
        args, _ = mod.resolve(args)
    except mod.InputError as err:
        raise AssertionError(f"{script}.py {shlex.join(argv)}: resolve refuses it: {err}") from None
    for option in PATH_OPTIONS:
        value = getattr(args, option, None)
        if not isinstance(value, str) or "{%" in value:
            continue
        path = value.rpartition(":")[0] if option == "reward_fn" else value
        if option in ("model", "init_checkpoint", "reward_model") and value in getattr(mod, "MODELS", {}):
            continue
        if option in ("dataset", "sft_data") and value in mod.DATASETS:
            continue
        if is_local(path) or (ROOT / path.split("/")[0]).exists() or option in ("dataset", "sft_data"):
            assert (ROOT / path).exists(), f"{script}.py --{option} {value}: no such file or preset"
    return args


@pytest.mark.parametrize("script, argv, ranks", COMMANDS)
def test_documented_command_parses_and_resolves(script, argv, ranks, monkeypatch):
    check_command(script, argv, ranks, monkeypatch)


def test_the_commands_are_found_and_the_stand_ins_used():
    """Not an empty pass: every script's commands are found in the README, torchrun ones too, and each stand-in
    replaces a file some command names."""
    in_readme = {c.values[0] for c in COMMANDS if c.id.startswith("README.md:")}
    assert in_readme == set(SCRIPTS), in_readme
    assert any(c.values[2] > 1 for c in COMMANDS)
    named = {a for c in COMMANDS for a in c.values[1]}
    assert set(STAND_INS) <= named, set(STAND_INS) - named
    assert all(any(a.startswith(p) for a in named) for p in PREFIX_STAND_INS)


@pytest.mark.parametrize(
    "line, refused",
    [
        ("python sera.py --rho2 0", "command line refuses"),  # a misspelt flag
        ("python sera.py --loss dpoo", "command line refuses"),  # a value the option does not take
        ("python srdpo.py --model zephyr-7", "resolve refuses"),  # a preset that does not exist
        ("python osp.py --dataset hh-rlhff", "no such file or preset"),
        ("python sera.py --model mistral-7b --eval_prompts uf_tests.jsonl", "resolve refuses"),  # no stand-in
        ("torchrun --nproc-per-node 3 sera.py --model mistral-7b", "resolve refuses"),  # 16 pairs over 3 ranks
    ],
)
def test_a_wrong_command_is_refused(line, refused, monkeypatch):
    [(script, argv, ranks)] = script_commands(line)
    with pytest.raises(AssertionError, match=refused):
        check_command(script, argv, ranks, monkeypatch)


def test_a_misspelt_flag_in_a_readme_command_is_caught(monkeypatch):
    """The README's own first command with a flag, one letter changed in that flag: refused."""
    script, argv, ranks = next(c.values for c in COMMANDS if c.id.startswith("README.md:") and c.values[1])
    flag = next(i for i, a in enumerate(argv) if a.startswith("--"))
    check_command(script, argv, ranks, monkeypatch)
    wrong = argv[:flag] + [argv[flag][:-1] + ("x" if argv[flag][-1] != "x" else "y")] + argv[flag + 1 :]
    with pytest.raises(AssertionError, match="command line refuses"):
        check_command(script, wrong, ranks, monkeypatch)


def test_extraction_reads_continuations_chains_and_spans():
    text = "```bash\nA=1 python sera.py --loss \\\n  ipo && torchrun --nproc_per_node=2 osp.py --k 3  # c\n```\n"
    text += "see `torchrun --nproc-per-node 4 opsr.py`, not `python tests/x.py sera.py`\n"
    found = [c for _, line in code_lines(text) for c in script_commands(line)]
    assert found == [("sera", ["--loss", "ipo"], 1), ("osp", ["--k", "3"], 2), ("opsr", [], 4)]


# ---- the Quickstart -------------------------------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_quickstart_is_the_cpu_torch_line_then_the_two_commands():
    quick = section((ROOT / "README.md").read_text(), "Quickstart")
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert [b.strip() for b in blocks] == list(QUICKSTART)
    assert quick.index("download.pytorch.org/whl/cpu") < quick.index("```")


def test_quickstart_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert QUICKSTART[1] in ci


def test_quickstart_run_command_is_what_ci_runs():
    assert QUICKSTART[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


# ---- what the README states beside its commands --------------------------------------------------------------------


def test_schema_table_rows_parse_as_their_schema():
    """Each example row of "Your own model and data" is read by the scripts' own parser into a prompt ending with
    the user's turn and two different replies taken from the row."""
    import sera

    text = section((ROOT / "README.md").read_text(), "Your own model and data")
    rows = re.findall(r"^\| ([^|]+) \| [^\n]* \| `(\{.*\})` \|$", text, flags=re.M)
    assert [name for name, _ in rows] == [
        "UltraFeedback message lists",
        "HH-RLHF raw text",
        "TL;DR comparisons",
        "plain strings",
    ]
    for name, row in rows:
        pair = sera.parse_pair(json.loads(row), name)
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"], name
        assert pair["chosen"] in row and pair["rejected"] in row, name


def test_memory_table_is_the_dry_runs():
    """The README's memory table at 7B is docs/gpus.md's, row for row."""
    rows = (
        [
            line.strip()
            for line in path.read_text().splitlines()
            if re.match(r"\s*\| (sera|srdpo|opsr|osp) \S+, \d+ \(", line)
        ]
        for path in (ROOT / "README.md", ROOT / "docs" / "gpus.md")
    )
    readme, gpus = rows
    assert len(readme) >= 4 and readme == gpus


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    fenced, out = False, set()
    for line in path.read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "benchmarks" / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to {target}: no such file"
        assert not anchor or anchor in anchors(path), f"{doc.name}: link to {target}: no such heading"


# ---- the commands that run on this machine, run ---------------------------------------------------------------------

HUB_OPTIONS = ("model", "dataset", "reward_model", "init_checkpoint", "sft_data")  # what may name the hub


def why_not_here(argv: list[str], ranks: int) -> str | None:
    """Why a documented command cannot run on a CPU machine without the hub (None: it can): a hub preset or id
    (after the stand-ins), more ranks than two, or vLLM on the toy (vLLM's CPU attention has no head size 40:
    tests/test_vllm.py runs the scripts with --sampler vllm on a copy with 2 heads of 80)."""
    if "--sampler" in argv and argv[argv.index("--sampler") + 1] == "vllm":
        return "--sampler vllm needs a GPU for the toy"
    for i, token in enumerate(argv[:-1]):
        name = token.removeprefix("--")
        if name in HUB_OPTIONS and not (ROOT / swap(argv[i + 1])).exists() and argv[i + 1] != "toy":
            return f"--{name} {argv[i + 1]} is on the hub"
    return f"{ranks} ranks" if ranks > 2 else None


def runnable_commands():
    """Each distinct documented command that runs here (the default job once, wherever it is written)."""
    seen, out = set(), []
    for command in COMMANDS:
        script, argv, ranks = command.values
        key = (script, tuple(swap(a) for a in argv), ranks)
        if why_not_here(argv, ranks) is None and key not in seen:
            seen.add(key)
            out.append(pytest.param(script, argv, ranks, id=command.id))
    return out


RUNNABLE = runnable_commands()


@pytest.fixture(scope="module")
def your_model(tmp_path_factory) -> Path:
    """The stand-in for the user's own --model: the toy with a 2,048-token context (a real SFT model has at least
    that; the toy's own 512 is below the paper settings a non-preset model gets). Its rotary positions need no
    weights for it."""
    folder = tmp_path_factory.mktemp("your-model")
    for file in (ROOT / STAND_INS["./my-sft"]).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    return folder


def run_documented(script: str, argv: list[str], ranks: int, out: Path, your_model: Path, *extra: str):
    """The command as a user runs it from the checkout, its files swapped for the stand-ins, in `out`."""
    argv = [str(your_model) if a == "./my-sft" else swap(a) for a in argv]
    if "--output_dir" in argv:
        argv[argv.index("--output_dir") + 1] = str(out)
    elif "--help" not in argv:
        argv += ["--output_dir", str(out)]
    launch = [sys.executable, f"{script}.py"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), f"{script}.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*launch, *argv, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("script, argv, ranks", RUNNABLE)
def test_documented_command_runs_here(script, argv, ranks, tmp_path, your_model):
    """Every README and docs/ command that needs neither the hub nor more than two ranks runs: --help prints the
    options; a training command runs to its first optimizer step (--stop_after_steps 1: the loading, data, scoring,
    sampling, judging and OSP's Stage 0 before it, and one step; the default job runs to its end in CI), records it
    and stops as an interrupted run does (under torchrun: rank 0 says so, torchrun reports the ranks' exit). A
    --resume command continues such a run (it redoes the step: no step checkpoint yet)."""
    out = tmp_path / "run"
    if "--help" in argv:
        res = run_documented(script, argv, ranks, out, your_model)
        assert res.returncode == 0 and "--output_dir" in res.stdout, res.stderr[-2000:]
        return
    for resume in [False, True] if "--resume" in argv else [False]:  # a run to continue first, as the user has one
        mine = argv if resume else [a for a in argv if a != "--resume"]
        res = run_documented(script, mine, ranks, out, your_model, "--stop_after_steps", "1")
        said = [line for line in res.stderr.splitlines() if "interrupted (--stop_after_steps 1 reached)" in line]
        assert res.returncode == (130 if ranks == 1 else 1) and len(said) == 1, res.stderr[-3000:]
        assert not resume or f"resuming {out}" in res.stdout, res.stdout[-2000:]
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in steps] == [1] * (1 + ("--resume" in argv)), steps  # (OSP: Stage 1's, after Stage 0)


def test_what_is_not_run_here_needs_the_hub_or_more_ranks():
    """The commands left out are left out for the hub or the ranks, and most are run: the default job of each script,
    a user's own files (the stand-ins), a resume, a torchrun line."""
    left_out = {c.id: why_not_here(*c.values[1:]) for c in COMMANDS if why_not_here(*c.values[1:])}
    assert all(
        re.fullmatch(r"--\w+ \S+ is on the hub|\d+ ranks|--sampler vllm needs a GPU for the toy", why)
        for why in left_out.values()
    ), left_out
    run = [c.values for c in RUNNABLE]
    assert {s for s, argv, _ in run if not argv} == set(SCRIPTS)
    assert any("./my-sft" in argv for _, argv, _ in run) and any("--resume" in argv for _, argv, _ in run)
    assert any(ranks == 2 for _, _, ranks in run) and len(run) >= 15, len(run)


# README lines that run something other than the four scripts, and where each is run (or why it is not)
OTHER_COMMANDS = {
    "python tests/check_copies.py": "tests/test_copies.py",
    "python -c \"from datasets import load_dataset; load_dataset('HuggingFaceH4/": "the hub",
}


def test_every_other_readme_command_is_run_by_ci_or_a_test():
    """A README line that is no script command is one of .ci/run's lines, a part of the test command (pytest on a
    file or marker), or in OTHER_COMMANDS, whose test file runs it."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for number, line in code_lines((ROOT / "README.md").read_text()):
        if script_commands(line) or line in ci or line.startswith("python -m pytest -q "):
            continue
        where = next((v for k, v in OTHER_COMMANDS.items() if line.startswith(k)), None)
        assert where, f"README.md:{number}: {line!r} is run neither by .ci/run nor by a test"
        assert where == "the hub" or line.split()[1] in (ROOT / where).read_text(), (line, where)
