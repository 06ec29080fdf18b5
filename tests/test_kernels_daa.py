"""The base pair losses as the scripts call them (`daa_loss_fn`, and through it `pair_loss_from_hidden`) against
a float64 oracle written out here from each loss's paper, for every loss and both log-prob conventions.

The oracle imports nothing from `selfpo_kernels`: sequence log-probs are log_softmax -> gather -> masked sums in
float64 (S, |y|, A = S / |y|), and each loss is its paper's formula on them:

    h        = (S_w - S_ref,w) - (S_l - S_ref,l), with every S replaced by A under --length_norm avg
    DPO      softplus(-beta h)                                   Rafailov et al. 2023, eq. 7
    cDPO     (1 - eps) softplus(-beta h) + eps softplus(beta h)  Mitchell 2023
    IPO      (h - 1 / (2 tau))^2, tau = beta                     Azar et al. 2024, eq. 17
    SLiC     max(0, 1 - beta h)                                  SeRA eq. 8, TRL's hinge
    SimPO    softplus(-(beta (A_w - A_l) - gamma))               Meng et al. 2024, eq. 6: always averaged
    rewards  beta * (policy - reference) in the convention used; beta * A for SimPO (Meng et al. eq. 4)
"""

import math

import pytest
import torch

from selfpo_kernels import daa_loss_fn, pair_loss_from_hidden

pytestmark = pytest.mark.smoke  # also in the newest-releases environment (.ci/run)
BETA, GAMMA, EPS = 0.7, 0.4, 0.2
KINDS = ["dpo", "cdpo", "ipo", "hinge", "simpo"]


def softplus64(u: torch.Tensor) -> torch.Tensor:
    """log(1 + e^u), evaluated without overflow."""
    return torch.log1p(torch.exp(-u.abs())) + u.clamp(min=0)


def oracle_losses(kind, pol_w, pol_l, ref_w, ref_l, n_w, n_l, length_norm):
    """(losses, chosen rewards, rejected rewards) by the papers' formulas in float64, from summed log-probs, counts."""
    if kind == "simpo" or length_norm:  # A = S / |y|
        pol_w, pol_l = pol_w / n_w, pol_l / n_l
        if ref_w is not None:
            ref_w, ref_l = ref_w / n_w, ref_l / n_l
    if kind == "simpo":
        return softplus64(-(BETA * (pol_w - pol_l) - GAMMA)), BETA * pol_w, BETA * pol_l
    h = (pol_w - ref_w) - (pol_l - ref_l)
    if kind == "dpo":
        losses = softplus64(-BETA * h)
    elif kind == "cdpo":
        losses = (1 - EPS) * softplus64(-BETA * h) + EPS * softplus64(BETA * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * BETA)) ** 2
    elif kind == "hinge":
        losses = (1 - BETA * h).clamp(min=0)
    return losses, BETA * (pol_w - ref_w), BETA * (pol_l - ref_l)


def code_loss_fn(kind, length_norm):
    if kind == "cdpo":
        return daa_loss_fn("dpo", beta=BETA, label_smoothing=EPS, length_norm=length_norm)
    return daa_loss_fn(kind, beta=BETA, gamma=GAMMA, length_norm=length_norm)


def sums_and_counts(pairs=6, seed=0):
    """Summed log-probs of unequal-length responses (chosen and rejected lengths differ in every pair), exactly
    representable in fp32 so both sides see the same inputs; a reference close enough to the policy that every
    loss sits away from its flat or kinked parts."""
    gen = torch.Generator().manual_seed(seed)
    n_w = torch.tensor([3.0, 17.0, 8.0, 40.0, 5.0, 12.0])[:pairs]
    n_l = torch.tensor([11.0, 4.0, 25.0, 9.0, 6.0, 30.0])[:pairs]
    per_token = lambda n: -(0.5 + torch.rand(pairs, generator=gen)) * n  # noqa: E731 - about -1 nat per token
    pol_w, pol_l = per_token(n_w), per_token(n_l)
    ref_w = pol_w + 0.3 * n_w * torch.randn(pairs, generator=gen)
    ref_l = pol_l + 0.3 * n_l * torch.randn(pairs, generator=gen)
    return [t.float() for t in (pol_w, pol_l, ref_w, ref_l, n_w, n_l)]


@pytest.mark.parametrize("length_norm", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("kind", KINDS)
def test_daa_loss_fn_matches_the_written_out_formulas(kind, length_norm):
    """Losses, implicit rewards and d loss / d S_policy (what the fused op back-propagates) against float64."""
    pol_w, pol_l, ref_w, ref_l, n_w, n_l = sums_and_counts()
    if kind == "simpo":
        ref_w = ref_l = None
    leaves = [pol_w.clone().requires_grad_(), pol_l.clone().requires_grad_()]
    losses, reward_w, reward_l = code_loss_fn(kind, length_norm)(*leaves, ref_w, ref_l, n_w, n_l)
    grads = torch.autograd.grad(losses.sum(), leaves)

    ref64 = (None, None) if ref_w is None else (ref_w.double(), ref_l.double())
    leaves64 = [pol_w.double().requires_grad_(), pol_l.double().requires_grad_()]
    want, want_w, want_l = oracle_losses(kind, *leaves64, *ref64, n_w.double(), n_l.double(), length_norm)
    want_grads = torch.autograd.grad(want.sum(), leaves64)
    # the cases are spread out (the losses differ between pairs) and none sits at the hinge's kink
    assert (want.max() - want.min()) > 1e-2 and ((want == 0) | (want > 1e-3)).all(), want

    assert losses.shape == (6,) and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward_w.double(), want_w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward_l.double(), want_l.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_length_norm_changes_the_loss():
    """The two conventions are different losses on unequal lengths (avg is not a no-op), and avg with every
    length 1 is sum (the division is by the token count, nothing else)."""
    pol_w, pol_l, ref_w, ref_l, n_w, n_l = sums_and_counts()
    for kind in ("dpo", "ipo", "hinge"):
        total = code_loss_fn(kind, False)(pol_w, pol_l, ref_w, ref_l, n_w, n_l)[0]
        avg = code_loss_fn(kind, True)(pol_w, pol_l, ref_w, ref_l, n_w, n_l)[0]
        assert (total - avg).abs().max() > 1e-2, kind
        ones = torch.ones_like(n_w)
        torch.testing.assert_close(code_loss_fn(kind, True)(pol_w, pol_l, ref_w, ref_l, ones, ones)[0], total)


# ---- the same losses through the fused op, from hidden states --------------------------------------------


def tiny_case(seed=0, pairs=3, length=8, hidden_size=8, vocab=13):
    """Two responses per pair of unequal lengths (prompt ignored, right padding), a reference head of its own."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :2] = -100  # prompt
    for row, keep in enumerate([6, 3, 8, 4, 7, 5][: 2 * pairs]):  # scored tokens: 4, 1, 6, 2, 5, 3
        labels[row, keep:] = -100
    scale = 2 / hidden_size**0.5
    return dict(
        hidden=torch.randn(2 * pairs, length, hidden_size, generator=gen),
        weight=torch.randn(vocab, hidden_size, generator=gen) * scale,
        ref_hidden=torch.randn(2 * pairs, length, hidden_size, generator=gen),
        ref_weight=torch.randn(vocab, hidden_size, generator=gen) * scale,
        labels=labels,
    )


def oracle_seq_logps(hidden, weight, labels):
    """(S [2B], |y| [2B]) in float64: log_softmax(h W^T) at the labels, summed over scored positions."""
    mask = labels != -100
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token * mask).sum(dim=1), mask.sum(dim=1).double()


@pytest.mark.parametrize("length_norm", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("kind", KINDS)
def test_pair_loss_from_hidden_matches_the_written_out_formulas(kind, length_norm):
    """The fused op (torch path, chunk boundaries between and inside pairs) with `daa_loss_fn`: per-pair losses,
    logged rewards and the gradients of hidden states and head against float64 autograd of the oracle."""
    case = tiny_case(seed=KINDS.index(kind))
    reference = {} if kind == "simpo" else dict(ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"])

    hidden64 = case["hidden"].double().requires_grad_()
    weight64 = case["weight"].double().requires_grad_()
    policy, counts = oracle_seq_logps(hidden64, weight64, case["labels"])
    n = policy.shape[0] // 2
    ref = (None, None)
    if reference:
        ref_sums = oracle_seq_logps(case["ref_hidden"], case["ref_weight"], case["labels"])[0]
        ref = (ref_sums[:n], ref_sums[n:])
    want, want_w, want_l = oracle_losses(kind, policy[:n], policy[n:], *ref, counts[:n], counts[n:], length_norm)
    want_grads = torch.autograd.grad(want.sum(), [hidden64, weight64])

    for workspace_rows in (None, 7, 3):  # one chunk; a few pairs per chunk; less than a pair (recomputed)
        hidden = case["hidden"].clone().requires_grad_()
        weight = case["weight"].clone().requires_grad_()
        losses, metrics = pair_loss_from_hidden(
            hidden,
            weight,
            case["labels"],
            code_loss_fn(kind, length_norm),
            **reference,
            impl="torch",
            workspace_bytes=None if workspace_rows is None else workspace_rows * 13 * 4,
        )
        grads = torch.autograd.grad(losses.sum(), [hidden, weight])
        torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(metrics["rewards/chosen"].double(), want_w.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(metrics["rewards/rejected"].double(), want_l.detach(), rtol=1e-5, atol=1e-5)
        for name, got, expected in zip(("hidden", "weight"), grads, want_grads):
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5, msg=f"grad {name}")


def test_oracle_constants():
    """The oracle's own anchors: h = 0 gives log 2 (DPO), 1 / (4 tau^2) (IPO), 1 (SLiC);
    equal averages give softplus(gamma) (SimPO)."""
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert math.isclose(oracle_losses("dpo", zero, zero, zero, zero, one, one, False)[0].item(), math.log(2))
    assert math.isclose(oracle_losses("ipo", zero, zero, zero, zero, one, one, False)[0].item(), 1 / (4 * BETA**2))
    assert oracle_losses("hinge", zero, zero, zero, zero, one, one, False)[0].item() == 1.0
    simpo = oracle_losses("simpo", -3 * one, -6 * one, None, None, 3 * one, 6 * one, False)[0].item()
    assert math.isclose(simpo, math.log1p(math.exp(GAMMA)))
