"""Inputs a new user brings, in all four scripts: malformed files and models fail with one clear line
before anything is written; the known quirks of real preference data are skipped and counted."""

import importlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "assets" / "toy" / "model"
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
GOOD = [json.loads(line) for line in open(ROOT / "assets" / "toy" / "data" / "prefs.jsonl")][:40]


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def rows_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def model_without(d: Path, drop: tuple[str, ...]) -> str:
    folder = d / "model"
    shutil.copytree(TOY_MODEL, folder)
    for name in drop:
        (folder / name).unlink()
    return str(folder)


def truncated_model(d: Path) -> str:
    folder = Path(model_without(d, ()))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def reward_file(d: Path, body: str) -> str:
    return write(d / "reward.py", f"def score(prompt, response):\n    {body}\n") + ":score"


def model_with_config(d: Path, **changes) -> str:
    """The toy's weights under a config that does not describe them (another size, another architecture)."""
    folder = Path(model_without(d, ()))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return str(folder)


def reward_module(d: Path, name: str, text: str) -> str:
    return write(d / name, text) + ":score"


BAD = {  # name: (arguments given a tmp folder, expected message)
    "empty dataset": (lambda d: dict(dataset=write(d / "e.jsonl", "")), r"--dataset: .*e.jsonl has no rows"),
    "invalid json line": (
        lambda d: dict(dataset=write(d / "x.jsonl", rows_text(GOOD[:3]) + "{oops\n")),
        r"x.jsonl line 4: not valid JSON",
    ),
    "not utf-8": (
        lambda d: dict(dataset=write(d / "x.jsonl", rows_text(GOOD[:3]).encode() + b"\xff\xfe\n")),
        r"x.jsonl is not UTF-8 text",
    ),
    "wrong columns": (
        lambda d: dict(dataset=write(d / "x.jsonl", rows_text([{"question": "q", "answer": "a"}] * 3))),
        r"x.jsonl line 1: missing column 'chosen'",
    ),
    "no tokenizer": (
        lambda d: dict(model=model_without(d, ("tokenizer.json", "tokenizer_config.json"))),
        r"--model: no config and tokenizer load from .*tokenizer",
    ),
    "no config": (
        lambda d: dict(model=model_without(d, ("config.json",))),
        r"--model: no config and tokenizer load from .*config.json",
    ),
    "truncated safetensors": (
        lambda d: dict(model=truncated_model(d)),
        r"--model: .* does not load as a causal LM \(Error while deserializing header",
    ),
    "reward raises": (
        lambda d: dict(reward_fn=reward_file(d, "raise KeyError('label')")),
        r"--reward_fn .* raised KeyError: 'label'",
    ),
    "reward not a number": (
        lambda d: dict(reward_fn=reward_file(d, "return 'good'")),
        r"--reward_fn .* returned 'good'; expected a finite number",
    ),
    "reward nan": (
        lambda d: dict(reward_fn=reward_file(d, "return float('nan')")),
        r"--reward_fn .* returned nan; expected a finite number",
    ),
    "missing eval prompts": (lambda d: dict(eval_prompts=str(d / "none.jsonl")), r"--eval_prompts: file .* not found"),
    "missing chat template": (
        lambda d: dict(chat_template=str(d / "none.jinja")),
        r"--chat_template: file .* not found",
    ),
    "output dir is a file": (lambda d: dict(output_dir=write(d / "out", "x")), r"--output_dir: .* is a file"),
    "dataset is text named .parquet": (
        lambda d: dict(dataset=write(d / "x.parquet", "prompt,chosen\n")),
        r"--dataset: .*x.parquet cannot be read \(.*\); expected a .jsonl, .json or .parquet file",
    ),
    "dataset is an empty folder": (
        lambda d: dict(dataset=str((d / "empty").mkdir() or d / "empty")),
        r"--dataset: .*empty cannot be read .*save_to_disk folder",
    ),
    "reward module does not import": (
        lambda d: dict(reward_fn=reward_module(d, "r.py", "import math\ndef score(prompt, response:\n")),
        r"--reward_fn: .*r.py:2: SyntaxError",
    ),
    "reward module raises on import": (
        lambda d: dict(reward_fn=reward_module(d, "r.py", "x = 1\nraise RuntimeError('no GPU here')\n")),
        r"--reward_fn: .*r.py:2: RuntimeError: no GPU here",
    ),
    "reward is not a .py file": (
        lambda d: dict(reward_fn=reward_module(d, "r.txt", "def score(p, r):\n    return 1.0\n")),
        r"--reward_fn: .*r.txt' is not a .py file",
    ),
    "weights of another size than the config": (
        lambda d: dict(model=model_with_config(d, intermediate_size=512)),
        r"--model: .*(do not fit its config|does not load as a causal LM)",
    ),
    "config of another architecture than the weights": (
        lambda d: dict(model=model_with_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=160)),
        r"--model: the weights in .* do not fit its config \(\d+ missing, \d+ unexpected",
    ),
    "output dir cannot be written": (
        lambda d: dict(output_dir=str(Path(write(d / "file", "x")) / "run")),
        r"--output_dir: .*file/run cannot be written",
    ),
    "scoring batch of 0": (lambda d: dict(scoring_batch_size=0), r"--scoring_batch_size must be >= 1, got 0"),
    "no new tokens": (lambda d: dict(max_new_tokens=0), r"--max_new_tokens must be >= 1, got 0"),
    "negative number of eval prompts": (lambda d: dict(num_eval=-1), r"--num_eval must be >= 0, got -1"),
    "warmup ratio over 1": (lambda d: dict(warmup_ratio=2.0), r"--warmup_ratio must be in \[0, 1\], got 2.0"),
    "generation batch of 0": (lambda d: dict(generation_batch_size=0), r"--generation_batch_size must be >= 1, got 0"),
    "negative temperature": (lambda d: dict(eval_temperature=-1.0), r"--eval_temperature must be >= 0, got -1.0"),
    "clipping norm of 0": (lambda d: dict(max_grad_norm=0.0), r"--max_grad_norm must be > 0, got 0.0"),
    "too many degenerate rows": (
        lambda d: dict(
            dataset=write(d / "x.jsonl", rows_text(GOOD[:30] + [dict(GOOD[0], rejected=GOOD[0]["chosen"])] * 3))
        ),
        r"3 of 33 rows are degenerate \(identical 3\)",
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written(script, case, tmp_path):
    """Each class of bad input, in each script, is an InputError (printed as one `<script>: error:` line by
    the shared __main__ block, tested in test_sera.py) raised before --output_dir is created."""
    module = importlib.import_module(script)
    make, match = BAD[case]
    small = write(tmp_path / "small.jsonl", rows_text(GOOD))
    given = dict(
        dataset=small, reward_fn=f"{ROOT / 'assets' / 'toy' / 'oracle.py'}:score", output_dir=str(tmp_path / "run")
    )
    osp = dict(num_judge_eval=8, judge_max_length=512)  # fits the toy when --model is a path
    given.update(dict(osp=osp, srdpo=dict(eval_pairs=4)).get(script, {}))
    given.update(max_prompt_length=64, max_new_tokens=24, max_length=96)  # the toy's context, not a paper preset's
    given.update(make(tmp_path))
    before = {p: p.stat().st_size for p in tmp_path.rglob("*")}
    with pytest.raises(module.InputError, match=match):
        module.main(module.Args(**given))
    assert {p: p.stat().st_size for p in tmp_path.rglob("*")} == before  # nothing written, nothing changed


# ---- real-data quirks: skipped and counted ---------------------------------------------------

HH = "\n\nHuman: {q}\n\nAssistant: {a}"


def quirk_rows() -> tuple[list[dict], dict]:
    """Good rows in the three schemas and one row per quirk (HH-RLHF and UltraFeedback have each)."""

    def uf(q, a, b):
        return {
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": b}],
        }

    good = (
        [
            {"chosen": HH.format(q=f"hi {i}", a="hello"), "rejected": HH.format(q=f"hi {i}", a="go away")}
            for i in range(40)
        ]
        + [uf(f"q {i}", "yes", "no") for i in range(40)]
        + [dict(GOOD[i]) for i in range(20)]
    )
    quirks = [
        ({"chosen": HH.format(q="hi", a="same"), "rejected": HH.format(q="hi", a="same")}, "identical"),
        (uf("q", "same", " same "), "identical"),
        ({"chosen": HH.format(q="hi", a=""), "rejected": HH.format(q="hi", a="no")}, "empty_response"),
        (uf("q", "yes", ""), "empty_message"),
        ({"chosen": HH.format(q="hi", a="yes"), "rejected": HH.format(q="hello", a="no")}, "differ_before_last_turn"),
        (
            {
                "chosen": HH.format(q="hi", a="yes") + "\n\nHuman: more?",
                "rejected": HH.format(q="hi", a="no") + "\n\nHuman: more?",
            },
            "not_ending_with_assistant",
        ),
        (
            {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
            "not_ending_with_assistant",
        ),
    ]
    expected: dict = {}
    for _, reason in quirks:
        expected[f"skipped_{reason}"] = expected.get(f"skipped_{reason}", 0) + 1
    return good + [row for row, _ in quirks], expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_quirks_are_skipped_and_counted(script):
    module = importlib.import_module(script)
    rows, expected = quirk_rows()
    counts: dict = {}
    pairs = module.parse_rows(rows, "fixture", module.Args(max_bad_fraction=0.07), counts)
    assert counts == expected and len(pairs) == len(rows) - sum(expected.values()) == 100
    assert [i for i, _ in pairs] == list(range(100))  # row indices are kept for messages
    with pytest.raises(
        module.InputError,
        match=r"7 of 107 rows are degenerate .* over --max_bad_fraction 0.05; "
        r"first: dataset fixture row 101: 'chosen' and 'rejected' responses are identical",
    ):
        module.parse_rows(rows, "fixture", module.Args(), {})


def test_malformed_rows_are_not_quirks():
    """A wrong type or a row that is no conversation is a malformed file: it fails, whatever the fraction."""
    import sera

    for row in (
        {"chosen": 3, "rejected": "b", "prompt": "p"},
        {"chosen": "junk\n\nHuman: hi\n\nAssistant: x", "rejected": "y"},
        {"chosen": [{"role": "user"}], "rejected": []},
    ):
        with pytest.raises(sera.InputError) as info:
            sera.parse_rows([row] + [dict(GOOD[0])] * 99, "f", sera.Args(max_bad_fraction=1.0), {})
        assert not isinstance(info.value, sera.BadRow) and "dataset f row 1:" in str(info.value)


def test_reward_fn_checked_on_every_call(tmp_path):
    import sera

    reward_fn = sera.load_reward_fn(
        reward_file(tmp_path, "return float('inf') if 'bad' in response else 1"),
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "fine"},
    )
    assert reward_fn("x", "fine") == 1.0
    with pytest.raises(sera.InputError, match=r"response 'bad answer': returned inf; expected a finite number"):
        reward_fn("x", "bad answer")
    assert math.isfinite(reward_fn("x", "ok"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_loss_stops_with_one_line_before_the_update(script):
    import torch

    mod = importlib.import_module(script)
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = mod.resolve(mod.Args(max_skipped_steps=1))[0]  # the first non-finite step stops the run
    with pytest.raises(mod.InputError, match=r"non-finite loss \(nan\) at step 7: stopping before the update"):
        stats = mod.StepStats(("loss", "pairs"), torch.device("cpu"))
        stats.add(loss=float("nan"), pairs=1)
        mod.optimizer_step([weight], optimizer, scheduler, stats, args, "step 7")
    assert torch.equal(weight.detach(), torch.ones(3))  # nothing was applied


def test_reward_fn_takes_any_real_number(tmp_path):
    """numpy scalars, fractions, ints: any numbers.Real but bool is a reward."""
    sera = importlib.import_module("sera")
    for body, expected in (("import numpy\n    return numpy.float32(9.0)", 9.0), ("return 3", 3.0)):
        assert sera.load_reward_fn(reward_file(tmp_path, body))("p", "r") == expected
    with pytest.raises(sera.InputError, match="returned True; expected a finite number"):
        sera.load_reward_fn(reward_file(tmp_path, "return True"))("p", "r")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script_and_every_option(script):
    """--help opens with the script's docstring; every option has a help text; a value a preset fills is shown."""
    import ast
    import subprocess
    import sys

    module = importlib.import_module(script)
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args").body
    undocumented = [
        node.target.id
        for node, after in zip(body, body[1:] + [None])
        if isinstance(node, ast.AnnAssign)
        and not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant))
    ]
    assert undocumented == []
    env = {"COLUMNS": "100", "PATH": "/usr/bin:/bin"}  # one column of sections (wider: two, interleaved)
    out = subprocess.run(
        [sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert module.__doc__.splitlines()[0] in out.stdout
    lr = module.MODELS["toy"].get("lr") or module.MODELS["toy"].get("lrs")
    assert f"toy {lr}" in " ".join(out.stdout.replace("│", " ").split()), out.stdout  # the toy's lr is not hidden


def test_log_file_progress_lines_do_not_repeat(capsys):
    """In a log file (stderr not a terminal) tqdm's refreshes are whole lines, and the final refresh that repeats
    the last periodic line is not printed twice."""
    sera = importlib.import_module("sera")
    lines = sera._LogLines()
    for text in ("\rstage 1:  50%| 31/62", "\r", "\rstage 1:  50%| 31/62", "\rstage 1: 100%| 62/62", "\n"):
        lines.write(text)
    err = re.sub(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", capsys.readouterr().err)  # each line timestamped
    assert err == "stage 1:  50%| 31/62\nstage 1: 100%| 62/62\n"


@pytest.mark.parametrize("script", ["sera", "opsr", "osp"])
@pytest.mark.parametrize(
    "option,value,domain", [("sample_top_p", 0.0, "in (0, 1]"), ("sample_temperature", -0.5, ">= 0")]
)
def test_sampling_options_outside_their_domain(script, option, value, domain):
    """The scripts that sample refuse a top-p of 0 and a negative temperature, naming option, value and domain."""
    module = importlib.import_module(script)
    with pytest.raises(module.InputError, match=re.escape(f"--{option} must be {domain}, got {value}")):
        module.resolve(module.Args(**{option: value}))
