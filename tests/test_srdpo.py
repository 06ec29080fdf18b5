"""srdpo.py: Sr-DPO / Sr-IPO through the script's own step function, schemas and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import srdpo  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOY_MODEL = ROOT / "assets" / "toy" / "model"
GOOD = {"prompt": "Sort these letters: c a b", "chosen": "a b c", "rejected": "b a c"}
THREE = [dict(GOOD, rejected=rejected) for rejected in ("b a c", "c b a", "b c a")]  # a repeated row is a quirk


def args(**kw):  # the paper presets need a GPU unless --device cpu: resolved as on a GPU-less machine
    return srdpo.resolve(srdpo.Args(**{"device": "cpu", **kw}))[0]


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    rows = [json.loads(line) for line in open(ROOT / "assets" / "toy" / "data" / "prefs.jsonl")][:6]
    pairs, _ = srdpo.build_dataset(rows, "toy", tokenizer, args(eval_pairs=0))
    return model, tokenizer, pairs


def with_reference(model, tokenizer, pairs, a):
    """Attach reference log-probs computed with `model` itself (policy = reference)."""
    n = len(pairs)
    sequences = (
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
        + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
        + [(p["aug_prompt_ids"], p["aug_chosen_ids"]) for p in pairs]
        + [(p["aug_prompt_ids"], p["aug_rejected_ids"]) for p in pairs]
    )
    ref, _ = srdpo.score(model, sequences, a, tokenizer.pad_token_id, torch.device("cpu"), desc="ref")
    return [
        dict(
            p,
            ref_chosen=float(ref[i]),
            ref_rejected=float(ref[n + i]),
            ref_aug_chosen=float(ref[2 * n + i]),
            ref_aug_rejected=float(ref[3 * n + i]),
        )
        for i, p in enumerate(pairs)
    ]


def perturbed(model, scale=0.02, seed=0):
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# ---- through sr_losses ----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["sr_dpo", "sr_ipo"])
def test_policy_equals_reference(toy, loss):
    """at the start h = Delta = 0; Sr-DPO loss log 2, Sr-IPO 1/(4 beta^2)."""
    model, tokenizer, pairs = toy
    a = args(loss=loss)
    pairs = with_reference(model, tokenizer, pairs, a)
    out = srdpo.sr_losses(model, pairs, a, torch.device("cpu"), tokenizer.pad_token_id)
    assert out["h"].abs().max() < 1e-4 and out["delta"].abs().max() < 1e-5
    want = math.log(2) if loss == "sr_dpo" else 1 / (4 * a.beta**2)
    torch.testing.assert_close(out["losses"], torch.full_like(out["losses"], want), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("loss,base", [("sr_dpo", "dpo"), ("sr_ipo", "ipo")])
def test_lambda_zero_is_plain(toy, loss, base):
    """lam = 0 gives DPO / IPO, values and parameter gradients."""
    model, tokenizer, pairs = toy
    policy = perturbed(model)
    a = args(loss=loss, lam=0.0)
    pairs = with_reference(model, tokenizer, pairs, a)
    out = srdpo.sr_losses(policy, pairs, a, torch.device("cpu"), tokenizer.pad_token_id)
    n = len(pairs)
    logps = out["logps"]
    batch = srdpo.collate(
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs],
        tokenizer.pad_token_id,
        "cpu",
    )
    from selfpo_kernels import causal_lm_logps, pair_loss

    fresh, _ = causal_lm_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs])
    plain = pair_loss(fresh[:n], fresh[n:], ref[:n], ref[n:], kind=base, beta=a.beta, reduction="none")
    torch.testing.assert_close(out["losses"], plain)
    # the step's gradients come from the fused pair op (causal_lm_pair_loss), the plain ones from autograd
    # through causal_lm_logps: the same in fp32 up to summation order (measured: 3e-6 of the largest entry)
    for g1, g2 in zip(grads(policy, out["losses"].sum()), grads(policy, plain.sum())):
        torch.testing.assert_close(g1, g2, atol=2e-5 * g2.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(logps, fresh.detach())


def test_empty_prompt_gives_scaled_dpo(toy):
    """with p empty, Delta = beta*h; Sr-DPO = DPO at beta(1 - lam) in value, gradient keeps beta."""
    model, tokenizer, pairs = toy
    policy = perturbed(model, seed=2, scale=0.05)
    a = args(lam=0.5)
    pairs = [
        dict(p, aug_prompt_ids=p["prompt_ids"], aug_chosen_ids=p["chosen_ids"], aug_rejected_ids=p["rejected_ids"])
        for p in pairs
    ]  # the augmented context equals the plain one
    pairs = with_reference(model, tokenizer, pairs, a)
    out = srdpo.sr_losses(policy, pairs, a, torch.device("cpu"), tokenizer.pad_token_id)
    h = out["h"]
    torch.testing.assert_close(out["delta"], a.beta * h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["losses"], F.softplus(-a.beta * (1 - a.lam) * h), atol=1e-5, rtol=1e-4)
    # dL/dh through the step: d(sum L)/d(logp_chosen) = -beta * sigma(-beta (1 - lam) h)
    n = len(pairs)
    batch = srdpo.collate(
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs],
        tokenizer.pad_token_id,
        "cpu",
    )
    logps = out["logps"].clone().requires_grad_()
    ref = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs])
    loss = srdpo.sr_loss((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]), out["delta"], a)
    (grad,) = torch.autograd.grad(loss.sum(), [logps])
    torch.testing.assert_close(grad[:n], -a.beta * torch.sigmoid(-a.beta * (1 - a.lam) * h), atol=1e-6, rtol=1e-4)
    assert batch["input_ids"].shape[0] == 2 * n


def test_augmented_context(toy):
    """the augmented user turn is p, a space, then the query; the plain pass is unchanged."""
    _, tokenizer, pairs = toy
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort these letters: c a b"}]
    aug = srdpo.augment(prompt, srdpo.REFINE_PROMPT)
    assert aug[0] == prompt[0] and aug[-1]["role"] == "user"
    assert aug[-1]["content"] == srdpo.REFINE_PROMPT + " " + "Sort these letters: c a b"
    assert srdpo.REFINE_PROMPT.startswith("Please generate a response with a usefulness rating of 100 out of 100")
    for p in pairs:
        plain_ids, chosen_ids = srdpo.encode(tokenizer, p["prompt"], p["chosen"])
        assert p["prompt_ids"] == plain_ids and p["chosen_ids"] == chosen_ids
        assert p["aug_chosen_ids"] == p["chosen_ids"] and len(p["aug_prompt_ids"]) > len(p["prompt_ids"])
        assert "usefulness rating of 100" in tokenizer.decode(p["aug_prompt_ids"])


# ---- the paper's rules, against a hand computation in float64 ---------------------------------------------
# Each expected value below comes from the paper's formula written out here, on log-probs this file computes
# itself (one unpadded forward per sequence, log-softmax in float64): never from srdpo's own outputs.

# The refinement prompt p of the paper (§3.2.2), verbatim.
PAPER_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. Note that the "
    "response should be harmless. The term 100 indicates the level of usefulness, where 100 is the maximum and 1 is "
    "the minimum. Query:"
)


def logp64(model, prompt_ids, response_ids):
    """S(pi, y | x): the summed log-probability of the response tokens after the prompt, in float64."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    start = len(prompt_ids) - 1  # the logits at t predict the token at t + 1
    return logprobs[torch.arange(start, start + len(response_ids)), torch.tensor(response_ids)].sum()


def margins64(model, pairs, context):
    """[(S(y_w | c), S(y_l | c)) for each pair] on the plain (c = x) or the augmented (c = p (+) x) context."""
    pre = "aug_" if context == "augmented" else ""
    return torch.stack(
        [
            torch.stack(
                [logp64(model, p[pre + "prompt_ids"], p[pre + side]) for side in ("chosen_ids", "rejected_ids")]
            )
            for p in pairs
        ]
    )


@pytest.fixture(scope="module")
def hand(toy):
    """A policy moved away from the reference (the toy SFT model), the reference's log-probs on both contexts
    attached as sr_losses reads them, and the paper's h(x) and h(p (+) x) computed here (float64)."""
    model, tokenizer, pairs = toy
    policy = perturbed(model, scale=0.05, seed=3)
    with torch.no_grad():
        ref, ref_aug = margins64(model, pairs, "plain"), margins64(model, pairs, "augmented")
        pol, pol_aug = margins64(policy, pairs, "plain"), margins64(policy, pairs, "augmented")
    pairs = [
        dict(
            p,
            ref_chosen=float(ref[i, 0]),
            ref_rejected=float(ref[i, 1]),
            ref_aug_chosen=float(ref_aug[i, 0]),
            ref_aug_rejected=float(ref_aug[i, 1]),
        )
        for i, p in enumerate(pairs)
    ]

    def margin(pi, rho):  # h = (S_pi(y_w) - S_ref(y_w)) - (S_pi(y_l) - S_ref(y_l)): chosen minus rejected
        return (pi[:, 0] - rho[:, 0]) - (pi[:, 1] - rho[:, 1])

    h, h_aug = margin(pol, ref), margin(pol_aug, ref_aug)
    # the contexts really differ: any mix-up of context, side or reference moves Delta far past the tolerance
    assert (h_aug - h).abs().min() > 0.05 and (margin(pol_aug, ref) - h_aug).abs().min() > 0.05
    return dict(policy=policy, pairs=pairs, ref=ref, h=h, h_aug=h_aug, pad=tokenizer.pad_token_id)


def test_delta_is_the_margin_on_the_augmented_context(hand):
    """Delta = beta * sg[h(p (+) x)] (eq. 12, Alg. 1 lines 4-5): the current policy and the frozen reference,
    both on the query with the refinement prompt prepended, chosen minus rejected, times beta."""
    a = args(lam=0.5, beta=0.2)
    out = srdpo.sr_losses(hand["policy"], hand["pairs"], a, torch.device("cpu"), hand["pad"])
    want = a.beta * hand["h_aug"]
    torch.testing.assert_close(out["delta"].double(), want, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(out["aug_h"].double(), hand["h_aug"], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(out["h"].double(), hand["h"], atol=3e-5, rtol=1e-5)  # h(x): the plain context


@pytest.mark.parametrize("lam", [0.7, 1.0])
@pytest.mark.parametrize("loss", ["sr_dpo", "sr_ipo"])
def test_sr_losses_are_eq13_and_eq15(hand, loss, lam):
    """Sr-DPO L = -log sigma(beta h(x) - lambda Delta) (eq. 13), Sr-IPO L = (h(x) - lambda Delta - 1/(2 beta))^2
    (eq. 15), with Delta = beta h(p (+) x), per pair."""
    beta = 0.2
    a = args(loss=loss, lam=lam, beta=beta)
    out = srdpo.sr_losses(hand["policy"], hand["pairs"], a, torch.device("cpu"), hand["pad"])
    h, delta = hand["h"], beta * hand["h_aug"]
    if loss == "sr_dpo":
        want = -torch.log(torch.sigmoid(beta * h - lam * delta))
    else:
        want = (h - lam * delta - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(out["losses"].double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["sr_dpo", "sr_ipo"])
def test_lambda_zero_gives_dpo_and_ipo_by_their_formulas(hand, loss):
    """lambda = 0: Sr-DPO is DPO, -log sigma(beta h) (Rafailov et al., eq. 7), and Sr-IPO is IPO on summed
    log-probs, (h - 1/(2 beta))^2 (Azar et al., eq. 17; Yu et al. eq. 15 at lambda = 0)."""
    beta = 0.2
    out = srdpo.sr_losses(
        hand["policy"], hand["pairs"], args(loss=loss, lam=0.0, beta=beta), torch.device("cpu"), hand["pad"]
    )
    h = hand["h"]
    want = -torch.log(torch.sigmoid(beta * h)) if loss == "sr_dpo" else (h - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(out["losses"].double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["sr_dpo", "sr_ipo"])
def test_no_gradient_through_delta(hand, loss):
    """Delta is a stop-gradient (eq. 12-13, Alg. 1 line 7: backward through h only): the parameter gradients are
    those of the paper's loss with Delta a constant, both written out here; no graph is kept for Delta."""
    beta, lam = 0.2, 0.7
    policy, pairs = hand["policy"], hand["pairs"]
    out = srdpo.sr_losses(policy, pairs, args(loss=loss, lam=lam, beta=beta), torch.device("cpu"), hand["pad"])
    assert not out["delta"].requires_grad and out["delta"].grad_fn is None
    pol = margins64(policy, pairs, "plain")  # with grad
    h = (pol[:, 0] - hand["ref"][:, 0]) - (pol[:, 1] - hand["ref"][:, 1])
    delta = beta * hand["h_aug"]  # a constant: computed under no_grad in the fixture
    manual = -F.logsigmoid(beta * h - lam * delta) if loss == "sr_dpo" else (h - lam * delta - 1 / (2 * beta)) ** 2
    for got, want in zip(grads(policy, out["losses"].sum()), grads(policy, manual.sum())):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_sr_loss_passes_no_gradient_to_delta():
    """sr_loss itself treats Delta as a constant: no gradient reaches it, and dL/dh is the paper's
    (eq. 13, 15 differentiated: -beta sigma(-(beta h - lambda Delta)), 2 (h - lambda Delta - 1/(2 beta)))."""
    beta, lam = 0.2, 0.7
    h64 = torch.tensor([-3.0, -0.5, 0.0, 1.5, 6.0], dtype=torch.float64)
    d64 = torch.tensor([0.4, -1.0, 0.3, 2.0, -0.2], dtype=torch.float64)
    for kind in ("sr_dpo", "sr_ipo"):
        h, delta = h64.float().requires_grad_(), d64.float().requires_grad_()
        loss = srdpo.sr_loss(h, delta, srdpo.Args(loss=kind, lam=lam, beta=beta))
        dh, dd = torch.autograd.grad(loss.sum(), [h, delta], allow_unused=True)
        assert dd is None or not dd.any()
        z = beta * h64 - lam * d64
        want = -beta * torch.sigmoid(-z) if kind == "sr_dpo" else 2 * (h64 - lam * d64 - 1 / (2 * beta))
        torch.testing.assert_close(dh.double(), want, atol=1e-6, rtol=1e-5)


def test_reference_is_the_starting_model_on_both_contexts(tmp_path, monkeypatch):
    """The frozen reference pi_SFT (Alg. 1 lines 1-2) gives S_ref(y | x) for h and S_ref(y | p (+) x) for Delta
    (eq. 12), each pair's chosen and rejected in its place."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def no_training(model, pairs, *rest, **kw):
        seen["pairs"] = [dict(p) for p in pairs]
        return model

    monkeypatch.setattr(srdpo, "train", no_training)
    srdpo.main(
        srdpo.Args(dataset="toy", num_pairs=4, eval_pairs=0, num_eval=0, device="cpu", output_dir=str(tmp_path / "r"))
    )
    sft = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    pairs = seen["pairs"]
    assert len(pairs) == 4
    with torch.no_grad():
        plain, aug = margins64(sft, pairs, "plain"), margins64(sft, pairs, "augmented")
    got = torch.tensor([[p[k] for k in ("ref_chosen", "ref_rejected")] for p in pairs], dtype=torch.float64)
    got_aug = torch.tensor([[p[k] for k in ("ref_aug_chosen", "ref_aug_rejected")] for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_aug, aug, atol=1e-4, rtol=1e-5)
    assert (aug - plain).abs().min() > 0.05  # the two contexts give different reference log-probs


def test_refinement_prompt_and_augmented_query(toy):
    """p is the paper's text verbatim (§3.2.2) and the default of --refine_prompt; p (+) x is p, one space, then
    the query, in the last user turn (separator ours); the pairs' augmented ids are those
    of that conversation, the plain ids those of the query alone."""
    _, tokenizer, pairs = toy
    assert srdpo.REFINE_PROMPT == PAPER_PROMPT and srdpo.Args().refine_prompt == PAPER_PROMPT
    turns = [
        {"role": "user", "content": "Sort these letters: b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "And these: d c"},
    ]
    assert srdpo.augment(turns, PAPER_PROMPT) == turns[:2] + [
        {"role": "user", "content": PAPER_PROMPT + " And these: d c"}
    ]
    for p in pairs:
        by_hand = p["prompt"][:-1] + [{"role": "user", "content": PAPER_PROMPT + " " + p["prompt"][-1]["content"]}]
        aug_prompt, aug_chosen = srdpo.encode(tokenizer, by_hand, p["chosen"])
        assert p["aug_prompt_ids"] == aug_prompt and p["aug_chosen_ids"] == aug_chosen
        assert (p["prompt_ids"], p["chosen_ids"]) == srdpo.encode(tokenizer, p["prompt"], p["chosen"])
        assert PAPER_PROMPT + " " + p["prompt"][-1]["content"] in tokenizer.decode(p["aug_prompt_ids"])


# ---- presets, schemas, bad input -----------------------------------------------------------


def test_presets():
    a = args(model="zephyr-7b", loss="sr_ipo")
    assert (a.beta, a.lr, a.optimizer, a.global_batch, a.dataset) == (0.1, 5e-7, "rmsprop", 64, "ultrafeedback")
    assert args(model="pythia-2.8b").dataset == "hh-rlhf"
    assert args(model="zephyr-7b", optimizer="adamw").optimizer == "adamw"


@pytest.mark.parametrize("fixture", ["ultrafeedback_binarized.jsonl", "hh_rlhf.jsonl", "summarize_from_feedback.jsonl"])
def test_fixture_schemas(fixture):
    rows, _ = srdpo.load_rows(str(FIXTURES / fixture))
    for i, row in enumerate(rows):
        pair = srdpo.parse_pair(row, f"row {i}")
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: dict(lam=-0.1), "--lam must be >= 0"),
        (lambda d: dict(beta=0.0), "--beta must be > 0"),
        (lambda d: dict(refine_prompt="  "), "--refine_prompt is empty; use --lam 0"),
        (lambda d: dict(model="zephyr"), "'zephyr' is neither a preset"),
        (lambda d: dict(dataset="uf"), "unknown preset or path 'uf'"),
        (lambda d: dict(dataset=str(d / "none.jsonl")), "not found"),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", THREE + [{"prompt": "p", "chosen": "a"}]), eval_pairs=0),
            "x.jsonl line 4: missing column 'rejected'",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", THREE + [dict(GOOD, rejected="")]), eval_pairs=0),
            "x.jsonl line 4: 'rejected' is empty",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", THREE + [dict(GOOD, rejected=GOOD["chosen"])]), eval_pairs=0
            ),
            "x.jsonl line 4: 'chosen' and 'rejected' responses are identical",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", THREE + [dict(GOOD, prompt="Sort these letters: " + "q " * 90)]),
                eval_pairs=0,
            ),
            "x.jsonl line 4: prompt has \\d+ tokens, over --max_prompt_length",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", THREE), eval_pairs=5),
            "need at least --eval_pairs \\+ 2",
        ),
        (
            lambda d: dict(global_batch=4, batch_size=8),
            "--global_batch 4 must be a positive multiple of --batch_size 8",
        ),
        (lambda d: dict(eval_prompts=str(d / "none.jsonl")), "--eval_prompts: file .* not found"),
        (
            lambda d: dict(eval_prompts=write_jsonl(d / "e.jsonl", [{"prompt": ""}])),
            "--eval_prompts .*e.jsonl line 1: 'prompt' is empty",
        ),
        (lambda d: dict(chat_template=str(d / "none.jinja")), "--chat_template: file .* not found"),
    ],
)
def test_bad_input(tmp_path, make, match):
    out = tmp_path / "out"
    with pytest.raises(srdpo.InputError, match=match):
        srdpo.main(srdpo.Args(**make(tmp_path), output_dir=str(out)))
    assert not out.exists()


def test_cli_error_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "srdpo.py"), "--lam", "-1", "--output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "srdpo.py: error: --lam must be >= 0, got -1.0"


def test_shared_prefix_pass_equals_full_forward(toy):
    """The prompted pass shares the refinement prompt's KV cache; log-probs equal a full forward."""
    from selfpo_kernels import causal_lm_logps

    model, tokenizer, pairs = toy
    sequences = [(p["aug_prompt_ids"], p["aug_chosen_ids"]) for p in pairs] + [
        (p["aug_prompt_ids"], p["aug_rejected_ids"]) for p in pairs
    ]
    shared = srdpo.shared_prefix_logps(model, sequences, tokenizer.pad_token_id, torch.device("cpu"))
    batch = srdpo.collate(sequences, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        full, _ = causal_lm_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-5)
    assert len(pairs[0]["aug_prompt_ids"]) - len(pairs[0]["prompt_ids"]) > 20  # there was a prefix to share


# ---- Sr-DPO / Sr-IPO (srdpo.sr_loss) against their invariants ---------------------------------


def sr(kind, h, delta, lam=0.5, beta=0.1):
    return srdpo.sr_loss(h, delta, srdpo.Args(loss=kind, lam=lam, beta=beta))


def test_sr_lambda_zero_is_dpo_and_ipo():
    from selfpo_kernels import pair_loss

    h = torch.linspace(-20, 20, 9, requires_grad=True)
    zeros = torch.zeros(9)
    for kind, base in (("sr_dpo", "dpo"), ("sr_ipo", "ipo")):
        a, b = (
            sr(kind, h, torch.randn(9), lam=0.0),
            pair_loss(h, zeros, zeros, zeros, kind=base, beta=0.1, reduction="none"),
        )
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(*(torch.autograd.grad(x.sum(), [h])[0] for x in (a, b)))


def test_sr_ipo_zero_at_the_shifted_target_and_sr_dpo_monotone_in_delta():
    beta, lam = 0.1, 0.5
    delta = beta * torch.tensor([-3.0, 0.0, 4.0])
    target = (lam * delta + 1 / (2 * beta)).requires_grad_()
    loss = sr("sr_ipo", target, delta, lam, beta)
    assert loss.abs().max().item() < 1e-6 and torch.autograd.grad(loss.sum(), [target])[0].abs().max().item() < 1e-4
    losses = sr("sr_dpo", torch.full((5,), 1.5), torch.linspace(-1, 1, 5))
    assert (losses[1:] > losses[:-1]).all()


def test_sr_delta_is_a_constant_and_the_naive_delta_rescales_beta():
    beta, lam = 0.1, 0.5
    h = torch.linspace(-20, 20, 9, requires_grad=True)
    delta = beta * h  # Delta = beta * h: Sr-DPO's value is DPO's with beta (1 - lambda), its gradient keeps beta
    loss = sr("sr_dpo", h, delta, lam, beta)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-beta * (1 - lam) * h))
    (grad,) = torch.autograd.grad(loss.sum(), [h])
    torch.testing.assert_close(grad, -beta * torch.sigmoid(-beta * (1 - lam) * h), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        sr("sr_ipo", h, delta, lam, beta), ((1 - lam * beta) * h - 1 / (2 * beta)) ** 2, atol=1e-4, rtol=1e-5
    )
