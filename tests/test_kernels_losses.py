"""pair_loss (DPO, cDPO, IPO, SLiC-HF, SimPO) against their invariants: values, gradients, conventions."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfpo_kernels import daa_loss_fn, pair_loss

LOG2 = math.log(2.0)


def loss_and_grad_h(kind, h, **kw):
    """Loss per pair and dL/dh, where h enters as policy_chosen - policy_rejected."""
    h = torch.as_tensor(h, dtype=torch.float32).reshape(-1).clone().requires_grad_()
    zeros = torch.zeros_like(h)
    losses = pair_loss(h, zeros, zeros, zeros, kind=kind, reduction="none", **kw)
    (grad,) = torch.autograd.grad(losses.sum(), [h])
    return losses.detach(), grad


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-10 * torch.rand(n, generator=g) - 1).requires_grad_() for _ in range(4)]


# ---- DPO / cDPO --------------------------------------------------------------------


def test_dpo_policy_equals_reference():
    logps = -5 * torch.rand(8)
    pw = logps.clone().requires_grad_()
    pl = (logps - 1).clone().requires_grad_()
    loss = pair_loss(pw, pl, logps, logps - 1, kind="dpo", beta=0.3, reduction="none")
    torch.testing.assert_close(loss, torch.full((8,), LOG2))
    _, grad = loss_and_grad_h("dpo", torch.zeros(8), beta=1.0)  # beta = 1: dL/dz = dL/dh
    torch.testing.assert_close(grad, torch.full((8,), -0.5))


def test_dpo_is_softplus_and_swap_identity():
    beta = 0.2
    h = torch.linspace(-30, 30, 41)
    loss, _ = loss_and_grad_h("dpo", h, beta=beta)
    torch.testing.assert_close(loss, F.softplus(-beta * h))
    swapped, _ = loss_and_grad_h("dpo", -h, beta=beta)
    torch.testing.assert_close(swapped - loss, beta * h, atol=1e-5, rtol=1e-5)  # L(-z) - L(z) = z


def test_dpo_monotone_and_gradient_finite_difference():
    beta = 0.5
    h = torch.linspace(-8, 8, 33, dtype=torch.float64)
    loss, grad = loss_and_grad_h("dpo", h, beta=beta)
    assert (loss[1:] < loss[:-1]).all()
    torch.testing.assert_close(grad, -beta * torch.sigmoid(-beta * h.float()), atol=1e-6, rtol=1e-5)
    eps = 1e-3
    up, _ = loss_and_grad_h("dpo", h + eps, beta=beta)
    down, _ = loss_and_grad_h("dpo", h - eps, beta=beta)
    torch.testing.assert_close((up - down) / (2 * eps), grad, atol=2e-3, rtol=1e-2)


def test_dpo_no_overflow():
    loss, grad = loss_and_grad_h("dpo", torch.tensor([100.0, -100.0]), beta=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, torch.tensor([0.0, 100.0]), atol=1e-6, rtol=1e-6)


def test_cdpo():
    h = torch.linspace(-5, 5, 21)
    dpo, _ = loss_and_grad_h("dpo", h, beta=1.0)
    cdpo0, _ = loss_and_grad_h("cdpo", h, beta=1.0, label_smoothing=0.0)
    torch.testing.assert_close(dpo, cdpo0)
    eps = 0.2
    _, grad = loss_and_grad_h("dpo", h, beta=1.0, label_smoothing=eps)
    torch.testing.assert_close(grad, torch.sigmoid(h) - (1 - eps), atol=1e-6, rtol=1e-5)
    # eps -> 0.5 (limit): minimiser at z = 0; just below, the minimiser is log((1-eps)/eps)
    eps = 0.3
    zstar = math.log((1 - eps) / eps)
    _, grad_star = loss_and_grad_h("dpo", torch.tensor([zstar]), beta=1.0, label_smoothing=eps)
    assert abs(grad_star.item()) < 1e-6
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_and_grad_h("dpo", h, label_smoothing=0.5)


# ---- IPO --------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 1.0, 2.5])
def test_ipo(tau):
    target = 1 / (2 * tau)
    loss, grad = loss_and_grad_h("ipo", torch.tensor([target, 0.0, 3.0]), beta=tau)
    assert abs(loss[0].item()) < 1e-6 and abs(grad[0].item()) < 1e-5
    torch.testing.assert_close(loss[1], torch.tensor(1 / (4 * tau**2)))
    torch.testing.assert_close(grad, 2 * (torch.tensor([target, 0.0, 3.0]) - target), atol=1e-5, rtol=1e-5)


def test_ipo_tau_one_is_seras_form():
    h = torch.linspace(-2, 2, 9)
    loss, _ = loss_and_grad_h("ipo", h, beta=1.0)
    torch.testing.assert_close(loss, (h - 0.5) ** 2)


def test_ipo_average_convention():
    """with equal lengths L, the averaged-log-prob margin is the summed margin / L."""
    L = 7
    pw, pl, rw, rl = [t.detach() for t in random_logps(5, seed=1)]
    h_sum = (pw - rw) - (pl - rl)
    h_avg = (pw / L - rw / L) - (pl / L - rl / L)
    torch.testing.assert_close(h_avg, h_sum / L)
    loss = pair_loss(pw / L, pl / L, rw / L, rl / L, kind="ipo", beta=0.5, reduction="none")
    torch.testing.assert_close(loss, (h_sum / L - 1.0) ** 2)


# ---- SLiC hinge --------------------------------------------------------------------


def test_hinge():
    beta = 0.5
    h = torch.tensor([2.0, 3.0, 0.0, -1.0, 1.0])
    loss, grad = loss_and_grad_h("hinge", h, beta=beta)
    torch.testing.assert_close(loss, torch.relu(1 - beta * h))
    assert loss[0] == 0 and loss[1] == 0 and grad[1] == 0
    torch.testing.assert_close(loss[2], torch.tensor(1.0))
    torch.testing.assert_close(grad[2:], torch.full((3,), -beta))


# ---- SimPO -------------------------------------------------------------------------


def test_simpo_ignores_reference():
    pw, pl, rw, rl = random_logps(6, seed=2)
    a = pair_loss(pw, pl, rw, rl, kind="simpo", beta=2.0, gamma=1.6, reduction="none")
    b = pair_loss(pw, pl, rw * 3 + 1, rl - 7, kind="simpo", beta=2.0, gamma=1.6, reduction="none")
    c = pair_loss(pw, pl, kind="simpo", beta=2.0, gamma=1.6, reduction="none")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    ga = torch.autograd.grad(a.sum(), [pw, pl])
    gc = torch.autograd.grad(c.sum(), [pw, pl])
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x, y)


def test_simpo_equal_averages():
    avg = torch.full((3,), -1.3)
    torch.testing.assert_close(
        pair_loss(avg, avg, kind="simpo", beta=2.0, gamma=1.6, reduction="none"), F.softplus(torch.full((3,), 1.6))
    )
    torch.testing.assert_close(pair_loss(avg, avg, kind="simpo", beta=2.0, gamma=0.0), torch.tensor(LOG2))


def test_simpo_length_normalisation():
    """SimPO's reward is beta * S / |y| (Meng et al. 2024, eq. 4): fed summed log-probs and
    token counts, as the fused op feeds them, repeating a response's tokens (twice the length, the same average)
    keeps its reward and the loss, whereas the summed reward doubles; and the loss is the formula on S / |y|."""
    beta, gamma = 2.0, 1.6
    token_logps = -torch.rand(9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    doubled = torch.cat([token_logps, token_logps])
    rejected = torch.tensor([-0.9 * 5])  # 5 tokens of -0.9: a length unlike either chosen one
    simpo = daa_loss_fn("simpo", beta=beta, gamma=gamma)
    dpo_sum = daa_loss_fn("dpo", beta=beta)  # a summed-log-prob reward, reference 0
    zero, five = torch.zeros(1), torch.tensor([5.0])
    rewards, losses, summed = {}, {}, {}
    for name, tokens in (("short", token_logps), ("long", doubled)):
        total, count = tokens.sum().float().reshape(1), torch.tensor([float(len(tokens))])
        losses[name], rewards[name], _ = simpo(total, rejected, None, None, count, five)
        summed[name] = dpo_sum(total, rejected, zero, zero, count, five)[1]
        average = tokens.sum().item() / len(tokens)
        expected = math.log1p(math.exp(-(beta * (average - (-0.9)) - gamma)))  # softplus(-(beta (A_w - A_l) - gamma))
        assert math.isclose(losses[name].item(), expected, rel_tol=1e-5), (name, losses[name].item(), expected)
        assert math.isclose(rewards[name].item(), beta * average, rel_tol=1e-5)
    torch.testing.assert_close(losses["long"], losses["short"])
    torch.testing.assert_close(rewards["long"], rewards["short"])
    torch.testing.assert_close(summed["long"], 2 * summed["short"])


def test_simpo_official_form():
    pw, pl, _, _ = [t.detach() for t in random_logps(8, seed=3)]
    beta, gamma_beta_ratio = 2.0, 0.8
    official = -F.logsigmoid(beta * ((pw - pl) - gamma_beta_ratio))
    ours = pair_loss(pw, pl, kind="simpo", beta=beta, gamma=beta * gamma_beta_ratio, reduction="none")
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(ours, F.softplus(-beta * ((pw - pl) - 1.6 / beta)))


# ---- API ---------------------------------------------------------------------------------


def test_mean_reduction_and_fp32():
    pw, pl, rw, rl = [t.detach().half() for t in random_logps(6, seed=6)]
    per_pair = pair_loss(pw, pl, rw, rl, kind="dpo", reduction="none")
    assert per_pair.dtype == torch.float32
    torch.testing.assert_close(pair_loss(pw, pl, rw, rl, kind="dpo"), per_pair.mean())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="kto"), "unknown kind 'kto'"),
        (dict(ref_chosen=None), "needs 'ref_chosen'"),
        (dict(kind="spce"), "unknown kind 'spce'"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(reduction="sum"), "reduction must be"),
        (dict(policy_rejected=torch.zeros(3)), "'policy_rejected' has shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(
        policy_chosen=torch.zeros(4),
        policy_rejected=torch.zeros(4),
        ref_chosen=torch.zeros(4),
        ref_rejected=torch.zeros(4),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pair_loss(**args)
