"""The engine's token passes as torch.library custom ops: they trace under FakeTensorMode (shapes only, no values: what
the fake-GPU dry run needs) and under torch.compile, and pass torch.library.opcheck's schema, fake and autograd
checks. The self-check and the host reads must not run on fake tensors. The fused pair op traces under FakeTensorMode
through the same two ops, with loss_fn on the whole batch between them."""

import os

import pytest
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import selfpo_kernels.pair as pair_mod
from selfpo_kernels import causal_lm_logps, causal_lm_pair_loss, daa_loss_fn, pair_loss_from_hidden, sequence_logps

TRITON = pair_mod.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
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
    monkeypatch.setattr(pair_mod, "_self_check_due", lambda device: True)  # as on CUDA: must be skipped when fake
    monkeypatch.setattr(pair_mod, "self_check", lambda *a: pytest.fail("self-check ran on fake tensors"))
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
    """The fake implementation is the registered one (a Python loop over chunks, with host reads, would not trace)."""
    calls = []
    real = pair_mod._token_logps
    monkeypatch.setattr(pair_mod, "_token_logps", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels = problem()
    with FakeTensorMode() as mode:
        sequence_logps(mode.from_tensor(hidden), mode.from_tensor(weight), mode.from_tensor(labels), impl="torch")
    assert calls == []  # the real pass never saw the fake tensors
    sequence_logps(hidden, weight, labels, impl="torch")
    assert calls == [1]


def test_fake_op_rejects_mixed_devices():
    """A wrong-device input fails in the fake implementation, naming the devices (as a launch would fail)."""
    hidden, weight, labels = problem()
    with FakeTensorMode() as mode:
        h, y = mode.from_tensor(hidden), mode.from_tensor(labels)
        w = mode.from_tensor(weight).to("meta")
        with pytest.raises(RuntimeError, match="different devices"):
            pair_mod._logps_op(h, w, None, y, 1.0, None, -100, "torch", None, None)


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


def pair_problem(seed=4, pairs=3, length=7, hidden_size=16, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / 3
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :2] = -100
    labels[1, -3:] = -100  # unequal lengths
    return hidden, weight, bias, labels


def sr_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, offset, **_):
    """A loss_fn with an extra, as the scripts pass (Sr-DPO's Delta, OSP's soft label)."""
    z = 0.5 * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -torch.nn.functional.logsigmoid(z - offset)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reference", ["hidden", "logps"])
def test_pair_loss_from_hidden_under_fake_mode(impl, reference, monkeypatch):
    """Forward and backward on fake tensors: [B] fp32 losses and metrics, gradients of the inputs' shapes and
    dtypes, through the two custom ops (the eager pass, with its host reads, never sees a fake tensor)."""
    monkeypatch.setattr(pair_mod, "self_check", lambda *a: pytest.fail("self-check ran on fake tensors"))
    monkeypatch.setattr(pair_mod, "_plan_chunks", lambda *a: pytest.fail("the eager pass ran on fake tensors"))
    hidden, weight, bias, labels = pair_problem()
    with FakeTensorMode() as mode:
        h, w, b, y = (mode.from_tensor(t).requires_grad_(t.is_floating_point()) for t in (hidden, weight, bias, labels))
        ref = dict(ref_hidden=h.detach() * 0.5, ref_weight=w.detach(), ref_bias=b.detach())
        if reference == "logps":
            ref = dict(ref_logps=mode.from_tensor(torch.randn(6)))
        extras = dict(offset=mode.from_tensor(torch.rand(3)))
        losses, metrics = pair_loss_from_hidden(h, w, y, sr_loss, bias=b, extras=extras, softcap=4.0, impl=impl, **ref)
        assert isinstance(losses, FakeTensor) and losses.shape == (3,) and losses.dtype == torch.float32
        assert metrics["logps/chosen"].shape == metrics["ref_logps/rejected"].shape == (3,)
        losses.mean().backward()
        assert h.grad.shape == hidden.shape and w.grad.shape == weight.shape and b.grad.shape == bias.shape
        assert h.grad.dtype == w.grad.dtype == torch.float32
        with torch.no_grad():  # the metrics-only call
            losses, metrics = pair_loss_from_hidden(h, w, y, daa_loss_fn("dpo"), bias=b, impl=impl, **ref)
        assert losses.shape == (3,) and metrics["rewards/margins"].shape == (3,)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_pass_equals_eager(impl, monkeypatch):
    """The traced formulation (what torch.compile runs: the two ops' real implementations around loss_fn on the
    whole batch) gives the eager pass's losses, metrics and gradients, a workspace that splits pairs included."""
    hidden, weight, bias, labels = pair_problem(seed=5)
    offset = torch.rand(3)

    def run():
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        losses, metrics = pair_loss_from_hidden(
            h,
            w,
            labels,
            sr_loss,
            bias=b,
            ref_hidden=hidden * 0.5,
            ref_weight=weight,
            ref_bias=bias,
            extras=dict(offset=offset),
            temperature=0.9,
            softcap=4.0,
            impl=impl,
            workspace_bytes=7 * 40 * 4,
        )
        (2 * losses.sum()).backward()
        return [losses.detach(), metrics["logps/rejected"], metrics["ref_logps/chosen"], h.grad, w.grad, b.grad]

    eager = run()
    traced_pass, calls = pair_mod._traced_pass, []

    def traced_with_real_ops(*args):  # the ops' real implementations, called on real tensors, see no tracing
        calls.append(1)
        monkeypatch.setattr(pair_mod, "tracing", lambda tensor: False)
        try:
            return traced_pass(*args)
        finally:
            monkeypatch.setattr(pair_mod, "tracing", lambda tensor: True)

    monkeypatch.setattr(pair_mod, "tracing", lambda tensor: True)
    monkeypatch.setattr(pair_mod, "_traced_pass", traced_with_real_ops)
    for got, want in zip(run(), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_token_ops(impl):
    """Schema, fake implementation against the real one, autograd registration of the engine's two custom ops
    (torch.library.opcheck), with and without a bias, soft-cap and a workspace that splits the rows."""
    hidden, weight, bias, labels = pair_problem(seed=6)
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    config = (0.8, 3.0, -100, impl, 12 * 40 * 4, None)
    torch.library.opcheck(pair_mod._logps_op, (hidden, weight, bias, labels, *config))
    torch.library.opcheck(pair_mod._logps_op, (hidden, weight, None, labels, 1.0, None, -100, impl, None, None))
    detached = (hidden.detach(), weight.detach(), bias.detach(), labels)
    lse = pair_mod._logps_op(*detached, *config)[1]
    grad = torch.randn(labels.shape)
    for need, accum in [((True, True, True), None), ((True, False, False), None), ((False, True, True), torch.float32)]:
        args = (*detached, lse, grad, *config[:-1], accum, *need)
        torch.library.opcheck(pair_mod._grads_op, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_lm_pair_loss_on_a_fake_model(impl):
    """causal_lm_pair_loss on a meta-built model materialised under fake mode, with its frozen reference model:
    what the scripts' training steps do in the dry run at 7B."""
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
        losses, metrics = causal_lm_pair_loss(
            model, ids, torch.ones_like(ids), labels, daa_loss_fn("dpo"), ref_model=reference, impl=impl
        )
        assert losses.shape == metrics["rewards/chosen"].shape == (2,) and losses.dtype == torch.float32
        losses.sum().backward()
        assert model.lm_head.weight.grad.shape == (50, 32)
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
