"""opsr.py: the pair rules, presets, schemas, bad input and whole runs on the toy world."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_records
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import opsr  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOY_MODEL = ROOT / "assets" / "toy" / "model"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
RUN = ["--iterations", "2", "--num_prompts", "160", "--num_pairs", "256", "--num_eval", "100"]


def args(**kw):  # the paper presets need a GPU unless --device cpu: resolved as on a GPU-less machine
    return opsr.resolve(opsr.Args(**{"device": "cpu", **kw}))[0]


def run(*argv, check=True):
    res = subprocess.run(
        [sys.executable, str(ROOT / "opsr.py"), *argv], capture_output=True, text=True, cwd=ROOT, env=ENV
    )
    if check and res.returncode != 0:
        raise AssertionError(f"opsr.py {' '.join(argv)} failed:\n{res.stderr[-5000:]}")
    return res


# ---- ------------------------------------------------------------------------------------


def test_templates_verbatim():
    assert (
        opsr.fill(opsr.CHOSEN_PREFIX, "Hi")
        == "Please produce a top-notch response that merits a perfect score of 10 out of 10. Hi"
    )
    assert (
        opsr.fill(opsr.REJECTED_PREFIX.format(score=3), "Hi")
        == "Please produce a good response that merits a perfect score of 3 out of 10. Hi"
    )
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    out = opsr.prefixed(prompt, opsr.CHOSEN_PREFIX)
    assert out[:3] == prompt[:3] and out[3]["content"] == opsr.fill(opsr.CHOSEN_PREFIX, "Q2")  # last user turn only


def test_schedule_and_learning_rates():
    base = args(model="mistral-7b")
    assert base.rejected_scores[:3] == [3, 5, 7] and base.lrs == [3e-7, 1e-7, 1e-8]
    assert (base.beta, base.gamma) == (2.0, 1.6)
    instruct = args(model="mistral-7b-instruct")
    assert instruct.lrs == [5e-7, 1e-7, 1e-8] and (instruct.beta, instruct.gamma) == (2.5, 0.25)
    assert instruct.dataset == "mistral-instruct-ultrafeedback"


@pytest.mark.parametrize(
    "text",
    [
        "Okay, here is a 10-score answer",
        "The 10-score answer is as follows",
        "I'd rate this 10/10",
        "This deserves a score of 7",
        "a perfect score indeed",
    ],
)
def test_filter_drops_score_talk(text):
    assert opsr.leaks_score(text)


@pytest.mark.parametrize("text", ["The sum is 10 points.", "Step 3 of 10 is to stir.", "a b c d"])
def test_filter_keeps_ordinary_text(text):
    assert not opsr.leaks_score(text)


def test_pairs_are_dropped_whole_and_counted():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    chosen = [("good", True), ("a 10-score answer", True), ("same", True), ("fine", True), ("", True), ("ok", False)]
    rejected = [("bad", True), ("bad", True), ("same", True), ("a score of 3 here", True), ("x", True), ("y", True)]
    counts = {}
    pairs = opsr.build_pairs(prompts, chosen, rejected, counts)
    assert [p["prompt"][0]["content"] for p in pairs] == ["q0"]
    assert counts == {"score_leak": 2, "identical": 1, "empty": 1, "truncated": 1}


def test_mocked_iteration_equals_plain_simpo(tmp_path, monkeypatch):
    """with generation mocked to fixed texts and M = 1, an OPSR iteration gives the same
    parameters as a plain SimPO epoch on those pairs under the plain prompt (independent loop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from selfpo_kernels import causal_lm_logps, pair_loss

    pool = [json.loads(line)["prompt"] for line in open(ROOT / "assets" / "toy" / "data" / "prompts.jsonl")][:40]

    def fake_generate(model, tokenizer, prompts, n, *a, **kw):
        good = "Please produce a top-notch" in prompts[0][-1]["content"]
        return [[("a b c" if good else "b c d", True)] for _ in prompts]

    monkeypatch.setattr(opsr, "generate", fake_generate)
    a = args(
        iterations=1,
        init_checkpoint=str(TOY_MODEL),
        num_prompts=40,
        num_eval=0,
        num_pairs=8,
        output_dir=str(tmp_path / "o"),
    )
    opsr.main(a)
    saved = json.loads((tmp_path / "o" / "pairs_1.jsonl").read_text().splitlines()[0])
    assert saved["prompt"] == [{"role": "user", "content": pool[0]}]  # the plain prompt is stored
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    policy = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    encoded = [
        opsr.encode(tokenizer, [{"role": "user", "content": p}], side) for p in pool for side in ("a b c", "b c d")
    ]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(a.seed * 1000 + 1)).tolist()
    n_steps = 40 // a.batch_size
    optimizer = torch.optim.AdamW(policy.parameters(), lr=a.lrs[0], weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.1 * n_steps), n_steps)
    for step in range(n_steps):
        idx = order[step * a.batch_size : (step + 1) * a.batch_size]
        batch = opsr.collate(
            [encoded[2 * i] for i in idx] + [encoded[2 * i + 1] for i in idx], tokenizer.pad_token_id, "cpu"
        )
        logps, _ = causal_lm_logps(
            policy, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="mean"
        )
        n = len(idx)
        loss = pair_loss(logps[:n], logps[n:], kind="simpo", beta=a.beta, gamma=a.gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), a.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    ours = load_file(str(tmp_path / "o" / "iter_1" / "model.safetensors"))
    for name, param in policy.state_dict().items():
        torch.testing.assert_close(ours[name], param, atol=2e-5, rtol=1e-4)


# ---- schemas and bad input ----------------------------------------------------------------


def test_mistral_instruct_fixture_parses():
    rows, _ = opsr.load_rows(str(FIXTURES / "mistral_instruct_ultrafeedback.jsonl"))
    for i, row in enumerate(rows):
        pair = opsr.parse_pair(row, f"row {i}")
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: dict(rejected_scores=[3, 5]), "--rejected_scores needs 3 values"),
        (lambda d: dict(rejected_scores=[3, 5, 12]), "--rejected_scores must be integers in 1..9"),
        (lambda d: dict(rejected_scores=[0, 5, 7]), "--rejected_scores must be integers in 1..9"),
        (lambda d: dict(prompts=write(d / "e.jsonl", "")), "--prompts: .*e.jsonl has no rows"),
        (
            lambda d: dict(
                prompts=write(d / "l.jsonl", json.dumps({"prompt": "Sort these letters: " + "a " * 90}) + "\n"),
                num_pairs=4,
            ),
            "prompt has \\d+ tokens, over --max_prompt_length",
        ),
        (lambda d: dict(lrs=[1e-4, -1.0, 1e-5]), "--lrs must be > 0, got \\[0.0001, -1.0, 1e-05\\]"),
        (lambda d: dict(iterations=0), "--iterations must be >= 1, got 0"),
        (lambda d: dict(model="mistral"), "'mistral' is neither a preset"),
        (lambda d: dict(prompts=str(d / "none.jsonl")), "--prompts: file .* not found"),
        (
            lambda d: dict(prompts=write(d / "p.jsonl", '{"prompt": "Sort these letters: a b"}\n{"prompt": ""}\n')),
            "--prompts .* row 1: 'prompt' is empty",
        ),
        (lambda d: dict(init_checkpoint=str(d / "nockpt")), "--init_checkpoint: .* not found"),
        (lambda d: dict(eval_prompts=str(d / "none.jsonl")), "--eval_prompts: file .* not found"),
        (lambda d: dict(eval_prompts=write(d / "e.jsonl", "not json\n")), "--eval_prompts: .* line 1: not valid JSON"),
        (lambda d: dict(chat_template=str(d / "none.jinja")), "--chat_template: file .* not found"),
    ],
)
def test_bad_input(tmp_path, make, match):
    out = tmp_path / "out"
    with pytest.raises(opsr.InputError, match=match):
        opsr.main(opsr.Args(**make(tmp_path), output_dir=str(out)))
    assert not out.exists()


# ---- whole runs -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def opsr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("opsr") / "run"
    run(*RUN, "--output_dir", str(out))
    return out


@pytest.mark.slow
def test_opsr_run_learns(opsr_run):
    state = json.loads((opsr_run / "state.json").read_text())
    print(f"OPSR toy eval: {state['eval']}")
    assert state["completed"] == 2 and all((opsr_run / f"iter_{m}" / "model.safetensors").exists() for m in (0, 1, 2))
    # seeds 0-4, 1 and 2 threads (benchmarks/learning_sweep.py, identical per thread count): +1.207 +1.124 +1.478
    # +1.492 +1.327; chosen - rejected oracle reward per iteration at least 5.588 4.910 5.157 5.055 4.862
    assert state["eval"]["2"] > state["eval"]["sft"] + 0.6, state["eval"]
    metrics = [json.loads(line) for line in open(opsr_run / "metrics.jsonl")]
    per_iteration = [m for m in metrics if "opsr/rejected_score" in m]
    assert [m["opsr/rejected_score"] for m in per_iteration] == [3, 5]
    for m in per_iteration:  # the prefixes really separate the answers, as the oracle sees it
        assert m["opsr/chosen_reward"] > m["opsr/rejected_reward"] + 2
    for m in (1, 2):
        for line in open(opsr_run / f"pairs_{m}.jsonl"):
            assert "merits a perfect score" not in json.dumps(json.loads(line)["prompt"])


@pytest.mark.slow
def test_opsr_resume_finishes_identically(opsr_run, tmp_path):
    out = tmp_path / "run"
    every = ["--save_every", "4"]  # step checkpoints inside the iterations: the resumed run starts from one
    interrupted = run(*RUN, *every, "--output_dir", str(out), "--stop_after_steps", "30", check=False)
    assert interrupted.returncode == 130 and json.loads((out / "state.json").read_text())["completed"] in (0, 1)
    assert list(out.glob("iter_*_partial"))
    resumed = run(*RUN, *every, "--output_dir", str(out), "--resume")
    assert "resuming from the step checkpoint" in resumed.stdout and not list(out.glob("iter_*_partial"))
    a, b = (
        load_file(str(opsr_run / "iter_2" / "model.safetensors")),
        load_file(str(out / "iter_2" / "model.safetensors")),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    assert_same_records(out, opsr_run)
