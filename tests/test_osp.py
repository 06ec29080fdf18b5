"""osp.py: SPCE and the judge through the script's functions, schemas, bad input and whole runs."""

import copy
import json
import math
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
import osp  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOY_MODEL = ROOT / "assets" / "toy" / "model"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["--num_eval", "100", "--num_judge_eval", "300", "--eval_every", "0"]


def args(**kw):
    return osp.resolve(osp.Args(**kw))[0]


def run(*argv, check=True):
    res = subprocess.run(
        [sys.executable, str(ROOT / "osp.py"), *argv], capture_output=True, text=True, cwd=ROOT, env=ENV
    )
    if check and res.returncode != 0:
        raise AssertionError(f"osp.py {' '.join(argv)} failed:\n{res.stderr[-5000:]}")
    return res


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    return model, tokenizer


PROMPTS = [
    [{"role": "user", "content": "Sort these letters: q d m a"}],
    [{"role": "user", "content": "Sort these letters: z b k"}],
]


# ---- judge template, judge strength --------------------------------------------


def test_judge_template_filled_once_and_context_rendering():
    text = osp.judge_text(osp.JUDGE_TEMPLATES["dialogue"], "Q", "say {b}", "B2")
    assert text.startswith("You are comparing two assistant replies to the same conversation.\n\nConversation:\nQ\n\n")
    assert "Reply A:\nsay {b}\n\nReply B:\nB2\n\n" in text and text.endswith("Answer with a single letter: A or B.")
    assert osp.judge_text(osp.JUDGE_TEMPLATES["summary"], "P", "a", "b").startswith(
        "You are comparing two summaries of the same post.\n\nPost:\nP\n\nSummary A:\na\n\nSummary B:\nb"
    )
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    assert osp.render_context(turns, "dialogue") == "Human: hi\n\nAssistant: hello\n\nHuman: and?"
    assert osp.render_context(turns[:1], "dialogue") == "hi"


def test_verdict_tokens_single_and_distinct(toy):
    _, tokenizer = toy
    ids = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    assert len(set(ids)) == 2 and all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in "AB")
    with pytest.raises(osp.InputError, match="the judge reads one verdict token"):
        osp.verdict_ids(tokenizer, ["Reply A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    with pytest.raises(osp.InputError, match="map to the same token id"):
        osp.verdict_ids(tokenizer, ["A", "A"], osp.JUDGE_TEMPLATES["dialogue"])


def test_verdict_logits_equal_full_logits_and_strength_is_antisymmetric(toy):
    """The judge's two-row projection equals the full model's last-position logits."""
    model, tokenizer = toy
    a = args()
    verdict = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    texts = [("a d m q", "b d m q"), ("b k z", "b k"), ("a d", "a d m q r")]  # judged in one batch: padded
    sequences = [
        osp.encode(
            tokenizer,
            [
                {
                    "role": "user",
                    "content": osp.judge_text(
                        osp.JUDGE_TEMPLATES["dialogue"], osp.render_context(PROMPTS[0], "dialogue"), y, w
                    ),
                }
            ],
        )[0]
        for y, w in texts
    ]
    judge = osp.make_judge(model, tokenizer, PROMPTS, osp.JUDGE_TEMPLATES["dialogue"], verdict, a, "cpu")
    ours = torch.tensor(judge([(0, y, w) for y, w in texts]), dtype=torch.float64)
    with torch.no_grad():
        full = [model(torch.tensor([s])).logits[0, -1] for s in sequences]
    torch.testing.assert_close(
        ours, torch.sigmoid(torch.stack([f[verdict[0]] - f[verdict[1]] for f in full]).double()), atol=1e-6, rtol=1e-5
    )
    j = judge([(0, "a d m q", "b d m r"), (0, "b d m r", "a d m q")])
    assert osp.strength(j[0], j[1]) + osp.strength(j[1], j[0]) == pytest.approx(1.0, abs=1e-15)
    assert 0 < j[0] < 1 and j[0] != j[1]


def test_equal_label_logits_give_half(toy):
    """if the two label rows of the output embedding are equal, J = 0.5 in both orders and q = 0.5."""
    model, tokenizer = toy
    model = copy.deepcopy(model)
    verdict = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    with torch.no_grad():
        model.lm_head.weight[verdict[1]] = model.lm_head.weight[verdict[0]]
    judge = osp.make_judge(model, tokenizer, PROMPTS, osp.JUDGE_TEMPLATES["dialogue"], verdict, args(), "cpu")
    j = judge([(0, "a d m q", "b d m r"), (0, "b d m r", "a d m q")])
    assert j == [0.5, 0.5] and osp.strength(*j) == 0.5


def test_strength_is_the_mean_of_both_presentation_orders():
    """q(a > b) = 0.5 * [J(a, b) + 1 - J(b, a)] (OSP §3.1 with both orders averaged), hand values."""
    assert osp.strength(0.9, 0.3) == pytest.approx(0.8, abs=1e-15)
    assert osp.strength(0.3, 0.9) == pytest.approx(0.2, abs=1e-15)
    assert osp.strength(0.2, 0.6) == pytest.approx(0.3, abs=1e-15)  # the reply in position A loses either way
    assert osp.strength(0.7, 0.7) == pytest.approx(0.5, abs=1e-15)  # a judge that always says "A": no preference


def test_defaults_are_the_papers():
    """K = 7 samples per prompt (floor(K/2) = 3 pairs), beta 0.1, 8 prompts per update, ranking against a
    baseline response, SPCE (OSP §4 as summarised)."""
    a = args(device="cpu")
    assert (a.k, a.beta, a.prompts_per_step, a.rank_by, a.loss) == (7, 0.1, 8, "baseline", "spce")
    big = args(model="mistral-7b", device="cpu")
    assert (big.k, big.beta, big.prompts_per_step, big.lr) == (7, 0.1, 8, 5e-7)


# ---- ranked pairing ----------------------------------------------------------


def quality_judge(quality: dict, calls: list):
    def judge(comparisons):
        calls.extend(comparisons)
        return [1 / (1 + math.exp(-(quality[a] - quality[b]))) for _, a, b in comparisons]

    return judge


@pytest.mark.parametrize("rank_by", ["baseline", "roundrobin"])
@pytest.mark.parametrize("k", [7, 8])
def test_ranked_pairing_best_with_worst(k, rank_by):
    texts = [f"y{i}" for i in range(k)]
    quality = {t: q for t, q in zip(texts, [0.3, 2.0, -1.0, 0.9, -2.5, 1.4, -0.2, 0.6][:k])}
    pairs, _ = osp.rank_and_pair([texts], quality_judge(quality, []), rank_by)
    pairs = pairs[0]
    best_first = sorted(range(k), key=lambda i: -quality[texts[i]])
    assert len(pairs) == k // 2
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (best_first[r], best_first[k - 1 - r]) for r in range(k // 2)
    ]
    used = [i for p in pairs for i in (p["chosen"], p["rejected"])]
    assert len(used) == len(set(used))  # nobody in two pairs
    if k == 7:
        assert best_first[3] not in used  # rank 4 unused
    for p in pairs:
        assert p["score_chosen"] >= p["score_rejected"] and p["q"] > 0.5
        expected = 1 / (1 + math.exp(-(quality[texts[p["chosen"]]] - quality[texts[p["rejected"]]])))
        assert p["q"] == pytest.approx(expected)  # symmetric judge: q is the formed pair's own judgment


def test_judge_forward_passes_per_prompt():
    """2*((K-1) + floor(K/2)) with --rank_by baseline, K*(K-1) with roundrobin; a formed pair that
    contains the baseline reuses its ranking comparison; identical texts cost nothing."""
    texts = [f"y{i}" for i in range(7)]
    median_baseline = dict(zip(texts, [0.0, 3, 2, 1, -1, -2, -3]))  # the baseline ranks 4th: unused
    best_baseline = dict(zip(texts, [9.0, 3, 2, 1, -1, -2, -3]))  # the baseline is paired with the worst
    for quality, expected in ((median_baseline, 18), (best_baseline, 16)):
        calls = []
        _, passes = osp.rank_and_pair([texts, texts], quality_judge(quality, calls), "baseline")
        assert passes == len(calls) == 2 * expected
    calls = []
    _, passes = osp.rank_and_pair([texts], quality_judge(median_baseline, calls), "roundrobin")
    assert passes == len(calls) == 42
    calls = []
    pairs, passes = osp.rank_and_pair([["same"] * 7], quality_judge({"same": 0.0}, calls), "baseline")
    assert passes == 0 and calls == [] and all(p["q"] == 0.5 for p in pairs[0])


def table_judge(table: dict):
    """J(a, b) read from a table of every ordered pair: position-biased (J(a, b) + J(b, a) != 1) and intransitive."""
    return lambda comparisons: [table[(a, b)] for _, a, b in comparisons]


@pytest.mark.parametrize("rank_by", ["baseline", "roundrobin"])
@pytest.mark.parametrize("k", [6, 7])
def test_ranked_pairing_written_out_with_a_position_biased_judge(k, rank_by):
    """Ranked pairing (OSP §3.1) against the spec written out on an arbitrary judge table:
    s_i = q(y_i > y_1) with s_1 = 0.5 (baseline) or s_i = mean_j q(y_i > y_j) (roundrobin); order by (-s_i, i);
    pair rank r with rank K+1-r; each pair's strength is q of the formed pair, q(a > b) = (J(a,b) + 1 - J(b,a)) / 2."""
    texts = [f"y{i}" for i in range(k)]
    g = torch.Generator().manual_seed(k)
    table = {(a, b): 0.05 + 0.9 * torch.rand(1, generator=g).item() for a in texts for b in texts if a != b}
    table[("y3", "y0")] = table[("y0", "y3")] = 0.5  # y3 ties the baseline: the earlier sample ranks first

    def q(i, j):
        return 0.5 * (table[(texts[i], texts[j])] + 1.0 - table[(texts[j], texts[i])])

    if rank_by == "baseline":
        scores = [0.5] + [q(i, 0) for i in range(1, k)]
    else:
        scores = [sum(q(i, j) for j in range(k) if j != i) / (k - 1) for i in range(k)]
    ranked = sorted(range(k), key=lambda i: (-scores[i], i))
    pairs, _ = osp.rank_and_pair([texts], table_judge(table), rank_by)
    assert [(p["chosen"], p["rejected"], p["rank"]) for p in pairs[0]] == [
        (ranked[r], ranked[k - 1 - r], r + 1) for r in range(k // 2)
    ]
    for p in pairs[0]:
        assert p["q"] == pytest.approx(q(p["chosen"], p["rejected"]), abs=1e-12)
        assert (p["score_chosen"], p["score_rejected"]) == pytest.approx((scores[p["chosen"]], scores[p["rejected"]]))
    if rank_by == "baseline":
        assert ranked.index(0) < ranked.index(3)  # the tie is broken by sample index


def test_online_step_samples_k_and_trains_on_the_ranked_pairs(toy, tmp_path, monkeypatch):
    """One Stage 1 step (OSP §3.1): K samples per prompt from the policy, the policy's
    own judgment, floor(K/2) pairs per prompt best-with-worst, each with the formed pair's strength q."""
    model, tokenizer = toy
    policy, ref = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False).eval()
    a = args(k=5, prompts_per_step=2, micro_batch_size=4)
    pool = [[{"role": "user", "content": f"Sort these letters: {w}"}] for w in ("q d m a", "z b k", "e c", "f g h")]
    answers = ["a d m q", "q m d a", "a d", "a d m q q", "d"]
    quality = dict(zip(answers, [3.0, -2.0, 0.5, 1.5, -1.0]))
    asked = []

    def fake_generate(model, tokenizer, prompts, n, *rest):
        asked.append((n, prompts))
        return [[(text, True) for text in answers[:n]] for _ in prompts]

    def fake_make_judge(model, tokenizer, prompts, template, verdict, args, device, desc="judge"):
        assert model is policy  # the policy judges its own samples
        bias = 0.4  # prefers the reply shown first
        return lambda comparisons: [1 / (1 + math.exp(-(quality[x] - quality[y] + bias))) for _, x, y in comparisons]

    monkeypatch.setattr(osp, "generate", fake_generate)
    monkeypatch.setattr(osp, "make_judge", fake_make_judge)
    verdict = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    opt = osp.make_optimizer(policy, a.lr, 10, a, "constant")
    stats = osp.online_step(
        policy, ref, tokenizer, pool, 0, (osp.JUDGE_TEMPLATES["dialogue"], verdict), opt, a, "cpu", {}, tmp_path
    )
    assert len(asked) == 1 and asked[0][0] == 5 and len(asked[0][1]) == 2 and all(p in pool for p in asked[0][1])
    rows = [json.loads(line) for line in open(tmp_path / "pairs" / "step_00001.jsonl")]
    assert stats["data/pairs"] == len(rows) == 2 * (5 // 2)
    best_first = sorted(answers, key=lambda t: -quality[t])
    expected = [(best_first[0], best_first[4]), (best_first[1], best_first[3])]  # 1st-5th, 2nd-4th; 3rd unused
    for p, prompt in enumerate(asked[0][1]):
        mine = [r for r in rows if r["prompt"] == prompt]
        assert [(r["chosen_text"], r["rejected_text"]) for r in mine] == expected
        for r in mine:
            d = quality[r["chosen_text"]] - quality[r["rejected_text"]]
            both_orders = 0.5 * (1 / (1 + math.exp(-(d + 0.4))) + 1 - 1 / (1 + math.exp(-(-d + 0.4))))
            assert r["q"] == pytest.approx(both_orders, abs=1e-12)


# ---- through the SPCE step -----------------------------------------------------


def make_tuples(tokenizer, qs):
    answers = [("a d m q", "b d m q"), ("b k z", "c k z"), ("a d m q", "a d")]
    tuples = []
    for i, q in enumerate(qs):
        prompt = PROMPTS[i % 2]
        chosen, rejected = answers[i % 3]
        p_ids, c_ids = osp.encode(tokenizer, prompt, chosen)
        tuples.append(
            {
                "prompt_ids": p_ids,
                "chosen_ids": c_ids,
                "rejected_ids": osp.encode(tokenizer, prompt, rejected)[1],
                "q": q,
            }
        )
    return tuples


def grads(model, ref, tuples, **kw):
    model.zero_grad(set_to_none=True)
    totals = osp.spce_backward(model, ref, tuples, args(micro_batch_size=2, **kw), "cpu", 2)
    return torch.cat([p.grad.flatten() for p in model.parameters()]), totals.sums.tolist()


def test_constant_judge_gives_half_and_zero_first_gradient(toy):
    """J = 0.5 everywhere -> every q = 0.5; at the first step (policy = reference) the SPCE gradient is 0."""
    model, tokenizer = toy
    texts = ["a d m q", "b d m q", "a d m r", "c d", "a", "b e n q", "a d m q r"]
    pairs, _ = osp.rank_and_pair([texts], lambda comparisons: [0.5] * len(comparisons), "baseline")
    assert [p["q"] for p in pairs[0]] == [0.5, 0.5, 0.5]
    policy, ref = copy.deepcopy(model), copy.deepcopy(model).eval()
    g, totals = grads(policy, ref, make_tuples(tokenizer, [0.5] * 5))
    assert torch.count_nonzero(g) == 0 and totals[0] / totals[9] == pytest.approx(math.log(2), abs=1e-6)


def test_spce_step_matches_dpo_at_q1_and_is_symmetric(toy):
    """q = 1 is DPO, and swapping a pair with q -> 1-q changes nothing, on real gradients;
    once sigma(z) > q the step lowers the margin."""
    model, tokenizer = toy
    ref = copy.deepcopy(model).eval()
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ones = make_tuples(tokenizer, [1.0] * 3)
    g_spce, _ = grads(policy, ref, ones)
    g_dpo, _ = grads(policy, ref, ones, loss="dpo")
    torch.testing.assert_close(g_spce, g_dpo, atol=1e-7, rtol=1e-5)
    soft = make_tuples(tokenizer, [0.8, 0.3, 0.6])
    swapped = [dict(t, chosen_ids=t["rejected_ids"], rejected_ids=t["chosen_ids"], q=1 - t["q"]) for t in soft]
    torch.testing.assert_close(grads(policy, ref, soft)[0], grads(policy, ref, swapped)[0], atol=1e-7, rtol=1e-5)
    # with q = sigma(z) of each pair the gradient vanishes and the loss is the binary entropy H(q)
    at_fixed_point = []
    for t in soft:
        z = grads(policy, ref, [t])[1][3]
        at_fixed_point.append(dict(t, q=1 / (1 + math.exp(-z))))
    g_zero, totals = grads(policy, ref, at_fixed_point)
    entropy = sum(-t["q"] * math.log(t["q"]) - (1 - t["q"]) * math.log(1 - t["q"]) for t in at_fixed_point)
    assert g_zero.abs().max() < 1e-5 * grads(policy, ref, soft)[0].abs().max() and totals[0] == pytest.approx(
        entropy, rel=1e-5
    )
    # the sign: pick q below the current sigma(z) of every pair; a small step along -grad must lower the margins
    low = [dict(t, q=0.0) for t in soft]
    g, before = grads(policy, ref, low)
    with torch.no_grad():
        offset = 0
        for p in policy.parameters():
            p.sub_(1e-3 * g[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    _, after = grads(policy, ref, low)
    assert after[3] < before[3]  # summed margins z went down


def sequence_logps_f64(model, prompt_ids, response_ids):
    """S(pi, y | x) in float64: the log-softmax of the logits at t - 1 gathered at y_t, summed over the response."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum()


def test_spce_step_is_the_soft_label_formula_in_float64(toy):
    """The SPCE step (OSP §3.1): the gradient of the mean over tuples of
    -[q log sigma(z) + (1-q) log sigma(-z)], z = beta * [S(pi,y_h) - S(ref,y_h) - S(pi,y_l) + S(ref,y_l)] with
    summed log-probs, the frozen reference and the judged q constants, written out in float64."""
    model, tokenizer = toy
    ref, policy = copy.deepcopy(model).eval(), copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in policy.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    qs = [0.2, 0.9, 0.6, 0.35, 0.75]
    tuples = make_tuples(tokenizer, qs)  # replies of different lengths: summed, not averaged, log-probs
    beta = 0.7
    ours, totals = grads(policy, ref, tuples, beta=beta)  # micro-batches of 2: accumulated over three
    policy64 = copy.deepcopy(policy).double()
    ref64 = copy.deepcopy(ref).double()
    losses = []
    for t in tuples:
        with torch.no_grad():
            ref_h = sequence_logps_f64(ref64, t["prompt_ids"], t["chosen_ids"])
            ref_l = sequence_logps_f64(ref64, t["prompt_ids"], t["rejected_ids"])
        pol_h = sequence_logps_f64(policy64, t["prompt_ids"], t["chosen_ids"])
        pol_l = sequence_logps_f64(policy64, t["prompt_ids"], t["rejected_ids"])
        z = beta * ((pol_h - ref_h) - (pol_l - ref_l))
        q = t["q"]
        losses.append(-(q * torch.nn.functional.logsigmoid(z) + (1 - q) * torch.nn.functional.logsigmoid(-z)))
    loss = torch.stack(losses).mean()
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in policy64.parameters()])
    assert totals[0] / totals[9] == pytest.approx(loss.item(), rel=1e-5)
    assert want.abs().max() > 1e-3  # a real gradient, not zero against zero
    torch.testing.assert_close(ours.double(), want, atol=1e-6, rtol=1e-4)


def test_stage1_starts_from_and_is_referenced_to_the_augmented_model(tmp_path, monkeypatch):
    """OSP §3.2 then §3.1: Stage 1's policy and its frozen reference are both pi_0, the
    model after Stage 0's augmentation (saved as stage0/), not the SFT model it started from."""
    seen = []

    def fake_online_step(model, ref_model, *rest):
        seen.append(
            (
                {k: v.detach().clone() for k, v in model.state_dict().items()},
                {k: v.detach().clone() for k, v in ref_model.state_dict().items()},
                [p.requires_grad for p in ref_model.parameters()],
            )
        )
        return {"loss": 0.0, "osp/q_mean": 0.5, "osp/abs_sigma_z_minus_q": 0.0}

    monkeypatch.setattr(osp, "online_step", fake_online_step)
    out = tmp_path / "o"
    small = dict(aug_epochs=1, num_sft=16, offline_fraction=0.01, num_judge_eval=0, num_eval=0, steps=1, num_prompts=8)
    osp.main(osp.Args(**small, eval_every=0, save_every=0, output_dir=str(out)))
    stage0, start = (
        load_file(str(out / "stage0" / "model.safetensors")),
        load_file(str(TOY_MODEL / "model.safetensors")),
    )
    assert len(seen) == 1
    policy, reference, requires_grad = seen[0]
    assert not any(requires_grad)  # frozen
    assert max((stage0[k] - start[k]).abs().max().item() for k in start) > 1e-4  # Stage 0 moved the weights
    for k in start:
        torch.testing.assert_close(reference[k], stage0[k], atol=0, rtol=0)
        torch.testing.assert_close(policy[k], stage0[k], atol=0, rtol=0)


# ---- augmentation instances -----------------------------------------------------------


def test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict(toy):
    _, tokenizer = toy
    a = args()
    verdict = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    pairs = [
        {"prompt": PROMPTS[i % 2], "chosen": f"good {i}", "rejected": f"bad {i}", "where": f"row {i}"} for i in range(5)
    ]
    instances = osp.judge_instances(pairs, tokenizer, osp.JUDGE_TEMPLATES["dialogue"], verdict, a, {})
    assert len(instances) == 2 * len(pairs)
    assert [e["response_ids"] for e in instances] == [[verdict[0]], [verdict[1]]] * len(pairs)  # 50/50, A then B
    first = tokenizer.decode(instances[0]["prompt_ids"])
    assert first.index("Reply A:\ngood 0") < first.index("Reply B:\nbad 0")
    second = tokenizer.decode(instances[1]["prompt_ids"])
    assert second.index("Reply A:\nbad 0") < second.index("Reply B:\ngood 0")
    batch = osp.collate([(e["prompt_ids"], e["response_ids"]) for e in instances], tokenizer.pad_token_id, "cpu")
    scored = batch["labels"] != -100
    assert scored.sum(1).tolist() == [1] * len(instances)
    assert batch["labels"][scored].tolist() == [verdict[0], verdict[1]] * len(pairs)


# ---- schemas and bad input ------------------------------------------------------------------


def test_hh_and_tldr_fixtures_parse_and_pick_their_judge_family(toy):
    _, tokenizer = toy
    for name, family in (("hh_rlhf.jsonl", "dialogue"), ("summarize_from_feedback.jsonl", "summary")):
        rows, _ = osp.load_rows(str(FIXTURES / name))
        for i, row in enumerate(rows):
            pair = osp.parse_pair(row, f"row {i}")
            assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
            text = osp.judge_text(
                osp.JUDGE_TEMPLATES[family],
                osp.render_context(pair["prompt"], family),
                pair["chosen"],
                pair["rejected"],
            )
            assert pair["chosen"] in text and pair["rejected"] in text
    assert args(dataset="tldr").judge_family == "summary" and args(dataset="tldr").max_new_tokens == 64
    assert args(dataset="hh-rlhf").judge_family == "dialogue" and args(dataset="hh-rlhf").max_new_tokens == 256
    rows, _ = osp.load_rows(str(FIXTURES / "hh_rlhf.jsonl"))
    multi = [osp.parse_pair(r, "r") for r in rows if r["chosen"].count("\n\nHuman:") > 1]
    assert multi and all(osp.render_context(m["prompt"], "dialogue").startswith("Human: ") for m in multi)


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: dict(k=1), "--k must be >= 2"),
        (lambda d: dict(verdict_tokens=["Reply A", "B"]), "--verdict_tokens: 'Reply A' is \\["),
        (lambda d: dict(verdict_tokens=["A", "A"]), "map to the same token id"),
        (lambda d: dict(offline_fraction=0.0), "--offline_fraction must be in \\(0, 1\\]"),
        (lambda d: dict(offline_fraction=1.5), "--offline_fraction must be in \\(0, 1\\]"),
        (lambda d: dict(prompts=write(d / "e.jsonl", "")), "--prompts: .*e.jsonl has no rows"),
        (
            lambda d: dict(judge_max_length=70),
            "judge prompt with both responses has \\d+ tokens, over --judge_max_length 70",
        ),
        (
            lambda d: dict(skip_augmentation=True, judge_max_length=120),
            "prompts.jsonl line 1: its judge prompt with two replies",
        ),
        (lambda d: dict(judge_max_length=4096), "--judge_max_length 4096 is over the model's context of 512"),
        (lambda d: dict(model="mistral"), "'mistral' is neither a preset"),
        (
            lambda d: dict(dataset=write(d / "m.jsonl", '{"prompt": "Sort these letters: a b", "chosen": "a b"}\n')),
            "m.jsonl line 1: missing column 'rejected'",
        ),
        (
            lambda d: dict(judge_template=write(d / "t.txt", "Which is better? {a} or {b}")),
            "has no \\{x\\} placeholder",
        ),
        (lambda d: dict(judge_template=str(d / "none.txt")), "--judge_template: file .* not found"),
        (lambda d: dict(num_judge_eval=1500), "no pairs left for the judge seed set"),
        (
            lambda d: dict(sft_data=write(d / "s.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')),
            "the last message must be the assistant's",
        ),
        (
            lambda d: dict(sft_data=write(d / "s.jsonl", '{"messages": [{"role": "user", "content": 3}]}\n')),
            "'messages'\\[0\\].content must be a string",
        ),
        (lambda d: dict(lora_r=8, save_every=5), "--save_every is not supported with LoRA"),
        (
            lambda d: dict(eval_prompts=write(d / "ev.jsonl", '{"text": "Sort these letters: a b"}\n')),
            "--eval_prompts .*ev.jsonl line 1: 'prompt' must be a string",
        ),
        (lambda d: dict(lr=-1.0), "--lr must be > 0, got -1.0"),
        (lambda d: dict(chat_template=str(d / "none.jinja")), "--chat_template: file .* not found"),
    ],
)
def test_bad_input(tmp_path, make, match):
    out = tmp_path / "out"
    with pytest.raises(osp.InputError, match=match):
        osp.main(osp.Args(**make(tmp_path), output_dir=str(out)))
    assert not out.exists()


def test_sft_rows_with_an_empty_message_are_skipped_and_counted(tmp_path, toy):
    """Stage 0's SFT part: a real-data quirk (an empty message) is skipped and counted; the seed pairs' chosen
    conversations stand in when there is no SFT file."""
    _, tokenizer = toy
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [
        [turn("user", "Sort these letters: b a"), turn("assistant", "a b")],
        [turn("user", "Sort these letters: c a"), turn("assistant", " ")],
        [turn("user", "Sort these letters: d a"), turn("assistant", "a d")],
    ]
    spec = write(tmp_path / "sft.jsonl", "".join(json.dumps({"messages": m}) + "\n" for m in rows))
    counts = {}
    examples = osp.load_sft(spec, [], tokenizer, args(), counts)
    assert len(examples) == 2 and counts == {"sft_empty_message": 1} and all(e["kind"] == "sft" for e in examples)
    pairs = [{"prompt": m[:1], "chosen": m[1]["content"], "rejected": "x"} for m in (rows[0], rows[2])]
    from_pairs = osp.load_sft(None, pairs, tokenizer, args(), counts)
    assert [e["response_ids"] for e in from_pairs] == [e["response_ids"] for e in examples]


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    res = run("--k", "1", "--output_dir", str(tmp_path / "o"), check=False)
    assert res.returncode != 0 and res.stderr.strip() == "osp.py: error: --k must be >= 2, got 1"
    assert not (tmp_path / "o").exists()


# ---- whole runs -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def osp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("osp") / "run"
    run(*SMALL, "--output_dir", str(out))
    return out


def test_osp_run_judge_and_policy_learn(osp_run):
    from transformers import AutoModelForCausalLM

    state = json.loads((osp_run / "state.json").read_text())
    judge, reward = state["judge"], state["eval"]
    print(f"OSP toy: judge {judge}, eval {reward}")
    assert state["done"] and state["step"] == 62
    for name in ("stage0", "final"):  # checkpoints reload with from_pretrained
        AutoModelForCausalLM.from_pretrained(osp_run / name)
    assert not (osp_run / "checkpoint").exists() and len(list((osp_run / "pairs").glob("step_*.jsonl"))) == 62
    # (a) augmentation sharpens the judge the SFT model already has. On these 300 held-out pairs the SFT judge
    # scores 0.637 (position consistency 0.127). Seeds 0-4 (python benchmarks/learning_sweep.py; identical at 1
    # and 2 threads on an AVX-512 CPU; "avx2" = ATEN_CPU_CAPABILITY=avx2, 1 thread):
    #   accuracy after augmentation   0.787 0.743 0.700 0.737 0.770   avx2: 0.733 0.740 0.733 0.760 0.843
    #   consistency gain              0.463 0.447 0.310 0.447 0.493   avx2: 0.417 0.457 0.463 0.477 0.563
    #   final - SFT eval reward       2.640 1.935 0.982 2.130 2.411   avx2: 1.971 2.334 1.417 2.393 2.688
    # The accuracy gain over the SFT judge is 0.06-0.15: this 1M-parameter model's judge tops out near 0.8
    # (0.79-0.83 on 800 fresh pairs after augmentation), so the former "+0.1 over SFT" bar, set when the SFT
    # judge sat at chance (0.555), cannot hold with margin; the bar is "above the SFT judge and above 0.65".
    assert judge["augmented"]["judge/oracle_accuracy"] > 0.65, judge
    assert judge["augmented"]["judge/oracle_accuracy"] > judge["sft"]["judge/oracle_accuracy"], judge
    assert judge["augmented"]["judge/position_consistency"] > judge["sft"]["judge/position_consistency"] + 0.2, judge
    # (b) the final policy beats the SFT start on the held-out oracle (worst seed +0.98)
    assert reward["final"] > reward["sft"] + 0.3, reward
    steps = [json.loads(line) for line in open(osp_run / "metrics.jsonl")]
    steps = [m for m in steps if m.get("stage") == 1]
    assert all(m["data/pairs"] + sum(v for k, v in m.items() if k.startswith("data/dropped_")) == 24 for m in steps)
    for key in (
        "osp/q_mean",
        "osp/q_hist",
        "osp/abs_sigma_z_minus_q",
        "gen/chosen_tokens_mean",
        "time/judging_s",
        "judge/forward_passes",
        "rewards/accuracies",
        "logps/chosen",
        "judge/online_oracle_agreement",
    ):
        assert key in steps[-1], key
    assert all(m["judge/forward_passes"] <= 8 * 18 for m in steps)


def test_spce_stays_calibrated_where_dpo_does_not(osp_run):
    """(c) Same self-judged pairs, same budget: SPCE holds mean |sigma(z) - q| small; DPO drives sigma(z) to 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(osp_run / "stage0")
    tuples = []
    for line in open(osp_run / "pairs" / "step_00001.jsonl"):
        row = json.loads(line)
        prompt_ids, chosen_ids = osp.encode(tokenizer, row["prompt"], row["chosen_text"])
        tuples.append(
            {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids,
                "q": row["q"],
                "rejected_ids": osp.encode(tokenizer, row["prompt"], row["rejected_text"])[1],
            }
        )
    gaps = {}
    for loss in ("spce", "dpo"):
        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_pretrained(osp_run / "stage0", dtype=torch.float32).eval()
        policy = AutoModelForCausalLM.from_pretrained(osp_run / "stage0", dtype=torch.float32)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-4, weight_decay=0.0)
        for _ in range(30):
            totals = osp.spce_backward(policy, ref, tuples, args(loss=loss), "cpu", tokenizer.pad_token_id)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        gaps[loss] = float(totals.sums[7] / totals.sums[9])
    print(f"mean |sigma(z) - q| after 30 steps: {gaps}")
    assert gaps["spce"] < 0.5 * gaps["dpo"], gaps


def test_osp_resume_after_interrupt_finishes_identically(tmp_path):
    base = [
        "--skip_augmentation",
        "--steps",
        "5",
        "--save_every",
        "2",
        "--num_eval",
        "20",
        "--num_judge_eval",
        "20",
        "--eval_every",
        "0",
    ]
    run(*base, "--output_dir", str(tmp_path / "full"))
    interrupted = run(*base, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "3", check=False)
    assert interrupted.returncode != 0 and "--resume" in interrupted.stderr
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["step"] == 2
    run(*base, "--output_dir", str(tmp_path / "cut"), "--resume")
    a, b = (
        load_file(str(tmp_path / "full" / "final" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "final" / "model.safetensors")),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    lines = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [m["step"] for m in lines if m.get("stage") == 1] == [1, 2, 3, 4, 5]  # redone steps are not duplicated
    assert_same_records(tmp_path / "cut", tmp_path / "full")


def test_osp_without_judge_or_reward_evaluation_finishes(tmp_path):
    """--num_judge_eval 0 --num_eval 0: nothing to report, and the run still ends (the summary line once crashed)."""
    res = run(
        "--skip_augmentation",
        "--steps",
        "1",
        "--num_eval",
        "0",
        "--num_judge_eval",
        "0",
        "--output_dir",
        str(tmp_path / "r"),
    )
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert state["done"] and state["judge"] == {} and state["eval"] == {} and "final: " in res.stdout


def test_osp_torchrun_two_ranks_with_augmentation(tmp_path):
    """FSDP2 on 2 CPU ranks (gloo): Stage 0, sharded sampling and judging (every rank runs every forward),
    the SPCE step with a sharded reference, step checkpoints; the checkpoints reload as plain models."""
    from transformers import AutoModelForCausalLM

    argv = [
        "--aug_epochs",
        "1",
        "--num_sft",
        "64",
        "--offline_fraction",
        "0.05",
        "--steps",
        "2",
        "--save_every",
        "1",
        "--num_eval",
        "16",
        "--num_judge_eval",
        "16",
        "--eval_every",
        "0",
        "--output_dir",
        str(tmp_path / "two"),
    ]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "osp.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert state["done"] and set(state["judge"]) == {"sft", "augmented", "final"}
    start, stage0, final = (
        load_file(str(d / "model.safetensors"))
        for d in (TOY_MODEL, tmp_path / "two" / "stage0", tmp_path / "two" / "final")
    )
    assert max((stage0[k] - start[k]).abs().max().item() for k in start) > 1e-3
    assert max((final[k] - stage0[k]).abs().max().item() for k in start) > 1e-5
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")


def test_osp_lora_merges_into_plain_checkpoints(tmp_path):
    """LoRA: Stage 0 adapter merged into stage0/, a fresh adapter for Stage 1 whose reference is the base
    under it (adapter switched off); final/ is a plain merged model."""
    run(
        "--lora_r",
        "8",
        "--aug_epochs",
        "1",
        "--num_sft",
        "64",
        "--offline_fraction",
        "0.05",
        "--steps",
        "3",
        "--num_eval",
        "16",
        "--num_judge_eval",
        "16",
        "--eval_every",
        "0",
        "--output_dir",
        str(tmp_path / "lora"),
    )
    start, stage0, final = (
        load_file(str(d / "model.safetensors"))
        for d in (TOY_MODEL, tmp_path / "lora" / "stage0", tmp_path / "lora" / "final")
    )
    assert sorted(final) == sorted(start)  # no adapter tensors left
    assert max((stage0[k] - start[k]).abs().max().item() for k in start) > 1e-4
    assert max((final[k] - stage0[k]).abs().max().item() for k in start) > 1e-5


# ---- SPCE (osp.spce_loss) against its invariants ----------------------------------------------


def spce_and_grad(z, q):
    z = torch.as_tensor(z, dtype=torch.float32).reshape(-1).clone().requires_grad_()
    losses = osp.spce_loss(z, torch.as_tensor(q, dtype=torch.float32).expand_as(z))
    (grad,) = torch.autograd.grad(losses.sum(), [z])
    return losses.detach(), grad


def test_spce_at_q1_is_dpo_and_at_q_below_1_is_conservative_dpo():
    from selfpo_kernels import pair_loss

    h = torch.linspace(-6, 6, 13)
    zeros = torch.zeros(13)
    dpo = pair_loss(h, zeros, zeros, zeros, kind="dpo", beta=0.7, reduction="none")
    torch.testing.assert_close(spce_and_grad(0.7 * h, 1.0)[0], dpo)
    cdpo = pair_loss(h, zeros, zeros, zeros, kind="dpo", beta=0.7, label_smoothing=0.15, reduction="none")
    torch.testing.assert_close(spce_and_grad(0.7 * h, 0.85)[0], cdpo)


@pytest.mark.parametrize("q", [0.1, 0.35, 0.5, 0.8, 0.97])
def test_spce_gradient_is_sigma_minus_q_and_minimum_is_the_entropy(q):
    z = torch.linspace(-5, 5, 11)
    _, grad = spce_and_grad(z, q)
    torch.testing.assert_close(grad, torch.sigmoid(z) - q, atol=1e-6, rtol=1e-5)
    loss_star, grad_star = spce_and_grad([math.log(q / (1 - q))], q)
    assert abs(grad_star.item()) < 1e-6
    assert math.isclose(loss_star.item(), -q * math.log(q) - (1 - q) * math.log(1 - q), rel_tol=1e-5)


def test_spce_symmetry_and_pushback():
    z = torch.linspace(-4, 4, 9)
    q = torch.rand(9, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(osp.spce_loss(z, q), osp.spce_loss(-z, 1 - q))
    torch.testing.assert_close(osp.spce_loss(torch.zeros(4), torch.full((4,), 0.5)), torch.full((4,), math.log(2.0)))
    assert spce_and_grad([3.0], 0.6)[1].item() > 0  # sigma(z) > q: the margin is pushed back; DPO (q = 1) never does
    assert spce_and_grad([3.0], 1.0)[1].item() < 0
