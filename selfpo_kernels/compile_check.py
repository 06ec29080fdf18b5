"""`python -m selfpo_kernels.compile_check`: every Triton kernel compiled ahead of time for sm_90 and sm_80, no GPU.

Each kernel is compiled exactly as the launcher would launch it (same tile table, same argument
list and so the same specialisation: dtypes, 16-byte alignment, divisibility), through Triton's
own compiler and the `ptxas` its wheel ships, for every combination of architecture, dtype,
policy / policy+reference, soft-cap on/off and shape. Per row: registers and spills (`ptxas -v`),
shared memory, the MMA instruction (wgmma / mma.sync / FMA), 16-byte `cp.async` copies, and
offset*stride products computed in int32 (`arith.muli` on an i32 tensor in the TTIR; all are
int64 since V*H and N*H can pass 2^31).
Exits non-zero on a compile failure, a spill at a default configuration, a 16-bit kernel on sm_90
without wgmma, or an int32 offset*stride product. Static analysis only: no timing.

    python -m selfpo_kernels.compile_check                     # the full table (a few minutes on 2 cores)
    python -m selfpo_kernels.compile_check --archs 90 --dtypes bf16 --shapes llama3-8b
    python -m selfpo_kernels.compile_check --extra-tiles 128,128,64,8,3   # also try a candidate tile
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

from . import logps, pair
from .ops import folded_width

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (N scored rows, H, V). "bias-fold" is what `_fold_bias` makes of H=4096 (padded to a
# multiple of 64); "unpadded-4097" is the same fold without padding, for comparison (not a default).
SHAPES = {
    "llama3-8b": (8192, 4096, 128256),
    "bias-fold": (8192, folded_width(4096), 128256),
    "unpadded-4097": (8192, 4097, 128256),
    "vh>2^31": (8192, 16384, 152064),  # V*H = 2.5e9: a 405B-class width with a Qwen-size vocabulary
    "nh>2^31": (300001, 8192, 32000),  # N*H = 2.5e9: long contexts (and N not a multiple of 16)
}
KINDS = ("fwd", "fwd_ref", "bwd", "pair_stats", "pair_grad")
MEMORY_BOUND = ("pair_stats", "pair_grad")  # no product inside: no MMA expected


@dataclasses.dataclass
class Args:
    archs: tuple[int, ...] = (90, 80)
    """compute capabilities to compile for (90 = H100/H200, 80 = A100)"""
    dtypes: tuple[Literal["bf16", "fp16", "fp32"], ...] = ("bf16", "fp16", "fp32")
    kinds: tuple[Literal["fwd", "fwd_ref", "bwd", "pair_stats", "pair_grad"], ...] = KINDS
    """fwd = policy forward, fwd_ref = policy + reference forward (one launch), bwd = gradient kernel;
    pair_stats / pair_grad = the pair op's log-sum-exp and dZ kernels over a workspace of logits (with a bias)"""
    softcaps: tuple[bool, ...] = (False, True)
    shapes: tuple[Literal["llama3-8b", "bias-fold", "unpadded-4097", "vh>2^31", "nh>2^31"], ...] = tuple(SHAPES)
    extra_tiles: tuple[str, ...] = ()
    """candidate tiles BLOCK_M,BLOCK_V,BLOCK_K,warps,stages compiled besides the launcher's (reported; they
    fail the run only if they do not compile)"""
    fp32_dot: Literal["tf32x3", "ieee", "tf32"] = logps.FP32_DOT
    """tl.dot input precision for fp32 inputs: ieee or tf32x3 (tensor cores, three tf32 products)"""
    sms: int = 132
    """streaming multiprocessors assumed for the forward's vocabulary split (H100 SXM: 132)"""
    estimate: bool = True
    """also print the static FLOP / DRAM-byte estimate per kernel (bf16, sm_90 tiles) for --shapes"""


class FakeTensor:
    """A CUDA tensor as Triton's binder sees it: dtype, shape, strides and a 16-byte-aligned address."""

    def __init__(self, shape, dtype, offset_bytes=0):
        self.shape, self.dtype, self._ptr = tuple(shape), dtype, (1 << 32) + offset_bytes
        self._strides = tuple(int(torch.tensor(shape[i + 1 :]).prod()) for i in range(len(shape)))

    def stride(self, dim):
        return self._strides[dim]

    def data_ptr(self):
        return self._ptr


def launch(kind, dtype, softcap, shape, arch, sms, tile=None):
    """(kernel, args, meta, grid) exactly as selfpo_kernels.logps builds them for this shape."""
    rows, hidden, vocab = shape
    if tile is not None:
        saved = dict(logps.TILES)
        logps.TILES.update({key: tile for key in logps.TILES})
    try:
        if kind in MEMORY_BOUND:  # one workspace block of the pair op, as selfpo_kernels.pair launches it
            chunk = min(rows, pair.WORKSPACE_BYTES["triton"] // (vocab * dtype.itemsize))
            ws, vec = FakeTensor((chunk, vocab), dtype), FakeTensor((chunk,), torch.float32)
            bias, targets = FakeTensor((vocab,), dtype), FakeTensor((chunk,), torch.int64)
            meta = pair.kernel_meta(kind.removeprefix("pair_"), True, softcap is not None)
            if kind == "pair_stats":
                return (
                    pair._pair_stats_kernel,
                    pair.stats_args(ws, bias, targets, vec, vec, 1.0, softcap),
                    meta,
                    (chunk,),
                )
            return (
                pair._pair_grad_kernel,
                pair.grad_args(ws, bias, targets, vec, vec, 1.0, softcap),
                meta,
                pair.grad_grid(chunk, vocab, meta),
            )
        if kind == "bwd":
            plan = logps.backward_plan(rows, vocab, dtype, arch, logps.WORKSPACE_BYTES)
            chunk, part = plan["chunk_rows"], plan["chunk_vocab"]  # one workspace block
            h = FakeTensor((chunk, hidden), dtype)
            args = logps.backward_args(
                h,
                FakeTensor((part, hidden), dtype),
                FakeTensor((chunk,), torch.int64),
                FakeTensor((chunk,), torch.float32),
                FakeTensor((chunk,), torch.float32),
                FakeTensor((chunk, part), dtype),
                1.0,
                softcap,
            )
            return logps._grad_logits_kernel, args, plan["meta"], logps.backward_grid(plan, chunk, part)
        models = 2 if kind == "fwd_ref" else 1
        plan = logps.forward_plan(rows, vocab, models, dtype, arch, sms)
        stat_bytes = 4 * models * plan["n_splits"] * rows  # stats[1] follows stats[0] in one buffer
        h, w = FakeTensor((rows, hidden), dtype), FakeTensor((vocab, hidden), dtype)
        args = logps.forward_args(
            plan,
            h,
            w,
            h,
            w,
            FakeTensor((rows,), torch.int64),
            FakeTensor((), torch.int64),
            FakeTensor((rows,), torch.float32),
            FakeTensor((rows,), torch.float32, stat_bytes),
            FakeTensor((models, rows), torch.float32),
            1.0,
            softcap,
        )
        return logps._forward_kernel, args, plan["meta"], plan["grid"]
    finally:
        if tile is not None:
            logps.TILES.clear()
            logps.TILES.update(saved)


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
    mma = sorted(set(re.findall(r"(wgmma\.mma_async\.sync|mma\.sync)\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(
        regs=int(re.search(r"Used (\d+) registers", log).group(1)),
        spill=int(spills.group(1)) + int(spills.group(2)),
        smem=kernel.metadata.shared,
        mma=" ".join(f"{'wgmma' if a.startswith('wgmma') else 'mma'}.{s}" for a, s in mma) or "FMA",
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


def check_row(row, default) -> str:
    """'' if the row is acceptable, else the reason it fails the check."""
    if "error" in row:
        return "compile failed"
    problems = []
    if default and row["spill"]:
        problems.append("spills at a default tile")
    if (
        row["arch"] >= 90
        and row["dtype"] != "fp32"
        and "wgmma" not in row["mma"]
        and row.get("kernel") not in MEMORY_BOUND
    ):
        problems.append("16-bit kernel without wgmma on sm_90")
    if row["i32_offs"]:
        problems.append("int32 offset*stride products")
    return "; ".join(problems)


def _parse_tile(text: str) -> tuple[int, ...]:
    try:
        tile = tuple(int(x) for x in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 5:
        raise SystemExit(
            f"selfpo_kernels.compile_check: error: --extra-tiles: {text!r} is not "
            "BLOCK_M,BLOCK_V,BLOCK_K,num_warps,num_stages (five integers)"
        )
    return tile


def run(args: Args) -> list[dict]:
    if not isinstance(logps._forward_kernel, triton.runtime.jit.JITFunction):
        raise SystemExit(
            "selfpo_kernels.compile_check: error: the kernels were built for Triton's interpreter "
            "(TRITON_INTERPRET=1 is set); unset it to compile them"
        )
    logps.FP32_DOT = args.fp32_dot
    tiles = [None] + [_parse_tile(t) for t in args.extra_tiles]
    cache, rows = {}, []
    for arch, kind, dtype_name, softcap, shape_name, tile in itertools.product(
        args.archs, args.kinds, args.dtypes, args.softcaps, args.shapes, tiles
    ):
        cap = 30.0 if softcap else None
        fn, kargs, meta, grid = launch(kind, DTYPES[dtype_name], cap, SHAPES[shape_name], arch, args.sms, tile)
        row = dict(
            kernel=kind,
            arch=arch,
            dtype=dtype_name,
            softcap=int(softcap),
            shape=shape_name,
            tile="x".join(str(meta.get(k, 1)) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K"))
            + f"/{meta['num_warps']}w/{meta.get('num_stages', 3)}s",
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
        default = tile is None and shape_name != "unpadded-4097"
        row["default"] = int(default)
        if tile is None:
            problem = check_row(row, default)
        else:  # a candidate: reported, fails the run only if it does not compile
            problem = "compile failed" if "error" in row else ""
        row["status"] = "FAIL: " + problem if problem else "ok"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


TFLOPS, TBPS = 790.0, 3.35  # H100 SXM: achievable dense bf16 (PERF.md), HBM3 bandwidth


def estimate(shape, sms: int, dtype=torch.bfloat16, arch: int = 90) -> list[tuple[str, float, float]]:
    """(step, FLOPs, DRAM bytes) of one policy fwd+bwd + reference fwd, from the launch plans. A model,
    not a measurement: one CTA per SM; a forward program's h rows and the W tiles its wave shares
    stay in L2 (so W is read once per wave of SMs/splits row blocks); the backward kernel reads W
    once per GROUP_M row blocks; cuBLAS reads each GEMM operand once per call."""
    rows, hidden, vocab = shape
    es, hv = dtype.itemsize, hidden * vocab
    plan = logps.forward_plan(rows, vocab, 2, dtype, arch, sms)
    waves = -(-plan["grid"][1] // max(1, sms // plan["n_splits"]))
    fwd = (2.0 * rows * hv, waves * hv * es + rows * hidden * es)
    back = logps.backward_plan(rows, vocab, dtype, arch, logps.WORKSPACE_BYTES)
    row_chunks, vocab_chunks = -(-rows // back["chunk_rows"]), -(-vocab // back["chunk_vocab"])
    row_groups = -(-rows // (back["block_m"] * logps.GROUP_M))
    dz, h_reads = rows * vocab * es, vocab_chunks * rows * hidden * es
    kernel = (2.0 * rows * hv, row_groups * hv * es + h_reads + dz)
    # the gradient split across workspace blocks accumulates in fp32: read + written per block
    d_hidden = (
        2.0 * rows * hv,
        dz + row_chunks * hv * es + (vocab_chunks * 2 * rows * hidden * 4 if vocab_chunks > 1 else rows * hidden * es),
    )
    d_weight = (2.0 * rows * hv, dz + h_reads + (row_chunks * 2 * hv * 4 if row_chunks > 1 else hv * es))
    return [
        ("forward, policy", *fwd),
        ("forward, reference (same launch)", *fwd),
        ("backward: dZ kernel (recomputes logits)", *kernel),
        ("backward: dH = dZ W (cuBLAS)", *d_hidden),
        ("backward: dW = dZ^T H (cuBLAS)", *d_weight),
    ]


def print_estimate(name, shape, sms):
    print(
        f"\nStatic estimate (not a measurement), {name} N={shape[0]} H={shape[1]} V={shape[2]} bf16, sm_90 tiles, "
        f"{sms} SMs; bounds at {TFLOPS:.0f} TFLOP/s and {TBPS} TB/s"
    )
    print("| step | GFLOP | DRAM GB (model) | FLOP/byte | compute-bound ms | memory-bound ms |")
    print("|---|---|---|---|---|---|")
    total = [0.0, 0.0, 0.0]
    for step, flops, nbytes in estimate(shape, sms):
        ms_c, ms_m = flops / TFLOPS / 1e9, nbytes / TBPS / 1e9
        total = [total[0] + ms_c, total[1] + ms_m, total[2] + max(ms_c, ms_m)]
        print(f"| {step} | {flops / 1e9:.0f} | {nbytes / 1e9:.2f} | {flops / nbytes:.0f} | {ms_c:.2f} | {ms_m:.2f} |")
    print(f"| total (sum of per-step max) | | | | | {total[2]:.1f} |")


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
    "mma",
    "cp16",
    "i32_offs",
    "default",
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
        f"SMs assumed {args.sms}, workspace {logps.WORKSPACE_BYTES >> 20} MB"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = run(args)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} rows, {len(failed)} failed")
    if args.estimate:
        for name in args.shapes:
            if name in ("llama3-8b", "vh>2^31"):
                print_estimate(name, SHAPES[name], args.sms)
            if name == "llama3-8b":
                print_pair_estimate(name, SHAPES[name])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
