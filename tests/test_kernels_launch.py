"""The Triton launcher's design points (issue: compile-checked kernels), in Triton's interpreter on CPU
against float64: int64 offsets, the padded bias fold, the once-per-row label gather, scored-first rows
with a device-side count (no host synchronisation), fp32 dW accumulation, the swizzled backward
grid, and the one-time self-check that names KERNELS_IMPL=torch."""

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

import selfpo_kernels.logps as triton_logps
import selfpo_kernels.ops as ops
import selfpo_kernels.torch_ref as torch_ref
from selfpo_kernels import causal_lm_logps, sequence_logps
from selfpo_kernels.torch_ref import naive_token_logps

pytestmark = pytest.mark.skipif(
    not (triton_logps.HAVE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="no Triton path (needs triton, and CUDA or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_int64_offsets():
    """Rows of W past 2^31 elements from its base: int32 offset*stride products would wrap (they read
    4.07 nats off here). W is a strided view into a lazily allocated 8.5 GB buffer: only touched pages count."""
    vocab, hidden_size, stride = 18, 16, (1 << 27) + 64  # rows 16 and 17 start past 2^31
    base = 1 << 31  # wrapped (negative) offsets would land in this zero-filled prefix, not segfault
    try:
        storage = torch.empty(base + vocab * stride, dtype=torch.float16)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot reserve 8.5 GB of virtual memory: {err}")
    gen = torch.Generator().manual_seed(0)
    w_small = torch.randn(vocab, hidden_size, generator=gen).half()
    weight = storage.as_strided((vocab, hidden_size), (stride, 1), base)
    weight.copy_(w_small)
    hidden = torch.randn(5, hidden_size, generator=gen).half()
    targets = torch.tensor([0, 17, 16, 3, 17])  # labels past 2^31 too (the label gather)
    logps, lse, _ = triton_logps._forward(hidden, weight, None, None, targets, 1.0, None, torch.tensor(5))
    h64 = hidden.double().requires_grad_()
    want = naive_token_logps(h64, w_small, targets, dtype=torch.float64)
    torch.testing.assert_close(logps.double(), want.detach(), atol=1e-3, rtol=0)
    grad = torch.linspace(-1, 1, 5)
    grad_hidden, _ = triton_logps._backward(hidden, weight, targets, lse, grad, 1.0, None, True, False, 5)
    (want_grad,) = torch.autograd.grad((want * grad.double()).sum(), [h64])
    torch.testing.assert_close(grad_hidden.double(), want_grad, atol=2e-2, rtol=0)


def test_bias_fold_is_padded_to_64():
    """h @ W^T + b as one product over H+1 columns, zero-padded to a multiple of 64 (H=4096 -> 4160)."""
    assert [ops.folded_width(h) for h in (4096, 4095, 32, 63)] == [4160, 4096, 64, 64]
    gen = torch.Generator().manual_seed(1)
    hidden, weight, bias = torch.randn(2, 3, 40, generator=gen), torch.randn(7, 40, generator=gen), torch.randn(7)
    folded_h, folded_w = ops._fold_bias(hidden, weight, bias)
    assert folded_h.shape[-1] == folded_w.shape[1] == 64
    torch.testing.assert_close(folded_h @ folded_w.T, hidden @ weight.T + bias)


def test_bias_model_on_triton_path():
    """A model whose lm_head has a bias (Phi), scored by the Triton kernels with the padded fold."""
    from test_kernels_hf import batch, reference_logps, tiny

    model = tiny("phi_bias")
    input_ids, attention_mask, labels = batch(2)
    got, _ = causal_lm_logps(model, input_ids, attention_mask, labels, temperature=0.8, impl="triton")
    want = reference_logps(model, input_ids, attention_mask, labels, temperature=0.8)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_labels_at_vocab_edges_across_splits(dtype):
    """The label logit is gathered once per row (h . W[label]); labels in the first, middle and last
    vocabulary split, soft-cap and temperature on, policy and reference, against float64."""
    vocab, hidden_size = 300, 48  # 10 splits of 32 columns under the interpreter
    plan = triton_logps.forward_plan(37, vocab, 2, dtype, None, 1)
    assert plan["n_splits"] > 1 and plan["grid"][0] == plan["n_splits"]  # the split is the fastest grid axis
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 37, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / 3
    ref_hidden = torch.randn(1, 37, hidden_size, generator=gen)
    labels = torch.randint(0, vocab, (1, 37), generator=gen)
    labels[0, :6] = torch.tensor([0, vocab - 1, 31, 32, 159, vocab - 2])
    labels[0, 30:] = -100
    policy, ref = sequence_logps(
        hidden.to(DEVICE, dtype),
        weight.to(DEVICE, dtype),
        labels.to(DEVICE),
        ref_hidden.to(DEVICE, dtype),
        weight.to(DEVICE, dtype),
        temperature=0.7,
        softcap=3.0,
        reduction="none",
        impl="triton",
    )
    mask = labels[0] != -100
    for got, h in ((policy, hidden), (ref, ref_hidden)):
        h_, w_ = h.to(dtype), weight.to(dtype)  # the oracle sees the same rounded inputs
        want = naive_token_logps(h_[0], w_, labels[0].clamp(min=0), 0.7, 3.0, torch.float64) * mask
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got[0].cpu().double(), want, atol=tol, rtol=0)


def test_rows_past_count_are_skipped():
    """With a device count, rows at or past it score 0 and get a zero gradient, whatever they hold."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 24, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(70, 24, generator=gen) / 3).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 70, (40,), generator=gen).to(DEVICE)
    count = torch.tensor(29, device=DEVICE)
    logps, _ = triton_logps.triton_token_logps(hidden, weight, targets, count=count)
    gh, gw = torch.autograd.grad(logps.sum(), [hidden, weight])
    h64, w64 = hidden.detach().double()[:29].requires_grad_(), weight.detach().double().requires_grad_()
    want = naive_token_logps(h64, w64, targets[:29], dtype=torch.float64)
    want_gh, want_gw = torch.autograd.grad(want.sum(), [h64, w64])
    assert (logps[29:] == 0).all() and (gh[29:] == 0).all()
    torch.testing.assert_close(logps[:29].double(), want.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gh[:29].double(), want_gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw.double(), want_gw, atol=1e-5, rtol=0)


class _SyncSpy(TorchFunctionMode):
    """Records tensor calls that copy a value to the host (each one a device synchronisation on CUDA)."""

    SYNCS = {"__int__", "__bool__", "__float__", "__index__", "item", "tolist", "nonzero", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward(monkeypatch):
    """The Triton path's forward reads nothing back from the device (the old one called `nonzero`,
    `int(min)` and `int(max)`); the backward reads the scored count once, copied during the forward."""
    monkeypatch.setattr(ops, "_device_side_checks", lambda device: True)  # the CUDA branch, on CPU
    monkeypatch.setattr(ops, "_needs_self_check", lambda device: False)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 9, 24, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(50, 24, generator=gen) / 3).to(DEVICE)
    labels = torch.randint(0, 50, (3, 9), generator=gen).to(DEVICE)
    labels[:, :4] = -100
    with _SyncSpy() as spy:
        out, _ = sequence_logps(
            hidden, weight, labels, ref_hidden=hidden.detach(), ref_weight=weight, reduction="mean", impl="triton"
        )
    assert spy.calls == [], spy.calls
    (grad,) = torch.autograd.grad(out.sum(), [hidden])
    want = sequence_logps(hidden, weight, labels, reduction="mean", impl="torch")[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), [hidden])[0], atol=1e-5, rtol=1e-5)


def test_label_check_on_device_and_debug(monkeypatch):
    """Out-of-range labels: a device-side assert on CUDA (here on CPU, where it raises at once); the
    host check naming the label otherwise (KERNELS_DEBUG=1 on CUDA)."""
    hidden, weight = torch.zeros(1, 3, 8, device=DEVICE), torch.zeros(5, 8, device=DEVICE)
    labels = torch.tensor([[1, 7, -100]], device=DEVICE)
    monkeypatch.setattr(ops, "_needs_self_check", lambda device: False)
    monkeypatch.setattr(ops, "_device_side_checks", lambda device: True)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        sequence_logps(hidden, weight, labels, impl="triton")
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_needs_self_check", lambda device: False)
    with pytest.raises(ValueError, match="label 7 is outside the vocabulary"):
        sequence_logps(hidden.cpu(), weight.cpu(), labels.cpu(), impl="triton")
    assert ops._device_side_checks(torch.device("cuda"))
    monkeypatch.setenv("KERNELS_DEBUG", "1")
    assert not ops._device_side_checks(torch.device("cuda"))


def test_weight_grad_accumulates_in_fp32(monkeypatch):
    """dW over several chunks: fp32 accumulation of 16-bit products (torch's addmm(out_dtype=float32) on
    CUDA, checked here on the meta device; fp32 factors on CPU), error vs float64 that of fp32 rounding, far
    below that of any 16-bit product or sum."""
    gen = torch.Generator().manual_seed(5)
    parts = [(torch.randn(64, 96, generator=gen).half(), torch.randn(64, 40, generator=gen).half()) for _ in range(8)]
    acc = torch.zeros(96, 40)
    for a, b in parts:
        torch_ref.add_matmul_fp32_(acc, a.T, b)
    want = sum(a.T.double() @ b.double() for a, b in parts)
    # Measured on these inputs (max |dW| = 88.1), max error / max |dW|: fp32 factors 1.6e-7; each product in fp16
    # then summed in fp32 2.7e-4; fp16 products and sum 8.8e-4; bf16 products 2.9e-3. The bar sits 60x above
    # fp32 and 27x below the best 16-bit variant.
    assert (acc.double() - want).abs().max() < 1e-5 * want.abs().max()
    assert torch_ref._ADDMM_OUT_DTYPE == hasattr(torch.ops.aten.addmm, "dtype_out")
    if torch_ref._ADDMM_OUT_DTYPE:  # the CUDA branch's call, shape- and dtype-checked on meta tensors
        calls = []
        real_addmm = torch.addmm
        monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k) or real_addmm(*a, **k))
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        meta_acc = torch.zeros(96, 40, device="meta")
        torch_ref.add_matmul_fp32_(meta_acc, parts[0][0].to("meta").T, parts[0][1].to("meta"))
        assert calls and calls[0]["out_dtype"] == torch.float32 and calls[0]["out"] is meta_acc


def _round_tf32(x):  # to 10 mantissa bits, nearest with ties away, as PTX cvt.rna.tf32.f32
    return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _emulated_dot(a, b, precision):
    """a @ b as a GPU tl.dot computes it from fp32 inputs with `input_precision=precision`."""
    if precision == "ieee":
        return a @ b
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    if precision == "tf32":
        return a_hi @ b_hi
    a_lo, b_lo = _round_tf32(a - a_hi), _round_tf32(b - b_hi)  # tf32x3: hi*hi + hi*lo + lo*hi
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


@pytest.mark.parametrize("shape", [(10, 16, 33), (34, 64, 200), (64, 4096, 2048)])
def test_fp32_dot_precision_meets_the_oracle_rule(shape):
    """The interpreter ignores input_precision, so FP32_DOT (tf32x3) is checked in emulation: its
    log-probs stay within 2x naive fp32's error vs float64 plus the fp32 floor (plain tf32 does not).
    On a GPU, the fp32 self-check applies the same rule to the real kernels."""
    rows, hidden_size, vocab = shape
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(rows, hidden_size, generator=gen), torch.randn(vocab, hidden_size, generator=gen)
    weight = weight / hidden_size**0.5 * 3
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    exact = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])

    def error(precision):
        logits = _emulated_dot(hidden, weight.T, precision)
        return (torch.log_softmax(logits, -1).gather(1, targets[:, None]).double() - exact).abs().max().item()

    assert error(triton_logps.FP32_DOT) <= 2 * error("ieee") + 2e-5
    assert error("tf32") > 2 * error("ieee") + 2e-5  # the rule can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,vocab,split", [(40, 300, "vocab"), (150, 70, "rows")])
def test_backward_workspace_blocks(rows, vocab, split, dtype):
    """A workspace of ~16 x 32 entries splits dZ along the longer side (vocabulary when rows < vocab:
    dH accumulates in fp32, each dW slice is written once; rows otherwise: dW accumulates); the
    gradients equal float64's, as with one block."""
    workspace = 16 * 32 * dtype.itemsize
    plan = triton_logps.backward_plan(rows, vocab, dtype, None, workspace)
    assert (plan["chunk_vocab"] < vocab) == (split == "vocab") and (plan["chunk_rows"] < rows) == (split == "rows")
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(rows, 24, generator=gen).to(dtype)
    weight = (torch.randn(vocab, 24, generator=gen) / 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    cotangent = torch.randn(rows, generator=gen)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    oracle = naive_token_logps(h64, w64, targets, 0.8, 3.0, torch.float64)
    want = torch.autograd.grad((oracle * cotangent.double()).sum(), [h64, w64])
    _, lse, _ = triton_logps._forward(hidden, weight, None, None, targets, 0.8, 3.0, torch.tensor(rows))
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for workspace_bytes in (workspace, None):  # blocks, then one block
        got = triton_logps._backward(
            hidden, weight, targets, lse, cotangent, 0.8, 3.0, True, True, rows, workspace_bytes
        )
        for g, w in zip(got, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, atol=tol * max(1.0, w.abs().max().item()), rtol=0)


def test_swizzled_backward_grid_covers_every_tile():
    """13 row blocks (one full group of GROUP_M=8 and a partial one) x 4 vocabulary tiles."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(200, 32, generator=gen).requires_grad_()
    weight = (torch.randn(97, 32, generator=gen) / 3).requires_grad_()
    targets = torch.randint(0, 97, (200,), generator=gen)
    cotangent = torch.randn(200, generator=gen)
    out, _ = triton_logps.triton_token_logps(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), softcap=4.0)
    got = torch.autograd.grad((out.cpu() * cotangent).sum(), [hidden, weight])
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = naive_token_logps(h64, w64, targets, 1.0, 4.0, torch.float64)
    for g, w in zip(got, torch.autograd.grad((want * cotangent.double()).sum(), [h64, w64])):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=0)


def test_self_check_passes_and_names_the_way_out(monkeypatch):
    ops._SELF_CHECKED.clear()
    ops.self_check(torch.device(DEVICE), torch.float32)  # the real kernels pass
    assert (DEVICE, torch.float32) in {(d, t) for d, t in ops._SELF_CHECKED}
    ops._SELF_CHECKED.clear()
    real = ops.triton_token_logps

    def off_by_a_bit(*args, **kwargs):
        policy, ref = real(*args, **kwargs)
        return policy + 1e-3, ref

    monkeypatch.setattr(ops, "triton_token_logps", off_by_a_bit)
    with pytest.raises(RuntimeError, match="self-check failed.*KERNELS_IMPL=torch"):
        ops.self_check(torch.device(DEVICE), torch.float32)

    def broken(*args, **kwargs):
        raise ValueError("no kernel image for this device")

    monkeypatch.setattr(ops, "triton_token_logps", broken)
    with pytest.raises(RuntimeError, match="do not run on.*no kernel image.*KERNELS_IMPL=torch"):
        ops.self_check(torch.device(DEVICE), torch.float32)
    assert not ops._SELF_CHECKED


def test_self_check_runs_once_per_device_and_dtype(monkeypatch):
    ops._SELF_CHECKED.clear()
    monkeypatch.setattr(ops, "_needs_self_check", lambda device: True)  # as on CUDA
    calls = []
    real = ops.triton_token_logps
    monkeypatch.setattr(ops, "triton_token_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, labels = torch.randn(1, 4, 8), torch.randn(11, 8), torch.randint(0, 11, (1, 4))
    with torch.no_grad():  # the check takes gradients even when the caller does not
        for _ in range(3):
            sequence_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), impl="triton")
    assert len(calls) == 1 + 3  # one self-check, then the three calls
    ops._SELF_CHECKED.clear()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda():
    """On a GPU, torch's sync debug mode turns any synchronising call of the forward into an error."""
    hidden = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16) / 8
    labels = torch.randint(0, 1000, (2, 64), device="cuda")
    labels[:, :10] = -100
    sequence_logps(hidden, weight, labels, impl="triton")  # compiles, runs the self-check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = sequence_logps(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
