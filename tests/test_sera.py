"""sera.py: the paper's rules (IRM, ensemble, selection, bootstrapping, references, losses) against their formulas,
dataset schemas, bad input, and whole runs on the toy world."""

import copy
import json
import math
import random
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
    # exactly the indices whose rank, counted from the margins (larger first, ties to the lower index), is below k1:
    # one answer whatever the run (SeRA §3.4 [ours]: a stable sort on (-margin, index))
    m = margins.tolist()
    rank = [sum(v > m[i] for v in m) + sum(m[j] == m[i] for j in range(i)) for i in range(101)]
    assert kept == [i for i in range(101) if rank[i] < k1]
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


# ---- the paper's rules, each against its formula written out (float64, small hand-made inputs) -------------------
# The expected values below come from the equations of SeRA, computed here in plain Python from
# log-probs that the test makes up: never from the script's own output.


def fake_logp(j, prompt_ids, response_ids):
    """S(theta_j, y | x): a made-up summed log-prob, fixed for each model j and sequence, different across models."""
    return random.Random(repr((j, list(prompt_ids), list(response_ids)))).uniform(-30.0, -1.0)


def paper_reward(j, s, length, a):
    """r_j(x, y) (SeRA eq. 5) from s(m) = S(theta_m, y | x): beta [S(theta_j) - S(ref_j)], ref_j
    = theta_{j-1} (or the SFT model theta_0 with --irm_reference sft), over |y| with --length_norm avg; SimPO: the
    reference-free beta S(theta_j) / |y| (App. C.3 eq. 17)."""
    if a.loss == "simpo":
        return a.beta * s(j) / length
    ratio = s(j) - s(j - 1 if a.irm_reference == "previous" else 0)
    return a.beta * (ratio / length if a.length_norm == "avg" else ratio)


def paper_ensemble_reward(j, s, length, a):
    """r~_j = (1 - gamma_e) r_j + gamma_e r_{j-1} for j >= 2, r~_1 = r_1 (SeRA eq. 7, §3.4)."""
    if j == 1:
        return paper_reward(1, s, length, a)
    return (1 - a.gamma_e) * paper_reward(j, s, length, a) + a.gamma_e * paper_reward(j - 1, s, length, a)


IRM_SETTINGS = [
    dict(loss="dpo"),
    dict(loss="ipo"),
    dict(loss="hinge", length_norm="avg"),
    dict(loss="dpo", irm_reference="sft"),
    dict(loss="simpo"),
]


@pytest.mark.parametrize("setting", IRM_SETTINGS, ids=lambda s: "-".join(s.values()))
def test_implicit_reward_and_ensemble_follow_eq_5_and_7(setting):
    """r_j uses theta_j against its own training reference theta_{j-1} with beta and the sign of eq. 5, and the
    ensemble puts 1 - gamma_e on the newer model and gamma_e on the older one (eq. 7)."""
    a = args(beta=0.37, gamma_e=0.2, **setting)
    rng = random.Random(5)
    n = 6
    table = {j: [rng.uniform(-40.0, -1.0) for _ in range(n)] for j in range(4)}  # S(theta_j, y_i), j = 0..3
    lengths = [rng.randint(1, 9) for _ in range(n)]
    logps = {j: torch.tensor(v, dtype=torch.float64) for j, v in table.items()}
    counts = torch.tensor(lengths, dtype=torch.float64)
    for j in (1, 2, 3):
        expected = [paper_reward(j, lambda m, i=i: table[m][i], lengths[i], a) for i in range(n)]
        torch.testing.assert_close(sera.implicit_reward(j, logps, counts, a).tolist(), expected, rtol=1e-12, atol=0)
        expected = [paper_ensemble_reward(j, lambda m, i=i: table[m][i], lengths[i], a) for i in range(n)]
        torch.testing.assert_close(sera.ensemble_reward(j, logps, counts, a).tolist(), expected, rtol=1e-12, atol=0)


def offline_world(n: int, seed: int):
    """n offline pairs (token ids of made-up lengths) and S(theta_j, .) of their [chosen; rejected] for j = 0..2."""
    rng = random.Random(seed)
    pairs = [
        {
            "index": i,
            "prompt_ids": [7, i],
            "chosen_ids": [1] * rng.randint(1, 9),
            "rejected_ids": [2] * rng.randint(1, 9),
        }
        for i in range(n)
    ]
    table = {j: [rng.uniform(-40.0, -1.0) for _ in range(2 * n)] for j in range(3)}
    return pairs, table


@pytest.mark.parametrize("t", [2, 3])
@pytest.mark.parametrize("setting", IRM_SETTINGS, ids=lambda s: "-".join(s.values()))
def test_offline_selection_keeps_the_largest_irm_under_the_previous_model(t, setting):
    """IRM-based selection at iteration t (SeRA §3.2, Algorithm 1 lines 7-8): the margin of (x, y_w, y_l) is
    m~_{t-1} = r~_{t-1}(x, y_w) - r~_{t-1}(x, y_l) (eq. 5, 7); the k1 pairs of largest margin are kept, each with the
    log-probs of theta_{t-1} as its training reference (the reference is refreshed every iteration, §3.4)."""
    a = args(beta=0.29, gamma_e=0.3, **setting)
    n, k1 = 12, 5
    pairs, table = offline_world(n, seed=t)
    logps = {j: torch.tensor(v, dtype=torch.float64) for j, v in table.items()}
    lengths = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    reward = [paper_ensemble_reward(t - 1, lambda m, i=i: table[m][i], lengths[i], a) for i in range(2 * n)]
    margin = [reward[i] - reward[n + i] for i in range(n)]  # chosen minus rejected
    largest = sorted(range(n), key=lambda i: margin[i], reverse=True)[:k1]

    kept, stats = sera.select_offline(t, pairs, logps, k1, a)
    assert sorted(p["index"] for p in kept) == sorted(largest) and stats["data/offline_kept"] == k1
    for p in kept:
        i = p["index"]
        assert p["margin"] == pytest.approx(margin[i], rel=1e-12) and p["source"] == "offline"
        assert (p["ref_chosen"], p["ref_rejected"]) == (table[t - 1][i], table[t - 1][n + i])  # theta_{t-1}

    # antisymmetry m(x, a, b) = -m(x, b, a): the same pairs with the labels swapped
    swapped = [dict(p, chosen_ids=p["rejected_ids"], rejected_ids=p["chosen_ids"]) for p in pairs]
    swapped_logps = {j: torch.cat([v[n:], v[:n]]) for j, v in logps.items()}
    everything, _ = sera.select_offline(t, swapped, swapped_logps, n, a)
    assert [p["margin"] for p in everything] == pytest.approx([-m for m in margin], rel=1e-12)


def codes(text):
    return [ord(c) for c in text]


class FakeModel:
    """Stands for theta_j: the stubbed scorer reads j, the stubbed sampler checks it."""

    def __init__(self, j):
        self.j = j


def fake_score(model, sequences, a, pad_id, device, desc):  # sera.score's contract on made-up log-probs
    logps = [fake_logp(model.j, prompt, response) for prompt, response in sequences]
    return torch.tensor(logps, dtype=torch.float64), torch.tensor([len(r) for _, r in sequences], dtype=torch.float64)


BOOT_SAMPLES = {  # prompt -> the n_cand = 4 samples of theta_{t-1} as (text, ended with EOS)
    "p0": [("a", True), ("bb", True), ("ccc", True), ("dd", True)],
    "p1": [("same", True)] * 4,  # one distinct sample: no pair
    "p2": [("x", True), ("x", True), ("yy", True), ("never ends", False)],  # a duplicate, one unfinished
    "p3": [("p", True), ("q", True), ("r", True), ("s", True)],
    "p4": [("", True), ("m", True), ("n", True), ("oo", True)],  # an empty sample
    "p5": [("e", True), ("ff", True), ("g", True), ("hh", True)],
}


def paper_bootstrap(t, k2, a):
    """Preference bootstrapping (SeRA §3.3, Algorithm 1 lines 9-16) written out: per distinct prompt, the distinct
    finished non-empty samples, each scored by r~_{t-1}; chosen = the highest, rejected = the lowest implicit reward;
    then the k2 pairs of largest margin. Returns {prompt: (chosen, rejected, margin)}."""
    pairs = {}
    for prompt, samples in BOOT_SAMPLES.items():
        texts = sorted({text for text, ended in samples if ended and text})
        if len(texts) < 2:
            continue
        r = {
            y: paper_ensemble_reward(t - 1, lambda m, y=y: fake_logp(m, codes(prompt), codes(y)), len(y), a)
            for y in texts
        }
        best, worst = max(texts, key=r.get), min(texts, key=r.get)
        pairs[prompt] = (best, worst, r[best] - r[worst])
    keep = sorted(pairs, key=lambda prompt: pairs[prompt][2], reverse=True)[:k2]
    return {prompt: pairs[prompt] for prompt in keep}


@pytest.mark.parametrize(
    "t,k2,setting",
    [(2, 10, dict(loss="dpo")), (3, 3, dict(loss="dpo")), (3, 2, dict(loss="simpo"))],
    ids=["t2-all-pairs", "t3-top3", "t3-simpo-top2"],
)
def test_bootstrap_pairs_the_highest_and_lowest_implicit_reward(t, k2, setting, monkeypatch):
    """Bootstrapping at iteration t samples n_cand responses per distinct prompt of D from theta_{t-1} (App. B.2:
    4, temperature 0.7, top-p 0.95), labels the pair by the implicit reward r~_{t-1} (chosen = highest, rejected =
    lowest; eq. 5, 7, with theta_{t-1}'s and the older models' log-probs each in their place) and keeps the k2 pairs of
    largest IRM (§3.3, §3.4), each referenced to theta_{t-1}."""
    a = args(beta=0.41, gamma_e=0.3, **setting)
    model_paths = {j: f"models/theta_{j}" for j in range(t)}
    policy = FakeModel(t - 1)
    sampled = []

    def fake_generate(model, tokenizer, prompts, n, temperature, top_p, a_, device, seed, model_path=None, desc=""):
        assert model is policy and model_path == model_paths[t - 1]  # samples of theta_{t-1}
        assert (n, temperature, top_p) == (a.n_cand, a.sample_temperature, a.sample_top_p) == (4, 0.7, 0.95)
        sampled.extend(p[-1]["content"] for p in prompts)
        return [BOOT_SAMPLES[p[-1]["content"]][:n] for p in prompts]

    def fake_load_model(path, device, a_=None, frozen=False):
        assert frozen
        return FakeModel(int(path.rsplit("_", 1)[1]))

    monkeypatch.setattr(sera, "generate", fake_generate)
    monkeypatch.setattr(sera, "score", fake_score)
    monkeypatch.setattr(sera, "load_model", fake_load_model)
    monkeypatch.setattr(
        sera, "encode", lambda tokenizer, prompt, response: (codes(prompt[-1]["content"]), codes(response))
    )
    d = [{"prompt": [{"role": "user", "content": f"p{i}"}]} for i in (0, 1, 2, 0, 3, 4, 5, 3, 2)]  # prompts repeat
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
    d_gen, stats = sera.bootstrap(policy, tokenizer, d, t, k2, model_paths, a, torch.device("cpu"), {})

    assert sorted(sampled) == sorted(BOOT_SAMPLES)  # every distinct prompt once
    expected = paper_bootstrap(t, k2, a)
    assert len(d_gen) == len(expected) == min(k2, 5) and stats["data/prompts_with_pair"] == 5
    got = {p["prompt"][-1]["content"]: p for p in d_gen}
    assert sorted(got) == sorted(expected)
    for prompt, (chosen, rejected, margin) in expected.items():
        p = got[prompt]
        assert (p["chosen"], p["rejected"], p["source"]) == (chosen, rejected, "generated")
        assert p["margin"] == pytest.approx(margin, rel=1e-12) and p["margin"] > 0
        assert (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) == (codes(prompt), codes(chosen), codes(rejected))
        assert p["ref_chosen"] == fake_logp(t - 1, codes(prompt), codes(chosen))  # the reference is theta_{t-1}
        assert p["ref_rejected"] == fake_logp(t - 1, codes(prompt), codes(rejected))


def test_iterations_train_on_d_then_on_selected_and_bootstrapped_pairs(tmp_path, monkeypatch):
    """Algorithm 1 (SeRA §3.4): iteration 1 is a plain DAA epoch on all of D with the SFT model as reference;
    iteration t >= 2 starts from theta_{t-1}, trains on the k1 = ceil(rho_1 N) selected offline pairs plus the
    k2 = N - k1 bootstrapped ones, and every pair's reference log-probs are theta_{t-1}'s. The models are stand-ins
    (the score, the sampler and the epoch are stubbed); the data, the selection and the bookkeeping are the script's."""
    trained, sampled = [], []

    def fake_load_model(path, device, a_=None, frozen=False):
        name = Path(path).name
        return FakeModel(int(name.split("_")[1]) if name.startswith("iter_") else 0)  # else the SFT model

    def fake_train(model, pairs, t, a_, lr, device, pad_id, log, save_step, start_step=0, saved=None):
        trained.append((t, model.j, [dict(p) for p in pairs]))
        return FakeModel(t)  # theta_t

    def fake_generate(model, tokenizer, prompts, n, temperature, top_p, a_, device, seed, model_path=None, desc=""):
        sampled.append((model.j, len(prompts)))
        words = ["a b", "c d e", "f", "g h", "i j k"]
        return [[(words[(i + k) % 5] if i % 4 else "a b", True) for k in range(n)] for i in range(len(prompts))]

    monkeypatch.setattr(sera, "load_model", fake_load_model)
    monkeypatch.setattr(sera, "prepare_for_training", lambda model, a_: model)
    monkeypatch.setattr(sera, "save_atomic", lambda model, tokenizer, directory, extra=None: model)
    monkeypatch.setattr(sera, "train_iteration", fake_train)
    monkeypatch.setattr(sera, "score", fake_score)
    monkeypatch.setattr(sera, "generate", fake_generate)
    n = 12
    sera.main(sera.Args(device="cpu", iterations=3, num_pairs=n, num_eval=0, output_dir=str(tmp_path / "run")))

    assert [(t, j) for t, j, _ in trained] == [(1, 0), (2, 1), (3, 2)]  # theta_t is trained from theta_{t-1}
    assert [j for j, _ in sampled] == [1, 2]  # no samples at iteration 1; then the latest model's
    _, _, d_1 = trained[0]
    assert len(d_1) == n and sorted(p["index"] for p in d_1) == sorted({p["index"] for p in d_1})  # all of D
    a = args(iterations=3, num_pairs=n, num_eval=0)

    def margin(t, p):  # m~_{t-1}(x, y_w, y_l), eq. 5 and 7
        s = [lambda m, y=y: fake_logp(m, p["prompt_ids"], y) for y in (p["chosen_ids"], p["rejected_ids"])]
        return paper_ensemble_reward(t - 1, s[0], len(p["chosen_ids"]), a) - paper_ensemble_reward(
            t - 1, s[1], len(p["rejected_ids"]), a
        )

    for t, _, d_t in trained:
        for p in d_t:  # the reference of iteration t is theta_{t-1} (theta_0 = SFT)
            assert p["ref_chosen"] == fake_logp(t - 1, p["prompt_ids"], p["chosen_ids"])
            assert p["ref_rejected"] == fake_logp(t - 1, p["prompt_ids"], p["rejected_ids"])
        if t == 1:
            assert all(p["source"] == "offline" and p["margin"] is None for p in d_t)
            continue
        offline = [p for p in d_t if p["source"] == "offline"]
        generated = [p for p in d_t if p["source"] == "generated"]
        assert (len(offline), len(generated)) == (9, 3)  # ceil(0.7 * 12) = 9 (8.4 rounded up), 12 - 9
        largest = sorted(d_1, key=lambda p: margin(t, p), reverse=True)[:9]
        assert sorted(p["index"] for p in offline) == sorted(p["index"] for p in largest)
        for p in d_t:  # the margin each pair was picked by is r~_{t-1}(chosen) - r~_{t-1}(rejected)
            assert p["margin"] == pytest.approx(margin(t, p), rel=1e-12)
        assert all(p["margin"] > 0 for p in generated)


def paper_daa_loss(a, s_w, s_l, ref_w, ref_l, n_w, n_l):
    """SeRA's DAA losses (eq. 6, 8, 9; App. C.3 eq. 18), on h = (S_w - ref_w) - (S_l - ref_l)."""
    h = (s_w - ref_w) - (s_l - ref_l)
    softplus = lambda u: math.log1p(math.exp(u))  # noqa: E731
    if a.loss == "dpo":
        return softplus(-a.beta * h)
    if a.loss == "ipo":
        return (h - 1 / (2 * a.beta)) ** 2
    if a.loss == "hinge":
        return max(0.0, 1 - a.beta * h)
    return softplus(-(a.beta * (s_w / n_w - s_l / n_l) - a.gamma))  # simpo: no reference


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo"])
def test_epoch_loss_is_the_daa_loss_against_each_pairs_reference(loss):
    """One DAA step of iteration t (SeRA §3.4): the loss of --loss on the policy's summed log-probs against the
    reference log-probs each pair carries (theta_{t-1}'s), per pair, then the batch mean. The policy's log-probs are
    recomputed here by a float64 forward of the same weights."""
    a = args(loss=loss, global_batch=4, batch_size=4, lr=1e-4)
    model = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), torch.device("cpu"), a), a)
    rng = random.Random(11)
    vocab = model.config.vocab_size
    pairs = [
        {
            "prompt_ids": [rng.randrange(3, vocab) for _ in range(4)],
            "chosen_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))],
            "rejected_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))],
            "ref_chosen": rng.uniform(-40.0, -20.0),
            "ref_rejected": rng.uniform(-40.0, -20.0),
        }
        for _ in range(4)
    ]
    oracle = copy.deepcopy(model).double().eval()

    def summed_logp(prompt, response):
        with torch.no_grad():
            logits = oracle(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        return float(logp.gather(1, torch.tensor(response)[:, None]).sum())

    expected = sum(
        paper_daa_loss(
            a,
            summed_logp(p["prompt_ids"], p["chosen_ids"]),
            summed_logp(p["prompt_ids"], p["rejected_ids"]),
            p["ref_chosen"],
            p["ref_rejected"],
            len(p["chosen_ids"]),
            len(p["rejected_ids"]),
        )
        for p in pairs
    ) / len(pairs)
    logged = []
    sera.train_iteration(model, pairs, 2, a, a.lr, torch.device("cpu"), 0, logged.append, lambda *_: None)
    step = next(m for m in logged if m.get("step") == 1)
    assert step["loss"] == pytest.approx(expected, rel=1e-4)


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
            "x.jsonl line 2: missing column 'rejected'",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, chosen=" ")])),
            "x.jsonl line 2: 'chosen' is empty",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [dict(GOOD, rejected="a b c"), GOOD])),
            "x.jsonl line 1: 'chosen' and 'rejected' responses are identical",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, chosen=7)])),
            "x.jsonl line 2: 'chosen' must be a string, got int",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(
                    d / "x.jsonl", [GOOD, {"prompt": "p", "chosen": [{"role": "user", "content": 3}], "rejected": []}]
                )
            ),
            "x.jsonl line 2: 'chosen'\\[0\\].content must be a string",
        ),
        (lambda d: dict(dataset="ultrachat"), "unknown preset or path 'ultrachat'"),
        (lambda d: dict(model="mistral-8b"), "--model: 'mistral-8b' is neither a preset"),
        (lambda d: dict(dataset=str(d / "missing.jsonl")), "path '.*missing.jsonl' not found"),
        (lambda d: dict(model=str(d / "nomodel")), "--model: '.*nomodel' is neither a preset"),
        (
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", [GOOD, dict(GOOD, prompt="Sort these letters: " + "a " * 80)])
            ),
            "x.jsonl line 2: prompt has \\d+ tokens, over --max_prompt_length 64",
        ),
        (lambda d: dict(rho_1=0.0), "--rho_1 must be in \\(0, 1\\]"),
        (lambda d: dict(rho_1=1.5), "--rho_1 must be in \\(0, 1\\]"),
        (lambda d: dict(iterations=-1), "--iterations must be >= 1, got -1"),
        (lambda d: dict(reward_fn="nofile.py:score"), "--reward_fn: file 'nofile.py' not found"),
        (lambda d: dict(eval_prompts=str(d / "none.jsonl")), "--eval_prompts: file .* not found"),
        (
            lambda d: dict(eval_prompts=write_jsonl(d / "e.jsonl", [{"text": "a b"}])),
            "--eval_prompts .*e.jsonl line 1: 'prompt' must be a string",
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
