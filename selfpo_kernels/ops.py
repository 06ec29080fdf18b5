"""Public entry points: sequence log-likelihoods from hidden states, and from a transformers LM."""

from __future__ import annotations

import os

import torch

from .logps import HAVE_TRITON, tracing, triton_token_logps
from .torch_ref import chunked_token_logps, naive_token_logps

IMPLS = ("auto", "triton", "torch")
REDUCTIONS = ("sum", "mean", "none")


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> KERNELS_IMPL if set, else 'triton' on CUDA with Triton installed, else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"sequence_logps: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("KERNELS_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"environment variable KERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if (device.type == "cuda" and HAVE_TRITON) else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device.type}); use impl='torch' on CPU, "
            "or set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter"
        )
    return impl


def _check_inputs(hidden, weight, labels, ref_hidden, ref_weight, reduction):
    if hidden.dim() != 3:
        raise ValueError(f"sequence_logps: 'hidden' must be [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"sequence_logps: 'weight' must be [V, H={hidden.shape[2]}], got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"sequence_logps: 'labels' must be [B, T]={tuple(hidden.shape[:2])}, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sequence_logps: 'labels' must be an integer tensor, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"sequence_logps: 'hidden' ({hidden.dtype}) and 'weight' ({weight.dtype}) must share a dtype")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("sequence_logps: pass both 'ref_hidden' and 'ref_weight', or neither")
    if ref_hidden is not None:
        if ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"sequence_logps: 'ref_hidden' must be [B, T, H'] with B, T = {tuple(hidden.shape[:2])}, "
                f"got {tuple(ref_hidden.shape)}"
            )
        if ref_weight.shape != (weight.shape[0], ref_hidden.shape[2]):
            raise ValueError(
                f"sequence_logps: 'ref_weight' must be [V={weight.shape[0]}, {ref_hidden.shape[2]}], "
                f"got {tuple(ref_weight.shape)}"
            )
        if ref_hidden.dtype != ref_weight.dtype:
            raise ValueError("sequence_logps: 'ref_hidden' and 'ref_weight' must share a dtype")
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_logps: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(token_logps, positions, mask, batch, length, reduction):
    """token_logps[i] belongs at flat position positions[i]; entries at unscored positions are 0."""
    per_token = token_logps.new_zeros(batch * length).scatter(0, positions, token_logps).view(batch, length)
    if reduction == "none":
        return per_token
    total = per_token.sum(dim=1)
    if reduction == "sum":
        return total
    return total / mask.view(batch, length).sum(dim=1).clamp(min=1).float()


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence log-likelihoods of `labels` under `softcap(hidden @ weight^T) / temperature`.

    hidden [B, T, H] (policy final hidden states, may require grad), weight [V, H] (may require
    grad), labels [B, T] aligned so that labels[b, t] is predicted from hidden[b, t]; positions
    equal to `ignore_index` are not scored. The optional reference (ref_hidden, ref_weight) is
    scored in the same pass and never receives gradients.

    reduction: "sum" -> [B]; "mean" -> [B] divided by the number of scored tokens (0 where none);
    "none" -> [B, T] with 0 at ignored positions. Returns fp32 (policy, reference or None).
    """
    _check_inputs(hidden, weight, labels, ref_hidden, ref_weight, reduction)
    impl = resolve_impl(impl, hidden.device)
    batch, length, hidden_size = hidden.shape
    vocab = weight.shape[0]
    flat_labels = labels.reshape(-1).long()
    mask = flat_labels != ignore_index
    out_of_range = mask & ((flat_labels < 0) | (flat_labels >= vocab))
    bad_label = f"sequence_logps: a label is outside the vocabulary [0, {vocab}) and is not ignore_index={ignore_index}"
    # Under FakeTensorMode or torch.compile there are no values to read: both paths then take the scored-first
    # order with a device-side count, the label check is skipped, and so is the self-check (it launches kernels).
    traced = tracing(hidden)
    count = None
    if impl == "triton" or traced:
        # No host synchronisation on this path: scored rows are sorted first (not compacted by
        # `nonzero`) and the kernels skip rows past their count, a device scalar; labels are
        # checked on the device (KERNELS_DEBUG=1: on the host, naming the label).
        if not traced and _device_side_checks(hidden.device):
            torch._assert_async(~out_of_range.any(), bad_label)
        elif not traced:
            _check_labels_on_host(flat_labels, out_of_range, bad_label)
        if impl == "triton" and not traced and _needs_self_check(hidden.device):
            self_check(hidden.device, hidden.dtype)
        positions = torch.argsort((~mask).to(torch.uint8), stable=True)  # scored first, in order
        count = mask.sum()
        targets = flat_labels.index_select(0, positions).clamp(0, vocab - 1)  # unscored rows: any valid index
    else:
        _check_labels_on_host(flat_labels, out_of_range, bad_label)
        # Compact the scored rows first: ignored tokens (prompt, padding) cost nothing below.
        positions = mask.nonzero().squeeze(1)
        targets = flat_labels.index_select(0, positions)
    rows = hidden.reshape(-1, hidden_size).index_select(0, positions)
    ref_rows = None
    if ref_hidden is not None:
        ref_rows = ref_hidden.detach().reshape(-1, ref_hidden.shape[2]).index_select(0, positions)
        ref_weight = ref_weight.detach()

    if impl == "triton":
        token_logps, ref_token_logps = triton_token_logps(
            rows, weight, targets, ref_rows, ref_weight, temperature, softcap, count=count
        )
    else:
        token_logps = chunked_token_logps(rows, weight, targets, temperature, softcap)
        ref_token_logps = None
        if ref_rows is not None:
            with torch.no_grad():
                ref_token_logps = chunked_token_logps(ref_rows, ref_weight, targets, temperature, softcap)
        if count is not None:  # traced: every row was scored, the unscored ones (past count) count 0
            scored = torch.arange(rows.shape[0], device=rows.device) < count
            token_logps = torch.where(scored, token_logps, 0.0)
            if ref_token_logps is not None:
                ref_token_logps = torch.where(scored, ref_token_logps, 0.0)

    policy = _reduce(token_logps, positions, mask, batch, length, reduction)
    ref = None if ref_token_logps is None else _reduce(ref_token_logps, positions, mask, batch, length, reduction)
    return policy, ref


def _device_side_checks(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("KERNELS_DEBUG", "0") != "1"


def _check_labels_on_host(flat_labels, out_of_range, message):
    if out_of_range.any():
        bad = flat_labels[out_of_range][0].item()
        raise ValueError(message.replace("a label", f"label {bad}"))


# ---------------------------------------------------------------------------------------------
# One-time check of the compiled kernels against the torch path, per (device, dtype).

_SELF_CHECKED: set = set()


def _needs_self_check(device: torch.device) -> bool:
    return device.type == "cuda"


def self_check(device: torch.device, dtype: torch.dtype) -> None:
    """Score a small problem (policy + reference, soft-cap, a multi-chunk backward) with the Triton
    kernels and check values and gradients against float64 by the tests' rule: error at most twice
    that of naive torch at the same dtype, plus a small floor. Raises RuntimeError on a mismatch."""
    key = (str(device), dtype)
    if key in _SELF_CHECKED:
        return
    gen = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 40, 64, 300
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / 2).to(device, dtype)
    ref_hidden = torch.randn(rows, hidden_size, generator=gen).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    cotangent = torch.randn(rows, generator=gen).to(device)
    count = torch.tensor(rows - 3, device=device)  # the last rows are unscored
    scored = torch.arange(rows, device=device) < count
    softcap, temperature = 5.0, 0.9

    def run(fn, dtype_):
        h = hidden.to(dtype_).requires_grad_()
        w = weight.to(dtype_).requires_grad_()
        policy, ref = fn(h, w, ref_hidden.to(dtype_), w.detach())
        policy = torch.where(scored, policy.to(torch.float64), 0.0)
        return [
            policy,
            torch.where(scored, ref.to(torch.float64), 0.0),
            *torch.autograd.grad((policy * cotangent.to(torch.float64)).sum(), [h, w]),
        ]

    def naive(h, w, rh, rw):  # float64 inputs: the oracle; otherwise naive torch at that dtype
        upcast = torch.float64 if h.dtype == torch.float64 else None
        return (
            naive_token_logps(h, w, targets, temperature, softcap, upcast),
            naive_token_logps(rh, rw, targets, temperature, softcap, upcast),
        )

    def fused(h, w, rh, rw):  # a workspace of 16 rows: several backward chunks
        return triton_token_logps(
            h, w, targets, rh, rw, temperature, softcap, count=count, workspace_bytes=16 * vocab * dtype.itemsize
        )

    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    way_out = "Set KERNELS_IMPL=torch to use the PyTorch path instead."
    # callers may score under no_grad or autocast; the check needs gradients and exact dtypes
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        oracle, budget = run(naive, torch.float64), run(naive, dtype)
        try:
            got = run(fused, dtype)
        except Exception as err:  # e.g. a compiler error for this GPU
            raise RuntimeError(
                f"selfpo_kernels: self-check failed: the Triton kernels do not run on {name_dev} ({dtype}): "
                f"{type(err).__name__}: {err}. {way_out}"
            ) from err
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-2)
    for name, g, b, o in zip(("policy logps", "reference logps", "grad hidden", "grad weight"), got, budget, oracle):
        err, allowed = (g.double() - o).abs().max().item(), 2 * (b.double() - o).abs().max().item() + floor
        if not err <= allowed:
            raise RuntimeError(
                f"selfpo_kernels: self-check failed: the Triton kernels' {name} on {name_dev} ({dtype}) are off by "
                f"{err:.3g} from float64 (allowed {allowed:.3g}); this Triton/GPU combination is not supported. "
                + way_out
            )
    _SELF_CHECKED.add(key)


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
            f"causal_lm_logps: {type(model).__name__} has no plain nn.Linear output embedding "
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
            f"causal_lm_logps: {type(model).__name__} combines logit scaling with "
            "soft-capping; this combination is not supported"
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
        raise NotImplementedError(f"causal_lm_logps: cannot find the decoder body of {type(model).__name__}")
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
    runs its decoder under no_grad and is scored in the same kernel call. `ref_hidden` may pass
    precomputed reference hidden states instead (already [B, T-1, H]).
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)[:, :-1]
    head = lm_head_config(model)  # after the forward: FSDP2 has gathered the weight by now
    shifted = labels[:, 1:]
    weight = head["weight"]
    ref_weight = None
    if ref_model is not None:
        with torch.no_grad():
            if ref_hidden is None:
                ref_hidden = decoder_hidden_states(ref_model, input_ids, attention_mask, **forward_kwargs)[:, :-1]
        ref_head = lm_head_config(ref_model)  # after its forward too: an FSDP2-sharded reference is gathered now
        if (ref_head["softcap"], ref_head["scale"]) != (head["softcap"], head["scale"]):
            raise ValueError("causal_lm_logps: policy and reference apply different logit transforms")
        ref_weight = ref_head["weight"]
    # Mixed precision (autocast, or bf16 hidden states from an fp32 master head): the product runs in the narrower
    # of the two dtypes, as autocast runs every other matmul; the kernels accumulate in fp32 and the head's
    # gradient flows back to the fp32 weight through the cast.
    hidden, weight = _common_dtype(hidden, weight)
    if ref_model is not None:
        ref_hidden, ref_weight = _common_dtype(ref_hidden, ref_weight)
        if ref_head["bias"] is not None:
            ref_hidden, ref_weight = _fold_bias(ref_hidden, ref_weight, ref_head["bias"])
    if head["bias"] is not None:
        hidden, weight = _fold_bias(hidden, weight, head["bias"])
    return sequence_logps(
        hidden,
        weight,
        shifted,
        ref_hidden,
        ref_weight,
        temperature=temperature / head["scale"],
        softcap=head["softcap"],
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl,
    )


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in the narrower floating dtype (bf16/fp16 over fp32)."""
    if hidden.dtype == weight.dtype:
        return hidden, weight
    dtype = hidden.dtype if hidden.element_size() < weight.element_size() else weight.dtype
    return hidden.to(dtype), weight.to(dtype)


def folded_width(hidden_size: int) -> int:
    """Hidden width once the bias is folded in: H + 1 rounded up to a multiple of 64. Odd widths
    (4097) lose 16-byte row alignment in the kernels: no cp.async, no vectorised loads."""
    return -(-(hidden_size + 1) // 64) * 64


def _fold_bias(hidden, weight, bias):
    """h @ W^T + b == [h, 1, 0..] @ [W, b, 0..]^T: the bias becomes one more hidden column, zero-padded
    to `folded_width` (copies W once)."""
    pad = folded_width(hidden.shape[-1]) - hidden.shape[-1] - 1
    ones = hidden.new_ones(hidden.shape[:-1] + (1,))
    hidden = torch.nn.functional.pad(torch.cat([hidden, ones], dim=-1), (0, pad))
    weight = torch.nn.functional.pad(torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1), (0, pad))
    return hidden, weight
