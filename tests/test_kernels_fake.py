"""The kernels as torch.library custom ops: they trace under FakeTensorMode (shapes only, no values: what the
fake-GPU dry run needs) and under torch.compile, and pass torch.library.opcheck's schema, fake and autograd
checks. The CUDA-only parts (self-check, pinned host count) must not run on fake tensors."""

import os

import pytest
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import kernels.logps as triton_logps
from kernels import causal_lm_logps, ops, sequence_logps, torch_ref

TRITON = triton_logps.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs Triton's interpreter"))]


def problem(seed=0, batch=3, length=7, hidden_size=16, vocab=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :2] = -100
    labels[0, -3:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logps_under_fake_mode(impl, monkeypatch):
    """Forward and backward on fake tensors: fp32 [B] outputs, gradients of the inputs' shapes, and neither the
    self-check nor a host read (both would raise on values a fake tensor does not have)."""
    monkeypatch.setattr(ops, "_needs_self_check", lambda device: True)  # as on CUDA: must be skipped when fake
    monkeypatch.setattr(ops, "self_check", lambda *a: pytest.fail("self-check ran on fake tensors"))
    hidden, weight, labels = problem()
    with FakeTensorMode() as mode:
        h, w, y = (mode.from_tensor(t) for t in (hidden, weight, labels))
        h.requires_grad_()
        w.requires_grad_()
        policy, ref = sequence_logps(h, w, y, ref_hidden=h.detach(), ref_weight=w.detach(), impl=impl)
        assert isinstance(policy, FakeTensor) and policy.shape == (3,) and policy.dtype == torch.float32
        assert ref.shape == (3,)
        policy.sum().backward()
        assert h.grad.shape == hidden.shape and w.grad.shape == weight.shape and w.grad.dtype == weight.dtype


def test_fake_mode_routes_through_the_custom_ops(monkeypatch):
    """The torch path's fake implementation is the registered one (a Python loop over chunks would not trace)."""
    calls = []
    real = torch_ref._forward_chunks
    monkeypatch.setattr(torch_ref, "_forward_chunks", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels = problem()
    with FakeTensorMode() as mode:
        sequence_logps(mode.from_tensor(hidden), mode.from_tensor(weight), mode.from_tensor(labels), impl="torch")
    assert calls == []  # the real kernel never saw the fake tensors
    sequence_logps(hidden, weight, labels, impl="torch")
    assert calls == [1]


def test_fake_op_rejects_mixed_devices():
    """A wrong-device input fails in the fake implementation, naming the devices (as a launch would fail)."""
    hidden, weight, labels = problem()
    targets, rows = labels.reshape(-1).clamp(min=0), hidden.reshape(-1, hidden.shape[-1])
    with FakeTensorMode() as mode:
        h = mode.from_tensor(rows)
        w = mode.from_tensor(weight).to("meta")
        with pytest.raises(RuntimeError, match="different devices"):
            triton_logps._forward_op(
                h, w, None, None, mode.from_tensor(targets), mode.from_tensor(torch.tensor(3)), 1.0, None, None
            )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_compiled_equals_eager(impl, reduction):
    """torch.compile (eager backend: dynamo + AOT autograd tracing with fake tensors) gives eager's values and
    gradients; the traced path scores every row and zeroes the unscored ones, the eager torch path compacts."""
    hidden, weight, labels = problem(seed=1)

    def loss(h, w):
        policy, ref = sequence_logps(
            h,
            w,
            labels,
            ref_hidden=h.detach() * 0.5,
            ref_weight=w.detach(),
            temperature=0.9,
            softcap=4.0,
            reduction=reduction,
            impl=impl,
        )
        return (policy * torch.linspace(-1, 1, 3)).sum() + ref.sum(), policy

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=False)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value, policy = fn(h, w)
        value.backward()
        results.append((value.detach(), policy.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_opcheck_chunked_ops():
    """Schema, fake implementation against the real one, autograd registration (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(30, 16, generator=gen) / 3).requires_grad_()
    targets = torch.randint(0, 30, (9,), generator=gen)
    for args in [(hidden, weight, targets, 1.0, None, 64), (hidden, weight, targets, 0.8, 3.0, 1 << 20)]:
        torch.library.opcheck(torch_ref._forward_op, args)
    _, lse = torch_ref._forward_op(hidden.detach(), weight.detach(), targets, 1.0, None, 64)
    torch.library.opcheck(
        torch_ref._backward_op,
        (hidden.detach(), weight.detach(), targets, lse, torch.randn(9), 1.0, None, 64, True, False),
    )


@pytest.mark.skipif(not TRITON, reason="needs Triton's interpreter")
def test_opcheck_triton_ops():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(12, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(40, 16, generator=gen) / 3).requires_grad_()
    targets = torch.randint(0, 40, (12,), generator=gen)
    count = torch.tensor(10)
    torch.library.opcheck(triton_logps._forward_op, (hidden, weight, None, None, targets, count, 1.0, None, None))
    torch.library.opcheck(
        triton_logps._forward_op, (hidden, weight, hidden.detach() * 2, weight.detach(), targets, count, 0.7, 5.0, None)
    )


def test_causal_lm_logps_on_a_fake_model():
    """A transformers model built on the meta device and materialised under fake mode (no weights), scored with
    its reference in one call, backward through the decoder: what the dry run does at 7B."""
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
        reference = transformers.LlamaForCausalLM(config).requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        reference.to_empty(device="cpu")
        ids = torch.randint(0, 50, (4, 12))
        labels = ids.clone()
        labels[:, :5] = -100
        policy, ref = causal_lm_logps(model, ids, torch.ones_like(ids), labels, ref_model=reference, impl="torch")
        assert policy.shape == ref.shape == (4,)
        policy.sum().backward()
        assert model.lm_head.weight.grad.shape == (50, 32)
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
