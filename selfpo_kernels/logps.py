"""Triton token log-likelihoods from hidden states and lm_head weights, policy and reference fused.

Forward (one launch for policy *and* reference): grid = (vocab splits, row blocks, models), the
vocabulary split the fastest axis, so the programs resident together share a few row blocks of
`h` and a few `W` slices, a working set that stays in L2. Each program streams its vocabulary
range in BLOCK_V tiles, computes the logit tile `h[BLOCK_M, H] @ W[BLOCK_V, H]^T` with fp32
accumulation, and folds it into an online log-sum-exp (running max and sum). The label logit is
gathered once per row by the split-0 program (`h . W[label]`), not searched for in every tile.
The per-split statistics are merged on the host (a [models, splits, M] tensor). `[N, V]` is
never built. Rows at or past `count` (a device scalar) are skipped, so the caller can pass rows
sorted scored-first without reading the number of scored rows on the host.

Backward (policy only, the reference gets no gradient): for a block of rows x vocabulary columns
bounded by `WORKSPACE_BYTES`, a Triton kernel recomputes each logit tile and writes
`g * (onehot - softmax)` (chained through temperature and soft-cap) into the workspace; two cuBLAS
GEMMs then give the block's share of dH = dZ @ W and dW = dZ^T @ H. The blocks split the longer of
rows and vocabulary, so the gradient accumulated (in fp32) across blocks is the smaller one (see
`backward_plan`). The kernel's 1-D grid is swizzled in groups of GROUP_M row blocks, for L2 reuse.

bf16/fp16 inputs are multiplied with fp32 accumulation; fp32 inputs use tf32x3 tensor-core dots
(`FP32_DOT`). Address arithmetic is int64: V*H passes 2^31 near Llama-405B's head, N*H at long
contexts. Every tile configuration below is compiled for sm_90 and sm_80 by
`python -m selfpo_kernels.compile_check` (registers, spills, MMA instructions).
"""

from __future__ import annotations

import os

import torch

from .torch_ref import add_matmul_fp32_

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAVE_TRITON = False

WORKSPACE_BYTES = 256 << 20  # bound on the backward's dZ chunk
VOCAB_SPLITS = 16  # forward: at least this many vocabulary splits per row block (fastest grid axis)
GROUP_M = 8  # backward: row blocks per swizzle group
# fp32 inputs: three tf32 tensor-core products (hi*hi + hi*lo + lo*hi), within the float64-oracle rule
# in emulation (tests/test_kernels_launch.py); "ieee" uses FMA and spills on sm_80 (compile check).
FP32_DOT = "tf32x3"

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) by (arch, kernel, 16-bit inputs?). Chosen with
# `python -m selfpo_kernels.compile_check` (no spills; wgmma on sm_90); timing them needs a GPU.
TILES = {
    (90, "fwd", True): (128, 128, 64, 8, 3),
    (90, "bwd", True): (128, 128, 64, 8, 3),
    (80, "fwd", True): (64, 128, 64, 8, 3),
    (80, "bwd", True): (64, 128, 64, 8, 3),
    (90, "fwd", False): (128, 128, 32, 8, 3),
    (90, "bwd", False): (64, 128, 32, 8, 3),
    (80, "fwd", False): (64, 64, 32, 4, 3),
    (80, "bwd", False): (64, 64, 32, 4, 3),
}
INTERPRETER_TILE = (16, 32, 32, 1, 1)


def tile_config(arch: int | None, kind: str, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """The TILES entry for a compute capability: the sm_90 row on Hopper (9.x), the sm_80 row (48 KB of
    shared memory at most) elsewhere, Blackwell included, until tiles are checked there; None = interpreter."""
    if arch is None:
        return INTERPRETER_TILE
    return TILES[(90 if 90 <= arch < 100 else 80, kind, dtype != torch.float32)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_arch(device: torch.device) -> int | None:
    if device.type != "cuda" or _interpreting():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


if HAVE_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _logit_tile(
        h_ptr,
        w_ptr,
        stride_h,
        stride_w,
        offs_m,
        offs_v,
        mask_m,
        mask_v,
        H,
        inv_temp,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # int64 row offsets: offs * stride passes 2^31 for large V*H or N*H
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            h = tl.load(h_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        tanh = acc  # placeholder when soft-capping is off
        if HAS_SOFTCAP:
            tanh = _tanh(acc / softcap)
            acc = softcap * tanh
        return acc * inv_temp, tanh

    @triton.jit
    def _forward_kernel(
        h_ptr,
        w_ptr,
        ref_h_ptr,
        ref_w_ptr,
        targets_ptr,
        count_ptr,
        max_ptr,
        sum_ptr,
        label_ptr,
        M,
        V,
        H,
        stride_h,
        stride_w,
        stride_rh,
        stride_rw,
        vocab_per_split,
        n_splits,
        inv_temp,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_split = tl.program_id(0)  # fastest axis: neighbouring programs share the row block
        pid_m = tl.program_id(1)
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
        count = tl.load(count_ptr)  # rows >= count are not scored
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v_start = pid_split * vocab_per_split
        v_end = tl.minimum(v_start + vocab_per_split, V)
        if pid_m * BLOCK_M >= count:
            v_end = v_start  # an unscored row block: no tiles
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            logits, _ = _logit_tile(
                hp,
                wp,
                sh,
                sw,
                offs_m,
                offs_v,
                mask_m,
                mask_v,
                H,
                inv_temp,
                softcap,
                HAS_SOFTCAP,
                BLOCK_M,
                BLOCK_V,
                BLOCK_K,
                DOT_PRECISION,
            )
            logits = tl.where(mask_v[None, :], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
        out = (pid_model * n_splits + pid_split) * M + offs_m
        tl.store(max_ptr + out, run_max, mask=offs_m < M)
        tl.store(sum_ptr + out, run_sum, mask=offs_m < M)
        if pid_split == 0:  # the label logit, once per row: h . W[label] in fp32
            targets = tl.load(targets_ptr + offs_m, mask=mask_m, other=0)
            h_rows = hp + offs_m.to(tl.int64)[:, None] * sh
            w_rows = wp + targets.to(tl.int64)[:, None] * sw
            label = tl.zeros((BLOCK_M,), dtype=tl.float32)
            h_end = tl.where(pid_m * BLOCK_M < count, H, 0)
            for k0 in range(0, h_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = mask_m[:, None] & (offs_k < H)[None, :]
                h = tl.load(h_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                label += tl.sum(h * w, axis=1)
            if HAS_SOFTCAP:
                label = softcap * _tanh(label / softcap)
            tl.store(label_ptr + pid_model * M + offs_m, label * inv_temp, mask=offs_m < M)

    @triton.jit
    def _grad_logits_kernel(
        h_ptr,
        w_ptr,
        targets_ptr,
        lse_ptr,
        grad_ptr,
        out_ptr,
        M,
        V,
        H,
        stride_h,
        stride_w,
        stride_out,
        inv_temp,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # 1-D grid swizzled in groups of GROUP row blocks: programs resident together cover
        # GROUP row blocks x (#SMs / GROUP) vocab tiles, so their h and W tiles stay in L2.
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP * tl.cdiv(V, BLOCK_V)
        first_m = (pid // per_group) * GROUP
        group_size = tl.minimum(blocks_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_m = offs_m < M
        mask_v = offs_v < V
        logits, tanh = _logit_tile(
            h_ptr,
            w_ptr,
            stride_h,
            stride_w,
            offs_m,
            offs_v,
            mask_m,
            mask_v,
            H,
            inv_temp,
            softcap,
            HAS_SOFTCAP,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
            DOT_PRECISION,
        )
        targets = tl.load(targets_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
        probs = tl.exp(logits - lse[:, None])
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        dz = (onehot - probs) * (g * inv_temp)[:, None]
        if HAS_SOFTCAP:
            dz = dz * (1.0 - tanh * tanh)
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_v[None, :]
        tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_v[None, :])


def forward_plan(rows: int, vocab: int, n_models: int, dtype: torch.dtype, arch: int | None, sms: int) -> dict:
    """Tile, vocabulary split and grid of the forward launch (shared with selfpo_kernels.compile_check)."""
    block_m, block_v, block_k, num_warps, num_stages = tile_config(arch, "fwd", dtype)
    row_blocks = triton.cdiv(rows, block_m)
    # Enough splits to fill the GPU (4 programs per SM), and at least VOCAB_SPLITS.
    wanted = max(VOCAB_SPLITS, triton.cdiv(4 * sms, row_blocks * n_models))
    n_splits = max(1, min(triton.cdiv(vocab, block_v), wanted))
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), block_v) * block_v
    n_splits = triton.cdiv(vocab, vocab_per_split)  # every split holds at least one column
    return dict(
        grid=(n_splits, row_blocks, n_models),
        n_splits=n_splits,
        vocab_per_split=vocab_per_split,
        meta=dict(
            BLOCK_M=block_m,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            num_warps=num_warps,
            num_stages=num_stages,
            DOT_PRECISION=_dot_precision(dtype),
        ),
    )


def forward_args(
    plan, hidden, weight, ref_hidden, ref_weight, targets, count, stat_max, stat_sum, label, temperature, softcap
) -> list:
    rows, hidden_size = hidden.shape
    return [
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        targets,
        count,
        stat_max,
        stat_sum,
        label,
        rows,
        weight.shape[0],
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        ref_hidden.stride(0),
        ref_weight.stride(0),
        plan["vocab_per_split"],
        plan["n_splits"],
        1.0 / temperature,
        1.0 if softcap is None else float(softcap),
    ]


def backward_plan(rows: int, vocab: int, dtype: torch.dtype, arch: int | None, workspace_bytes: int) -> dict:
    """Tile and workspace block (chunk_rows x chunk_vocab) of the backward. When dZ [rows, vocab] does
    not fit the workspace it is split along the longer side, so that the gradient accumulated across
    chunks (in fp32, read and written once per chunk) is the smaller one: along the vocabulary when
    rows < vocab (dH [rows, H] accumulates, each dW slice is written once), else along the rows."""
    block_m, block_v, block_k, num_warps, num_stages = tile_config(arch, "bwd", dtype)
    elements = workspace_bytes // dtype.itemsize
    chunk_rows, chunk_vocab = max(rows, 1), vocab
    if rows * vocab > elements and rows < vocab:
        chunk_vocab = min(vocab, max(block_v, elements // rows // block_v * block_v))
    elif rows * vocab > elements:
        chunk_rows = min(rows, max(block_m, elements // vocab // block_m * block_m))
    return dict(
        chunk_rows=chunk_rows,
        chunk_vocab=chunk_vocab,
        block_m=block_m,
        block_v=block_v,
        meta=dict(
            BLOCK_M=block_m,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            num_warps=num_warps,
            num_stages=num_stages,
            DOT_PRECISION=_dot_precision(dtype),
            GROUP=GROUP_M,
        ),
    )


def backward_grid(plan, rows: int, vocab: int) -> tuple[int]:
    return (triton.cdiv(rows, plan["block_m"]) * triton.cdiv(vocab, plan["block_v"]),)


def backward_args(hidden, weight, targets, lse, grad, out, temperature, softcap) -> list:
    rows, hidden_size = hidden.shape
    return [
        hidden,
        weight,
        targets,
        lse,
        grad,
        out,
        rows,
        weight.shape[0],
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        out.stride(0),
        1.0 / temperature,
        1.0 if softcap is None else float(softcap),
    ]


def _forward(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap, count):
    """Returns (policy logps [M], policy lse [M], reference logps [M] or None), all fp32; 0 at rows >= count."""
    rows = hidden.shape[0]
    if ref_hidden is not None and (
        ref_hidden.dtype != hidden.dtype or ref_weight.dtype != weight.dtype or ref_hidden.shape != hidden.shape
    ):
        # One launch needs one element type and hidden size; otherwise score the reference apart.
        logps, lse, _ = _forward(hidden, weight, None, None, targets, temperature, softcap, count)
        return logps, lse, _forward(ref_hidden, ref_weight, None, None, targets, temperature, softcap, count)[0]
    n_models = 1 if ref_hidden is None else 2
    if ref_hidden is None:
        ref_hidden, ref_weight = hidden, weight
    arch = device_arch(hidden.device)
    sms = 1 if arch is None else torch.cuda.get_device_properties(hidden.device).multi_processor_count
    plan = forward_plan(rows, weight.shape[0], n_models, hidden.dtype, arch, sms)
    stats = torch.empty((2, n_models, plan["n_splits"], rows), dtype=torch.float32, device=hidden.device)
    label = torch.empty((n_models, rows), dtype=torch.float32, device=hidden.device)
    args = forward_args(
        plan, hidden, weight, ref_hidden, ref_weight, targets, count, stats[0], stats[1], label, temperature, softcap
    )
    _forward_kernel[plan["grid"]](*args, HAS_SOFTCAP=softcap is not None, **plan["meta"])
    split_max, split_sum = stats
    top = split_max.amax(dim=1)  # [models, M]
    lse = top + torch.log((split_sum * torch.exp(split_max - top[:, None])).sum(dim=1))
    scored = torch.arange(rows, device=hidden.device) < count
    logps = torch.where(scored, label - lse, 0.0)  # unscored rows hold no statistics
    lse = torch.where(scored, lse, 0.0)
    return logps[0], lse[0], (logps[1] if n_models == 2 else None)


def _backward(
    hidden, weight, targets, lse, grad_logps, temperature, softcap, need_hidden, need_weight, rows, workspace_bytes=None
):
    """Gradients for the first `rows` rows (the scored ones); later rows get a zero gradient."""
    vocab = weight.shape[0]
    plan = backward_plan(
        rows,
        vocab,
        hidden.dtype,
        device_arch(hidden.device),
        WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes,
    )
    step_rows, step_vocab = plan["chunk_rows"], plan["chunk_vocab"]
    by_rows, by_vocab = step_rows < rows, step_vocab < vocab
    # A gradient summed over chunks accumulates in fp32; one written once per chunk stays in its dtype.
    grad_hidden = grad_weight = None
    if need_hidden:  # unscored rows (past `rows`) keep a zero gradient
        grad_hidden = torch.zeros_like(hidden)
        hidden_acc = None
        if by_vocab:
            hidden_acc = torch.zeros((rows, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if by_rows else weight.dtype, device=weight.device)
    workspace = torch.empty((min(step_rows, rows), step_vocab), dtype=hidden.dtype, device=hidden.device)
    grad_logps = grad_logps.float().contiguous()
    for start in range(0, rows, step_rows):
        end = min(start + step_rows, rows)
        h = hidden[start:end]
        for v0 in range(0, vocab, step_vocab):
            v1 = min(v0 + step_vocab, vocab)
            w = weight[v0:v1]
            dz = workspace[: end - start, : v1 - v0]
            args = backward_args(
                h, w, targets[start:end] - v0, lse[start:end], grad_logps[start:end], dz, temperature, softcap
            )
            _grad_logits_kernel[backward_grid(plan, end - start, v1 - v0)](
                *args, HAS_SOFTCAP=softcap is not None, **plan["meta"]
            )
            if need_hidden and by_vocab:
                add_matmul_fp32_(hidden_acc[start:end], dz, w)
            elif need_hidden:
                torch.mm(dz, w, out=grad_hidden[start:end])
            if need_weight and by_rows:
                add_matmul_fp32_(grad_weight[v0:v1], dz.T, h)
            elif need_weight:
                torch.mm(dz.T, h, out=grad_weight[v0:v1])
    if need_hidden and by_vocab:
        grad_hidden[:rows] = hidden_acc
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


class _HostCount:
    """The number of scored rows, copied to the host without blocking during the forward and read in
    backward, by when the GPU has normally long passed that copy (no synchronisation in the forward)."""

    def __init__(self, count: torch.Tensor):
        self.count, self.event = count, None
        if count.is_cuda:
            self.count = torch.empty((), dtype=count.dtype, pin_memory=True)
            self.count.copy_(count, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def get(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.count)


def tracing(tensor: torch.Tensor) -> bool:
    """True under FakeTensorMode (fake tensors carry no values) or while torch.compile traces: no host reads,
    no pinned copies or events, no kernel launches outside the custom ops' real implementations."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import is_fake

    # is_fake also sees through the functional wrappers of AOT autograd's tracing
    return torch.compiler.is_compiling() or is_fake(tensor) or detect_fake_mode(tensor) is not None


# The kernels as torch.library custom ops: opaque to torch.compile and FakeTensorMode, which see only the
# shapes given by the register_fake functions below (a Triton launch cannot run on fake tensors).


@torch.library.custom_op("selfpo::triton_token_logps_fwd", mutates_args=())
def _forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    targets: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    softcap: float | None,
    workspace_bytes: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy logps [M], policy lse [M], reference logps [M] or [0]); `workspace_bytes` is the backward's."""
    logps, lse, ref_logps = _forward(hidden, weight, ref_hidden, ref_weight, targets, temperature, softcap, count)
    if ref_logps is None:
        return logps, lse, logps.new_empty(0)
    return logps.clone(), lse, ref_logps.clone()  # views of one [2, M] buffer: outputs must not share storage


@_forward_op.register_fake
def _(hidden, weight, ref_hidden, ref_weight, targets, count, temperature, softcap, workspace_bytes):
    _check_devices("triton_token_logps", hidden, weight, ref_hidden, ref_weight, targets, count)
    rows = hidden.shape[0]
    ref_rows = 0 if ref_hidden is None else rows
    return (
        hidden.new_empty(rows, dtype=torch.float32),
        hidden.new_empty(rows, dtype=torch.float32),
        hidden.new_empty(ref_rows, dtype=torch.float32),
    )


@torch.library.custom_op("selfpo::triton_token_logps_bwd", mutates_args=())
def _backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    softcap: float | None,
    rows: int,
    need_hidden: bool,
    need_weight: bool,
    workspace_bytes: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad hidden, grad weight), each [0] when not needed. rows < 0: read `count` here (one host read; the
    eager path passes the count copied to the host during the forward)."""
    rows = int(count) if rows < 0 else rows
    grad_hidden, grad_weight = _backward(
        hidden, weight, targets, lse, grad_logps, temperature, softcap, need_hidden, need_weight, rows, workspace_bytes
    )
    return (
        hidden.new_empty(0) if grad_hidden is None else grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight,
    )


@_backward_op.register_fake
def _(
    hidden,
    weight,
    targets,
    lse,
    grad_logps,
    count,
    temperature,
    softcap,
    rows,
    need_hidden,
    need_weight,
    workspace_bytes,
):
    _check_devices("triton_token_logps backward", hidden, weight, targets, lse, grad_logps, count)
    # the transient workspace (and fp32 accumulator) as the real backward allocates it, so memory trackers see it
    plan = backward_plan(
        hidden.shape[0],
        weight.shape[0],
        hidden.dtype,
        90,
        WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes,
    )
    workspace = hidden.new_empty((plan["chunk_rows"], plan["chunk_vocab"]))
    accumulator = (
        hidden.new_empty(hidden.shape, dtype=torch.float32)
        if plan["chunk_vocab"] < weight.shape[0]
        else weight.new_empty(weight.shape, dtype=torch.float32)
        if plan["chunk_rows"] < hidden.shape[0]
        else None
    )
    del workspace, accumulator
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
    )


def _check_devices(name: str, *tensors):
    """Every input on one device, as a kernel launch needs (a fake tensor on the wrong device fails here)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{name}: inputs are on different devices {sorted(map(str, devices))}")


def _setup_backward(ctx, inputs, output):
    hidden, weight, _, _, targets, count, temperature, softcap, workspace_bytes = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1], count)
    host_count = None if tracing(count) else _HostCount(count)
    ctx.config = (temperature, softcap, host_count, workspace_bytes)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_formula(ctx, grad_logps, _grad_lse, _grad_ref):
    hidden, weight, targets, lse, count = ctx.saved_tensors
    temperature, softcap, host_count, workspace_bytes = ctx.config
    rows = -1 if host_count is None else host_count.get()
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden, grad_weight = _backward_op(
        hidden,
        weight,
        targets,
        lse,
        grad_logps,
        count,
        temperature,
        softcap,
        rows,
        need_hidden,
        need_weight,
        workspace_bytes,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward_formula, setup_context=_setup_backward)


def triton_token_logps(
    hidden,
    weight,
    targets,
    ref_hidden=None,
    ref_weight=None,
    temperature=1.0,
    softcap=None,
    count=None,
    workspace_bytes=None,
):
    """Token log-probs of M rows; with `count` (an int64 device scalar) only the first `count` rows are
    scored and the others get 0, so the caller need not know the number of scored rows on the host."""
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the 'triton' package (pip install triton); use impl='torch' instead")
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if count is None:
        count = torch.tensor(hidden.shape[0], device=hidden.device)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach().contiguous(), ref_weight.detach().contiguous()
    softcap = None if softcap is None else float(softcap)
    logps, _, ref_logps = _forward_op(
        hidden, weight, ref_hidden, ref_weight, targets, count, float(temperature), softcap, workspace_bytes
    )
    return logps, (ref_logps if ref_hidden is not None else None)
