"""The package's one engine: the scored tokens in chunks, each chunk's logits computed once into a bounded workspace.

Logits are softcap * tanh((h W^T + b) / softcap) / temperature, in fp32 from products in the hidden states' dtype;
`[tokens, vocab]` is never built. The engine serves both ops:

* the pair step (`pair_loss_from_hidden`). A preference step never needs per-token log-probs for their own sake: as
  soon as a pair's sequence log-probs are known, so is the upstream gradient of each of its tokens. So the chunks hold
  whole pairs, and for each chunk:
  1. reference logits -> log-sum-exp -> reference sequence log-probs (no gradient), in the workspace;
  2. policy logits, computed ONCE into the same workspace -> log-sum-exp and sequence log-probs;
  3. the chunk's pair losses by the caller's `loss_fn`, and their gradient g w.r.t. the policy's sequence log-probs
     by autograd on those few small tensors;
  4. dZ = g / temperature * (onehot - softmax) (times 1 - tanh^2 under a soft-cap), in place, from the stored logits;
  5. dH = dZ W and dW += dZ^T H (skipped for a frozen head, as under LoRA), dbias += sum dZ.
  Policy: 6 N H V FLOPs (4 with a frozen head) + the reference's 2 N H V, against 10 N H V for log-probs with
  recompute followed by the loss. A single pair with more scored tokens than the workspace holds is split, and its
  sub-chunks' logits are recomputed in step 4 (a fourth GEMM for that pair only). The op is an autograd Function whose
  forward computes the gradients; its backward scales them by the upstream gradient of the per-pair losses, which must
  be the same for every pair (`losses.sum() * c`, `losses.mean()`), since dW is summed over pairs before it is known.
* token log-probs (`sequence_logps`, and the pair step under tracing): steps 1-2 per chunk of tokens, as a custom op;
  its backward, a second op, recomputes each chunk's logits for the given d loss / d log-probs (8 N H V with them).

Two back ends behind `impl=`: "torch" (an fp32 workspace; `torch_ref.TorchBackend`, the CPU path) and "triton"
(cuBLAS logits into a workspace in the input dtype, log-sum-exp and dZ by two memory-bound Triton kernels, dZ written
over the logits; compiled ahead of time by `python -m selfpo_kernels.compile_check`, and checked against float64 on
first use per CUDA device and dtype by `self_check`).

Host reads: the label range check and the scored tokens' positions (the chunk plan), once per pass. Under
FakeTensorMode or torch.compile (no values to read) the pair step is the two token ops with `loss_fn` on the whole
batch between them (`_traced_pass`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from .losses import pair_loss
from .torch_ref import _ADDMM_OUT_DTYPE, TorchBackend, add_matmul_fp32_

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAVE_TRITON = False

IMPLS = ("auto", "triton", "torch")
# Bound on the workspace, one chunk's logits: fp32 on the torch path (128 MB = 1048 rows at V = 32000: tall enough
# for the dW GEMM, whose inner dimension is the chunk's row count), the input dtype on the Triton path (256 MB = 1046
# rows at V = 128256 bf16: a pair of two 512-token sequences). A pair with more scored tokens is recomputed.
WORKSPACE_BYTES = {"torch": 128 << 20, "triton": 256 << 20}
STATS_BLOCK_V, GRAD_BLOCK_V, NUM_WARPS = 2048, 2048, 8  # the memory-bound kernels' tile (compile-checked)
INTERPRETER_BLOCK_V = 32

LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a pass takes besides its tensors; the custom ops take its fields, in this order."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100
    impl: str = "torch"  # resolved: "torch" or "triton"
    workspace_bytes: int | None = None  # bound on the workspace (default: WORKSPACE_BYTES[impl])
    accum_dtype: torch.dtype | None = None  # what dW and dbias are summed in over chunks (default fp32)

    def fields(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


class Head(NamedTuple):
    hidden: torch.Tensor  # [S, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> KERNELS_IMPL if set, else 'triton' on CUDA with Triton installed, else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"selfpo_kernels: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("KERNELS_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"environment variable KERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if (device.type == "cuda" and HAVE_TRITON) else "torch"
    if impl == "triton" and not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the 'triton' package (pip install triton); use impl='torch' instead")
    if impl == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device.type}); use impl='torch' on CPU, "
            "or set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter"
        )
    return impl


def make_config(hidden, temperature, softcap, ignore_index, impl, workspace_bytes=None, accum_dtype=None) -> Config:
    """The call's Config, its impl resolved; the Triton path's first use per CUDA device and dtype runs `self_check`."""
    impl = resolve_impl(impl, hidden.device)
    if impl == "triton" and _self_check_due(hidden.device) and not tracing(hidden):
        self_check(hidden.device, hidden.dtype)
    softcap = None if softcap is None else float(softcap)
    return Config(float(temperature), softcap, int(ignore_index), impl, workspace_bytes, accum_dtype)


def _dtypes_fit(hidden: torch.dtype, weight: torch.dtype) -> bool:
    return hidden == weight or (weight == torch.float32 and hidden in (torch.bfloat16, torch.float16))


def check_inputs(name, hidden, weight, labels, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, pairs=False):
    """One line naming the first bad argument of `sequence_logps` (pairs=False) or `pair_loss_from_hidden`."""
    rows = "2B" if pairs else "B"
    if hidden.dim() != 3 or (pairs and hidden.shape[0] % 2):
        layout = " (B chosen rows, then their B rejected rows)" if pairs else ""
        raise ValueError(f"{name}: 'hidden' must be [{rows}, T, H]{layout}, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{name}: 'weight' must be [V, H={hidden.shape[2]}], got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name}: 'labels' must be [{rows}, T]={tuple(hidden.shape[:2])}, an integer tensor, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError(f"{name}: pass both 'ref_hidden' and 'ref_weight', or neither")
    if ref_hidden is not None and ref_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"{name}: 'ref_hidden' must be [{rows}, T, H'] with {rows}, T = {tuple(hidden.shape[:2])}, "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_hidden is not None and ref_weight.shape != (weight.shape[0], ref_hidden.shape[2]):
        raise ValueError(
            f"{name}: 'ref_weight' must be [V={weight.shape[0]}, {ref_hidden.shape[2]}], got {tuple(ref_weight.shape)}"
        )
    for h, w, what in (
        (hidden, weight, "'hidden' and 'weight'"),
        (ref_hidden, ref_weight, "'ref_hidden' and 'ref_weight'"),
    ):
        if h is not None and not _dtypes_fit(h.dtype, w.dtype):
            raise ValueError(
                f"{name}: {what} must share a dtype, or the weight be an fp32 master of 16-bit hidden states; "
                f"got {h.dtype} and {w.dtype}"
            )
    for bias_name, b, w in (("bias", bias, weight), ("ref_bias", ref_bias, ref_weight)):
        if b is not None and (w is None or b.shape != (w.shape[0],)):
            raise ValueError(f"{name}: '{bias_name}' must be [V] next to its weight, got {tuple(b.shape)}")


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
    """Launch constants of the two kernels (shared with selfpo_kernels.compile_check)."""
    block = INTERPRETER_BLOCK_V if _interpreting() else (STATS_BLOCK_V if kind == "stats" else GRAD_BLOCK_V)
    meta = dict(BLOCK_V=block, HAS_BIAS=bias, HAS_SOFTCAP=softcap)
    if not _interpreting():
        meta["num_warps"] = NUM_WARPS
    return meta


def kernel_args(ws, bias, targets, lse, out, temperature, softcap) -> list:
    """The kernels' arguments; `out` is the label logits (stats) or g (grad)."""
    softcap = 1.0 if softcap is None else float(softcap)
    return [ws, ws if bias is None else bias, targets, lse, out, ws.shape[1], ws.stride(0), 1.0 / temperature, softcap]


def grad_grid(rows: int, vocab: int, meta: dict) -> tuple[int, int]:
    return rows, -(-vocab // meta["BLOCK_V"])


class _TritonBackend:
    """Workspace in the input dtype (the cuBLAS GEMM's output); two Triton kernels read it."""

    fp32_workspace = False

    def __init__(self, temperature, softcap):
        self.temperature, self.softcap = temperature, softcap

    def stats(self, ws, bias, targets, keep: bool):
        rows = ws.shape[0]
        lse = torch.empty(rows, dtype=torch.float32, device=ws.device)
        label = torch.empty(rows, dtype=torch.float32, device=ws.device)
        if rows:
            meta = kernel_meta("stats", bias is not None, self.softcap is not None)
            _pair_stats_kernel[(rows,)](
                *kernel_args(ws, bias, targets, lse, label, self.temperature, self.softcap), **meta
            )
        return label - lse, lse, True

    def recompute(self, ws, bias, lse):
        return True

    def grad(self, ws, bias, targets, lse, state, g):
        if ws.shape[0]:
            meta = kernel_meta("grad", bias is not None, self.softcap is not None)
            args = kernel_args(ws, bias, targets, lse, g.float().contiguous(), self.temperature, self.softcap)
            _pair_grad_kernel[grad_grid(ws.shape[0], ws.shape[1], meta)](*args, **meta)
        return ws


# ---------------------------------------------------------------------------------------------
# The engine: a plan of the scored tokens, chunk by chunk; the gradients summed over chunks.


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[:] = h @ w^T, one GEMM; an fp32 `out` from 16-bit inputs: fp32 output of the GEMM on CUDA
    (`mm(out_dtype=float32)`, torch >= 2.8), else through a temporary."""
    if out.dtype == h.dtype:
        return torch.mm(h, w.T, out=out)
    if h.is_cuda and out.dtype == torch.float32 and _ADDMM_OUT_DTYPE:
        return torch.mm(h, w.T, out_dtype=torch.float32, out=out)
    return out.copy_(h @ w.T)


def _compute(head: Head) -> Head:
    """The products run in the hidden states' dtype: a wider (fp32 master) weight is cast once, for this call only."""
    return head if head.weight.dtype == head.hidden.dtype else head._replace(weight=head.weight.to(head.hidden.dtype))


def add_sequence_sums_(sums: torch.Tensor, sequence: torch.Tensor, token_logps: torch.Tensor) -> torch.Tensor:
    """sums[sequence[i]] += token_logps[i], in float64, in token order: how both ops sum sequence log-probs.

    A margin is a difference of sums of hundreds of log-probs, and a serial fp32 sum rounds each partial sum
    (measured: 3x naive's error at 460 tokens); the callers round each float64 sum once, to fp32. The same token
    log-probs added in the same order give the same bits in both ops: a reference scored by `sequence_logps` and
    the pair step's policy, of the same weights, differ by exactly 0 (on CUDA, index_add_'s atomics may reorder
    the float64 additions, far below one fp32 rounding)."""
    return sums.index_add_(0, sequence, token_logps.double())


def sequence_sums(token_logps: torch.Tensor) -> torch.Tensor:
    """Per-row float64 sums of token log-probs [S, T] (0 where not scored, which adds nothing) by
    `add_sequence_sums_`, row by row in position order, as the pair step adds its scored tokens."""
    n_seqs, length = token_logps.shape
    rows = torch.arange(n_seqs, device=token_logps.device).repeat_interleave(length)
    sums = torch.zeros(n_seqs, dtype=torch.float64, device=token_logps.device)
    return add_sequence_sums_(sums, rows, token_logps.reshape(-1))


def _accum_dtype(param: torch.Tensor | None, accum_dtype: torch.dtype | None) -> torch.dtype:
    """What a parameter's gradient is summed in over chunks: accum_dtype, by default fp32; never narrower than
    the parameter (an fp32 weight's gradient is its own accumulator)."""
    accum = accum_dtype or torch.float32
    return accum if param is None or accum.itemsize >= param.dtype.itemsize else param.dtype


class _Plan:
    """The scored tokens of the rows `order` of labels [S, T] (all rows by default), in that order, and the workspace.
    Checks the labels (a host read)."""

    def __init__(self, cfg: Config, labels: torch.Tensor, head: Head, order: torch.Tensor | None = None):
        n_seqs, length = labels.shape
        vocab, device = head.weight.shape[0], labels.device
        flat = labels.reshape(-1).long()
        mask = flat != cfg.ignore_index
        bad = mask & ((flat < 0) | (flat >= vocab))
        if bad.any():
            raise ValueError(
                f"selfpo_kernels: label {flat[bad][0].item()} is outside the vocabulary [0, {vocab}) and is not "
                f"ignore_index={cfg.ignore_index}"
            )
        order = torch.arange(n_seqs, device=device) if order is None else order
        seq_mask = mask.view(n_seqs, length)[order]
        self.positions = (order[:, None] * length + torch.arange(length, device=device))[seq_mask]
        # (sequence, position) of each scored token: chunks gather their rows from the [S, T, H] tensors as they
        # are (a sliced hidden[:, :-1] is not copied whole)
        self.index = (torch.div(self.positions, length, rounding_mode="floor"), self.positions % length)
        self.targets = flat.index_select(0, self.positions)
        self.seq_tokens = seq_mask.sum(dim=1)
        self.backend = (_TritonBackend if cfg.impl == "triton" else TorchBackend)(cfg.temperature, cfg.softcap)
        self.ws_dtype = torch.float32 if self.backend.fp32_workspace else head.hidden.dtype
        ws_bytes = cfg.workspace_bytes or WORKSPACE_BYTES[cfg.impl]
        self.budget = max(1, ws_bytes // (vocab * self.ws_dtype.itemsize))
        self.vocab, self.workspace = vocab, None

    def chunks(self) -> list[tuple[int, int]]:
        """Consecutive token ranges of at most `budget` rows, the workspace allocated for them."""
        n = self.positions.shape[0]
        self.allocate(n)
        return [(start, min(start + self.budget, n)) for start in range(0, n, self.budget)]

    def allocate(self, rows: int):
        shape = (max(1, min(self.budget, rows)), self.vocab)
        self.workspace = torch.empty(shape, dtype=self.ws_dtype, device=self.positions.device)

    def logits(self, head: Head, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the workspace holding the chunk's raw products h W^T, the chunk's hidden rows)."""
        rows = head.hidden[self.index[0][start:end], self.index[1][start:end]]
        return _logits_into(self.workspace[: end - start], rows, head.weight), rows

    def stats(self, head: Head, start: int, end: int, keep: bool = False):
        """-> (token log-probs, lse, state for `grad`, the workspace, the chunk's hidden rows)."""
        ws, rows = self.logits(head, start, end)
        return *self.backend.stats(ws, head.bias, self.targets[start:end], keep), ws, rows


class _Grads:
    """d hidden, d weight, d bias of a head, summed chunk by chunk: dW and dbias in `accum_dtype` (default fp32)."""

    def __init__(self, head: Head, need: tuple[bool, bool, bool], accum_dtype: torch.dtype | None):
        hidden, weight, bias = head
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        self.hidden = torch.zeros_like(hidden) if need[0] else None  # unscored positions keep a zero gradient
        self.weight = self.bias = None
        if need[1]:
            self.weight = torch.zeros(weight.shape, dtype=_accum_dtype(weight, accum_dtype), device=weight.device)
        if need[2] and bias is not None:
            self.bias = torch.zeros(bias.shape, dtype=_accum_dtype(bias, accum_dtype), device=bias.device)

    def any(self) -> bool:
        return any(g is not None for g in (self.hidden, self.weight, self.bias))

    def add(self, plan: _Plan, head: Head, start: int, end: int, dz: torch.Tensor, rows: torch.Tensor):
        dz = dz.to(rows.dtype)
        if self.hidden is not None:
            self.hidden.index_put_((plan.index[0][start:end], plan.index[1][start:end]), torch.mm(dz, head.weight))
        if self.weight is not None:
            _add_matmul_(self.weight, dz.T, rows)
        if self.bias is not None:
            self.bias += torch.sum(dz, dim=0, dtype=self.bias.dtype)

    def result(self) -> tuple:
        weight = None if self.weight is None else self.weight.to(self.dtypes[0])
        return self.hidden, weight, None if self.bias is None else self.bias.to(self.dtypes[1])


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b: one GEMM in acc's dtype, or into an fp32 accumulator from 16-bit factors."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        add_matmul_fp32_(acc, a, b)


def _token_logps(cfg: Config, head: Head, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs and log-sum-exps [S, T] fp32 (0 where not scored), chunk by chunk."""
    head = _compute(head)
    plan = _Plan(cfg, labels, head)
    logps = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    lse = torch.zeros_like(logps)
    for start, end in plan.chunks():
        positions = plan.positions[start:end]
        logps[positions], lse[positions], *_ = plan.stats(head, start, end)
    return logps.view(labels.shape), lse.view(labels.shape)


def _token_grads(cfg: Config, head: Head, labels, lse, grad, need: tuple[bool, bool, bool]) -> tuple:
    """Gradients of sum(grad * log-probs) for grad [S, T], each chunk's logits recomputed (lse from the forward)."""
    grads = _Grads(head, need, cfg.accum_dtype)
    head = _compute(head)
    plan = _Plan(cfg, labels, head)
    lse, grad = lse.reshape(-1)[plan.positions], grad.reshape(-1).float()[plan.positions]
    for start, end in plan.chunks() if grads.any() else ():
        ws, rows = plan.logits(head, start, end)
        state = plan.backend.recompute(ws, head.bias, lse[start:end])
        dz = plan.backend.grad(ws, head.bias, plan.targets[start:end], lse[start:end], state, grad[start:end])
        grads.add(plan, head, start, end, dz, rows)
    return grads.result()


# ---------------------------------------------------------------------------------------------
# The token passes as torch.library custom ops: opaque to torch.compile and FakeTensorMode, which see only the shapes
# of their register_fake functions; the backward of the first is the second.


@torch.library.custom_op("selfpo::token_logps", mutates_args=())
def _logps_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    impl: str,
    workspace_bytes: int | None,
    accum_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, log-sum-exps) [S, T] fp32 of the head at every position of labels, 0 where not scored."""
    cfg = Config(temperature, softcap, ignore_index, impl, workspace_bytes, accum_dtype)
    return _token_logps(cfg, Head(hidden, weight, bias), labels)


@_logps_op.register_fake
def _(hidden, weight, bias, labels, *config):
    _check_devices(hidden, weight, bias, labels)
    return hidden.new_empty(labels.shape, dtype=torch.float32), hidden.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("selfpo::token_grads", mutates_args=())
def _grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    impl: str,
    workspace_bytes: int | None,
    accum_dtype: torch.dtype | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of sum(grad * log-probs), grad [S, T]; [0] for each gradient not needed."""
    cfg = Config(temperature, softcap, ignore_index, impl, workspace_bytes, accum_dtype)
    grads = _token_grads(cfg, Head(hidden, weight, bias), labels, lse, grad, (need_hidden, need_weight, need_bias))
    return tuple(t.new_empty(0) if g is None else g for g, t in zip(grads, (hidden, weight, weight)))


@_grads_op.register_fake
def _(hidden, weight, bias, labels, lse, grad, *config_and_need):
    _check_devices(hidden, weight, bias, labels, lse, grad)
    need_hidden, need_weight, need_bias = config_and_need[-3:]
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else weight.new_empty(0),
    )


def _check_devices(*tensors):
    """Every input on one device, as a kernel launch needs (a fake tensor on the wrong device fails here)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"selfpo_kernels: inputs are on different devices {sorted(map(str, devices))}")


def _setup_backward(ctx, inputs, output):
    hidden, weight, bias, labels, *config = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.config = config
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_lse):
    need = ctx.needs_input_grad[:3]
    grads = _grads_op(*ctx.saved_tensors, grad, *ctx.config, *need)
    return *(g if wanted else None for g, wanted in zip(grads, need)), *[None] * (1 + len(ctx.config))


_logps_op.register_autograd(_backward, setup_context=_setup_backward)


def token_logps(cfg: Config, head: Head, labels: torch.Tensor) -> torch.Tensor:
    """Per-position log-probs [S, T] fp32 of the head (0 where not scored), differentiable w.r.t. the head."""
    held = _held(cfg, head, labels) if tracing(head.hidden) and not torch.compiler.is_compiling() else []
    logps = _logps_op(*head, labels, *cfg.fields())[0]
    del held
    return logps


def tracing(tensor: torch.Tensor) -> bool:
    """True under FakeTensorMode (fake tensors carry no values) or while torch.compile traces: no host reads."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import is_fake

    # is_fake also sees through the functional wrappers of AOT autograd's tracing
    return torch.compiler.is_compiling() or is_fake(tensor) or detect_fake_mode(tensor) is not None


def _held(cfg: Config, head: Head, labels, need=(False, False, False), ref: Head | None = None) -> list:
    """Empty tensors of what the real pass holds beside its inputs and outputs: the workspace (its most rows), the
    torch path's soft-cap buffer and dZ in the input dtype, a chunk's gathered hidden rows, the weights' copies in the
    hidden dtype (of a wider, fp32 master weight), the dW and dbias accumulators (when wider than the weights).
    Allocated under FakeTensorMode outside the custom ops, so that a memory tracker (a dispatch mode above
    FakeTensorMode, which sees the ops' outputs and not what their fake implementations allocate) counts them."""
    hidden, weight, bias = head
    vocab = weight.shape[0]
    dtype = torch.float32 if cfg.impl == "torch" else hidden.dtype
    budget = (cfg.workspace_bytes or WORKSPACE_BYTES[cfg.impl]) // (vocab * dtype.itemsize)
    rows = max(1, min(budget, labels.numel()))
    held = [hidden.new_empty((rows, vocab), dtype=dtype), hidden.new_empty((rows, hidden.shape[2]))]
    if cfg.impl == "torch" and cfg.softcap is not None:
        held.append(hidden.new_empty((rows, vocab), dtype=torch.float32))
    if dtype != hidden.dtype:
        held.append(hidden.new_empty((rows, vocab)))
    for h in (head, ref):
        if h is not None and h.weight.dtype != h.hidden.dtype:
            held.append(h.weight.new_empty(h.weight.shape, dtype=h.hidden.dtype))
    for param, wanted in ((weight, need[1]), (bias, need[2])):
        if wanted and param is not None and _accum_dtype(param, cfg.accum_dtype) != param.dtype:
            held.append(param.new_empty(param.shape, dtype=_accum_dtype(param, cfg.accum_dtype)))
    return held


# ---------------------------------------------------------------------------------------------
# The pair step: chunks of whole pairs; losses, metrics and the gradients, eagerly.


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


def _call_loss_fn(loss_fn, seq, ref, tokens, extras):
    """loss_fn on pair-major [2b] sequence log-probs (ref, tokens alike) -> (losses [b], rewards or None)."""
    n_pairs = seq.shape[0] // 2
    out = loss_fn(
        policy_chosen=seq[0::2],
        policy_rejected=seq[1::2],
        ref_chosen=None if ref is None else ref[0::2],
        ref_rejected=None if ref is None else ref[1::2],
        chosen_tokens=tokens[0::2],
        rejected_tokens=tokens[1::2],
        **extras,
    )
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
    with torch.enable_grad():
        seq = policy_seq.detach().float().requires_grad_()
        ref = None if ref_seq is None else ref_seq.float()
        losses, rewards = _call_loss_fn(loss_fn, seq, ref, tokens, extras)
        (g_seq,) = torch.autograd.grad(losses.sum(), [seq], allow_unused=True)
    g_seq = torch.zeros_like(seq) if g_seq is None else g_seq.float()
    if rewards is not None:
        rewards = torch.stack([r.detach().float() for r in rewards])
    return losses.detach().float(), rewards, g_seq


def _pair_order(n_pairs: int, device) -> torch.Tensor:
    """Row order of pair-major sequences: chosen 0, rejected 0, chosen 1, ... (rows: B chosen, then B rejected)."""
    return torch.stack([torch.arange(n_pairs), torch.arange(n_pairs) + n_pairs], dim=1).reshape(-1).to(device)


def _pair_pass(cfg: Config, policy: Head, labels, loss_fn, ref: Head | None, ref_logps, extras, need) -> tuple:
    """The fused pair step on real tensors: (outputs, (d hidden, d weight, d bias))."""
    n_pairs, device = labels.shape[0] // 2, labels.device
    grads = _Grads(policy, need, cfg.accum_dtype)
    policy, ref = _compute(policy), None if ref is None else _compute(ref)
    seq_order = _pair_order(n_pairs, device)
    plan = _Plan(cfg, labels, policy, seq_order)
    token_seq = torch.repeat_interleave(torch.arange(2 * n_pairs, device=device), plan.seq_tokens)
    groups = _plan_chunks(plan.seq_tokens.view(n_pairs, 2).sum(dim=1).tolist(), plan.budget)  # host read
    plan.allocate(max(end - start for _, _, start, end in groups))
    # Sequence sums in float64 (add_sequence_sums_, as sequence_logps sums); they leave as fp32.
    policy_seq = torch.zeros(2 * n_pairs, dtype=torch.float64, device=device)
    ref_seq = None
    if ref_logps is not None:
        ref_seq = ref_logps.detach().double()[seq_order]
    elif ref is not None:
        ref_seq = torch.zeros(2 * n_pairs, dtype=torch.float64, device=device)
    losses_all = torch.zeros(n_pairs, dtype=torch.float32, device=device)
    rewards_all = None
    tokens = plan.seq_tokens.float()

    for first_pair, end_pair, first_token, end_token in groups:
        subs = [(s, min(s + plan.budget, end_token)) for s in range(first_token, end_token, plan.budget)]
        subs = subs or [(first_token, first_token)]
        keep = len(subs) == 1  # the whole group's logits stay in the workspace until dZ
        if ref is not None:  # reference first: the policy's logits then stay in the workspace
            for start, end in subs:
                ref_tok = plan.stats(ref, start, end)[0]
                add_sequence_sums_(ref_seq, token_seq[start:end], ref_tok)
        lse_parts = []
        for start, end in subs:
            tok, lse, state, ws, rows = plan.stats(policy, start, end, keep)
            add_sequence_sums_(policy_seq, token_seq[start:end], tok)
            lse_parts.append(lse)
        seqs = slice(2 * first_pair, 2 * end_pair)
        losses, rewards, g_seq = _group_losses(
            loss_fn,
            policy_seq[seqs],
            None if ref_seq is None else ref_seq[seqs],
            tokens[seqs],
            {k: v[first_pair:end_pair] for k, v in extras.items()},
        )
        losses_all[first_pair:end_pair] = losses
        if rewards is not None:
            if rewards_all is None:
                rewards_all = torch.zeros(2, n_pairs, dtype=torch.float32, device=device)
            rewards_all[:, first_pair:end_pair] = rewards
        if not grads.any():
            continue
        g_tok = g_seq[token_seq[first_token:end_token] - 2 * first_pair]
        for (start, end), lse in zip(subs, lse_parts):
            if not keep:  # a pair larger than the workspace: its logits are recomputed
                ws, rows = plan.logits(policy, start, end)
                state = plan.backend.recompute(ws, policy.bias, lse)
            g = g_tok[start - first_token : end - first_token]
            dz = plan.backend.grad(ws, policy.bias, plan.targets[start:end], lse, state, g)
            grads.add(plan, policy, start, end, dz, rows)

    policy_seq, ref_seq = policy_seq.float(), None if ref_seq is None else ref_seq.float()
    if len(groups) > 1:
        _check_per_pair(loss_fn, losses_all, policy_seq, ref_seq, tokens, extras)
    outputs = dict(losses=losses_all, policy=policy_seq, ref=ref_seq, tokens=plan.seq_tokens, rewards=rewards_all)
    return outputs, grads.result()


def _check_per_pair(loss_fn, losses, policy_seq, ref_seq, tokens, extras):
    """The losses evaluated chunk by chunk must be those of one call on all pairs: else loss_fn mixes pairs
    (a batch statistic) and the chunked gradient would be wrong."""
    with torch.no_grad():
        whole, _ = _call_loss_fn(loss_fn, policy_seq, ref_seq, tokens, extras)
    same = torch.isclose(whole.float(), losses, rtol=1e-5, atol=1e-6, equal_nan=True).all()
    message = (
        "pair_loss_from_hidden: loss_fn gives other losses on chunks of pairs than on the whole batch; "
        "each pair's loss must depend on that pair's inputs only"
    )
    if losses.is_cuda:
        torch._assert_async(same, message)
    elif not same:
        raise ValueError(message)


def _traced_pass(cfg: Config, policy: Head, labels, loss_fn, ref: Head | None, ref_logps, extras, need) -> tuple:
    """`_pair_pass` without host reads: the token log-probs by one op (the reference's by another call), loss_fn on
    the whole batch, the gradients by the second op. The label check runs in the ops' real implementations."""
    # under FakeTensorMode: what the real pass holds, for memory trackers (nothing to trace in compile)
    held = [] if torch.compiler.is_compiling() else _held(cfg, policy, labels, need, ref)
    order = _pair_order(labels.shape[0] // 2, labels.device)
    detached = Head(*(None if t is None else t.detach() for t in policy))
    logps, lse = _logps_op(*detached, labels, *cfg.fields())
    seq = sequence_sums(logps).float()[order]
    ref_seq = None
    if ref_logps is not None:
        ref_seq = ref_logps.detach().float()[order]
    elif ref is not None:
        ref_seq = sequence_sums(_logps_op(*ref, labels, *cfg.fields())[0]).float()[order]
    tokens = (labels != cfg.ignore_index).sum(dim=1)[order]
    losses, rewards, g_seq = _group_losses(loss_fn, seq, ref_seq, tokens.float(), extras)
    grads = (None, None, None)
    if any(need):
        g_rows = torch.cat([g_seq[0::2], g_seq[1::2]])[:, None].expand(labels.shape)  # pair-major -> rows
        grads = _grads_op(*detached, labels, lse, g_rows, *cfg.fields(), *need)
        grads = tuple(g if wanted else None for g, wanted in zip(grads, need))
    del held
    return dict(losses=losses, policy=seq, ref=ref_seq, tokens=tokens, rewards=rewards), grads


class PairLossFromHidden(torch.autograd.Function):
    """Per-pair losses with the gradients computed in forward; backward scales them by the (uniform) upstream."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, args, sink):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        outputs, ctx.grads = (_traced_pass if tracing(hidden) else _pair_pass)(*args, need)
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
    name, extras = "pair_loss_from_hidden", dict(extras or {})
    check_inputs(name, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, pairs=True)
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError(f"{name}: pass the reference as 'ref_hidden'/'ref_weight' or as 'ref_logps', not both")
    if ref_logps is not None and ref_logps.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: 'ref_logps' must be [2B={hidden.shape[0]}], got {tuple(ref_logps.shape)}")
    for key, value in extras.items():
        if not isinstance(value, torch.Tensor) or value.shape != (hidden.shape[0] // 2,):
            raise ValueError(f"{name}: extras['{key}'] must be a per-pair tensor [B={hidden.shape[0] // 2}]")
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(
            f"{name}: 'accum_dtype' must be None, torch.float32 or the weight's dtype ({weight.dtype}), "
            f"got {accum_dtype}"
        )
    cfg = make_config(hidden, temperature, softcap, ignore_index, impl, workspace_bytes, accum_dtype)
    ref = (
        None
        if ref_hidden is None
        else Head(*(None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)))
    )
    extras = {k: v.detach().float() for k, v in extras.items()}
    args = (cfg, Head(hidden, weight, bias), labels, loss_fn, ref, ref_logps, extras)
    if any(t is not None and t.requires_grad for t in (hidden, weight, bias)) and torch.is_grad_enabled():
        outputs = {}
        losses = PairLossFromHidden.apply(hidden, weight, bias, args, outputs)
    else:
        with torch.no_grad():
            outputs, _ = (_traced_pass if tracing(hidden) else _pair_pass)(*args, (False, False, False))
        losses = outputs["losses"]
    return losses, _metrics(outputs)


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


# ---------------------------------------------------------------------------------------------
# One-time check of the Triton path against float64 on the device it runs on, per (device, dtype).

_SELF_CHECKED: set = set()


def _self_check_due(device: torch.device) -> bool:
    return device.type == "cuda"


def self_check(device: torch.device, dtype: torch.dtype) -> None:
    """Run a small pair step (bias, soft-cap, temperature, chunk boundaries between and inside pairs: both kernels,
    logits kept and recomputed) on the Triton path and check losses and gradients against float64 by the tests'
    rule: error at most twice that of naive torch at the same dtype, plus a small floor. RuntimeError on a mismatch."""
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
    mask, order = labels != -100, _pair_order(pairs, device)
    loss_fn, softcap, temperature = daa_loss_fn("dpo", beta=0.5), 5.0, 0.9

    def run(fn, dtype_):
        h, w, b = (t.to(device, dtype_).requires_grad_() for t in (hidden, weight, bias))
        losses = fn(h, w, b, ref_hidden.to(device, dtype_))
        return [losses.double(), *torch.autograd.grad(losses.sum(), [h, w, b])]

    def naive(h, w, b, rh):  # logits -> log_softmax -> gather -> sums, fp32 softmax unless float64
        def seq_logps(x):
            logits = softcap * torch.tanh((x @ w.T + b) / softcap) / temperature
            logits = logits if logits.dtype == torch.float64 else logits.float()
            return (torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)

        with torch.no_grad():
            ref = seq_logps(rh)[order]
        return _call_loss_fn(loss_fn, seq_logps(h)[order], ref, mask.sum(1).to(h.dtype)[order], {})[0]

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
        # callers may score under no_grad or autocast; the check needs gradients and exact dtypes
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            oracle, budget = run(naive, torch.float64), run(naive, dtype)
            try:
                got = run(fused, dtype)
            except Exception as err:  # e.g. a compiler error for this GPU
                raise RuntimeError(
                    f"selfpo_kernels: self-check failed: the Triton kernels do not run on {name} ({dtype}): "
                    f"{type(err).__name__}: {err}. {way_out}"
                ) from err
        floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-2)
        for what, g, b, o in zip(("losses", "grad hidden", "grad weight", "grad bias"), got, budget, oracle):
            err, allowed = (g.double() - o).abs().max().item(), 2 * (b.double() - o).abs().max().item() + floor
            if not err <= allowed:
                raise RuntimeError(
                    f"selfpo_kernels: self-check failed: the Triton kernels' {what} on {name} ({dtype}) are off by "
                    f"{err:.3g} from float64 (allowed {allowed:.3g}). {way_out}"
                )
    except BaseException:
        _SELF_CHECKED.discard(key)
        raise
