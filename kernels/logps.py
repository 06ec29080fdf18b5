"""Triton token log-likelihoods from hidden states and lm_head weights, policy and reference fused.

Forward (one launch for policy *and* reference): grid = (row blocks, vocab splits, models).
Each program streams its vocabulary range in BLOCK_V tiles, computes the logit tile
`h[BLOCK_M, H] @ W[BLOCK_V, H]^T` with fp32 accumulation, and folds it into an online
log-sum-exp (running max and sum) plus the label logit. The per-split partial statistics are
merged on the host (a [models, splits, M] tensor, a few KB). `[N, V]` is never built.

Backward (policy only, the reference gets no gradient): for a bounded chunk of rows, a
Triton kernel recomputes each logit tile and writes `g * (onehot - softmax)` (chained through
temperature and soft-cap) into a workspace of at most `WORKSPACE_BYTES`; two cuBLAS GEMMs
then give dH = dZ @ W and dW += dZ^T @ H for the chunk.

bf16/fp16 inputs are multiplied with fp32 accumulation; fp32 inputs use IEEE fp32 dots.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAVE_TRITON = False

WORKSPACE_BYTES = 256 << 20  # bound on the backward's dZ chunk


def _tile_config(rows: int, vocab: int, hidden: int, interpret: bool):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) — small tiles under the interpreter."""
    if interpret:
        return 16, 32, 32, 1, 1
    return 64, 128, 64, 8, 3  # untuned defaults for Hopper/Ampere; see the GPU benchmark issue


if HAVE_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, stride_h, stride_w, offs_m, offs_v, mask_m, mask_v, H,
                    inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            h = tl.load(h_ptr + offs_m[:, None] * stride_h + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        tanh = acc  # placeholder when soft-capping is off
        if HAS_SOFTCAP:
            tanh = _tanh(acc / softcap)
            acc = softcap * tanh
        return acc * inv_temp, tanh

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, ref_h_ptr, ref_w_ptr, targets_ptr,
                        max_ptr, sum_ptr, label_ptr,
                        M, V, H, stride_h, stride_w, stride_rh, stride_rw,
                        vocab_per_split, n_splits, inv_temp, softcap,
                        HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_split = tl.program_id(1)
        pid_model = tl.program_id(2)  # 0 = policy, 1 = reference
        if pid_model == 0:
            hp = h_ptr
            wp = w_ptr
            sh = stride_h
            sw = stride_w
        else:
            hp = ref_h_ptr
            wp = ref_w_ptr
            sh = stride_rh
            sw = stride_rw
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        targets = tl.load(targets_ptr + offs_m, mask=mask_m, other=0)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        label_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v_start = pid_split * vocab_per_split
        v_end = tl.minimum(v_start + vocab_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            logits, _ = _logit_tile(hp, wp, sh, sw, offs_m, offs_v, mask_m, mask_v, H, inv_temp, softcap,
                                    HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
            logits = tl.where(mask_v[None, :], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            is_label = offs_v[None, :] == targets[:, None]
            label_logit += tl.sum(tl.where(is_label, logits, 0.0), axis=1)
        out = (pid_model * n_splits + pid_split) * M + offs_m
        tl.store(max_ptr + out, run_max, mask=mask_m)
        tl.store(sum_ptr + out, run_sum, mask=mask_m)
        tl.store(label_ptr + out, label_logit, mask=mask_m)

    @triton.jit
    def _grad_logits_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, grad_ptr, out_ptr,
                            M, V, H, stride_h, stride_w, stride_out, inv_temp, softcap,
                            HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_m = offs_m < M
        mask_v = offs_v < V
        logits, tanh = _logit_tile(h_ptr, w_ptr, stride_h, stride_w, offs_m, offs_v, mask_m, mask_v, H,
                                   inv_temp, softcap, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, IEEE)
        targets = tl.load(targets_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
        probs = tl.exp(logits - lse[:, None])
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        dz = (onehot - probs) * (g * inv_temp)[:, None]
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)
        tl.store(out_ptr + offs_m[:, None] * stride_out + offs_v[None, :], dz.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_v[None, :])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forward(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap):
    """Returns (policy logps [M], policy lse [M], reference logps [M] or None), all fp32."""
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if ref_hidden is not None and (ref_hidden.dtype != hidden.dtype or ref_weight.dtype != weight.dtype
                                   or ref_hidden.shape != hidden.shape):
        # One launch needs one element type and hidden size; otherwise score the reference apart.
        logps, lse, _ = _forward(hidden, weight, None, None, targets, temperature, softcap)
        return logps, lse, _forward(ref_hidden, ref_weight, None, None, targets, temperature, softcap)[0]
    n_models = 1 if ref_hidden is None else 2
    if ref_hidden is None:
        ref_hidden, ref_weight = hidden, weight
    block_m, block_v, block_k, num_warps, num_stages = _tile_config(rows, vocab, hidden_size, _interpreting())
    row_blocks = triton.cdiv(rows, block_m)
    # Split the vocabulary so that there are enough programs to fill the GPU.
    target_programs = 4 if _interpreting() else 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    n_splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(target_programs, row_blocks * n_models)))
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), block_v) * block_v
    n_splits = triton.cdiv(vocab, vocab_per_split)  # every split holds at least one column
    stats = torch.empty((3, n_models, n_splits, rows), dtype=torch.float32, device=hidden.device)
    grid = (row_blocks, n_splits, n_models)
    _forward_kernel[grid](
        hidden, weight, ref_hidden, ref_weight, targets, stats[0], stats[1], stats[2],
        rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
        vocab_per_split, n_splits, 1.0 / temperature, 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    split_max, split_sum, split_label = stats
    top = split_max.amax(dim=1)  # [models, M]
    lse = top + torch.log((split_sum * torch.exp(split_max - top[:, None])).sum(dim=1))
    logps = split_label.sum(dim=1) - lse
    return logps[0], lse[0], (logps[1] if n_models == 2 else None)


def _backward(hidden, weight, targets, lse, grad_logps, temperature, softcap, need_hidden, need_weight):
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    block_m, block_v, block_k, num_warps, num_stages = _tile_config(rows, vocab, hidden_size, _interpreting())
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    chunk = max(block_m, min(rows, WORKSPACE_BYTES // (vocab * hidden.element_size())) // block_m * block_m)
    workspace = torch.empty((min(chunk, rows), vocab), dtype=hidden.dtype, device=hidden.device)
    multi_chunk = chunk < rows
    grad_weight = None
    if need_weight and multi_chunk:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_logps = grad_logps.float().contiguous()
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h = hidden[start:end]
        dz = workspace[: end - start]
        grid = (triton.cdiv(end - start, block_m), triton.cdiv(vocab, block_v))
        _grad_logits_kernel[grid](
            h, weight, targets[start:end], lse[start:end], grad_logps[start:end], dz,
            end - start, vocab, hidden_size, h.stride(0), weight.stride(0), dz.stride(0),
            1.0 / temperature, 1.0 if softcap is None else float(softcap),
            HAS_SOFTCAP=softcap is not None, IEEE=hidden.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )
        if need_hidden:
            torch.mm(dz, weight, out=grad_hidden[start:end])
        if need_weight:
            if multi_chunk and dz.dtype == torch.float32:
                grad_weight.addmm_(dz.T, h)  # in place: no [V, H] temporary per chunk
            elif multi_chunk:  # bf16/fp16: an fp32 accumulator; per-chunk temporary (to tune on GPU)
                grad_weight += (dz.T @ h).float()
            else:
                grad_weight = dz.T @ h
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


class TritonTokenLogps(torch.autograd.Function):
    """(policy logps [M], reference logps [M] or empty) for M scored rows; grads for the policy only."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap):
        logps, lse, ref_logps = _forward(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.config = (temperature, softcap)
        if ref_logps is None:
            ref_logps = logps.new_empty(0)
        ctx.mark_non_differentiable(ref_logps)
        return logps, ref_logps

    @staticmethod
    def backward(ctx, grad_logps, _grad_ref):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, softcap = ctx.config
        grad_hidden, grad_weight = _backward(hidden, weight, targets, lse, grad_logps, temperature, softcap,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None, None, None


def triton_token_logps(hidden, weight, targets, ref_hidden=None, ref_weight=None, temperature=1.0, softcap=None):
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the 'triton' package (pip install triton); use impl='torch' instead")
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach().contiguous(), ref_weight.detach().contiguous()
    if hidden.requires_grad or weight.requires_grad:
        logps, ref_logps = TritonTokenLogps.apply(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap)
    else:
        logps, _, ref_logps = _forward(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap)
    return logps, (ref_logps if ref_hidden is not None else None)
