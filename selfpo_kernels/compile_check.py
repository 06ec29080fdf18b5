"""`python -m selfpo_kernels.compile_check`: every Triton kernel compiled ahead of time for sm_90 and sm_80, no GPU.

Each kernel is compiled exactly as the engine would launch it (same launch constants, same argument list and so the
same specialisation: dtypes, 16-byte alignment, divisibility), through Triton's own compiler and the `ptxas` its wheel
ships, for every combination of architecture, dtype, soft-cap on/off and shape (one workspace chunk of the vocabulary,
with a bias). Per row: registers and spills (`ptxas -v`), shared memory, 16-byte `cp.async` copies, and offset*stride
products computed in int32 (`arith.muli` on an i32 tensor in the TTIR; all are int64).
Exits non-zero on a compile failure, a spill, or an int32 offset*stride product. Static analysis only: no timing.

    python -m selfpo_kernels.compile_check                     # the full table (about a minute on 2 cores)
    python -m selfpo_kernels.compile_check --archs 90 --dtypes bf16 --shapes llama3-8b
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
from typing import Literal

import torch
import triton
import tyro

from . import pair

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (N scored rows, H, V): the kernels see one workspace chunk [rows, V] (rows = the workspace's, at most N)
SHAPES = {
    "llama3-8b": (8192, 4096, 128256),
    "vh>2^31": (8192, 16384, 152064),  # V*H = 2.5e9: a 405B-class width with a Qwen-size vocabulary
    "nh>2^31": (300001, 8192, 32000),  # N*H = 2.5e9: long contexts (and N not a multiple of 16)
}
KINDS = ("pair_stats", "pair_grad")


@dataclasses.dataclass
class Args:
    archs: tuple[int, ...] = (90, 80)
    """compute capabilities to compile for (90 = H100/H200, 80 = A100)"""
    dtypes: tuple[Literal["bf16", "fp16", "fp32"], ...] = ("bf16", "fp16", "fp32")
    kinds: tuple[Literal["pair_stats", "pair_grad"], ...] = KINDS
    """the engine's log-sum-exp kernel and dZ kernel over a workspace of logits (with a bias)"""
    softcaps: tuple[bool, ...] = (False, True)
    shapes: tuple[Literal["llama3-8b", "vh>2^31", "nh>2^31"], ...] = tuple(SHAPES)
    estimate: bool = True
    """also print the static FLOP / DRAM-byte estimate of the pair step (bf16) for llama3-8b"""


class FakeTensor:
    """A CUDA tensor as Triton's binder sees it: dtype, shape, strides and a 16-byte-aligned address."""

    def __init__(self, shape, dtype, offset_bytes=0):
        self.shape, self.dtype, self._ptr = tuple(shape), dtype, (1 << 32) + offset_bytes
        self._strides = tuple(int(torch.tensor(shape[i + 1 :]).prod()) for i in range(len(shape)))

    def stride(self, dim):
        return self._strides[dim]

    def data_ptr(self):
        return self._ptr


def launch(kind, dtype, softcap, shape):
    """(kernel, args, meta, grid) of one workspace chunk, exactly as selfpo_kernels.pair launches it."""
    rows, _, vocab = shape
    chunk = min(rows, pair.WORKSPACE_BYTES["triton"] // (vocab * dtype.itemsize))
    ws, vec = FakeTensor((chunk, vocab), dtype), FakeTensor((chunk,), torch.float32)
    bias, targets = FakeTensor((vocab,), dtype), FakeTensor((chunk,), torch.int64)
    meta = pair.kernel_meta(kind.removeprefix("pair_"), True, softcap is not None)
    args = pair.kernel_args(ws, bias, targets, vec, vec, 1.0, softcap)
    if kind == "pair_stats":
        return pair._pair_stats_kernel, args, meta, (chunk,)
    return pair._pair_grad_kernel, args, meta, pair.grad_grid(chunk, vocab, meta)


def compile_one(fn, args, meta, arch, softcap):
    """Compile for sm_<arch> and return the measurements of one row."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(meta, HAS_SOFTCAP=softcap is not None, debug=False)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    finally:
        os.unlink(f.name)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(
        regs=int(re.search(r"Used (\d+) registers", log).group(1)),
        spill=int(spills.group(1)) + int(spills.group(2)),
        smem=kernel.metadata.shared,
        cp16=ptx.count("], 0x10"),
        i32_offs=len(re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", ttir)),
    )


def _specialisation(arg):
    """What Triton specialises a launch argument on (dtype; 16-byte alignment; int value 1, %16, 64-bit)."""
    if isinstance(arg, FakeTensor):
        return str(arg.dtype), arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        return "int", arg == 1, arg % 16 == 0, abs(arg) >= 1 << 31
    return type(arg).__name__


def check_row(row) -> str:
    """'' if the row is acceptable, else the reason it fails the check."""
    if "error" in row:
        return "compile failed"
    problems = []
    if row["spill"]:
        problems.append("spills")
    if row["i32_offs"]:
        problems.append("int32 offset*stride products")
    return "; ".join(problems)


def run(args: Args) -> list[dict]:
    if not isinstance(pair._pair_stats_kernel, triton.runtime.jit.JITFunction):
        raise SystemExit(
            "selfpo_kernels.compile_check: error: the kernels were built for Triton's interpreter "
            "(TRITON_INTERPRET=1 is set); unset it to compile them"
        )
    cache, rows = {}, []
    for arch, kind, dtype_name, softcap, shape_name in itertools.product(
        args.archs, args.kinds, args.dtypes, args.softcaps, args.shapes
    ):
        cap = 30.0 if softcap else None
        fn, kargs, meta, grid = launch(kind, DTYPES[dtype_name], cap, SHAPES[shape_name])
        row = dict(
            kernel=kind,
            arch=arch,
            dtype=dtype_name,
            softcap=int(softcap),
            shape=shape_name,
            tile=f"{meta['BLOCK_V']}/{meta['num_warps']}w",
            grid="x".join(map(str, grid)),
        )
        # the binary depends on the specialisation only, not on the shape's values
        key = (fn.__name__, arch, str(meta), cap is not None, tuple(map(_specialisation, kargs)))
        if key not in cache:
            try:
                cache[key] = compile_one(fn, kargs, meta, arch, cap)
            except Exception as err:  # report, keep going
                cache[key] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        row.update(cache[key])
        problem = check_row(row)
        row["status"] = "FAIL: " + problem if problem else "ok"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


TFLOPS, TBPS = 790.0, 3.35  # H100 SXM: achievable dense bf16 (PERF.md), HBM3 bandwidth


# The head as the pair op sees it: (trainable, weight bytes per element, dW accumulator bytes per element or 0)
PAIR_HEADS = {
    "trainable bf16 head, fp32 dW accumulator (default)": (True, 2, 4),
    "trainable bf16 head, accum_dtype=bf16": (True, 2, 0),
    "trainable fp32 master head, bf16 hidden states": (True, 4, 0),
    "frozen head (LoRA)": (False, 2, 0),
}


def pair_estimate(shape, head: str, dtype=torch.bfloat16) -> list[tuple[str, float, float]]:
    """(step, FLOPs, DRAM bytes) of `pair_loss_from_hidden`'s Triton path (cuBLAS logits into the workspace, two
    Triton kernels): policy fwd+bwd + reference fwd + the pair loss. Model: per chunk of whole pairs, cuBLAS
    reads each operand once per call and writes its output once (W once per chunk); the log-sum-exp kernel reads
    the chunk's logits once, the dZ kernel reads and writes them; dW += dZ^T H reads and writes its accumulator
    (the fp32 one, or the gradient itself) once per chunk. The pair loss itself works on [B] tensors."""
    trainable, weight_es, _ = PAIR_HEADS[head]
    rows, hidden, vocab = shape
    es, hv = dtype.itemsize, hidden * vocab
    chunk = max(1, min(rows, pair.WORKSPACE_BYTES["triton"] // (vocab * es)))
    chunks, logits, h_bytes = -(-rows // chunk), rows * vocab * es, rows * hidden * es
    gemm = 2.0 * rows * hv
    steps = [
        ("reference logits (cuBLAS, into the workspace)", gemm, chunks * hv * es + h_bytes + logits),
        ("reference log-sum-exp (Triton)", 0.0, logits),
        ("policy logits, once (cuBLAS, into the workspace)", gemm, chunks * hv * es + h_bytes + logits),
        ("policy log-sum-exp (Triton)", 0.0, logits),
        ("dZ = g (onehot - softmax) in place (Triton)", 0.0, 2 * logits),
        ("dH = dZ W (cuBLAS)", gemm, logits + chunks * hv * es + h_bytes),
    ]
    if weight_es != es:
        steps.insert(0, ("bf16 copy of the fp32 master head, once", 0.0, hv * (weight_es + es)))
    if trainable:
        accum = PAIR_HEADS[head][2] or weight_es
        steps.append(
            (f"dW += dZ^T H (cuBLAS, into {accum * 8}-bit sums)", gemm, logits + h_bytes + chunks * 2 * hv * accum)
        )
    return steps


def pair_memory_terms(shape, head: str, dtype=torch.bfloat16) -> list[tuple[str, float]]:
    """(term, bytes) of the pair op's extra memory beyond its inputs, outputs and gradients (Triton path)."""
    _, weight_es, accum_es = PAIR_HEADS[head]
    rows, hidden, vocab = shape
    es = dtype.itemsize
    chunk = max(1, min(rows, pair.WORKSPACE_BYTES["triton"] // (vocab * es)))
    terms = [
        ("workspace (one chunk's logits, then its dZ)", chunk * vocab * es),
        ("chunk rows of h and of the reference's h, the chunk's dH product", 3 * chunk * hidden * es),
        ("per-token indices, targets, lse, label logits", rows * (5 * 8 + 3 * 4)),
    ]
    if weight_es != es:
        terms.append(
            (
                "bf16 copy of the fp32 head for the products, as autocast makes for a linear layer "
                "(one more for an fp32 reference head)",
                vocab * hidden * es,
            )
        )
    if accum_es:
        terms.append(
            ("fp32 dW accumulator (row chunks sum dW; the bf16 gradient is cast from it)", vocab * hidden * accum_es)
        )
    return terms


def print_pair_estimate(name, shape):
    print(
        f"\nStatic estimate (not a measurement) of pair_loss_from_hidden, Triton path, {name} N={shape[0]} "
        f"H={shape[1]} V={shape[2]} bf16, workspace {pair.WORKSPACE_BYTES['triton'] >> 20} MB; "
        f"bounds at {TFLOPS:.0f} TFLOP/s and {TBPS} TB/s"
    )
    for head in PAIR_HEADS:
        print(
            f"\n{head}:\n| step | GFLOP | DRAM GB (model) | compute-bound ms | memory-bound ms |\n|---|---|---|---|---|"
        )
        total = 0.0
        for step, flops, nbytes in pair_estimate(shape, head):
            ms_c, ms_m = flops / TFLOPS / 1e9, nbytes / TBPS / 1e9
            total += max(ms_c, ms_m)
            print(f"| {step} | {flops / 1e9:.0f} | {nbytes / 1e9:.2f} | {ms_c:.2f} | {ms_m:.2f} |")
        print(f"| total (sum of per-step max) | | | | {total:.1f} |")
        terms = pair_memory_terms(shape, head)
        print(
            "extra memory: "
            + "; ".join(f"{t} {b / 2**20:.1f} MB" for t, b in terms)
            + f"; total {sum(b for _, b in terms) / 2**20:.0f} MB"
        )


COLUMNS = (
    "kernel",
    "arch",
    "dtype",
    "softcap",
    "shape",
    "tile",
    "grid",
    "regs",
    "spill",
    "smem",
    "cp16",
    "i32_offs",
    "status",
)


def format_row(row) -> str:
    if "error" in row:
        return "| " + " | ".join(str(row.get(c, "")) for c in COLUMNS[:7]) + f" | {row['error']} | {row['status']} |"
    return "| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |"


def main(args: Args) -> int:
    from triton import knobs

    print(
        f"triton {triton.__version__}, ptxas {knobs.nvidia.ptxas.version} / {knobs.nvidia.ptxas_blackwell.version}, "
        f"workspace {pair.WORKSPACE_BYTES['triton'] >> 20} MB"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = run(args)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} rows, {len(failed)} failed")
    if args.estimate and "llama3-8b" in args.shapes:
        print_pair_estimate("llama3-8b", SHAPES["llama3-8b"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
