"""Benchmark of sequence log-likelihoods from hidden states: ours (triton, torch) vs naive and peers.

    python -m selfpo_kernels.bench                                   # default shapes for this device
    python -m selfpo_kernels.bench --shapes cpu-target --modes fwd_bwd --repeats 20
    python -m selfpo_kernels.bench --shapes llama3-8b --dtypes bf16 --impls triton naive trl liger cce

Protocol (shared/PERF.md): every (impl, shape, dtype, mode) is first checked against the naive
float32 result (per-sequence log-probs, the reference log-probs, and for backward modes the
gradients w.r.t. hidden and weight); a result outside tolerance is reported FAILED and never
timed. The checked implementations are then warmed up and timed round-robin (one run of each in
turn, so background load hits all of them alike): median, p10 and p90 of `--repeats` runs, with
CUDA events on GPU and time.perf_counter on CPU. Peak extra memory: on CUDA the
max_memory_allocated delta over the inputs; on CPU the peak-RSS delta of one run in a fresh
subprocess (VmHWM after resetting it, or ru_maxrss). Both include the gradients the run creates.

Modes: fwd (policy forward, no grad), fwd_bwd (policy forward + backward w.r.t. hidden and
weight), fwd_bwd_ref (fwd_bwd plus the reference forward: one `sequence_logps` call for ours,
two calls for everyone else), pair (the DPO step: policy fwd+bwd + reference fwd + the DPO loss
over pairs of PAIR_SEQ_LEN-token sequences, backpropagating the sum of the per-pair losses: ours
`torch`/`triton` = one `pair_loss_from_hidden` call (`triton_wsums`: dW summed in the weight's dtype,
`accum_dtype`), `torch_logps`/`triton_logps` = our
`sequence_logps` then the loss, the others = their log-probs then the loss with autograd).
Rows are appended to benchmarks/results/<device>.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Literal

import torch
import tyro

from .losses import pair_loss
from .ops import sequence_logps
from .pair import daa_loss_fn, pair_loss_from_hidden
from .torch_ref import naive_token_logps

IGNORE = -100
MODES = ("fwd", "fwd_bwd", "fwd_bwd_ref", "pair")
PAIR_SEQ_LEN, PAIR_BETA = 512, 0.1  # pair mode: sequences of 512 positions (chosen, rejected), DPO's beta
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative tolerances against the naive fp32 result: (per-sequence log-probs, gradients).
TOLERANCES = {"fp32": (1e-4, 1e-3), "bf16": (2e-3, 5e-2), "fp16": (1e-3, 2e-2)}
# Pair mode, against float64: (per-pair losses, gradients). The loss is as precise as the margin, a difference of
# four sums of hundreds of log-probs (~5e3 nats at V = 32000): fp32 rounds each at ~5e-4, times beta.
PAIR_TOLERANCES = {"fp32": (1e-3, 1e-3), "bf16": (5e-2, 5e-2), "fp16": (2e-2, 2e-2)}


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int  # N: positions in the batch (a fraction of them ignored, see --ignore_frac)
    hidden: int  # H
    vocab: int  # V
    seqs: int  # B sequences of N / B tokens each
    modes: tuple[str, ...] = MODES  # modes run when --modes is not given


SHAPES = {
    # PERF.md shapes (CUDA)
    "mistral-7b": Shape(8192, 4096, 32000, 4),
    "llama3-8b": Shape(8192, 4096, 128256, 4),
    "qwen2.5-1.5b": Shape(16384, 2048, 151936, 8),
    "gpu-small": Shape(2048, 1024, 32000, 2),
    # CPU: two quick ones, and PERF.md's CPU target (fwd+bwd only by default: naive takes seconds)
    "cpu-tiny": Shape(512, 64, 2048, 2),
    "cpu-small": Shape(1024, 128, 8192, 2),
    "cpu-target": Shape(4096, 256, 32000, 4, modes=("fwd_bwd",)),
}
DEFAULT_SHAPES = {
    "cuda": ("gpu-small", "mistral-7b", "llama3-8b", "qwen2.5-1.5b"),
    "cpu": ("cpu-tiny", "cpu-small", "cpu-target"),
}


@dataclasses.dataclass
class Args:
    shapes: tuple[str, ...] | None = None
    """shape names from SHAPES; default: the PERF.md shapes + a small one on CUDA, small ones on CPU"""
    impls: tuple[str, ...] | None = None
    """implementations to run (default: all that run on this device; naive is always included)"""
    modes: tuple[Literal["fwd", "fwd_bwd", "fwd_bwd_ref", "pair"], ...] | None = None
    """default: each shape's own list (all four, fwd_bwd only for cpu-target)"""
    dtypes: tuple[Literal["fp32", "bf16", "fp16"], ...] | None = None
    """default: bf16 on CUDA, fp32 on CPU"""
    repeats: int = 20
    """timed runs per result (PERF.md asks for >= 20)"""
    warmup: int = 1
    """untimed runs per implementation before timing, besides the correctness run"""
    ignore_frac: float = 0.1
    """fraction of each sequence's labels set to -100 (its first positions, like a prompt)"""
    memory: bool = True
    """measure peak extra memory (on CPU: one fresh subprocess per result)"""
    peak_tflops: float = 790.0
    """dense peak used for the FLOP floor on CUDA (H100 SXM bf16 ≈ 790)"""
    device: Literal["cuda", "cpu"] | None = None
    """cuda or cpu (default: cuda when available)"""
    threads: int | None = None
    """torch CPU threads (default: torch's own choice); recorded in every row"""
    out: str | None = None
    """CSV path (default: benchmarks/results/<device>.csv); rows are appended"""
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Implementations: fn(hidden [B,T,H], weight [V,H], labels [B,T], ref_hidden=None, ref_weight=None)
# -> (policy [B] fp32 summed log-probs, reference [B] or None). Peers score the reference in a
# second call under no_grad, as their users would.


def _ours(impl: str) -> Callable:
    def fn(hidden, weight, labels, ref_hidden=None, ref_weight=None):
        return sequence_logps(hidden, weight, labels, ref_hidden, ref_weight, ignore_index=IGNORE, impl=impl)

    return fn


def _two_calls(score: Callable) -> Callable:
    """Adapter: policy and reference scored by two calls of score(hidden, weight, labels) -> [B]."""

    def fn(hidden, weight, labels, ref_hidden=None, ref_weight=None):
        ref = None
        if ref_hidden is not None:
            with torch.no_grad():
                ref = score(ref_hidden, ref_weight, labels)
        return score(hidden, weight, labels), ref

    return fn


def _naive_score(hidden, weight, labels):
    # logits = h @ W^T -> fp32 log_softmax -> gather -> masked sum, all through autograd
    token = naive_token_logps(hidden.flatten(0, 1), weight, labels.clamp(min=0).flatten())
    return (token.view(labels.shape) * (labels != IGNORE)).sum(dim=1)


def _load_trl():
    from trl.kernels import ChunkedLogProbFunction  # TRL >= 1.16

    vocab_chunk = 32768  # TRL's own default (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)

    def score(hidden, weight, labels):
        scored = labels != IGNORE  # TRL compacts the scored rows itself on GPU; we do it everywhere
        token = ChunkedLogProbFunction.apply(
            hidden[scored], weight, None, labels[scored], 1.0, vocab_chunk, None, 1.0, ()
        )[0]
        return torch.zeros(labels.shape, device=labels.device).masked_scatter(scored, token.float()).sum(dim=1)

    return _two_calls(score), importlib.metadata.version("trl")


def _load_liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def score(hidden, weight, labels):  # per-token cross-entropy = -log-prob (0 where ignored)
        loss = liger_fused_linear_cross_entropy(
            hidden.flatten(0, 1), weight, labels.flatten(), ignore_index=IGNORE, reduction="none"
        )
        return -loss.float().view(labels.shape).sum(dim=1)

    return _two_calls(score), importlib.metadata.version("liger-kernel")


def _load_cce():
    from cut_cross_entropy import linear_cross_entropy

    def score(hidden, weight, labels):
        loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none")
        return -loss.float().view(labels.shape).sum(dim=1)

    return _two_calls(score), importlib.metadata.version("cut-cross-entropy")


def pair_shape(shape: Shape) -> Shape:
    """The pair mode's layout of a shape: B chosen then B rejected sequences of PAIR_SEQ_LEN positions."""
    return dataclasses.replace(shape, seqs=max(2, 2 * (shape.tokens // (2 * PAIR_SEQ_LEN))))


def _ours_pair(impl: str, weight_sums: bool = False) -> Callable:
    """Pair mode, ours: fn(hidden, weight, labels, ref_hidden, ref_weight) -> per-pair DPO losses, one call;
    weight_sums: dW summed in the weight's dtype (accum_dtype), not in an fp32 accumulator."""
    loss_fn = daa_loss_fn("dpo", beta=PAIR_BETA)

    def fn(hidden, weight, labels, ref_hidden, ref_weight):
        return pair_loss_from_hidden(
            hidden,
            weight,
            labels,
            loss_fn,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ignore_index=IGNORE,
            impl=impl,
            accum_dtype=weight.dtype if weight_sums else None,
        )[0]

    return fn


def _pair_from_logps(score: Callable) -> Callable:
    """Pair mode from a log-prob implementation: policy and reference log-probs, then the DPO loss (autograd)."""

    def fn(hidden, weight, labels, ref_hidden, ref_weight):
        policy, ref = score(hidden, weight, labels, ref_hidden, ref_weight)
        n = policy.shape[0] // 2
        return pair_loss(policy[:n], policy[n:], ref[:n], ref[n:], kind="dpo", beta=PAIR_BETA, reduction="none")

    return fn


def mode_impls(impls: dict[str, Callable], mode: str) -> dict[str, Callable]:
    """The implementations run in `mode`: in pair mode ours fused (torch, triton; triton_wsums: dW summed in the
    weight's dtype) and unfused (*_logps)."""
    if mode != "pair":
        return impls
    fns = {}
    for name, fn in impls.items():
        fns[name] = _ours_pair(name) if name in ("torch", "triton") else _pair_from_logps(fn)
        if name == "triton":
            fns["triton_wsums"] = _ours_pair(name, weight_sums=True)
        if name in ("torch", "triton"):
            fns[f"{name}_logps"] = _pair_from_logps(fn)
    return fns


IMPLS: dict[str, Callable] = {"triton": _ours("triton"), "torch": _ours("torch"), "naive": _two_calls(_naive_score)}
PEERS = {"trl": _load_trl, "liger": _load_liger, "cce": _load_cce}
CUDA_ONLY = ("triton", "liger", "cce")  # Triton kernels; on CPU only the (far too slow) interpreter


def available_impls(device: str, wanted: tuple[str, ...] | None) -> tuple[dict[str, Callable], dict, list[str]]:
    """-> (name -> fn with naive first, peer name -> version, one-line notes on what was skipped)."""
    names = list(wanted) if wanted else [*IMPLS, *PEERS]
    unknown = [n for n in names if n not in IMPLS and n not in PEERS]
    if unknown:
        raise ValueError(f"--impls: unknown {unknown}; known: {[*IMPLS, *PEERS]}")
    impls, versions, notes = {"naive": IMPLS["naive"]}, {}, []
    for name in names:
        if name in impls:
            continue
        if device != "cuda" and name in CUDA_ONLY:
            notes.append(f"{name}: skipped (needs CUDA)")
        elif name in IMPLS:
            impls[name] = IMPLS[name]
        else:
            try:
                impls[name], versions[name] = PEERS[name]()
            except ImportError as error:
                notes.append(f"{name}: skipped (not importable: {error})")
    return impls, versions, notes


# ---------------------------------------------------------------------------------------------
# Inputs, the fp32 oracle, one run.


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    upstream: torch.Tensor  # d loss / d policy[b]: not all ones, so per-sequence grad scaling is checked


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: str, ignore_frac: float, seed: int, pair: bool = False
) -> Inputs:
    """pair: the reference is the policy plus 1 % noise (as a reference near its policy in DPO), so that DPO's
    margins are O(1) and its gradient does not vanish; otherwise independent."""
    if shape.tokens % shape.seqs:
        raise ValueError(f"shape {shape}: tokens must be a multiple of seqs")
    gen = torch.Generator().manual_seed(seed)
    length = shape.tokens // shape.seqs

    def randn(*size, std=1.0):  # logits h @ W^T come out with std ~2, like a trained LM head's
        return (torch.randn(*size, generator=gen) * std).to(device=device, dtype=dtype)

    labels = torch.randint(0, shape.vocab, (shape.seqs, length), generator=gen)
    labels[:, : int(ignore_frac * length)] = IGNORE
    head_std = 2 / shape.hidden**0.5
    hidden, weight = randn(shape.seqs, length, shape.hidden), randn(shape.vocab, shape.hidden, std=head_std)
    ref_hidden, ref_weight = randn(shape.seqs, length, shape.hidden), randn(shape.vocab, shape.hidden, std=head_std)
    if pair:
        ref_hidden, ref_weight = hidden + 0.01 * ref_hidden, weight + 0.01 * ref_weight
    return Inputs(
        hidden.requires_grad_(),
        weight.requires_grad_(),
        labels.to(device),
        ref_hidden,
        ref_weight,
        torch.rand(shape.seqs, generator=gen).add(0.5).to(device),
    )


def run_once(fn: Callable, x: Inputs, mode: str):
    """-> (policy, reference or None, grad_hidden or None, grad_weight or None); pair mode: (losses, None, ...)."""
    if mode == "pair":
        x.hidden.grad = x.weight.grad = None
        losses = fn(x.hidden, x.weight, x.labels, x.ref_hidden, x.ref_weight)
        losses.sum().backward()
        return losses.detach(), None, x.hidden.grad, x.weight.grad
    if mode == "fwd":
        with torch.no_grad():
            return *fn(x.hidden.detach(), x.weight.detach(), x.labels), None, None
    x.hidden.grad = x.weight.grad = None
    ref_args = (x.ref_hidden, x.ref_weight) if mode == "fwd_bwd_ref" else ()
    policy, ref = fn(x.hidden, x.weight, x.labels, *ref_args)
    (policy * x.upstream).sum().backward()
    return policy.detach(), ref, x.hidden.grad, x.weight.grad


def oracle(x: Inputs, rows_per_chunk: int = 0, dtype: torch.dtype = torch.float32):
    """Naive fp32 results (policy, reference, grad_hidden, grad_weight) for all modes, computed in
    row chunks so that the check itself stays within memory at the large GPU shapes (`dtype`: float64
    for the pair mode)."""
    batch, length, hidden_size = x.hidden.shape
    rows_per_chunk = rows_per_chunk or max(1, (1 << 28) // (x.weight.shape[0] * dtype.itemsize))
    hidden = x.hidden.detach().to(dtype).flatten(0, 1).requires_grad_()
    weight = x.weight.detach().to(dtype).requires_grad_()
    ref_hidden, ref_weight = x.ref_hidden.to(dtype).flatten(0, 1), x.ref_weight.to(dtype)
    labels = x.labels.flatten()
    seq_of_row = torch.arange(batch, device=labels.device).repeat_interleave(length)
    policy = torch.zeros(batch, device=labels.device, dtype=dtype)
    ref = torch.zeros(batch, device=labels.device, dtype=dtype)
    for start in range(0, batch * length, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        scored, targets, seqs = labels[rows] != IGNORE, labels[rows].clamp(min=0), seq_of_row[rows]
        token = naive_token_logps(hidden[rows], weight, targets, dtype=dtype) * scored
        (token * x.upstream[seqs]).sum().backward()
        policy.index_add_(0, seqs, token.detach())
        with torch.no_grad():
            ref.index_add_(0, seqs, naive_token_logps(ref_hidden[rows], ref_weight, targets, dtype=dtype) * scored)
    return policy, ref, hidden.grad.view(batch, length, hidden_size), weight.grad


def pair_oracle(x: Inputs):
    """Naive float64 (per-pair DPO losses, None, grad_hidden, grad_weight) of the pair mode: the sequence
    log-probs, the loss softplus(-beta h) and its gradient g per sequence, then the log-probs' backward with g
    as the upstream. float64, since the margin h is a difference of sums of hundreds of log-probs: in fp32 it
    carries ~1e-3 nats of rounding, which every fp32 implementation shares (hence PAIR_TOLERANCES)."""
    policy, ref, _, _ = oracle(x, dtype=torch.float64)
    n = policy.shape[0] // 2
    policy = policy.requires_grad_()
    losses = torch.nn.functional.softplus(-PAIR_BETA * ((policy[:n] - ref[:n]) - (policy[n:] - ref[n:])))
    (upstream,) = torch.autograd.grad(losses.sum(), [policy])
    _, _, grad_hidden, grad_weight = oracle(dataclasses.replace(x, upstream=upstream), dtype=torch.float64)
    return losses.detach(), None, grad_hidden, grad_weight


def relative_error(results, expected) -> float:
    """max |a - b| / max(1, max |b|) over the pairs where both are given."""
    errors = [
        ((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        for a, b in zip(results, expected)
        if a is not None and b is not None
    ]
    return max(errors, default=0.0)


# ---------------------------------------------------------------------------------------------
# Measurement: time, memory.


def time_round_robin(fns: dict[str, Callable], x: Inputs, mode: str, warmup: int, repeats: int, device: str):
    """Warm up each fn, then time one run of each in turn `repeats` times -> name -> [ms]."""
    for fn in fns.values():
        for _ in range(warmup):
            run_once(fn, x, mode)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_once(fn, x, mode)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                run_once(fn, x, mode)
                times[name].append(1e3 * (time.perf_counter() - start_s))
    return times


def cuda_peak_extra_mb(fn: Callable, x: Inputs, mode: str) -> float:
    x.hidden.grad = x.weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(fn, x, mode)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child_peak_rss_mb(impl: str, dims: str, dtype: str, mode: str, ignore_frac: str, seed: str, threads: str):
    """Run in a fresh interpreter: print the peak-RSS growth (MB) of one run of `impl` at N,H,V,B `dims`."""
    torch.set_num_threads(int(threads))
    fn = mode_impls(available_impls("cpu", (impl.removesuffix("_logps"),))[0], mode)[impl]
    run_once(fn, make_inputs(pair_shape(SHAPES["cpu-tiny"]), DTYPES[dtype], "cpu", 0.1, 0), mode)  # load libraries
    x = make_inputs(
        Shape(*map(int, dims.split(","))), DTYPES[dtype], "cpu", float(ignore_frac), int(seed), pair=mode == "pair"
    )
    gc.collect()
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before, method = _rss_kb("VmHWM"), "VmHWM"  # = the RSS at the reset
    except OSError:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    run_once(fn, x, mode)
    after = _rss_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux syncs RSS counters lazily (64 page faults per thread): below ~1 MB this is noise, never < 0
    print(f"{max(0, after - before) / 1024:.1f} {method}")


def cpu_peak_extra_mb(impl: str, shape: Shape, dtype: str, mode: str, args: Args):
    """-> (MB or None, how it was measured): one run of `impl` in a fresh subprocess."""
    code = "import sys, selfpo_kernels.bench as b; b.child_peak_rss_mb(*sys.argv[1:])"
    dims = f"{shape.tokens},{shape.hidden},{shape.vocab},{shape.seqs}"
    argv = [impl, dims, dtype, mode, str(args.ignore_frac), str(args.seed), str(torch.get_num_threads())]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if done.returncode:
        return None, f"memory subprocess failed: {done.stderr.strip().splitlines()[-1:]}"
    megabytes, method = done.stdout.split()[-2:]
    return float(megabytes), f"peak RSS delta, fresh subprocess ({method})"


# ---------------------------------------------------------------------------------------------
# Report.

COLUMNS = [
    "device",
    "torch",
    "triton",
    "peers",
    "threads",
    "load_avg",
    "date_utc",
    "command",
    "impl",
    "shape",
    "N",
    "H",
    "V",
    "seqs",
    "ignored_frac",
    "dtype",
    "mode",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "repeats",
    "time_vs_naive",
    "peak_extra_mb",
    "grads_mb",
    "mem_vs_naive",
    "memory_method",
    "max_abs_err",
    "rel_err",
    "grad_rel_err",
    "floor_ms",
    "frac_of_floor",
    "status",
]
METRICS = COLUMNS[COLUMNS.index("median_ms") : -1]  # filled per result; left empty when not measured


def device_name(device: str) -> str:
    """GPU name, or cpu-<model name from /proc/cpuinfo>, as a slug for the CSV file name."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    if device != "cuda" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1] for line in cpuinfo if line.startswith("model name")), name)
    return re.sub(r"[^a-z0-9]+", "-", (name if device == "cuda" else "cpu-" + name).lower()).strip("-")


def flop_floor_ms(mode: str, scored: int, shape: Shape, peak_tflops: float) -> float:
    """PERF.md: 2NHV forward, + 4NHV backward (no recompute), + 2NHV for the reference forward."""
    flops = {"fwd": 2, "fwd_bwd": 6, "fwd_bwd_ref": 8, "pair": 8}[mode] * scored * shape.hidden * shape.vocab
    return flops / (peak_tflops * 1e12) * 1e3


def print_table(rows: list[dict], cuda: bool):
    columns = {
        "impl": "",
        "shape": "",
        "dtype": "",
        "mode": "",
        "median_ms": ".1f",
        "p10_ms": ".1f",
        "p90_ms": ".1f",
        "time_vs_naive": ".2f",
        "peak_extra_mb": ".1f",
        "mem_vs_naive": ".2f",
        "rel_err": ".1e",
        "grad_rel_err": ".1e",
        **({"floor_ms": ".2f", "frac_of_floor": ".0%"} if cuda else {}),
        "status": "",
    }
    lines = [list(columns)] + [[format(r[c], f) if r[c] != "" else "" for c, f in columns.items()] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def write_csv(rows: list[dict], path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        if header != COLUMNS:
            raise ValueError(f"{path}: existing header {header} differs from {COLUMNS}; pass --out elsewhere")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if not exists:
            writer.writeheader()
        writer.writerows({k: format(v, ".6g") if isinstance(v, float) else v for k, v in row.items()} for row in rows)


# ---------------------------------------------------------------------------------------------
# BENCH LOGIC: check every implementation, then time and measure the ones that passed.


def check(row: dict, fn: Callable, x: Inputs, mode: str, expected) -> bool:
    """Run once, fill the error columns and status of `row`; True when within tolerance."""
    try:
        policy, ref, grad_hidden, grad_weight = run_once(fn, x, mode)
    except Exception as error:  # noqa: BLE001 -- a crashing peer is a row, not the end of the run
        row["status"] = f"ERROR {type(error).__name__}: {str(error)[:120]}"
        if torch.cuda.is_available():  # e.g. out of memory: give the next implementation a clean slate
            torch.cuda.empty_cache()
        return False
    got = (policy, ref if mode == "fwd_bwd_ref" else None)
    row["max_abs_err"] = max((a.float() - b).abs().max().item() for a, b in zip(got, expected[:2]) if a is not None)
    row["rel_err"] = relative_error(got, expected[:2])
    row["grad_rel_err"] = relative_error((grad_hidden, grad_weight), expected[2:])
    log_tol, grad_tol = (PAIR_TOLERANCES if mode == "pair" else TOLERANCES)[row["dtype"]]
    if mode == "fwd_bwd_ref" and ref is None:
        row["status"] = "FAILED: no reference log-probs returned"
    elif row["rel_err"] > log_tol or row["grad_rel_err"] > grad_tol:
        row["status"] = f"FAILED (tolerance {log_tol:g} / {grad_tol:g})"
    else:
        row["status"] = "ok"
    return row["status"] == "ok"


def main(args: Args, argv: list[str] | None = None) -> list[dict]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    shape_names, dtypes = args.shapes or DEFAULT_SHAPES[device], args.dtypes or (("bf16",) if cuda else ("fp32",))
    for option, values, known in (
        ("shapes", shape_names, SHAPES),
        ("modes", args.modes or (), MODES),
        ("dtypes", dtypes, DTYPES),
    ):
        if unknown := [v for v in values if v not in known]:
            raise ValueError(f"--{option}: unknown {unknown}; known: {list(known)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    impls, versions, notes = available_impls(device, args.impls)
    common = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peers": " ".join(f"{k}={v}" for k, v in versions.items()),
        "threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m selfpo_kernels.bench {shlex.join(argv)}".rstrip() if argv is not None else repr(args),
        "ignored_frac": args.ignore_frac,
    }
    print(" | ".join(f"{k} {common[k]}" for k in ("device", "torch", "triton", "threads")) + f" | impls {list(impls)}")
    for note in notes:
        print("  " + note)

    rows = []
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        for dtype in dtypes:
            inputs = {}  # by layout: the pair mode has its own (pairs of PAIR_SEQ_LEN-token sequences)
            for mode in args.modes or shape.modes:
                layout = pair_shape(shape) if mode == "pair" else shape
                if layout not in inputs:
                    inputs.clear()  # one layout's tensors at a time
                    x = make_inputs(layout, DTYPES[dtype], device, args.ignore_frac, args.seed, pair=mode == "pair")
                    inputs[layout] = x, {}, int((x.labels != IGNORE).sum())
                x, expected_by_mode, scored = inputs[layout]
                kind = "pair" if mode == "pair" else "logps"
                if kind not in expected_by_mode:
                    expected_by_mode[kind] = pair_oracle(x) if mode == "pair" else oracle(x)
                expected = expected_by_mode[kind]
                grads_mb = sum(t.numel() * t.element_size() for t in (x.hidden, x.weight)) / 2**20
                fns = mode_impls(impls, mode)
                print(f"{shape_name} ({shape.tokens}x{shape.hidden}x{shape.vocab}) {dtype} {mode} ...", flush=True)
                results = {
                    name: {
                        **common,
                        "impl": name,
                        "shape": shape_name,
                        "N": shape.tokens,
                        "H": shape.hidden,
                        "V": shape.vocab,
                        "seqs": layout.seqs,
                        "dtype": dtype,
                        "mode": mode,
                        **dict.fromkeys(METRICS, ""),
                        "grads_mb": grads_mb if "bwd" in mode or mode == "pair" else 0.0,
                    }
                    for name in fns
                }
                # a fast wrong result must not print a number: only checked implementations are timed
                checked = {name: fn for name, fn in fns.items() if check(results[name], fn, x, mode, expected)}
                times = time_round_robin(checked, x, mode, args.warmup, args.repeats, device)
                load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else ""  # other jobs skew CPU times
                for name, fn in checked.items():
                    row, ms = results[name], times[name]
                    deciles = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else ms * 9
                    row.update(
                        load_avg=load_avg,
                        median_ms=statistics.median(ms),
                        p10_ms=deciles[0],
                        p90_ms=deciles[-1],
                        repeats=len(ms),
                    )
                    if cuda:
                        row["floor_ms"] = flop_floor_ms(mode, scored, shape, args.peak_tflops)
                        row["frac_of_floor"] = row["floor_ms"] / row["median_ms"]
                    if args.memory and cuda:
                        row["peak_extra_mb"] = cuda_peak_extra_mb(fn, x, mode)
                        row["memory_method"] = "cuda max_memory_allocated delta"
                    elif args.memory:
                        megabytes, row["memory_method"] = cpu_peak_extra_mb(name, layout, dtype, mode, args)
                        row["peak_extra_mb"] = "" if megabytes is None else megabytes
                naive = results["naive"]
                for row in results.values():
                    if row["median_ms"] != "" and naive["median_ms"] != "":
                        row["time_vs_naive"] = row["median_ms"] / naive["median_ms"]
                    if row["peak_extra_mb"] != "" and naive["peak_extra_mb"] not in ("", 0.0):
                        row["mem_vs_naive"] = row["peak_extra_mb"] / naive["peak_extra_mb"]
                rows.extend(results.values())
            del x, expected, inputs

    print()
    print_table(rows, cuda)
    if cuda:
        print(
            f"floor_ms: 2NHV fwd, 6NHV fwd+bwd (8NHV if logits are recomputed), +2NHV reference; N = scored "
            f"tokens; at {args.peak_tflops:g} TFLOP/s"
        )
    print(
        "peak_extra_mb: extra memory of one run beyond its inputs, including the gradients (grads_mb): "
        + ("cuda max_memory_allocated delta" if cuda else "peak-RSS delta of one run in a fresh subprocess")
    )
    out = args.out or os.path.join("benchmarks", "results", f"{common['device']}.csv")
    write_csv(rows, out)
    print(f"wrote {len(rows)} rows to {out}")
    return rows


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


if __name__ == "__main__":
    main(tyro.cli(Args), sys.argv[1:])
