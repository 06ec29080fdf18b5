"""The pair loss straight from hidden states: log-probs, the pair loss and its gradient in one pass over the head.

A preference step never needs per-token log-probs for their own sake, only the pair loss and its gradient.
As soon as a pair's sequence log-probs are known, so is the upstream gradient of each of its tokens
(d loss / d log p(y_t) is the pair loss's derivative w.r.t. the sequence log-prob the token belongs to).
So the scored tokens are taken in row chunks that hold whole pairs, and for each chunk:

1. reference logits -> log-sum-exp -> reference sequence log-probs (no gradient), in the workspace;
2. policy logits, computed ONCE into the same workspace -> log-sum-exp and sequence log-probs;
3. the chunk's pair losses by the caller's `loss_fn`, and their gradient g w.r.t. the policy's sequence
   log-probs by autograd on those few small tensors;
4. dZ = g / temperature * (onehot - softmax) (times 1 - tanh^2 under a soft-cap), in place, from the stored
   logits: no recompute;
5. dH = dZ W and dW += dZ^T H (skipped for a frozen head, as under LoRA), dbias += sum dZ.

Policy: 6 N H V FLOPs (4 with a frozen head) + the reference's 2 N H V, against 10 N H V for log-probs with
recompute followed by the loss: three GEMMs per chunk instead of four. A single pair with more scored tokens
than the workspace holds is the one exception: it is split, and its sub-chunks' logits are recomputed once
in step 4 (a fourth GEMM for that pair only).

The op is a `torch.autograd.Function` whose forward computes the gradients eagerly; its backward scales them
by the upstream gradient of the per-pair losses, which must be the same for every pair (`losses.sum() * c`,
`losses.mean()`: what a training step does), since dW is summed over pairs before the upstream is known.

Two implementations behind `impl=`: "torch" (chunked PyTorch, the CPU path) and "triton" (the chunk's
logits by a cuBLAS GEMM into the workspace in the input dtype, log-sum-exp and dZ by two memory-bound
Triton kernels, dZ written over the logits; compiled ahead of time by `python -m selfpo_kernels.compile_check`,
and checked against float64 on first use per CUDA device and dtype by `self_check`).

Host reads: the label range check and the chunk plan (tokens per pair), once per call. Under FakeTensorMode or
torch.compile (no values to read) the pass is two `torch.library` custom ops instead, the sequence log-probs and
the gradients for given d loss / d log-probs (each the chunked pass inside, so a compiled step computes the
policy's logits twice), with `loss_fn` on the whole batch between them (`_traced_pass`); under FakeTensorMode
the workspace and accumulators the real pass holds are allocated beside them, for memory trackers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .logps import tracing
from .losses import pair_loss
from .ops import _common_dtype, resolve_impl
from .torch_ref import _ADDMM_OUT_DTYPE, add_matmul_fp32_

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAVE_TRITON = False

# Bound on one chunk's logits: fp32 on the torch path (128 MB = 1048 rows at V = 32000: tall enough for the dW
# GEMM, whose inner dimension is the chunk's row count), the input dtype on the Triton path (256 MB = 1046 rows
# at V = 128256 bf16: a pair of two 512-token sequences). A pair with more scored tokens is recomputed.
WORKSPACE_BYTES = {"torch": 128 << 20, "triton": 256 << 20}
STATS_BLOCK_V, GRAD_BLOCK_V, NUM_WARPS = 2048, 2048, 8  # the memory-bound kernels' tile (compile-checked)
INTERPRETER_BLOCK_V = 32

LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def daa_loss_fn(
    kind: str = "dpo", beta: float = 0.1, gamma: float = 0.0, label_smoothing: float = 0.0, length_norm: bool = False
) -> LossFn:
    """A `loss_fn` for `pair_loss_from_hidden` from `selfpo_kernels.pair_loss`, returning (losses, chosen rewards,
    rejected rewards) with the implicit rewards beta * (policy - reference), or beta * the averaged
    log-probs for SimPO (Meng et al. 2024, eq. 4). kind="simpo" or length_norm=True divides the sequence
    log-probs by their token counts first. (The methods' own losses, SPCE in osp.py and Sr-DPO / Sr-IPO
    in srdpo.py, are loss_fns of their scripts.)"""

    def loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens):
        if kind == "simpo" or length_norm:
            policy_chosen, policy_rejected = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
            if ref_chosen is not None:
                ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens
        losses = pair_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            kind=kind,
            beta=beta,
            gamma=gamma,
            label_smoothing=label_smoothing,
            reduction="none",
        )
        with torch.no_grad():
            if kind == "simpo":
                return losses, beta * policy_chosen, beta * policy_rejected
            return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Triton: two memory-bound kernels over the logits a GEMM wrote into the workspace.

if HAVE_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _transform(z, bias_ptr, offs_v, mask_v, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """(logits, tanh) of raw products z: + bias, soft-cap, / temperature, in fp32."""
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        tanh = z  # placeholder when soft-capping is off
        if HAS_SOFTCAP:
            tanh = _tanh(z / softcap)
            z = softcap * tanh
        return z * inv_temp, tanh

    @triton.jit
    def _pair_stats_kernel(
        ws_ptr,
        bias_ptr,
        targets_ptr,
        lse_ptr,
        label_ptr,
        V,
        stride_ws,
        inv_temp,
        softcap,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # one program per row: online log-sum-exp over the row's logits, and the label's logit
        row = tl.program_id(0).to(tl.int64)
        base = ws_ptr + row * stride_ws
        run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = tl.load(base + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            logits, _ = _transform(z, bias_ptr, offs_v, mask_v, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
            logits = tl.where(mask_v, logits, float("-inf"))
            new_max = tl.maximum(run_max, logits)
            # lanes still at -inf (a short last tile) keep a zero sum, not exp(nan)
            run_sum = tl.where(
                new_max == float("-inf"), 0.0, run_sum * tl.exp(run_max - new_max) + tl.exp(logits - new_max)
            )
            run_max = new_max
        top = tl.max(run_max, axis=0)
        lse = top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0))
        target = tl.load(targets_ptr + row)
        z = tl.load(base + target).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + target).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        tl.store(lse_ptr + row, lse)
        tl.store(label_ptr + row, z * inv_temp)

    @triton.jit
    def _pair_grad_kernel(
        ws_ptr,
        bias_ptr,
        targets_ptr,
        lse_ptr,
        grad_ptr,
        V,
        stride_ws,
        inv_temp,
        softcap,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # dZ = g / T * (onehot - softmax) (* (1 - tanh^2)), written over the logits it reads
        row = tl.program_id(0).to(tl.int64)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        ptrs = ws_ptr + row * stride_ws + offs_v
        z = tl.load(ptrs, mask=mask_v, other=0.0).to(tl.float32)
        logits, tanh = _transform(z, bias_ptr, offs_v, mask_v, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_ptr + row)
        target = tl.load(targets_ptr + row)
        onehot = tl.where(offs_v == target, 1.0, 0.0)
        dz = (onehot - tl.exp(logits - lse)) * (g * inv_temp)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)
        tl.store(ptrs, dz.to(ws_ptr.dtype.element_ty), mask=mask_v)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_meta(kind: str, bias: bool, softcap: bool) -> dict:
    """Launch constants of the pair kernels (shared with selfpo_kernels.compile_check)."""
    block = INTERPRETER_BLOCK_V if _interpreting() else (STATS_BLOCK_V if kind == "stats" else GRAD_BLOCK_V)
    meta = dict(BLOCK_V=block, HAS_BIAS=bias)
    if not _interpreting():
        meta["num_warps"] = NUM_WARPS
    return meta


def stats_args(ws, bias, targets, lse, label, temperature, softcap) -> list:
    return [
        ws,
        ws if bias is None else bias,
        targets,
        lse,
        label,
        ws.shape[1],
        ws.stride(0),
        1.0 / temperature,
        1.0 if softcap is None else float(softcap),
    ]


def grad_args(ws, bias, targets, lse, grad, temperature, softcap) -> list:
    return [
        ws,
        ws if bias is None else bias,
        targets,
        lse,
        grad,
        ws.shape[1],
        ws.stride(0),
        1.0 / temperature,
        1.0 if softcap is None else float(softcap),
    ]


def grad_grid(rows: int, vocab: int, meta: dict) -> tuple[int, int]:
    return rows, -(-vocab // meta["BLOCK_V"])


# ---------------------------------------------------------------------------------------------
# The two back ends: (stats) logits -> (label logit - lse, lse), and (grad) logits -> dZ, both in place.


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[:] = h @ w^T, one GEMM; an fp32 `out` from 16-bit inputs: fp32 output of the GEMM on CUDA
    (`mm(out_dtype=float32)`, torch >= 2.8), else through a temporary."""
    if out.dtype == h.dtype:
        return torch.mm(h, w.T, out=out)
    if h.is_cuda and out.dtype == torch.float32 and _ADDMM_OUT_DTYPE:
        return torch.mm(h, w.T, out_dtype=torch.float32, out=out)
    return out.copy_(h @ w.T)


class _TorchBackend:
    """fp32 workspace. After `stats` the workspace holds exp(logits - rowmax), and `grad` finishes softmax from it."""

    fp32_workspace = True

    def __init__(self, temperature, softcap):
        self.temperature, self.softcap = temperature, softcap

    def _transform_(self, ws, bias):
        if bias is not None:
            ws += bias.float()
        tanh = None
        if self.softcap is not None:
            tanh = torch.tanh(ws / self.softcap)  # kept for the soft-cap's derivative (a second buffer)
            torch.mul(tanh, self.softcap, out=ws)
        if self.temperature != 1.0:
            ws /= self.temperature
        return tanh

    def stats(self, ws, bias, targets, keep: bool):
        """-> token log-probs, lse, state for `grad` (when keep: dZ is then formed from these logits)."""
        tanh = self._transform_(ws, bias)
        label = ws.gather(1, targets[:, None]).squeeze(1)
        top = ws.amax(dim=1)
        ws.sub_(top[:, None]).exp_()
        total = ws.sum(dim=1)
        lse = top + total.log()
        return label - lse, lse, (1.0 / total, tanh) if keep else None

    def recompute(self, ws, bias, lse):
        tanh = self._transform_(ws, bias)
        ws.sub_(lse[:, None]).exp_()
        return torch.ones_like(lse), tanh

    def grad(self, ws, bias, targets, lse, state, g):
        """ws holds exp(logits - c) with softmax = ws * inv_total; -> dZ in place (fp32)."""
        inv_total, tanh = state
        scale = g / self.temperature
        ws.mul_((-scale * inv_total)[:, None])
        ws[torch.arange(ws.shape[0], device=ws.device), targets] += scale
        if tanh is not None:
            ws.mul_(tanh.square_().neg_().add_(1.0))
        return ws


class _TritonBackend:
    """Workspace in the input dtype (the cuBLAS GEMM's output); two Triton kernels read it."""

    fp32_workspace = False

    def __init__(self, temperature, softcap):
        if not HAVE_TRITON:
            raise RuntimeError("impl='triton' needs the 'triton' package (pip install triton); use impl='torch'")
        self.temperature, self.softcap = temperature, softcap

    def _meta(self, kind, bias):
        return dict(kernel_meta(kind, bias is not None, self.softcap is not None), HAS_SOFTCAP=self.softcap is not None)

    def stats(self, ws, bias, targets, keep: bool):
        rows = ws.shape[0]
        lse = torch.empty(rows, dtype=torch.float32, device=ws.device)
        label = torch.empty(rows, dtype=torch.float32, device=ws.device)
        if rows:
            _pair_stats_kernel[(rows,)](
                *stats_args(ws, bias, targets, lse, label, self.temperature, self.softcap), **self._meta("stats", bias)
            )
        return label - lse, lse, True

    def recompute(self, ws, bias, lse):
        return True

    def grad(self, ws, bias, targets, lse, state, g):
        if ws.shape[0]:
            meta = self._meta("grad", bias)
            _pair_grad_kernel[grad_grid(ws.shape[0], ws.shape[1], meta)](
                *grad_args(ws, bias, targets, lse, g.float().contiguous(), self.temperature, self.softcap), **meta
            )
        return ws


# ---------------------------------------------------------------------------------------------
# The pass: chunks of whole pairs; losses, metrics and the gradients, eagerly.


def _plan_chunks(pair_tokens: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """Greedy groups of consecutive whole pairs whose scored tokens fit `budget` rows:
    (first pair, end pair, first token, end token). A pair alone over budget is one group (split later)."""
    groups, first_pair, first_token, token = [], 0, 0, 0
    for pair, count in enumerate(pair_tokens):
        if pair > first_pair and token + count - first_token > budget:
            groups.append((first_pair, pair, first_token, token))
            first_pair, first_token = pair, token
        token += count
    groups.append((first_pair, len(pair_tokens), first_token, token))
    return groups


def _call_loss_fn(loss_fn, group_inputs, n_pairs):
    out = loss_fn(**group_inputs)
    losses, rewards = (out, None) if isinstance(out, torch.Tensor) else (out[0], tuple(out[1:3]))
    if not isinstance(losses, torch.Tensor) or losses.shape != (n_pairs,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"pair_loss_from_hidden: loss_fn must return per-pair losses of shape ({n_pairs},) "
            f"(or a tuple (losses, chosen_rewards, rejected_rewards)), got {got}"
        )
    return losses, rewards


def _group_losses(loss_fn, policy_seq, ref_seq, tokens, extras):
    """A group's pair losses [b], rewards [2, b] or None, and g = d sum(losses) / d sequence log-probs [2b]
    (pair-major, like the inputs), by autograd on these small tensors."""
    n_pairs = policy_seq.shape[0] // 2
    with torch.enable_grad():
        chosen = policy_seq[0::2].float().requires_grad_()
        rejected = policy_seq[1::2].float().requires_grad_()
        ref = None if ref_seq is None else ref_seq.float()
        losses, rewards = _call_loss_fn(
            loss_fn,
            dict(
                policy_chosen=chosen,
                policy_rejected=rejected,
                ref_chosen=None if ref is None else ref[0::2],
                ref_rejected=None if ref is None else ref[1::2],
                chosen_tokens=tokens[0::2],
                rejected_tokens=tokens[1::2],
                **extras,
            ),
            n_pairs,
        )
        grads = torch.autograd.grad(losses.sum(), [chosen, rejected], allow_unused=True)
    g_seq = torch.stack([torch.zeros_like(chosen) if g is None else g.float() for g in grads], dim=1).reshape(-1)
    if rewards is not None:
        rewards = torch.stack([r.detach().float() for r in rewards])
    return losses.detach().float(), rewards, g_seq


def _pair_pass(
    hidden,
    weight,
    bias,
    labels,
    loss_fn,
    ref_hidden,
    ref_weight,
    ref_bias,
    ref_logps,
    extras,
    temperature,
    softcap,
    ignore_index,
    impl,
    workspace_bytes,
    need_hidden,
    need_weight,
    need_bias,
    grad_logps=None,
    accum_dtype=None,
):
    """loss_fn=None (the traced path's ops): no losses; the gradient is that of sum(grad_logps * log-probs) for the
    given pair-major grad_logps [2B] (or none)."""
    if tracing(hidden):
        return _traced_pass(
            hidden,
            weight,
            bias,
            labels,
            loss_fn,
            ref_hidden,
            ref_weight,
            ref_bias,
            ref_logps,
            extras,
            temperature,
            softcap,
            ignore_index,
            impl,
            workspace_bytes,
            need_hidden,
            need_weight,
            need_bias,
            accum_dtype,
        )
    n_seqs, length, _ = hidden.shape
    n_pairs, vocab, device, weight_dtype = n_seqs // 2, weight.shape[0], hidden.device, weight.dtype
    backend = (_TritonBackend if impl == "triton" else _TorchBackend)(temperature, softcap)

    # Scored tokens in pair-major order: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...
    flat_labels = labels.reshape(-1).long()
    mask = flat_labels != ignore_index
    bad = mask & ((flat_labels < 0) | (flat_labels >= vocab))
    if bad.any():
        raise ValueError(
            f"pair_loss_from_hidden: label {flat_labels[bad][0].item()} is outside the vocabulary "
            f"[0, {vocab}) and is not ignore_index={ignore_index}"
        )
    seq_order = torch.stack([torch.arange(n_pairs), torch.arange(n_pairs) + n_pairs], dim=1).reshape(-1).to(device)
    seq_mask = mask.view(n_seqs, length)[seq_order]
    positions = (seq_order[:, None] * length + torch.arange(length, device=device))[seq_mask]
    # (sequence, position) of each scored token: rows are gathered chunk by chunk from the [2B, T, H] tensors
    # as they are (a sliced hidden[:, :-1] is not copied whole)
    row_index = (torch.div(positions, length, rounding_mode="floor"), positions % length)
    seq_tokens = seq_mask.sum(dim=1)  # pair-major
    token_seq = torch.repeat_interleave(torch.arange(2 * n_pairs, device=device), seq_tokens)
    targets_all = flat_labels.index_select(0, positions)
    pair_tokens = seq_tokens.view(n_pairs, 2).sum(dim=1).tolist()  # host read: the chunk plan

    ws_dtype = torch.float32 if backend.fp32_workspace else hidden.dtype
    budget = max(
        1, (WORKSPACE_BYTES[impl] if workspace_bytes is None else workspace_bytes) // (vocab * ws_dtype.itemsize)
    )
    groups = _plan_chunks(pair_tokens, budget)
    ws_rows = max(1, min(budget, max(end - start for _, _, start, end in groups)))
    workspace = torch.empty((ws_rows, vocab), dtype=ws_dtype, device=device)

    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # dW and dbias sum over chunks, in fp32 unless told otherwise; for an fp32 (master) weight the accumulator is
    # the gradient returned, and for a 16-bit one accum_dtype=weight.dtype sums straight into the gradient
    accum = _accum_dtype(weight, accum_dtype)
    grad_weight = torch.zeros(weight.shape, dtype=accum, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=_accum_dtype(bias, accum_dtype), device=device) if need_bias else None
    # the products run in the hidden states' dtype: a wider (fp32 master) weight is cast once, for this pass only
    weight, ref_weight = _compute_copy(weight, hidden), _compute_copy(ref_weight, ref_hidden)
    # Sequence sums in float64: a margin is a difference of sums of hundreds of log-probs, and a serial fp32
    # index_add rounds each partial sum (measured: 3x naive's error at 460 tokens); they leave as fp32.
    policy_seq = torch.zeros(2 * n_pairs, dtype=torch.float64, device=device)
    ref_seq = None
    if ref_logps is not None:
        ref_seq = ref_logps.detach().double()[seq_order]
    elif ref_hidden is not None:
        ref_seq = torch.zeros(2 * n_pairs, dtype=torch.float64, device=device)
    losses_all = torch.zeros(n_pairs, dtype=torch.float32, device=device)
    rewards_all = None
    tokens_f = seq_tokens.float()

    for first_pair, end_pair, first_token, end_token in groups:
        subs = [(s, min(s + budget, end_token)) for s in range(first_token, end_token, budget)] or [(first_token,) * 2]
        keep = len(subs) == 1  # the whole group's logits stay in the workspace until dZ
        local_seq = token_seq[first_token:end_token] - 2 * first_pair

        def rows_of(tensor, start, end):
            return tensor[row_index[0][start:end], row_index[1][start:end]]

        if ref_hidden is not None:  # reference first: the policy's logits then stay in the workspace
            for start, end in subs:
                ws = workspace[: end - start]
                _logits_into(ws, rows_of(ref_hidden, start, end), ref_weight)
                ref_tok, _, _ = backend.stats(ws, ref_bias, targets_all[start:end], keep=False)
                ref_seq.index_add_(0, token_seq[start:end], ref_tok.double())
        lse_parts, state, kept_rows = [], None, None
        for start, end in subs:
            ws = workspace[: end - start]
            kept_rows = rows_of(hidden, start, end)
            _logits_into(ws, kept_rows, weight)
            tok, lse, state = backend.stats(ws, bias, targets_all[start:end], keep)
            policy_seq.index_add_(0, token_seq[start:end], tok.double())
            lse_parts.append(lse)

        seqs = slice(2 * first_pair, 2 * end_pair)
        if loss_fn is None:
            rewards, g_seq = None, None if grad_logps is None else grad_logps[seqs].float()
        else:
            losses, rewards, g_seq = _group_losses(
                loss_fn,
                policy_seq[seqs],
                None if ref_seq is None else ref_seq[seqs],
                tokens_f[seqs],
                {k: v[first_pair:end_pair] for k, v in extras.items()},
            )
            losses_all[first_pair:end_pair] = losses
        if rewards is not None:
            if rewards_all is None:
                rewards_all = torch.zeros(2, n_pairs, dtype=torch.float32, device=device)
            rewards_all[:, first_pair:end_pair] = rewards
        if not (need_hidden or need_weight or need_bias):
            continue
        g_tok = g_seq[local_seq]

        for (start, end), lse in zip(subs, lse_parts):
            ws = workspace[: end - start]
            if not keep:  # a pair larger than the workspace: its logits are recomputed
                kept_rows = rows_of(hidden, start, end)
                _logits_into(ws, kept_rows, weight)
                state = backend.recompute(ws, bias, lse)
            dz = backend.grad(
                ws, bias, targets_all[start:end], lse, state, g_tok[start - first_token : end - first_token]
            )
            dz = dz.to(hidden.dtype)
            if need_hidden:
                grad_hidden.index_put_((row_index[0][start:end], row_index[1][start:end]), torch.mm(dz, weight))
            if need_weight:
                _add_matmul_(grad_weight, dz.T, kept_rows)
            if need_bias:
                grad_bias += torch.sum(dz, dim=0, dtype=grad_bias.dtype)

    policy_seq, ref_seq = policy_seq.float(), None if ref_seq is None else ref_seq.float()
    if len(groups) > 1 and loss_fn is not None:
        _check_per_pair(loss_fn, losses_all, policy_seq, ref_seq, tokens_f, extras)
    outputs = dict(losses=losses_all, policy=policy_seq, ref=ref_seq, tokens=seq_tokens, rewards=rewards_all)
    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight_dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    return outputs, grads


def _accum_dtype(param: torch.Tensor | None, accum_dtype: torch.dtype | None) -> torch.dtype:
    """What a parameter's gradient is summed in over chunks: accum_dtype, by default fp32; never narrower than
    the parameter (an fp32 weight's gradient is its own accumulator)."""
    accum = accum_dtype or torch.float32
    return accum if param is None or accum.itemsize >= param.dtype.itemsize else param.dtype


def _compute_copy(weight: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor | None:
    return weight if weight is None or weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b: one GEMM in acc's dtype, or into an fp32 accumulator from 16-bit factors."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        add_matmul_fp32_(acc, a, b)


def _check_per_pair(loss_fn, losses, policy_seq, ref_seq, tokens, extras):
    """The losses evaluated chunk by chunk must be those of one call on all pairs: else loss_fn mixes pairs
    (a batch statistic) and the chunked gradient would be wrong."""
    with torch.no_grad():
        whole, _ = _call_loss_fn(
            loss_fn,
            dict(
                policy_chosen=policy_seq[0::2],
                policy_rejected=policy_seq[1::2],
                ref_chosen=None if ref_seq is None else ref_seq[0::2],
                ref_rejected=None if ref_seq is None else ref_seq[1::2],
                chosen_tokens=tokens[0::2],
                rejected_tokens=tokens[1::2],
                **extras,
            ),
            losses.shape[0],
        )
    same = torch.isclose(whole.float(), losses, rtol=1e-5, atol=1e-6, equal_nan=True).all()
    message = (
        "pair_loss_from_hidden: loss_fn gives other losses on chunks of pairs than on the whole batch; "
        "each pair's loss must depend on that pair's inputs only"
    )
    if losses.is_cuda:
        torch._assert_async(same, message)
    elif not same:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# Traced (FakeTensorMode, torch.compile): the pass as two custom ops, opaque to the tracer, around loss_fn.


def _ws_rows(hidden, weight, impl, workspace_bytes) -> tuple[int, torch.dtype]:
    """The workspace's rows at most (the chunk plan's are known only from the labels' values) and its dtype."""
    dtype = torch.float32 if impl != "triton" else hidden.dtype
    budget = (WORKSPACE_BYTES[impl] if workspace_bytes is None else workspace_bytes) // (
        weight.shape[0] * dtype.itemsize
    )
    return max(1, min(budget, hidden.shape[0] * hidden.shape[1])), dtype


def _held_by_the_pass(
    hidden, weight, bias, ref_hidden, ref_weight, softcap, impl, workspace_bytes, need_weight, need_bias, accum_dtype
) -> list:
    """Empty tensors of what the real pass holds beside its inputs and outputs: the workspace (its most rows),
    the torch path's soft-cap buffer and dZ in the input dtype, a chunk's gathered hidden rows, the weights' copies
    in the hidden dtype (of a wider, fp32 master weight), the dW and dbias accumulators (when wider than the
    weights: fp32 for 16-bit weights, unless accum_dtype is theirs). Allocated by `_traced_pass` under
    FakeTensorMode, outside the ops, so that a memory tracker (a dispatch mode above FakeTensorMode, which sees the
    ops' outputs and not what their fake implementations allocate) counts them."""
    rows, dtype = _ws_rows(hidden, weight, impl, workspace_bytes)
    vocab = weight.shape[0]
    held = [hidden.new_empty((rows, vocab), dtype=dtype), hidden.new_empty((rows, hidden.shape[2]))]
    if impl != "triton" and softcap is not None:
        held.append(hidden.new_empty((rows, vocab), dtype=torch.float32))
    if dtype != hidden.dtype:
        held.append(hidden.new_empty((rows, vocab)))
    for w, h in ((weight, hidden), (ref_weight, ref_hidden)):
        if w is not None and w.dtype != h.dtype:
            held.append(w.new_empty(w.shape, dtype=h.dtype))
    for param, need in ((weight, need_weight), (bias, need_bias)):
        if need and param is not None and _accum_dtype(param, accum_dtype) != param.dtype:
            held.append(param.new_empty(param.shape, dtype=_accum_dtype(param, accum_dtype)))
    return held


def _rows_to_pairs(t: torch.Tensor) -> torch.Tensor:
    """[2B] in row order (B chosen, then B rejected) -> pair-major (chosen 0, rejected 0, chosen 1, ...)."""
    n = t.shape[0] // 2
    return torch.stack([t[:n], t[n:]], dim=1).reshape(-1)


@torch.library.custom_op("selfpo::pair_seq_logps", mutates_args=())
def _seq_logps_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    impl: str,
    workspace_bytes: int | None,
) -> torch.Tensor:
    """Summed log-probs [2B] fp32 of the rows of `labels`, pair-major (chosen 0, rejected 0, chosen 1, ...), by the
    chunked pass without a loss_fn (no gradients)."""
    outputs, _ = _pair_pass(
        hidden,
        weight,
        bias,
        labels,
        None,
        None,
        None,
        None,
        None,
        {},
        temperature,
        softcap,
        ignore_index,
        impl,
        workspace_bytes,
        need_hidden=False,
        need_weight=False,
        need_bias=False,
    )
    return outputs["policy"]


@_seq_logps_op.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, impl, workspace_bytes):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("selfpo::pair_grads", mutates_args=())
def _grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    grad_logps: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    impl: str,
    workspace_bytes: int | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of sum(grad_logps * summed log-probs), grad_logps [2B] pair-major as
    `_seq_logps_op` returns them; [0] for each gradient not needed. The chunked pass, without a loss_fn."""
    _, grads = _pair_pass(
        hidden,
        weight,
        bias,
        labels,
        None,
        None,
        None,
        None,
        None,
        {},
        temperature,
        softcap,
        ignore_index,
        impl,
        workspace_bytes,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias and bias is not None,
        grad_logps=grad_logps,
        accum_dtype=accum_dtype,
    )
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_grads_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    grad_logps,
    temperature,
    softcap,
    ignore_index,
    impl,
    workspace_bytes,
    need_hidden,
    need_weight,
    need_bias,
    accum_dtype,
):
    need_bias = need_bias and bias is not None
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias else weight.new_empty(0),
    )


def _traced_pass(
    hidden,
    weight,
    bias,
    labels,
    loss_fn,
    ref_hidden,
    ref_weight,
    ref_bias,
    ref_logps,
    extras,
    temperature,
    softcap,
    ignore_index,
    impl,
    workspace_bytes,
    need_hidden,
    need_weight,
    need_bias,
    accum_dtype,
):
    """`_pair_pass` without host reads: sequence log-probs by one op (the reference's by another call), loss_fn on
    the whole batch, the gradients by a second op. The label check runs in the ops' real implementations."""
    scalars = (temperature, None if softcap is None else float(softcap), ignore_index, impl, workspace_bytes)
    held = []  # under FakeTensorMode: what the real pass holds, for memory trackers (nothing to trace in compile)
    if not torch.compiler.is_compiling():
        held = _held_by_the_pass(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            softcap,
            impl,
            workspace_bytes,
            need_weight,
            need_bias,
            accum_dtype,
        )
    policy = _seq_logps_op(hidden.detach(), weight.detach(), _detach(bias), labels, *scalars)
    ref = None
    if ref_logps is not None:
        ref = _rows_to_pairs(ref_logps.detach().float())
    elif ref_hidden is not None:
        ref = _seq_logps_op(ref_hidden, ref_weight, ref_bias, labels, *scalars)
    tokens = _rows_to_pairs((labels != ignore_index).sum(dim=1))
    losses, rewards, g_seq = _group_losses(loss_fn, policy, ref, tokens.float(), extras)
    grads = (None, None, None)
    if need_hidden or need_weight or need_bias:
        grads = _grads_op(
            hidden.detach(),
            weight.detach(),
            _detach(bias),
            labels,
            g_seq,
            *scalars,
            need_hidden,
            need_weight,
            need_bias,
            accum_dtype,
        )
        grads = tuple(g if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias)))
    del held
    outputs = dict(losses=losses, policy=policy, ref=ref, tokens=tokens, rewards=rewards)
    return outputs, grads


def _detach(t):
    return None if t is None else t.detach()


class PairLossFromHidden(torch.autograd.Function):
    """Per-pair losses with the gradients computed in forward; backward scales them by the (uniform) upstream."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, config, sink):
        outputs, grads = _pair_pass(
            hidden,
            weight,
            bias,
            **config,
            need_hidden=ctx.needs_input_grad[0],
            need_weight=ctx.needs_input_grad[1],
            need_bias=bias is not None and ctx.needs_input_grad[2],
        )
        ctx.grads = grads
        sink.update(outputs)  # the metrics, returned beside the autograd output
        return outputs["losses"].clone()

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.grads is None:
            raise RuntimeError(
                "pair_loss_from_hidden: backward ran twice through the same call; its gradients "
                "were computed in forward and are used once (run the op again instead)"
            )
        grads, ctx.grads = ctx.grads, None
        scale = grad_losses[:1]
        uniform = (grad_losses == scale).all()
        message = (
            "pair_loss_from_hidden: the upstream gradient must be the same for every pair "
            "(backpropagate losses.sum() or losses.mean(), scaled as you like): dW is summed over pairs "
            "before the upstream gradient is known"
        )
        if grad_losses.is_cuda or tracing(grad_losses):
            torch._assert_async(uniform, message)
        elif not uniform:
            raise RuntimeError(message)
        return (*(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads), None, None)


def pair_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    workspace_bytes: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair preference losses of `loss_fn` over sequence log-probs, with no [tokens, vocab] logits kept.

    hidden [2B, T, H]: final hidden states of B chosen sequences (rows 0..B-1) then their B rejected ones
    (rows B..2B-1), as when chosen and rejected are concatenated in one forward; weight [V, H] and bias [V]
    the head (a frozen head, requires_grad=False, costs no dW GEMM); labels [2B, T], labels[b, t] predicted
    from hidden[b, t], `ignore_index` where not scored (prompt, padding: unequal lengths are padding).
    Logits are softcap * tanh((h W^T + b) / softcap), then / temperature. The products run in hidden's dtype:
    weight (and ref_weight) share it, or are fp32 masters of 16-bit hidden states, cast once for the call.

    accum_dtype: what dW and dbias are summed in over chunks of rows (default fp32; never narrower than the
    parameter). For an fp32 weight the sum is its gradient, with no further buffer; for a 16-bit weight, fp32
    costs a [V, H] fp32 accumulator (2 GB at 128256 x 4096) and rounds once, while the weight's own dtype sums
    straight into its gradient (no extra memory; rounds once per chunk).

    The reference, with no gradient: ref_hidden [2B, T, H'] with ref_weight [V, H'] (and ref_bias), scored in
    the same pass, or precomputed ref_logps [2B] (summed sequence log-probs, same layout), or none.

    loss_fn is called on chunks of whole pairs with keyword arguments, each a [b] fp32 tensor for b pairs:
    policy_chosen, policy_rejected (summed sequence log-probs, differentiable), ref_chosen, ref_rejected (or
    None without a reference), chosen_tokens, rejected_tokens (scored-token counts), and the chunk's slice of
    every tensor in `extras` (per-pair values [B] such as soft_label or offset; no gradient flows into them).
    It returns the per-pair losses [b], or (losses, chosen_rewards, rejected_rewards). Each pair's loss must
    depend on that pair's inputs only (true of every pair loss in `selfpo_kernels.losses`; `daa_loss_fn` wraps them).

    Returns (losses [B] fp32, differentiable w.r.t. hidden, weight and bias; metrics: per-pair fp32 tensors
    "loss", "logps/chosen", "logps/rejected" (summed policy log-probs), "tokens/chosen", "tokens/rejected",
    "ref_logps/chosen", "ref_logps/rejected" (with a reference) and "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies" (when loss_fn returns rewards)). Backpropagate losses.sum() or
    losses.mean() (any uniform scale): the gradients were computed in forward, for the sum of the losses.
    """
    extras = dict(extras or {})
    _check_inputs(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, ref_logps, extras)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(
            f"pair_loss_from_hidden: 'accum_dtype' must be None, torch.float32 or the weight's dtype "
            f"({weight.dtype}), got {accum_dtype}"
        )
    impl = resolve_impl(impl, hidden.device)
    if impl == "triton" and hidden.device.type == "cuda" and not tracing(hidden):
        self_check(hidden.device, hidden.dtype)
    config = dict(
        labels=labels,
        loss_fn=loss_fn,
        ref_hidden=None if ref_hidden is None else ref_hidden.detach(),
        ref_weight=None if ref_weight is None else ref_weight.detach(),
        ref_bias=None if ref_bias is None else ref_bias.detach(),
        ref_logps=ref_logps,
        extras={k: v.detach().float() for k, v in extras.items()},
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        impl=impl,
        workspace_bytes=workspace_bytes,
        accum_dtype=accum_dtype,
    )
    tracked = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if tracked and torch.is_grad_enabled():
        outputs = {}
        losses = PairLossFromHidden.apply(hidden, weight, bias, config, outputs)
    else:
        with torch.no_grad():
            outputs, _ = _pair_pass(
                hidden, weight, bias, **config, need_hidden=False, need_weight=False, need_bias=False
            )
        losses = outputs["losses"]
    return losses, _metrics(outputs)


# ---------------------------------------------------------------------------------------------
# One-time check of the Triton path against float64 on the device it runs on, per (device, dtype).

_SELF_CHECKED: set = set()


def _naive_pair(hidden, weight, bias, labels, ref_hidden, loss_fn, softcap, temperature):
    """Per-pair losses from naive logits -> log_softmax -> gather -> sums (at the inputs' dtype, fp32 softmax
    unless float64)."""

    def seq_logps(h):
        logits = h @ weight.T + bias
        logits = softcap * torch.tanh(logits / softcap) / temperature
        logits = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (logp * (labels != -100)).sum(dim=1)

    policy = seq_logps(hidden)
    with torch.no_grad():
        ref = seq_logps(ref_hidden)
    n = policy.shape[0] // 2
    tokens = (labels != -100).sum(dim=1).to(policy.dtype)
    return loss_fn(
        policy_chosen=policy[:n],
        policy_rejected=policy[n:],
        ref_chosen=ref[:n],
        ref_rejected=ref[n:],
        chosen_tokens=tokens[:n],
        rejected_tokens=tokens[n:],
    )[0]


def self_check(device: torch.device, dtype: torch.dtype) -> None:
    """Run a small pair step (bias, soft-cap, temperature, chunk boundaries between and inside pairs) on the
    Triton path and check losses and gradients against float64 by the tests' rule: error at most twice that of
    naive torch at the same dtype, plus a small floor. Raises RuntimeError on a mismatch."""
    key = (str(device), dtype)
    if key in _SELF_CHECKED:
        return
    gen = torch.Generator().manual_seed(0)
    pairs, length, hidden_size, vocab = 3, 12, 64, 300
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / 4
    bias = torch.randn(vocab, generator=gen)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :3] = -100
    labels[1, 8:] = -100  # unequal lengths
    labels = labels.to(device)
    loss_fn, softcap, temperature = daa_loss_fn("dpo", beta=0.5), 5.0, 0.9

    def run(fn, dtype_):
        h, w, b = (t.to(device, dtype_).requires_grad_() for t in (hidden, weight, bias))
        losses = fn(h, w, b, ref_hidden.to(device, dtype_))
        return [losses.double(), *torch.autograd.grad(losses.sum(), [h, w, b])]

    def naive(h, w, b, rh):
        return _naive_pair(h, w, b, labels, rh, loss_fn, softcap, temperature)

    def fused(h, w, b, rh):  # 14 rows of workspace: pairs split and pairs grouped
        return pair_loss_from_hidden(
            h,
            w,
            labels,
            loss_fn,
            bias=b,
            ref_hidden=rh,
            ref_weight=w.detach(),
            ref_bias=b.detach(),
            temperature=temperature,
            softcap=softcap,
            impl="triton",
            workspace_bytes=14 * vocab * dtype.itemsize,
        )[0]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    way_out = "Pass impl='torch' (or set KERNELS_IMPL=torch) to use the PyTorch path instead."
    _SELF_CHECKED.add(key)  # the fused run below calls pair_loss_from_hidden, which calls this check
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            oracle, budget = run(naive, torch.float64), run(naive, dtype)
            try:
                got = run(fused, dtype)
            except Exception as err:  # e.g. a compiler error for this GPU
                raise RuntimeError(
                    f"pair_loss_from_hidden: self-check failed: the Triton path does not run on "
                    f"{name} ({dtype}): {type(err).__name__}: {err}. {way_out}"
                ) from err
        floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-2)
        for what, g, b, o in zip(("losses", "grad hidden", "grad weight", "grad bias"), got, budget, oracle):
            err, allowed = (g.double() - o).abs().max().item(), 2 * (b.double() - o).abs().max().item() + floor
            if not err <= allowed:
                raise RuntimeError(
                    f"pair_loss_from_hidden: self-check failed: the Triton path's {what} on {name} "
                    f"({dtype}) are off by {err:.3g} from float64 (allowed {allowed:.3g}). {way_out}"
                )
    except BaseException:
        _SELF_CHECKED.discard(key)
        raise


def _metrics(outputs) -> dict[str, torch.Tensor]:
    policy, ref, tokens, rewards = outputs["policy"], outputs["ref"], outputs["tokens"].float(), outputs["rewards"]
    metrics = {
        "loss": outputs["losses"],
        "logps/chosen": policy[0::2],
        "logps/rejected": policy[1::2],
        "tokens/chosen": tokens[0::2],
        "tokens/rejected": tokens[1::2],
    }
    if ref is not None:
        metrics.update({"ref_logps/chosen": ref[0::2], "ref_logps/rejected": ref[1::2]})
    if rewards is not None:
        margins = rewards[0] - rewards[1]
        metrics.update(
            {
                "rewards/chosen": rewards[0],
                "rewards/rejected": rewards[1],
                "rewards/margins": margins,
                "rewards/accuracies": (margins > 0).float(),
            }
        )
    return metrics


def _dtypes_fit(hidden: torch.dtype, weight: torch.dtype) -> bool:
    return hidden == weight or (weight == torch.float32 and hidden in (torch.bfloat16, torch.float16))


def _check_inputs(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, ref_logps, extras):
    name = "pair_loss_from_hidden"
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(
            f"{name}: 'hidden' must be [2B, T, H] (B chosen rows, then their B rejected rows), "
            f"got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{name}: 'weight' must be [V, H={hidden.shape[2]}], got shape {tuple(weight.shape)}")
    for h, w, what in (
        (hidden, weight, "'hidden' and 'weight'"),
        (ref_hidden, ref_weight, "'ref_hidden' and 'ref_weight'"),
    ):
        if h is not None and w is not None and not _dtypes_fit(h.dtype, w.dtype):
            raise ValueError(
                f"{name}: {what} must share a dtype, or the weight be an fp32 master of 16-bit hidden states; "
                f"got {h.dtype} and {w.dtype}"
            )
    if labels.shape != hidden.shape[:2] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name}: 'labels' must be an integer tensor [2B, T]={tuple(hidden.shape[:2])}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    for bias_name, b, w in (("bias", bias, weight), ("ref_bias", ref_bias, ref_weight)):
        if b is not None and (w is None or b.shape != (w.shape[0],)):
            raise ValueError(f"{name}: '{bias_name}' must be [V] next to its weight, got {tuple(b.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError(f"{name}: pass both 'ref_hidden' and 'ref_weight', or neither")
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError(f"{name}: pass the reference as 'ref_hidden'/'ref_weight' or as 'ref_logps', not both")
    if ref_hidden is not None:
        if ref_hidden.shape[:2] != hidden.shape[:2] or ref_weight.shape != (weight.shape[0], ref_hidden.shape[2]):
            raise ValueError(
                f"{name}: 'ref_hidden' must be [2B, T, H'] with 2B, T = {tuple(hidden.shape[:2])} and "
                f"'ref_weight' [V={weight.shape[0]}, H'], got {tuple(ref_hidden.shape)} and "
                f"{tuple(ref_weight.shape)}"
            )
    if ref_logps is not None and ref_logps.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: 'ref_logps' must be [2B={hidden.shape[0]}], got {tuple(ref_logps.shape)}")
    for key, value in extras.items():
        if not isinstance(value, torch.Tensor) or value.shape != (hidden.shape[0] // 2,):
            raise ValueError(f"{name}: extras['{key}'] must be a per-pair tensor [B={hidden.shape[0] // 2}]")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (bf16 under autocast) and an fp32 master head stay as they are: the pass casts the weight
    for its products and sums dW into its fp32 gradient. Otherwise both in the narrower dtype."""
    return (hidden, weight) if _dtypes_fit(hidden.dtype, weight.dtype) else _common_dtype(hidden, weight)


def causal_lm_pair_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
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
    log-probs `ref_logps` [2B]."""
    from .ops import decoder_hidden_states, lm_head_config

    hidden = decoder_hidden_states(model, input_ids, attention_mask)[:, :-1]
    head = lm_head_config(model)  # after the forward: FSDP2 has gathered the weight by now
    hidden, weight = _compute_dtype(hidden, head["weight"])
    bias = None if head["bias"] is None else head["bias"].to(weight.dtype)
    ref_weight = ref_bias = None
    if ref_model is not None:
        if ref_hidden is None:
            with torch.no_grad():
                ref_hidden = decoder_hidden_states(ref_model, input_ids, attention_mask)[:, :-1]
        ref_head = lm_head_config(ref_model)
        if (ref_head["softcap"], ref_head["scale"]) != (head["softcap"], head["scale"]):
            raise ValueError("causal_lm_pair_loss: policy and reference apply different logit transforms")
        ref_hidden, ref_weight = _compute_dtype(ref_hidden, ref_head["weight"].detach())
        ref_bias = None if ref_head["bias"] is None else ref_head["bias"].detach().to(ref_weight.dtype)
    return pair_loss_from_hidden(
        hidden,
        weight,
        labels[:, 1:],
        loss_fn,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        ref_logps=ref_logps,
        extras=extras,
        temperature=1.0 / head["scale"],
        softcap=head["softcap"],
        impl=impl,
    )
