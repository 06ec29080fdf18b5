"""Pure-PyTorch token log-likelihoods from hidden states and an lm_head weight.

Two implementations:
* `chunked_token_logps` — the CPU path (and the fallback where Triton is absent): an
  autograd.Function that walks the scored tokens in chunks and recomputes each chunk's
  logits in backward, so extra memory is bounded by `chunk x V`, never `N x V`.
* `naive_token_logps` — `logits -> log_softmax -> gather` with autograd, in any dtype; the
  test oracle in float64 and the "naive" row of the benchmark.

Logit transform shared by every path: z = h @ W^T, then Gemma-2
soft-capping `cap * tanh(z / cap)` when `softcap` is set, then division by `temperature`.
"""

from __future__ import annotations

import torch

# Target size of one chunk's fp32 logits; the backward holds about two such buffers. Chunks must
# be tall: the dW GEMM's inner dimension is the chunk's row count (131 rows at 4M/32000 ran 3x
# slower than one big GEMM on CPU).
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16M floats = 64 MB


def transform_logits(logits: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def naive_token_logps(hidden, weight, targets, temperature=1.0, softcap=None, dtype=None):
    """log softmax(transform(hidden @ weight^T))[targets]; `dtype` upcasts first (oracle: float64)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logits = transform_logits(hidden @ weight.T, temperature, softcap)
    logits = logits.float() if dtype is None else logits
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def add_matmul_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. bf16/fp16 on CUDA: one GEMM accumulating into acc (`addmm(out_dtype=float32)`,
    torch >= 2.8), no [V, H] low-precision temporary; on CPU the factors cast to fp32 (temporaries of their size,
    not of acc's); older torch on CUDA via a temporary product."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        acc += (a @ b).float()


def _addmm_has_out_dtype() -> bool:
    try:  # the meta kernel checks the signature without a GPU
        acc = torch.empty(2, 2, device="meta")
        x = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


_ADDMM_OUT_DTYPE = _addmm_has_out_dtype()


def _chunk_rows(num_rows: int, vocab: int, chunk_elements: int) -> int:
    return max(1, min(num_rows, chunk_elements // max(vocab, 1)))


@torch.no_grad()
def _forward_chunks(hidden, weight, targets, temperature, softcap, chunk_elements):
    rows = hidden.shape[0]
    logps = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(rows, weight.shape[0], chunk_elements)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        logits = transform_logits((hidden[start:end] @ weight.T).float(), temperature, softcap)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - chunk_lse
        lse[start:end] = chunk_lse
    return logps, lse


def _backward_chunks(
    hidden, weight, targets, lse, grad_logps, temperature, softcap, chunk_elements, need_hidden, need_weight
):
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # dW accumulates over chunks: keep it in fp32 so low-precision weights do not lose sums.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    scale = grad_logps.float() / temperature
    rows = hidden.shape[0]
    step = _chunk_rows(rows, weight.shape[0], chunk_elements)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        h = hidden[start:end]
        logits = (h @ weight.T).float()
        # d logp / d z = onehot - softmax(z), chained through temperature and soft-cap.
        if softcap is not None:
            tanh = torch.tanh(logits / softcap)
            logits = softcap * tanh
        if temperature != 1.0:
            logits /= temperature
        grad = logits.sub_(lse[start:end, None]).exp_().mul_(-scale[start:end, None])  # in place
        idx = torch.arange(end - start, device=h.device)
        grad[idx, targets[start:end]] += scale[start:end]
        if softcap is not None:
            grad *= 1.0 - tanh * tanh
        grad = grad.to(hidden.dtype)
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if need_weight:
            add_matmul_fp32_(grad_weight, grad.T, h)
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


# The chunked path as torch.library custom ops, so that it traces under FakeTensorMode and torch.compile
# (which see the register_fake shapes only) exactly as the Triton path does.


@torch.library.custom_op("selfpo::chunked_token_logps_fwd", mutates_args=())
def _forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token logps [M], lse [M]), fp32."""
    return _forward_chunks(hidden, weight, targets, temperature, softcap, chunk_elements)


@_forward_op.register_fake
def _(hidden, weight, targets, temperature, softcap, chunk_elements):
    rows = hidden.shape[0]
    # one chunk's fp32 logits, the transient the real forward holds
    chunk = hidden.new_empty((_chunk_rows(rows, weight.shape[0], chunk_elements), weight.shape[0]), dtype=torch.float32)
    del chunk
    return hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("selfpo::chunked_token_logps_bwd", mutates_args=())
def _backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor,
    temperature: float,
    softcap: float | None,
    chunk_elements: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad hidden, grad weight), each [0] when not needed."""
    grad_hidden, grad_weight = _backward_chunks(
        hidden, weight, targets, lse, grad_logps, temperature, softcap, chunk_elements, need_hidden, need_weight
    )
    return (
        hidden.new_empty(0) if grad_hidden is None else grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight,
    )


@_backward_op.register_fake
def _(hidden, weight, targets, lse, grad_logps, temperature, softcap, chunk_elements, need_hidden, need_weight):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
    )


def _setup_backward(ctx, inputs, output):
    hidden, weight, targets, temperature, softcap, chunk_elements = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.config = (temperature, softcap, chunk_elements)
    ctx.mark_non_differentiable(output[1])


def _backward_formula(ctx, grad_logps, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden, grad_weight = _backward_op(
        hidden, weight, targets, lse, grad_logps, *ctx.config, need_hidden, need_weight
    )
    return grad_hidden if need_hidden else None, grad_weight if need_weight else None, None, None, None, None


_forward_op.register_autograd(_backward_formula, setup_context=_setup_backward)


def chunked_token_logps(hidden, weight, targets, temperature=1.0, softcap=None, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """Token log-likelihoods [M] fp32 for M scored rows; gradients w.r.t. hidden and weight (chunks recomputed)."""
    softcap = None if softcap is None else float(softcap)
    return _forward_op(hidden, weight, targets, float(temperature), softcap, int(chunk_elements))[0]
