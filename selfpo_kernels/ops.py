"""Public entry points: sequence log-likelihoods from hidden states, and both ops for a transformers causal LM."""

from __future__ import annotations

import torch

from .pair import Head, _dtypes_fit, check_inputs, make_config, pair_loss_from_hidden, sequence_sums, token_logps

REDUCTIONS = ("sum", "mean", "none")


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    impl: str = "auto",
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence log-likelihoods of `labels` under `softcap(hidden @ weight^T + bias) / temperature`.

    hidden [B, T, H] (policy final hidden states, may require grad), weight [V, H] and bias [V] (may require
    grad; the weight may be an fp32 master of 16-bit hidden states), labels [B, T] aligned so that labels[b, t] is
    predicted from hidden[b, t]; positions equal to `ignore_index` are not scored. The optional reference
    (ref_hidden, ref_weight, ref_bias) is scored in the same call and never receives gradients.

    reduction: "sum" -> [B]; "mean" -> [B] divided by the number of scored tokens (0 where none);
    "none" -> [B, T] with 0 at ignored positions. Returns fp32 (policy, reference or None). Sums and means are
    taken in float64 and rounded once, as `pair_loss_from_hidden` sums its sequence log-probs: of the same head,
    the two give the same bits.
    """
    check_inputs("sequence_logps", hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_logps: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cfg = make_config(hidden, temperature, softcap, ignore_index, impl, workspace_bytes)
    policy = token_logps(cfg, Head(hidden, weight, bias), labels)
    ref = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref = token_logps(cfg, Head(ref_hidden, ref_weight, ref_bias), labels)
    counts = (labels != ignore_index).sum(dim=1).clamp(min=1)
    reduce = {
        "none": lambda t: t,
        "sum": lambda t: sequence_sums(t).float(),
        "mean": lambda t: (sequence_sums(t) / counts).float(),
    }[reduction]
    return reduce(policy), None if ref is None else reduce(ref)


# ---------------------------------------------------------------------------------------------
# transformers causal LMs: run the decoder body, then score with the output embedding.


def lm_head_config(model) -> dict:
    """Output embedding weight/bias and the logit transform a transformers causal LM applies.

    Handles tied embeddings (the shared weight is returned), `final_logit_softcapping`
    (Gemma-2/3), `logit_scale` (Cohere: logits * scale) and `logits_scaling` (Granite:
    logits / scale). Raises for models whose output head is not a plain linear layer.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(
            f"selfpo_kernels: {type(model).__name__} has no plain nn.Linear output embedding "
            f"(got {type(head).__name__}); score it with model(...).logits instead"
        )
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(text_config, "logit_scale", None) is not None:
        scale *= float(text_config.logit_scale)
    if getattr(text_config, "logits_scaling", None) is not None:
        scale /= float(text_config.logits_scaling)
    if softcap is not None and scale != 1.0:
        raise NotImplementedError(
            f"selfpo_kernels: {type(model).__name__} combines logit scaling with soft-capping; not supported"
        )
    return {"weight": head.weight, "bias": head.bias, "softcap": softcap, "scale": scale}


def head_logits(model, hidden: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """fp32 logits of final hidden states [N, H] for the vocabulary ids `rows` (all when None), with the
    head's bias, scale and soft-cap applied as the model applies them. A few rows (a judge's verdict tokens)
    cost N x len(rows) dot products, not a vocabulary-wide matmul. Read after the model's forward: an
    FSDP2-sharded head is gathered only then."""
    head = lm_head_config(model)
    weight, bias = head["weight"], head["bias"]
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    logits = hidden.float() @ weight.float().T  # fp32: a bf16 difference of two logits is coarse
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * head["scale"]
    if head["softcap"] is not None:
        logits = head["softcap"] * torch.tanh(logits / head["softcap"])
    return logits


def decoder_hidden_states(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm).

    Runs the model's own forward, so the hooks of FSDP2, PEFT or DDP wrappers fire as usual, with
    `logits_to_keep=1` (the lm_head sees one position only), and takes the decoder body's output
    from a forward hook: unlike `output_hidden_states=True`, no other layer's output is kept alive
    (under no_grad, about 8.6 GB for a 16 x 2048 batch of a 7B model). Models without
    `logits_to_keep` fall back to calling the decoder body.

    Under an autocast the model's forward enters (fp32 masters computing in bf16), the states come in the
    autocast dtype, as its lm_head would take them: the residual stream of such a model stays fp32, and the
    head's products would otherwise run in fp32.
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise NotImplementedError(f"selfpo_kernels: cannot find the decoder body of {type(model).__name__}")
    captured = []

    def keep(module, args, out):
        captured.append(_autocast_input(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))

    handle = body.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False, **kwargs)
        return captured[-1]
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
    finally:
        handle.remove()
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return _autocast_input(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


def _autocast_input(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` as a matmul under the current autocast would read it: cast to the autocast dtype when narrower."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device) or not hidden.is_floating_point():
        return hidden
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype) if dtype.itemsize < hidden.dtype.itemsize else hidden


def _model_heads(name, model, input_ids, attention_mask, ref_model, ref_hidden, forward_kwargs):
    """The one adapter of both entry points: (policy Head, reference Head or None, the head's logit transform) of a
    causal LM, shifted: hidden state t scores the token at t + 1. The bias stays its own term, added in fp32 to the
    logits. Both ops get the heads in the same dtypes, so that the engine computes their log-probs alike."""
    hidden = decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)[:, :-1]
    head = lm_head_config(model)  # after the forward: FSDP2 has gathered the weight by now
    ref = None
    if ref_model is not None:
        if ref_hidden is None:
            with torch.no_grad():
                ref_hidden = decoder_hidden_states(ref_model, input_ids, attention_mask, **forward_kwargs)[:, :-1]
        ref_head = lm_head_config(ref_model)  # after its forward too: an FSDP2-sharded reference is gathered now
        if (ref_head["softcap"], ref_head["scale"]) != (head["softcap"], head["scale"]):
            raise ValueError(f"{name}: policy and reference apply different logit transforms")
        ref_bias = None if ref_head["bias"] is None else ref_head["bias"].detach()
        ref = _in_dtype(Head(ref_hidden.detach(), ref_head["weight"].detach(), ref_bias))
    return _in_dtype(Head(hidden, head["weight"], head["bias"])), ref, head


def _in_dtype(head: Head) -> Head:
    """Mixed precision (autocast, or bf16 hidden states from an fp32 master head): the products run in the narrower
    dtype, as autocast runs every other matmul. An fp32 master weight of 16-bit hidden states is passed as it is, by
    both entry points: the engine casts it for its products, a copy per pass that no backward keeps, computes the
    logits into its workspace and their log-sum-exp in fp32 as for any head, and sums dW straight into the master's
    fp32 gradient (not rounded to 16 bits on the way). Other mixes are cast here to the narrower dtype."""
    hidden, weight = head.hidden.dtype, head.weight.dtype
    if _dtypes_fit(hidden, weight):
        return head
    dtype = min(hidden, weight, key=lambda d: d.itemsize)
    return head._replace(hidden=head.hidden.to(dtype), weight=head.weight.to(dtype))


def causal_lm_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    ref_model=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "sum",
    impl: str = "auto",
    ref_hidden: torch.Tensor | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence log-likelihoods of a causal LM (and its reference) without materialising logits.

    `labels` are unshifted, as for `model(..., labels=labels)`: labels[:, t] is the token at t,
    -100 where not scored; the causal shift is applied here. The reference model, when given,
    runs its decoder under no_grad and is scored in the same call. `ref_hidden` may pass
    precomputed reference hidden states instead (already [B, T-1, H]).
    """
    args = (model, input_ids, attention_mask, ref_model, ref_hidden, forward_kwargs)
    policy, ref, head = _model_heads("causal_lm_logps", *args)
    return sequence_logps(
        policy.hidden,
        policy.weight,
        labels[:, 1:],
        None if ref is None else ref.hidden,
        None if ref is None else ref.weight,
        temperature=temperature / head["scale"],
        softcap=head["softcap"],
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl,
        bias=policy.bias,
        ref_bias=None if ref is None else ref.bias,
    )


def causal_lm_pair_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss_fn,
    ref_model=None,
    ref_hidden: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`pair_loss_from_hidden` for a transformers causal LM, as `causal_lm_logps` scores one: rows 0..B-1 of
    the batch are the chosen sequences, B..2B-1 their rejected ones; labels unshifted (the causal shift is
    applied here). The reference: a frozen `ref_model` (its decoder under no_grad, the head from the same
    pass), its precomputed hidden states `ref_hidden` [2B, T-1, H] with `ref_model`'s head, or summed
    log-probs `ref_logps` [2B]. An fp32 master head of 16-bit hidden states is passed as it is: the pass casts
    it once for its products and sums dW straight into its fp32 gradient."""
    args = (model, input_ids, attention_mask, ref_model, ref_hidden, {})
    policy, ref, head = _model_heads("causal_lm_pair_loss", *args)
    return pair_loss_from_hidden(
        policy.hidden,
        policy.weight,
        labels[:, 1:],
        loss_fn,
        bias=policy.bias,
        ref_hidden=None if ref is None else ref.hidden,
        ref_weight=None if ref is None else ref.weight,
        ref_bias=None if ref is None else ref.bias,
        ref_logps=ref_logps,
        extras=extras,
        temperature=1.0 / head["scale"],
        softcap=head["softcap"],
        impl=impl,
    )
