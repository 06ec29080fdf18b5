"""sequence_logps (torch and Triton paths) against a float64 oracle.

The Triton path runs under TRITON_INTERPRET=1 here (set in conftest.py when there is no GPU);
the interpreter's tl.dot is wrong for bf16 inputs, so bf16 is tested on the torch path on CPU
and on both paths on CUDA (marked `cuda`).
"""

import os

import pytest
import torch

import selfpo_kernels.pair as pair_mod
from selfpo_kernels import sequence_logps
from selfpo_kernels.torch_ref import naive_token_logps

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON_PATH = pair_mod.HAVE_TRITON and (CUDA or INTERPRET)

# (B, T, H, V): vocab sizes that are not multiples of any tile, one hidden size below BLOCK_K.
SHAPES = [(2, 5, 16, 33), (3, 9, 40, 77), (2, 17, 64, 200), (1, 4, 24, 301)]


def impls_and_dtypes():
    cases = [("torch", d) for d in (torch.float32, torch.float16, torch.bfloat16)]
    if HAVE_TRITON_PATH:
        cases += [("triton", torch.float32), ("triton", torch.float16)]
        if CUDA:
            cases.append(("triton", torch.bfloat16))
    return cases


def make_inputs(B, T, H, V, dtype, seed=0, ignore_frac=0.3, with_ref=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < ignore_frac] = -100
    if B > 1:
        labels[-1] = -100  # one all-ignored sequence
    out = [hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)]
    if with_ref:
        out += [
            torch.randn(B, T, H, generator=gen).to(DEVICE, dtype),
            (torch.randn(V, H, generator=gen) / H**0.5 * 3).to(DEVICE, dtype),
        ]
    return out


def oracle_sequence(hidden, weight, labels, temperature=1.0, softcap=None, dtype=torch.float64, reduction="sum"):
    """Naive log_softmax + gather at `dtype` (float64: the oracle; None: naive torch at the input dtype)."""
    B, T, H = hidden.shape
    mask = labels != -100
    tok = naive_token_logps(hidden.reshape(-1, H), weight, labels.clamp(min=0).reshape(-1), temperature, softcap, dtype)
    tok = tok.view(B, T) * mask
    if reduction == "none":
        return tok
    total = tok.sum(1)
    return total if reduction == "sum" else total / mask.sum(1).clamp(min=1)


def errors_vs_oracle(fn, hidden, weight, labels, temperature=1.0, softcap=None):
    """Max abs error of fn's values and of its grads w.r.t. hidden and weight, vs the float64 oracle."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    out = fn(h, w, labels)
    ref = oracle_sequence(h64, w64, labels, temperature, softcap)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    gh, gw = torch.autograd.grad((out.float() * cotangent).sum(), [h, w])
    rh, rw = torch.autograd.grad((ref * cotangent.double()).sum(), [h64, w64])
    return (
        (out.double() - ref).abs().max().item(),
        (gh.double() - rh).abs().max().item(),
        (gw.double() - rw).abs().max().item(),
    )


@pytest.mark.parametrize("impl,dtype", impls_and_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.0, 4.0), (1.3, 2.5)])
def test_values_and_grads_vs_float64(impl, dtype, shape, temperature, softcap):
    hidden, weight, labels = make_inputs(*shape, dtype, seed=hash(shape) % 1000)

    def kernel(h, w, lab):
        return sequence_logps(h, w, lab, temperature=temperature, softcap=softcap, impl=impl)[0]

    def naive(h, w, lab):  # naive torch at the input dtype: the error budget
        return oracle_sequence(h, w, lab, temperature, softcap, dtype=None)

    got = errors_vs_oracle(kernel, hidden, weight, labels, temperature, softcap)
    budget = errors_vs_oracle(naive, hidden, weight, labels, temperature, softcap)
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, b in zip(("value", "grad_hidden", "grad_weight"), got, budget):
        assert g <= 2 * b + floor, f"{impl} {dtype} {name}: error {g:.3g} vs naive {b:.3g}"


@pytest.mark.smoke  # also in the newest-releases environment (.ci/run)
@pytest.mark.parametrize("impl,dtype", [c for c in impls_and_dtypes() if c[1] == torch.float32])
def test_fp32_absolute_accuracy(impl, dtype):
    """In fp32 the fused result is within 1e-4 (relative to the magnitude) of float64."""
    hidden, weight, labels = make_inputs(3, 11, 48, 157, dtype, seed=3)
    value_err, gh_err, gw_err = errors_vs_oracle(
        lambda h, w, lab: sequence_logps(h, w, lab, impl=impl)[0], hidden, weight, labels
    )
    assert value_err < 1e-4 and gh_err < 1e-4 and gw_err < 1e-4


@pytest.mark.parametrize("impl,dtype", [c for c in impls_and_dtypes() if c[1] != torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(impl, dtype, reduction):
    hidden, weight, labels = make_inputs(3, 6, 16, 50, dtype, seed=5)
    got = sequence_logps(hidden, weight, labels, reduction=reduction, impl=impl)[0]
    want = oracle_sequence(hidden, weight, labels, reduction=reduction)
    assert got.dtype == torch.float32
    assert got.shape == ((3, 6) if reduction == "none" else (3,))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    # the all-ignored last sequence scores exactly 0, and ignored positions are exactly 0
    assert (got[-1] == 0).all()
    if reduction == "none":
        assert (got[labels == -100] == 0).all()


@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_policy_and_reference_in_one_call(impl):
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(2, 8, 32, 90, torch.float32, seed=7, with_ref=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    policy, ref = sequence_logps(
        hidden, weight, labels, ref_hidden, ref_weight, temperature=0.9, softcap=3.0, impl=impl
    )
    policy_alone, _ = sequence_logps(hidden, weight, labels, temperature=0.9, softcap=3.0, impl=impl)
    ref_alone, none = sequence_logps(ref_hidden, ref_weight, labels, temperature=0.9, softcap=3.0, impl=impl)
    assert none is None
    torch.testing.assert_close(policy, policy_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, ref_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ref.double(), oracle_sequence(ref_hidden, ref_weight, labels, 0.9, 3.0), atol=1e-4, rtol=1e-4
    )
    assert not ref.requires_grad
    g_joint = torch.autograd.grad(policy.sum(), [hidden, weight])
    g_alone = torch.autograd.grad(policy_alone.sum(), [hidden, weight])
    for a, b in zip(g_joint, g_alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_reference_with_different_dtype_and_width():
    """A reference of another dtype or hidden size is scored in a second pass, same result."""
    if not HAVE_TRITON_PATH:
        pytest.skip("no Triton path")
    hidden, weight, labels = make_inputs(2, 6, 32, 70, torch.float32, seed=8)
    gen = torch.Generator().manual_seed(9)
    ref_hidden = torch.randn(2, 6, 24, generator=gen).to(DEVICE, torch.float16)
    ref_weight = (torch.randn(70, 24, generator=gen) / 3).to(DEVICE, torch.float16)
    _, ref = sequence_logps(hidden, weight, labels, ref_hidden, ref_weight, impl="triton")
    _, ref_torch = sequence_logps(hidden, weight, labels, ref_hidden, ref_weight, impl="torch")
    torch.testing.assert_close(ref, ref_torch, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_ignored_positions_change_nothing(impl):
    """values at ignored positions, and padding to a longer length, change neither value nor grad."""
    hidden, weight, labels = make_inputs(3, 7, 24, 60, torch.float32, seed=11)
    h1 = hidden.clone().requires_grad_()
    out1 = sequence_logps(h1, weight, labels, impl=impl)[0]
    (g1,) = torch.autograd.grad(out1.sum(), [h1])
    h2 = hidden.clone()
    h2[labels == -100] = 1e3 * torch.randn_like(h2[labels == -100])
    h2.requires_grad_()
    out2 = sequence_logps(h2, weight, labels, impl=impl)[0]
    (g2,) = torch.autograd.grad(out2.sum(), [h2])
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(g1, g2)
    assert (g1[labels == -100] == 0).all()
    # right-pad to T + 5 with ignored labels
    padded_h = torch.cat([hidden, torch.randn(3, 5, 24, device=DEVICE)], dim=1)
    padded_l = torch.cat([labels, torch.full((3, 5), -100, device=DEVICE)], dim=1)
    torch.testing.assert_close(sequence_logps(padded_h, weight, padded_l, impl=impl)[0], out1)


@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_mean_is_sum_over_count(impl):
    """mean = sum / number of scored labels."""
    hidden, weight, labels = make_inputs(4, 9, 16, 40, torch.float32, seed=12)
    total = sequence_logps(hidden, weight, labels, reduction="sum", impl=impl)[0]
    mean = sequence_logps(hidden, weight, labels, reduction="mean", impl=impl)[0]
    counts = (labels != -100).sum(1).float()
    torch.testing.assert_close(mean, total / counts.clamp(min=1))


@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_gradient_rows_sum_to_zero(impl):
    """dL/dz = g*(onehot - softmax) sums to 0 over the vocabulary at every scored row.

    With a constant column in the hidden states, dW[:, k] = sum_rows dz[row, :] * 1, so the
    column of dW sums to zero over the vocabulary (softcap and temperature included).
    """
    hidden, weight, labels = make_inputs(2, 8, 20, 45, torch.float32, seed=13)
    hidden[..., 0] = 1.0
    weight.requires_grad_()
    out = sequence_logps(hidden, weight, labels, temperature=0.8, impl=impl)[0]
    (gw,) = torch.autograd.grad((out * torch.tensor([1.0, -2.0], device=DEVICE)).sum(), [weight])
    assert gw[:, 0].sum().abs().item() < 1e-4
    assert gw[:, 0].abs().max().item() > 1e-2  # and it is not trivially zero


@pytest.mark.smoke  # also in the newest-releases environment (.ci/run)
@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_causal_alignment(impl):
    """logits putting all mass on labels[t] at position t give ~0; shifted by one they do not."""
    V = 16
    labels = torch.tensor([[3, 7, 1, 9, 2, 5]], device=DEVICE)
    weight = torch.eye(V, device=DEVICE)
    hidden = 1e4 * torch.nn.functional.one_hot(labels, V).float()
    aligned = sequence_logps(hidden, weight, labels, impl=impl)[0]
    shifted = sequence_logps(hidden.roll(1, dims=1), weight, labels, impl=impl)[0]
    assert aligned.abs().item() < 1e-3
    assert shifted.item() < -1e3


def test_torch_path_chunking_is_exact():
    """Many small chunks (a workspace of 64, 3 and 1 rows) give the same values and grads as one chunk."""
    hidden, weight, labels = make_inputs(1, 37, 24, 101, torch.float32, seed=14, ignore_frac=0.0)
    grads = []
    for rows in (64, 3, 1):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = sequence_logps(
            h, w, labels, temperature=0.9, softcap=3.0, reduction="none", impl="torch", workspace_bytes=rows * 101 * 4
        )[0]
        grads.append((out, *torch.autograd.grad((out * torch.arange(37.0)).sum(), [h, w])))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAVE_TRITON_PATH, reason="no Triton path")
def test_triton_multi_chunk_backward(monkeypatch):
    """A workspace smaller than the rows forces several backward chunks; results are unchanged."""
    hidden, weight, labels = make_inputs(2, 40, 32, 97, torch.float32, seed=15, ignore_frac=0.1)

    def run():
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = sequence_logps(h, w, labels, softcap=3.0, impl="triton")[0]
        return (out, *torch.autograd.grad(out.sum(), [h, w]))

    one = run()
    monkeypatch.setitem(pair_mod.WORKSPACE_BYTES, "triton", 97 * 4 * 16)
    many = run()
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.smoke  # also in the newest-releases environment (.ci/run)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_logits_fp32_accumulation(impl):
    """bf16 inputs, fp32 log-softmax: error below 1e-3 per token.

    Both paths round the logits to bf16 like any bf16 matmul (the Triton path's cuBLAS product writes them into
    a bf16 workspace), so the oracle is float64 log-softmax of those same bf16 logits (Triton on CUDA only: the
    interpreter's bf16 is not trusted).
    """
    if impl == "triton" and not (CUDA and pair_mod.HAVE_TRITON):
        pytest.skip("bf16 Triton needs a GPU")
    hidden, weight, labels = make_inputs(1, 32, 64, 300, torch.bfloat16, seed=16, ignore_frac=0.0)
    got = sequence_logps(hidden, weight, labels, reduction="none", impl=impl)[0]
    logits = (hidden @ weight.T).double()
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    per_token = (got.double() - want).abs().max().item()
    assert per_token < 1e-3, per_token


@pytest.mark.parametrize("impl", [c[0] for c in impls_and_dtypes() if c[1] == torch.float32])
def test_fp32_master_weight_of_16bit_hidden(impl):
    """The one input rule of both ops: an fp32 master head beside fp16 hidden states is taken as it is, its products
    run in fp16 (the values of the head cast outside), and its gradient comes back fp32, summed in fp32."""
    hidden, weight, labels = make_inputs(2, 9, 32, 70, torch.float32, seed=18)
    hidden = hidden.half().requires_grad_()
    master = weight.clone().requires_grad_()
    got = sequence_logps(hidden, master, labels, softcap=3.0, impl=impl, workspace_bytes=5 * 70 * 4)[0]
    (grad,) = torch.autograd.grad(got.sum(), [master])
    cast = weight.clone().requires_grad_()
    want = sequence_logps(hidden, cast.half(), labels, softcap=3.0, impl=impl, workspace_bytes=5 * 70 * 4)[0]
    (want_grad,) = torch.autograd.grad(want.sum(), [cast])
    assert grad.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    exact = torch.autograd.grad(oracle_sequence(hidden.detach(), cast, labels, softcap=3.0).sum(), [cast])[0]
    assert (grad.double() - exact).abs().max() <= (want_grad.double() - exact).abs().max() + 1e-6


def test_grad_flows_only_to_what_requires_it():
    hidden, weight, labels = make_inputs(2, 5, 16, 30, torch.float32, seed=17)
    hidden.requires_grad_()
    out = sequence_logps(hidden, weight, labels, impl="torch")[0]
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden=torch.zeros(2, 16)), "'hidden' must be \\[B, T, H\\]"),
        (dict(weight=torch.zeros(30, 15)), "'weight' must be \\[V, H=16\\]"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "'labels' must be \\[B, T\\]"),
        (dict(labels=torch.zeros(2, 5)), "integer tensor"),
        (dict(labels=torch.full((2, 5), 30)), "label 30 is outside the vocabulary"),
        (dict(weight=torch.zeros(30, 16, dtype=torch.float64)), "must share a dtype"),
        (dict(ref_hidden=torch.zeros(2, 5, 16)), "both 'ref_hidden' and 'ref_weight'"),
        (dict(ref_hidden=torch.zeros(2, 5, 16), ref_weight=torch.zeros(31, 16)), "'ref_weight' must be"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(hidden=torch.zeros(2, 5, 16), weight=torch.zeros(30, 16), labels=torch.zeros(2, 5, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sequence_logps(**args)


def test_env_override(monkeypatch):
    monkeypatch.setenv("KERNELS_IMPL", "bogus")
    with pytest.raises(ValueError, match="KERNELS_IMPL"):
        sequence_logps(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long))
    monkeypatch.setenv("KERNELS_IMPL", "torch")
    from selfpo_kernels import resolve_impl

    assert resolve_impl("auto", torch.device("cuda")) == "torch"


def test_torch_path_memory_is_bounded_by_chunks():
    """PERF.md: at N=4096, H=256, V=32000 fp32 fwd+bwd the torch path's peak extra memory is
    under a quarter of naive's. Measured as peak RSS in fresh subprocesses (CPU)."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
torch.manual_seed(0)
N, H, V = 4096, 256, 32000
h = torch.randn(1, N, H).requires_grad_(); w = (torch.randn(V, H) / 16).requires_grad_()
lab = torch.randint(0, V, (1, N))
gh = torch.empty_like(h); gw = torch.empty_like(w)  # room for the grads, part of the baseline
import selfpo_kernels
from selfpo_kernels.torch_ref import naive_token_logps
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here: imports may have peaked higher
base = kib("VmRSS:")
if sys.argv[1] == "naive":
    out = naive_token_logps(h[0], w, lab[0]).sum()
else:
    out = selfpo_kernels.sequence_logps(h, w, lab, impl="torch")[0].sum()
out.backward()
print((kib("VmHWM:") - base) * 1024)
"""
    extra = {}
    for impl in ("naive", "torch"):
        res = subprocess.run(
            [sys.executable, "-c", script, impl],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        extra[impl] = int(res.stdout.strip().splitlines()[-1])
    assert extra["naive"] > 500e6, extra  # naive really builds [N, V] (0.5 GB per fp32 copy)
    assert extra["torch"] < extra["naive"] / 4, extra
