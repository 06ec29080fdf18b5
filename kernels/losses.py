"""Pair losses on sequence log-likelihoods (ALGORITHMS.md §1, §5.2).

Every loss is evaluated in fp32 with the stable forms (softplus, never log(sigmoid)).
Notation: h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the DPO
"logits"; z = beta * h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("dpo", "cdpo", "ipo", "hinge", "simpo", "spce", "sr_dpo", "sr_ipo")


def _check_pair_tensor(name: str, value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"pair_loss: '{name}' must be a tensor of shape {tuple(like.shape)}, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"pair_loss: '{name}' has shape {tuple(value.shape)}, expected {tuple(like.shape)} (same as policy_chosen)")
    return value.float()


def pair_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = rho(y_w) - rho(y_l), the pair log-ratio margin (ALGORITHMS.md §0)."""
    return (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())


def pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    kind: str = "dpo",
    beta: float = 0.1,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    soft_label: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-pair preference loss.

    kind:
      dpo     softplus(-z) (Rafailov et al. 2023); with label_smoothing=eps it is cDPO:
              (1-eps)*softplus(-z) + eps*softplus(z)                       (§1.2, §1.3)
      cdpo    alias of dpo with label_smoothing                              (§1.3)
      ipo     (h - 1/(2*beta))^2, beta = IPO's tau                           (§1.4)
      hinge   relu(1 - beta*h), SLiC-HF as in SeRA eq. 8 / TRL               (§1.5)
      simpo   softplus(-(beta*(A_w - A_l) - gamma)); pass *averaged* log-probs,
              the reference arguments are ignored                             (§1.6)
      spce    -[q log sigma(z) + (1-q) log sigma(-z)], q = soft_label (OSP)   (§1.7)
      sr_dpo  softplus(-(beta*h - offset)), offset = lambda*Delta (Sr-DPO eq. 13)
      sr_ipo  (h - offset - 1/(2*beta))^2 (Sr-IPO eq. 15)                    (§5.2)
    offset is a stop-gradient term: it is detached here whatever the caller passes.
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
            raise ValueError(f"pair_loss: kind={kind!r} needs 'ref_chosen' and 'ref_rejected' (only 'simpo' is reference-free)")
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
        elif kind == "spce":
            if soft_label is None:
                raise ValueError("pair_loss: kind='spce' needs 'soft_label' (strength q in [0, 1] per pair)")
            q = _check_pair_tensor("soft_label", soft_label, policy_chosen).detach()
            if bool(((q < 0) | (q > 1) | torch.isnan(q)).any()):
                raise ValueError("pair_loss: 'soft_label' must lie in [0, 1]")
            losses = q * F.softplus(-z) + (1.0 - q) * F.softplus(z)
        else:  # sr_dpo, sr_ipo
            if offset is None:
                raise ValueError(f"pair_loss: kind={kind!r} needs 'offset' (= lambda * Delta, the stop-gradient refinement margin)")
            off = _check_pair_tensor("offset", offset, policy_chosen).detach()
            if kind == "sr_dpo":
                losses = F.softplus(-(z - off))
            else:
                losses = (h - off - 1.0 / (2.0 * beta)) ** 2
    return losses.mean() if reduction == "mean" else losses
