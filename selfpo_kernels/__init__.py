"""selfpo kernels: sequence log-likelihoods (policy + reference) and the fused pair step from hidden states, with no
[tokens, vocab] logits kept; the base pair losses; entry points for transformers causal LMs."""

from .losses import pair_loss
from .ops import causal_lm_logps, causal_lm_pair_loss, decoder_hidden_states, head_logits, sequence_logps
from .pair import daa_loss_fn, pair_loss_from_hidden, resolve_impl

__all__ = [
    "causal_lm_logps",
    "causal_lm_pair_loss",
    "daa_loss_fn",
    "decoder_hidden_states",
    "head_logits",
    "pair_loss",
    "pair_loss_from_hidden",
    "resolve_impl",
    "sequence_logps",
]
