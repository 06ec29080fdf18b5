"""The pure-PyTorch pieces: the engine's CPU back end, the fp32 product-sum it uses, and the tests' naive oracle.

Logit transform shared by every path: z = h @ W^T (+ b), then Gemma-2 soft-capping `cap * tanh(z / cap)` when
`softcap` is set, then division by `temperature`.
"""

from __future__ import annotations

import torch


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


class TorchBackend:
    """The engine's back end on CPU: an fp32 workspace, transformed in place. After `stats` it holds
    exp(logits - rowmax), from which `grad` finishes the softmax (no second pass over the logits)."""

    fp32_workspace = True

    def __init__(self, temperature: float, softcap: float | None):
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
        """-> token log-probs, lse, and (when keep) the state `grad` forms dZ from."""
        tanh = self._transform_(ws, bias)
        label = ws.gather(1, targets[:, None]).squeeze(1)
        top = ws.amax(dim=1)
        ws.sub_(top[:, None]).exp_()
        total = ws.sum(dim=1)
        lse = top + total.log()
        return label - lse, lse, (1.0 / total, tanh) if keep else None

    def recompute(self, ws, bias, lse):
        """Fresh logits in ws, with the log-sum-exp known: -> the state for `grad`."""
        tanh = self._transform_(ws, bias)
        ws.sub_(lse[:, None]).exp_()
        return None, tanh

    def grad(self, ws, bias, targets, lse, state, g):
        """ws holds exp(logits - c), softmax = ws * inv_total (1 after `recompute`); -> dZ in place (fp32)."""
        inv_total, tanh = state
        scale = g / self.temperature
        ws.mul_((-scale if inv_total is None else -scale * inv_total)[:, None])
        ws[torch.arange(ws.shape[0], device=ws.device), targets] += scale
        if tanh is not None:
            ws.mul_(tanh.square_().neg_().add_(1.0))
        return ws
