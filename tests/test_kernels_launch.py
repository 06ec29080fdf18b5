"""The engine's Triton launches in Triton's interpreter on CPU, against float64: int64 offsets into the workspace,
a native lm_head bias, labels at the kernels' vocabulary-tile edges, every tile of the dZ kernel's grid, the host label
check, fp32 dW accumulation of 16-bit products, and the one-time self-check that names KERNELS_IMPL=torch."""

import os

import pytest
import torch

import selfpo_kernels.pair as pair_mod
import selfpo_kernels.torch_ref as torch_ref
from selfpo_kernels import causal_lm_logps, sequence_logps
from selfpo_kernels.torch_ref import naive_token_logps

pytestmark = pytest.mark.skipif(
    not (pair_mod.HAVE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="no Triton path (needs triton, and CUDA or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_int64_offsets():
    """Workspace rows past 2^31 elements from its base: int32 row*stride products would wrap. The workspace is a
    strided view into a lazily allocated 8.5 GB buffer: only touched pages count."""
    rows, vocab, stride = 5, 18, (1 << 29) + 64  # rows 4 and later start past 2^31
    base = 1 << 31  # wrapped (negative) offsets would land in this zero-filled prefix, not segfault
    try:
        storage = torch.zeros(base + rows * stride, dtype=torch.float16)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot reserve 8.5 GB of virtual memory: {err}")
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).half()
    ws = storage.as_strided((rows, vocab), (stride, 1), base)
    ws.copy_(logits)
    targets = torch.tensor([0, 17, 16, 3, 17])
    backend = pair_mod._TritonBackend(1.0, None)
    logps, lse, state = backend.stats(ws, None, targets, keep=True)
    want = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(logps.double(), want.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
    grad = torch.linspace(-1, 1, rows)
    dz = backend.grad(ws, None, targets, lse, state, grad)
    want_dz = (torch.nn.functional.one_hot(targets, vocab) - want.exp()) * grad.double()[:, None]
    torch.testing.assert_close(dz.double(), want_dz, atol=2e-3, rtol=0)


def test_bias_model_on_triton_path():
    """A model whose lm_head has a bias (Phi), scored by the Triton kernels with the bias added to the logits."""
    from test_kernels_hf import batch, reference_logps, tiny

    model = tiny("phi_bias")
    input_ids, attention_mask, labels = batch(2)
    got, _ = causal_lm_logps(model, input_ids, attention_mask, labels, temperature=0.8, impl="triton")
    want = reference_logps(model, input_ids, attention_mask, labels, temperature=0.8)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_labels_at_vocab_edges(dtype):
    """The label logit is read once per row; labels in the first, middle and last vocabulary tiles and at tile
    boundaries (32 columns under the interpreter), soft-cap and temperature on, policy and reference, vs float64."""
    vocab, hidden_size = 300, 48
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
        if dtype == torch.float16:  # and the same fp16 logits, as the GEMM writes them into the workspace
            logits = (h_[0].double() @ w_.double().T).half().double()
            want = torch.log_softmax(3.0 * torch.tanh(logits / 3.0) / 0.7, -1)
            want = want.gather(1, labels[0].clamp(min=0)[:, None])[:, 0] * mask
        else:
            want = naive_token_logps(h_[0], w_, labels[0].clamp(min=0), 0.7, 3.0, torch.float64) * mask
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got[0].cpu().double(), want, atol=tol, rtol=0)


def test_grad_kernel_covers_every_tile():
    """200 rows x 4 vocabulary tiles of the dZ kernel (a partial last one), soft-cap on: gradients equal float64's."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(1, 200, 32, generator=gen).requires_grad_()
    weight = (torch.randn(97, 32, generator=gen) / 3).requires_grad_()
    labels = torch.randint(0, 97, (1, 200), generator=gen)
    cotangent = torch.randn(1, 200, generator=gen)
    out, _ = sequence_logps(
        hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), softcap=4.0, reduction="none", impl="triton"
    )
    got = torch.autograd.grad((out.cpu() * cotangent).sum(), [hidden, weight])
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = naive_token_logps(h64[0], w64, labels[0], 1.0, 4.0, torch.float64)
    for g, w in zip(got, torch.autograd.grad((want * cotangent[0].double()).sum(), [h64, w64])):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_label_check_names_the_label(impl):
    """An out-of-range label is one clear error naming it, on both paths (checked on the host, before any launch)."""
    hidden, weight = torch.zeros(1, 3, 8, device=DEVICE), torch.zeros(5, 8, device=DEVICE)
    labels = torch.tensor([[1, 7, -100]], device=DEVICE)
    with pytest.raises(ValueError, match="label 7 is outside the vocabulary"):
        sequence_logps(hidden, weight, labels, impl=impl)


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


def test_self_check_passes_and_names_the_way_out(monkeypatch):
    device = torch.device(DEVICE)
    monkeypatch.setattr(pair_mod, "_SELF_CHECKED", set())
    pair_mod.self_check(device, torch.float32)  # the real kernels pass
    assert (str(device), torch.float32) in pair_mod._SELF_CHECKED
    monkeypatch.setattr(pair_mod, "_SELF_CHECKED", set())
    real = pair_mod._TritonBackend.stats

    def off_by_a_bit(self, *args, **kwargs):
        logps, lse, state = real(self, *args, **kwargs)
        return logps * 1.001, lse, state  # a shift common to policy and reference would cancel in margins

    monkeypatch.setattr(pair_mod._TritonBackend, "stats", off_by_a_bit)
    with pytest.raises(RuntimeError, match="self-check failed.*losses.*KERNELS_IMPL=torch"):
        pair_mod.self_check(device, torch.float32)

    def broken(self, *args, **kwargs):
        raise ValueError("no kernel image for this device")

    monkeypatch.setattr(pair_mod._TritonBackend, "stats", broken)
    with pytest.raises(RuntimeError, match="do not run on.*no kernel image.*KERNELS_IMPL=torch"):
        pair_mod.self_check(device, torch.float32)
    assert not pair_mod._SELF_CHECKED


def test_self_check_runs_once_per_device_and_dtype(monkeypatch):
    """Both ops run the one self-check, once per (device, dtype), also when the caller is under no_grad."""
    monkeypatch.setattr(pair_mod, "_SELF_CHECKED", set())
    monkeypatch.setattr(pair_mod, "_self_check_due", lambda device: True)  # as on CUDA
    checks = []
    real_pass = pair_mod._pair_pass
    monkeypatch.setattr(pair_mod, "_pair_pass", lambda *a, **k: checks.append(1) or real_pass(*a, **k))
    hidden, weight, labels = torch.randn(2, 4, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 4))
    with torch.no_grad():  # the check takes gradients even when the caller does not
        for _ in range(3):
            sequence_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), impl="triton")
            pair_mod.pair_loss_from_hidden(
                hidden.to(DEVICE),
                weight.to(DEVICE),
                labels.to(DEVICE),
                pair_mod.daa_loss_fn(),
                impl="triton",
                ref_logps=torch.zeros(2, device=DEVICE),
            )
    assert len(checks) == 1 + 3  # the self-check's own pair step ran once, then the three of the loop
