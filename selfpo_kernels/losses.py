"""The direct alignment losses shared by the scripts, on sequence log-likelihoods.

Every loss is evaluated in fp32 with the stable forms (softplus, never log(sigmoid)).
Notation: h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the DPO
"logits"; z = beta * h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("dpo", "cdpo", "ipo", "hinge", "simpo")


def _check_pair_tensor(name: str, value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"pair_loss: '{name}' must be a tensor of shape {tuple(like.shape)}, got {type(value).__name__}"
        )
    if value.shape != like.shape:
        raise ValueError(
            f"pair_loss: '{name}' has shape {tuple(value.shape)}, expected {tuple(like.shape)} (same as policy_chosen)"
        )
    return value.float()


def pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    kind: str = "dpo",
    beta: float = 0.1,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-pair preference loss.

    kind:
      dpo     softplus(-z) (Rafailov et al. 2023, eq. 7); with label_smoothing=eps it is
              conservative DPO: (1-eps)*softplus(-z) + eps*softplus(z)
      cdpo    alias of dpo with label_smoothing
      ipo     (h - 1/(2*beta))^2, beta = IPO's tau (Azar et al. 2023; SeRA eq. 9)
      hinge   relu(1 - beta*h), SLiC-HF's calibration loss as in SeRA eq. 8
      simpo   softplus(-(beta*(A_w - A_l) - gamma)) (Meng et al. 2024, eq. 6; SeRA eq. 18);
              pass *averaged* log-probs, the reference arguments are ignored
    The methods' own losses live in their scripts: OSP's SPCE in osp.py, Sr-DPO / Sr-IPO in srdpo.py.
    reduction: "mean" -> scalar, "none" -> [B].
    """
    if kind not in KINDS:
        raise ValueError(f"pair_loss: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"pair_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(policy_chosen, torch.Tensor) or policy_chosen.dim() != 1:
        raise ValueError("pair_loss: 'policy_chosen' must be a 1-D tensor [B] of sequence log-likelihoods")
    if not beta > 0:
        raise ValueError(f"pair_loss: beta must be > 0, got {beta}")
    pol_w = policy_chosen.float()
    pol_l = _check_pair_tensor("policy_rejected", policy_rejected, policy_chosen)

    if kind == "simpo":
        # SimPO eq. (6): no reference; the official code's gamma_beta_ratio = gamma / beta.
        losses = F.softplus(-(beta * (pol_w - pol_l) - gamma))
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(
                f"pair_loss: kind={kind!r} needs 'ref_chosen' and 'ref_rejected' (only 'simpo' is reference-free)"
            )
        ref_w = _check_pair_tensor("ref_chosen", ref_chosen, policy_chosen)
        ref_l = _check_pair_tensor("ref_rejected", ref_rejected, policy_chosen)
        h = (pol_w - ref_w) - (pol_l - ref_l)
        z = beta * h
        if kind in ("dpo", "cdpo"):
            eps = float(label_smoothing)
            if not 0.0 <= eps < 0.5:
                raise ValueError(f"pair_loss: label_smoothing must be in [0, 0.5), got {eps}")
            losses = (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)
        elif kind == "ipo":
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        elif kind == "hinge":
            losses = torch.relu(1.0 - z)
    return losses.mean() if reduction == "mean" else losses
