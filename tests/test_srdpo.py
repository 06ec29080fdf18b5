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


def test_no_gradient_through_delta(toy):
    """parameter grads equal those with Delta replaced by a detached constant; no graph kept."""
    model, tokenizer, pairs = toy
    policy = perturbed(model, seed=1)
    a = args(lam=0.7)
    pairs = with_reference(model, tokenizer, pairs, a)
    out = srdpo.sr_losses(policy, pairs, a, torch.device("cpu"), tokenizer.pad_token_id)
    assert not out["delta"].requires_grad and out["delta"].grad_fn is None
    assert out["delta"].abs().max() > 1e-4  # the refinement margin is really there
    constant = out["delta"].clone()
    n = len(pairs)
    batch = srdpo.collate(
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs],
        tokenizer.pad_token_id,
        "cpu",
    )
    from selfpo_kernels import causal_lm_logps

    logps, _ = causal_lm_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs])
    h = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    manual = F.softplus(-(a.beta * h - a.lam * constant))
    torch.testing.assert_close(out["losses"], manual, atol=1e-6, rtol=1e-5)
    for g1, g2 in zip(grads(policy, out["losses"].sum()), grads(policy, manual.sum())):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


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
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", [GOOD] * 3 + [{"prompt": "p", "chosen": "a"}]), eval_pairs=0
            ),
            "row 3: missing column 'rejected'",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD] * 3 + [dict(GOOD, rejected="")]), eval_pairs=0),
            "row 3: 'rejected' is empty",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(d / "x.jsonl", [GOOD] * 3 + [dict(GOOD, rejected=GOOD["chosen"])]), eval_pairs=0
            ),
            "row 3: 'chosen' and 'rejected' responses are identical",
        ),
        (
            lambda d: dict(
                dataset=write_jsonl(
                    d / "x.jsonl", [GOOD] * 3 + [dict(GOOD, prompt="Sort these letters: " + "q " * 90)]
                ),
                eval_pairs=0,
            ),
            "row 3: prompt has \\d+ tokens, over --max_prompt_length",
        ),
        (
            lambda d: dict(dataset=write_jsonl(d / "x.jsonl", [GOOD] * 3), eval_pairs=5),
            "need at least --eval_pairs \\+ 2",
        ),
        (
            lambda d: dict(global_batch=4, batch_size=8),
            "--global_batch 4 must be a positive multiple of --batch_size 8",
        ),
        (lambda d: dict(eval_prompts=str(d / "none.jsonl")), "--eval_prompts: file .* not found"),
        (
            lambda d: dict(eval_prompts=write_jsonl(d / "e.jsonl", [{"prompt": ""}])),
            "--eval_prompts .* row 0: 'prompt' is empty",
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
