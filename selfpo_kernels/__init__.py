"""selfpo kernels: fused sequence log-likelihoods (policy + reference) and pair losses.

from selfpo_kernels import sequence_logps, pair_loss, causal_lm_logps, pair_loss_from_hidden
"""

from .losses import KINDS, pair_loss, pair_margin
from .ops import causal_lm_logps, decoder_hidden_states, head_logits, lm_head_config, resolve_impl, sequence_logps
from .pair import causal_lm_pair_loss, daa_loss_fn, pair_loss_from_hidden

__all__ = [
    "KINDS",
    "causal_lm_logps",
    "causal_lm_pair_loss",
    "daa_loss_fn",
    "decoder_hidden_states",
    "head_logits",
    "lm_head_config",
    "pair_loss",
    "pair_loss_from_hidden",
    "pair_margin",
    "resolve_impl",
    "sequence_logps",
]
