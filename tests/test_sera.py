"""sera.py: the IRM invariants, dataset schemas, bad input, and whole runs on the toy world."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sera  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOY_MODEL = ROOT / "assets" / "toy" / "model"


def args(**kw):  # the paper presets need a GPU unless --device cpu: resolved as on a GPU-less machine
    return sera.resolve(sera.Args(**{"device": "cpu", **kw}))[0]


# ---- invariants on the script's functions --------------------------------------------


def test_irm_zero_when_policy_equals_reference():
    logps = {0: torch.randn(10, dtype=torch.float64)}
    logps[1] = logps[0].clone()
    counts = torch.full((10,), 5.0, dtype=torch.float64)
    for loss in ("dpo", "ipo", "hinge"):
        assert (sera.implicit_reward(1, logps, counts, args(loss=loss)) == 0).all()


def test_irm_antisymmetry_and_bootstrap_margin_nonnegative():
    g = torch.Generator().manual_seed(0)
    logps = {j: torch.randn(8, generator=g, dtype=torch.float64) for j in range(3)}
    counts = torch.randint(1, 9, (8,), generator=g).double()
    a = args(gamma_e=0.4)
    reward = sera.ensemble_reward(2, logps, counts, a)
    irm_ab = reward[:4] - reward[4:]
    irm_ba = reward[4:] - reward[:4]
    torch.testing.assert_close(irm_ab, -irm_ba)
    pairs = sera.bootstrap_pairs([0, 1], [["a", "b", "c", "d"], ["e", "f", "g", "h"]], [reward[:4], reward[4:]])
    assert all(p["margin"] >= 0 for p in pairs)


def test_selection_sizes_and_top_k():
    k1, k2 = sera.selection_sizes(101, 0.7, None)
    assert k1 == math.ceil(0.7 * 101) == 71 and k1 + k2 == 101
    assert sera.selection_sizes(101, 0.7, 0.5) == (71, 51)
    g = torch.Generator().manual_seed(1)
    margins = torch.randint(-3, 4, (101,), generator=g).double()  # many ties
    kept = sera.top_k(margins, k1)
    assert len(kept) == k1 == len(set(kept))
    dropped = sorted(set(range(101)) - set(kept))
    assert min(margins[kept]) >= max(margins[dropped])
    assert kept == sera.top_k(margins.clone(), k1)  # deterministic
    # ties at the threshold go to the lower original index
    threshold = min(margins[kept])
    tied_kept = [i for i in kept if margins[i] == threshold]
    tied_dropped = [i for i in dropped if margins[i] == threshold]
    assert not tied_dropped or max(tied_kept) < min(tied_dropped)


def test_bootstrapping_argmax_argmin_and_distinctness():
    samples = [
        [("x", True), ("y", True), ("x", True), ("z", True)],  # duplicates removed
        [("same", True), ("same", True), ("same", True)],  # all identical: no pair
        [("long", False), ("ok", True), ("", True), ("fine", True)],  # unfinished and empty dropped
    ]
    candidates, unfinished = sera.distinct_samples(samples)
    assert candidates == [["x", "y", "z"], ["same"], ["ok", "fine"]] and unfinished == 1
    rewards = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0]), torch.tensor([1.0, 3.0])]
    pairs = sera.bootstrap_pairs([0, 1, 2], candidates, rewards)
    assert [p["key"] for p in pairs] == [0, 2]  # at most one pair per prompt, none for identical samples
    assert (pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["margin"]) == ("z", "y", 3.0)
    assert (pairs[1]["chosen"], pairs[1]["rejected"], pairs[1]["margin"]) == ("fine", "ok", 2.0)
    margins = torch.tensor([p["margin"] for p in pairs])
    assert len(sera.top_k(margins, 5)) == min(5, len(pairs))


def test_ensemble_is_linear_and_ignored_at_first_model():
    g = torch.Generator().manual_seed(2)
    logps = {j: torch.randn(6, generator=g, dtype=torch.float64) for j in range(4)}
    counts = torch.ones(6, dtype=torch.float64)
    r = {gamma: sera.ensemble_reward(2, logps, counts, args(gamma_e=gamma)) for gamma in (0.0, 0.25, 1.0)}
    torch.testing.assert_close(r[0.0], sera.implicit_reward(2, logps, counts, args()))
    torch.testing.assert_close(r[1.0], sera.implicit_reward(1, logps, counts, args()))
    torch.testing.assert_close(r[0.25], 0.75 * r[0.0] + 0.25 * r[1.0])
    # r~_1 = r_1: the ensemble is ignored when only one trained model exists (t = 2)
    torch.testing.assert_close(
        sera.ensemble_reward(1, logps, counts, args(gamma_e=0.9)), sera.implicit_reward(1, logps, counts, args())
    )
    # the scorer needs theta_{t-1}, theta_{t-2} and (ensemble) theta_{t-3}
    assert sera.reward_models(2, args(gamma_e=0.3)) == {0, 1, 2}
    assert sera.reward_models(2, args(gamma_e=0.0)) == {1, 2}
    assert sera.reward_models(1, args(gamma_e=0.3)) == {0, 1}
    assert sera.reward_models(2, args(gamma_e=0.3, irm_reference="sft")) == {0, 1, 2}
    assert sera.reward_models(2, args(loss="simpo", gamma_e=0.3)) == {1, 2}


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo"])
def test_daa_loss(loss):
    g = torch.Generator().manual_seed(3)
    logps, ref = -10 * torch.rand(8, generator=g), -10 * torch.rand(8, generator=g)
    counts = torch.randint(1, 6, (8,), generator=g).float()
    a = args(loss=loss, beta=1.0 if loss == "ipo" else 0.5)
    losses, chosen, rejected = sera.daa_loss(a)(logps[:4], logps[4:], ref[:4], ref[4:], counts[:4], counts[4:])
    h = (logps[:4] - ref[:4]) - (logps[4:] - ref[4:])
    if loss == "ipo":  # beta = 1 -> (h - 0.5)^2
        torch.testing.assert_close(losses, (h - 0.5) ** 2)
    elif loss == "hinge":  # max(0, 1 - beta h)
        torch.testing.assert_close(losses, torch.clamp(1 - 0.5 * h, min=0))
    elif loss == "dpo":
        torch.testing.assert_close(losses, torch.nn.functional.softplus(-0.5 * h))
    else:
        avg = logps / counts
        torch.testing.assert_close(losses, torch.nn.functional.softplus(-(0.5 * (avg[:4] - avg[4:]) - a.gamma)))
    if loss != "simpo":
        torch.testing.assert_close(chosen - rejected, 0.5 * h if loss != "ipo" else h)


# ---- configuration and presets -----------------------------------------------------------


def test_presets_fill_paper_settings():
    mistral = args(model="mistral-7b")
    assert (mistral.beta, mistral.lora_r, mistral.lr, mistral.batch_size, mistral.global_batch) == (
        0.01,
        8,
        5e-6,
        4,
        16,
    )
    assert (mistral.lora_alpha, mistral.lora_dropout) == (128, 0.05)
    given = args(model="mistral-7b", lora_alpha=64, lora_dropout=0.0)  # a value on the command line wins
    assert (given.lora_alpha, given.lora_dropout) == (64, 0.0)
    assert (args().lora_alpha, args().lora_dropout) == (16, 0.0)
    tiny = args(model="tinyllama", loss="ipo")
    assert tiny.beta == 1.0 and tiny.batch_size == 8 and tiny.global_batch == 16
    assert args(model="tinyllama").beta == 0.2 and args(model="pythia-2.8b", loss="hinge").beta == 0.2
    assert args(model="mistral-7b", beta=0.05).beta == 0.05  # every preset value can be overridden


@pytest.mark.parametrize(
    "fixture,n_min",
    [("ultrafeedback_binarized.jsonl", 5), ("hh_rlhf.jsonl", 5), ("summarize_from_feedback.jsonl", 5)],
)
def test_dataset_schemas_parse(fixture, n_min):
    rows, _ = sera.load_rows(str(FIXTURES / fixture))
    parsed = [sera.parse_pair(row, f"row {i}") for i, row in enumerate(rows)]
    assert len(parsed) >= n_min
    for pair in parsed:
        assert pair["prompt"][-1]["role"] == "user"
        assert pair["chosen"].strip() and pair["rejected"].strip() and pair["chosen"] != pair["rejected"]
        assert all(m["role"] in ("user", "assistant", "system") for m in pair["prompt"])


def test_hh_parsing_keeps_the_conversation():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the hen",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No.",
    }
    pair = sera.parse_pair(row, "row 0")
    assert pair["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert pair["chosen"] == "Why did the hen" and pair["rejected"] == "No."


def test_tldr_parsing_uses_choice():
    row = {
        "info": {"post": "My cat ate my homework.", "title": "Help", "subreddit": "cats"},
        "summaries": [{"text": " cat ate homework"}, {"text": " a post"}],
        "choice": 1,
    }
    pair = sera.parse_pair(row, "row 0")
    assert pair["chosen"] == "a post" and pair["rejected"] == "cat ate homework"
    assert "POST: My cat ate my homework." in pair["prompt"][0]["content"]


# ---- bad input: one clear error, nothing written ------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Sort these letters: c a b", "chosen": "a b c", "rejected": "b a c"}


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD, {"prompt": "p", "chosen": "a"}])),
            "row 1: missing column 'rejected'",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, chosen=" ")])),
            "row 1: 'chosen' is empty",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [dict(GOOD, rejected="a b c"), GOOD])),
            "row 0: 'chosen' and 'rejected' responses are identical",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, chosen=7)])),
            "row 1: 'chosen' must be a string, got int",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(
                    d / "x.jsonl", [GOOD, {"prompt": "p", "chosen": [{"role": "user", "content": 3}], "rejected": []}]
                )
            ),
            "row 1: 'chosen'\\[0\\].content must be a string",
        ),
        (lambda d: dict(dataset="ultrachat"), "unknown preset or path 'ultrachat'"),
        (lambda d: dict(model="mistral-8b"), "--model: 'mistral-8b' is neither a preset"),
        (lambda d: dict(dataset=str(d / "missing.jsonl")), "path '.*missing.jsonl' not found"),
        (lambda d: dict(model=str(d / "nomodel")), "--model: '.*nomodel' is neither a preset"),
        (
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, prompt="Sort these letters: " + "a " * 80)])
            ),
            "row 1: prompt has \\d+ tokens, over --max_prompt_length 64",
        ),
        (lambda d: dict(rho_1=0.0), "--rho_1 must be in \\(0, 1\\]"),
        (lambda d: dict(rho_1=1.5), "--rho_1 must be in \\(0, 1\\]"),
        (lambda d: dict(iterations=-1), "--iterations must be >= 1, got -1"),
        (lambda d: dict(reward_fn="nofile.py:score"), "--reward_fn: file 'nofile.py' not found"),
        (lambda d: dict(eval_prompts=str(d / "none.jsonl")), "--eval_prompts: file .* not found"),
        (
            lambda d: dict(eval_prompts=write_jsonl(d / "e.jsonl", [{"text": "a b"}])),
            "--eval_prompts .* row 0: 'prompt' must be a string",
        ),
        (lambda d: dict(chat_template=str(d / "none.jinja")), "--chat_template: file .* not found"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, make, match):
    out = tmp_path / "out"
    kwargs = dict(make(tmp_path), output_dir=str(out), iterations=make(tmp_path).get("iterations", 1))
    with pytest.raises(sera.InputError, match=match):
        sera.main(sera.Args(**kwargs))
    assert not out.exists()


def test_tokenizer_without_chat_template(tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(TOY_MODEL, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model_dir.glob("chat_template.*"):
        extra.unlink()
    dataset = write_jsonl(tmp_path / "x.jsonl", [GOOD, GOOD])
    with pytest.raises(sera.InputError, match="has no chat template; pass --chat_template"):
        sera.main(sera.Args(model=str(model_dir), dataset=dataset, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "sera.py"), "--rho_1", "2", "--output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == "sera.py: error: --rho_1 must be in (0, 1], got 2.0"
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
