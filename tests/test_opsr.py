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
    # M = 3 (paper §4.1); one epoch per iteration, cosine with warmup 0.1, global batch 128 (SimPO's settings)
    assert (base.iterations, base.epochs, base.scheduler, base.warmup_ratio) == (3, 1, "cosine", 0.1)
    assert base.global_batch == 128 and base.loss == "simpo"
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
        "Here is my top-notch answer:",
        "This reply merits the highest score.",
        "I think 3 out of 10 fits.",
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
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("good", "bad")  # the 10/10 sample is the chosen side
    assert counts == {"score_leak": 2, "identical": 1, "empty": 1, "truncated": 1}


# the two prefixes of paper §3.3, written out: the 10/10 one gives the chosen answer, the s/10 one the rejected
CHOSEN_TEXT = "Please produce a top-notch response that merits a perfect score of 10 out of 10. "
REJECTED_TEXT = "Please produce a good response that merits a perfect score of {} out of 10. "


def prefix_sampler(calls: list):
    """A stand-in for generate(): one answer per prompt, "a b c" under the 10/10 prefix and "c b a <s>" under the
    s/10 prefix (the prefix read back from the user turn's text); any other prompt is an error."""

    def fake_generate(model, tokenizer, prompts, n, **kw):
        calls.append((n, [p[-1]["content"] for p in prompts]))
        out = []
        for prompt in prompts:
            content = prompt[-1]["content"]
            if content.startswith(CHOSEN_TEXT):
                out.append([("a b c", True)] * n)
                continue
            score = next(s for s in range(1, 10) if content.startswith(REJECTED_TEXT.format(s)))
            out.append([(f"c b a {'x ' * score}".strip(), True)] * n)
        return out

    return fake_generate


def test_online_pairs_take_chosen_from_the_10_prefix_and_rejected_from_s_m(monkeypatch):
    """Iteration m (paper §3.3-3.4, Fig. 2): one sample per prefix, the 10/10 sample is chosen, the s_m/10 sample
    rejected with s_m = 3, 5, 7 for m = 1, 2, 3; the pair is stored and encoded under the plain prompt x."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    pool = [[{"role": "user", "content": f"Sort these letters: {w}"}] for w in ("q d m", "z b", "k a e")]
    calls = []
    monkeypatch.setattr(opsr, "generate", prefix_sampler(calls))
    a = args(iterations=3)
    for m, s_m in ((1, 3), (2, 5), (3, 7)):
        calls.clear()
        pairs, stats = opsr.online_pairs(None, tokenizer, pool, m, "prev", a, "cpu", {})
        asked = sorted(text for _, texts in calls for text in texts)
        expected = [CHOSEN_TEXT + p[-1]["content"] for p in pool] + [
            REJECTED_TEXT.format(s_m) + p[-1]["content"] for p in pool
        ]
        assert asked == sorted(expected) and all(n == 1 for n, _ in calls)  # one sample per prefix and prompt
        rejected = " ".join(["c b a"] + ["x"] * s_m)
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a b c", rejected)] * len(pool)
        assert [p["prompt"] for p in pairs] == pool and stats["opsr/rejected_score"] == s_m
        for p, prompt in zip(pairs, pool):
            assert (p["iteration"], p["rejected_score"]) == (m, s_m)
            assert p["prompt_ids"] == opsr.encode(tokenizer, prompt)[0]  # trained on x, never on the prefixed prompt
            assert p["chosen_ids"] == opsr.encode(tokenizer, prompt, "a b c")[1]
            assert p["rejected_ids"] == opsr.encode(tokenizer, prompt, rejected)[1]


def sequence_logps_f64(model, prompt_ids, response_ids):
    """S(pi, y | x) in float64: the log-softmax of the logits at t - 1 gathered at y_t, summed over the response."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum()


def test_simpo_step_is_the_length_normalised_reference_free_formula(monkeypatch):
    """The iterations' loss (paper Table 1: SimPO; §4.1: length-normalised reward and target margin): one
    training step's loss and gradient equal, in float64, mean softplus(-(beta*(A_w - A_l) - gamma)) with
    A = S / |y|, whatever reference log-probs the pairs carry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    policy = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    oracle = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float64)
    answers = [("a d m q", "b d"), ("b k", "b k z z y"), ("a d m q r", "q"), ("c", "c d e f g h")]
    pairs = []
    for i, (chosen, rejected) in enumerate(answers):  # chosen and rejected of different lengths
        prompt = [{"role": "user", "content": f"Sort these letters: {chosen}"}]
        p_ids, c_ids = opsr.encode(tokenizer, prompt, chosen)
        r_ids = opsr.encode(tokenizer, prompt, rejected)[1]
        pairs.append(
            dict(
                prompt_ids=p_ids,
                chosen_ids=c_ids,
                rejected_ids=r_ids,
                ref_chosen=-3.0 * i - 7.0,
                ref_rejected=5.0 * i - 1.0,
            )
        )  # SimPO has no reference: these must not matter
    beta, gamma = 1.7, 0.9
    a = args(beta=beta, gamma=gamma, batch_size=4, global_batch=4)
    grads, logged = [], []
    step = opsr.optimizer_step

    def capture(trainable, *rest):
        grads.append([p.grad.detach().clone() for p in trainable])
        return step(trainable, *rest)

    monkeypatch.setattr(opsr, "optimizer_step", capture)
    opsr.train_iteration(policy, pairs, 1, a, 1e-4, "cpu", tokenizer.pad_token_id, logged.append, lambda *x: None)

    losses = []
    for p in pairs:
        a_w = sequence_logps_f64(oracle, p["prompt_ids"], p["chosen_ids"]) / len(p["chosen_ids"])
        a_l = sequence_logps_f64(oracle, p["prompt_ids"], p["rejected_ids"]) / len(p["rejected_ids"])
        losses.append(torch.nn.functional.softplus(-(beta * (a_w - a_l) - gamma)))
    loss = torch.stack(losses).mean()
    loss.backward()
    step_metrics = [m for m in logged if "loss" in m]
    assert len(grads) == len(step_metrics) == 1
    assert step_metrics[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    expected = [p.grad for p in oracle.parameters()]
    assert len(expected) == len(grads[0])
    for ours, want in zip(grads[0], expected):
        torch.testing.assert_close(ours.double(), want, atol=1e-6, rtol=1e-4)


def test_iterations_use_their_lr_rejected_score_and_reference(tmp_path, monkeypatch):
    """main (paper §3.2-3.4, §4.1): iteration 0 is the SimPO initialisation on the offline pairs at the first lr;
    iteration m >= 1 trains on pairs built with s_m at lr_m; with --loss dpo the reference of iteration m is
    pi_{m-1}, the model iteration m-1 saved (Fig. 2: "the reference model for the next round")."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(opsr, "generate", prefix_sampler([]))
    seen = []

    def fake_train(model, pairs, t, m_args, lr, *rest, **kw):
        seen.append((t, lr, m_args.loss, [dict(p) for p in pairs], m_args.beta))
        with torch.no_grad():  # each "iteration" moves the weights: pi_m differs from pi_{m-1}
            g = torch.Generator().manual_seed(t)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model

    monkeypatch.setattr(opsr, "train_iteration", fake_train)
    lrs = [3e-4, 2e-4, 1e-4]
    out = tmp_path / "o"
    opsr.main(
        args(iterations=3, lrs=lrs, loss="dpo", beta=2.5, num_prompts=4, num_pairs=6, num_eval=0, output_dir=str(out))
    )
    assert [(t, lr, loss, beta) for t, lr, loss, _, beta in seen] == [
        (0, lrs[0], "simpo", 2.5),  # the initialisation phase is SimPO (its beta) whatever --loss says
        (1, lrs[0], "dpo", 0.01),  # DPO iterations: the Zephyr recipe's beta 0.01
        (2, lrs[1], "dpo", 0.01),
        (3, lrs[2], "dpo", 0.01),
    ]
    assert len(seen[0][3]) == 6 and all("rejected_score" not in p for p in seen[0][3])  # the offline pairs
    for t, s_m in ((1, 3), (2, 5), (3, 7)):
        pairs = seen[t][3]
        rejected = " ".join(["c b a"] + ["x"] * s_m)
        assert pairs and all(p["rejected_score"] == s_m and p["rejected"] == rejected for p in pairs)
        previous = AutoModelForCausalLM.from_pretrained(out / f"iter_{t - 1}", dtype=torch.float64)
        with torch.no_grad():
            for p in pairs:
                for side in ("chosen", "rejected"):
                    want = sequence_logps_f64(previous, p["prompt_ids"], p[f"{side}_ids"]).item()
                    assert p[f"ref_{side}"] == pytest.approx(want, abs=1e-4), (t, side)


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
            "--prompts .*p.jsonl line 2: 'prompt' is empty",
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
