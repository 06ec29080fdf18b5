"""causal_lm_logps on tiny random transformers models vs model(...).logits -> log_softmax -> gather."""

import pytest
import torch
import transformers

from selfpo_kernels import causal_lm_logps, causal_lm_pair_loss, daa_loss_fn, decoder_hidden_states, head_logits

VOCAB = 97


def tiny(name, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if name == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif name == "qwen2_tied":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif name == "gpt2":  # tied embeddings, LayerNorm, learned positions
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    elif name == "gemma2_softcap":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
    elif name == "phi_bias":  # lm_head has a bias
        config = transformers.PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"})
    elif name == "cohere_scale":
        config = transformers.CohereConfig(**common, logit_scale=0.5)
    elif name == "granite_scaling":
        config = transformers.GraniteConfig(**common, logits_scaling=4.0)
    else:
        raise KeyError(name)
    config.update(extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make the head matter: random init is tiny for some architectures
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def reference_logps(model, input_ids, attention_mask, labels, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature
    target = labels[:, 1:]
    tok = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * (target != -100)).sum(1)


ARCHS = ["llama", "qwen2_tied", "gpt2", "gemma2_softcap", "phi_bias", "cohere_scale", "granite_scaling"]


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_model_logits(arch):
    model = tiny(arch)
    input_ids, attention_mask, labels = batch()
    want = reference_logps(model, input_ids, attention_mask, labels, temperature=0.8)
    got, ref = causal_lm_logps(model, input_ids, attention_mask, labels, temperature=0.8, impl="torch")
    assert ref is None
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_logits_match_model_logits(arch):
    """head_logits on the decoder's hidden states: the model's own logits (bias, scale, soft-cap), all rows or a few."""
    model = tiny(arch)
    input_ids, attention_mask, _ = batch()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
        hidden = decoder_hidden_states(model, input_ids, attention_mask)
        every = head_logits(model, hidden.reshape(-1, hidden.shape[-1])).reshape(want.shape)
        some = head_logits(model, hidden[:, -1], [5, 2])
    torch.testing.assert_close(every.double(), want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(some.double(), want[:, -1, [5, 2]], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2_tied", "phi_bias"])
def test_gradients_match_model_logits(arch):
    model = tiny(arch)
    input_ids, attention_mask, labels = batch(1)
    params = [p for p in model.parameters() if p.requires_grad]
    got, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl="torch")
    g_got = torch.autograd.grad(got.sum(), params)
    want = reference_logps(model, input_ids, attention_mask, labels)
    g_want = torch.autograd.grad(want.sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3, msg=name)


def test_reference_model_in_same_call():
    policy, reference = tiny("llama"), tiny("llama")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    input_ids, attention_mask, labels = batch(2)
    pol, ref = causal_lm_logps(policy, input_ids, attention_mask, labels, ref_model=reference, impl="torch")
    torch.testing.assert_close(
        pol.double(), reference_logps(policy, input_ids, attention_mask, labels), atol=2e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ref.double(), reference_logps(reference, input_ids, attention_mask, labels), atol=2e-4, rtol=1e-4
    )
    assert not ref.requires_grad
    pol.sum().backward()
    assert all(p.grad is None for p in reference.parameters())


def test_triton_path_on_model():
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no Triton path")
    model = tiny("gemma2_softcap")
    input_ids, attention_mask, labels = batch(3)
    got, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl="triton")
    torch.testing.assert_close(
        got.double(), reference_logps(model, input_ids, attention_mask, labels), atol=2e-4, rtol=1e-4
    )


def test_unsupported_head_is_a_clear_error():
    model = tiny("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(NotImplementedError, match="no plain nn.Linear output embedding"):
        causal_lm_logps(model, input_ids, attention_mask, labels)


def _exact_and_naive_bf16(model, input_ids, attention_mask, labels):
    """(float64 log-probs, the model's own bf16 log-probs, and their head-weight gradients) under a bf16 autocast.
    float64: log_softmax of the head applied in float64 to the final hidden states the head reads (the decoder's
    last output rounded to bf16, as autocast feeds a matmul) and to its fp32 master weight (and bias, soft-cap).
    Naive: model(...).logits, the head's bf16 product, then log_softmax in float64."""
    head = model.get_output_embeddings()
    target = labels[:, 1:]
    mask = target != -100

    def seq(logits):
        token = torch.log_softmax(logits.double(), -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return (token * mask).sum(1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16
    naive = seq(out.logits[:, :-1])
    (naive_grad,) = torch.autograd.grad(naive.sum(), [head.weight])
    weight = head.weight.detach().double().requires_grad_()
    logits = out.hidden_states[-1].detach().to(torch.bfloat16).double() @ weight.T
    if head.bias is not None:
        logits = logits + head.bias.detach().double()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    exact = seq(logits[:, :-1])
    (exact_grad,) = torch.autograd.grad(exact.sum(), [weight])
    return exact.detach(), naive.detach(), exact_grad, naive_grad


def summed_logps_loss(policy_chosen, policy_rejected, **_):
    """A per-pair 'loss' whose gradient is that of the pair's summed log-probs: the pair op's head gradient is then
    causal_lm_logps's."""
    return policy_chosen + policy_rejected


@pytest.mark.parametrize("entry", ["causal_lm_logps", "causal_lm_pair_loss"])
@pytest.mark.parametrize("arch", ["llama", "phi_bias", "gemma2_softcap"])
def test_bf16_autocast_within_twice_the_naive_error(arch, entry):
    """fp32 masters under a bf16 autocast: the fused head (the log-prob op, and the pair op the scripts train with)
    reads the bf16 final states and runs its product in bf16 on the fp32 weight (bias, soft-cap). Rule (Cut
    Cross-Entropy's): the error of the sequence log-probs and of the head's gradient against float64 is at
    most twice that of the model's own bf16 logits, plus a floor of 1e-3 of the largest value.

    Measured here (batch seed 4, both entries), error against float64, fused / naive bf16 / the hidden states
    shifted by one position: log-probs (|logps| up to 34, bar 0.037 to 0.043) llama 0.0022 / 0.0022 / 0.98, phi
    0.0014-0.0030 / 0.0030 / 1.3, gemma2 0.0007 / 0.0050 / 0.61; head gradient (bar 0.023 to 0.040) llama
    0.005-0.010 / 0.010 / 5.0, phi 0.012 / 0.012 / 3.6, gemma2 0.008-0.015 / 0.017 / 3.2. A one-position shift
    misses the bar by 14x or more."""
    model = tiny(arch, tie_word_embeddings=False)  # untied: the head's gradient is its own
    input_ids, attention_mask, labels = batch(4, rows=4)  # two pairs: rows 0, 1 chosen, 2, 3 rejected
    exact, naive, exact_grad, naive_grad = _exact_and_naive_bf16(model, input_ids, attention_mask, labels)
    head = model.get_output_embeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if entry == "causal_lm_logps":
            got, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl="torch")
            total = got.sum()
        else:
            losses, metrics = causal_lm_pair_loss(
                model, input_ids, attention_mask, labels, summed_logps_loss, ref_logps=torch.zeros(4), impl="torch"
            )
            got, total = torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]]), losses.sum()
    (grad,) = torch.autograd.grad(total, [head.weight])
    assert head.weight.dtype == torch.float32 and grad.dtype == torch.float32
    for what, value, budget, oracle in (("logps", got, naive, exact), ("grad lm_head", grad, naive_grad, exact_grad)):
        err = (value.double() - oracle).abs().max().item()
        allowed = 2 * (budget.double() - oracle).abs().max().item() + 1e-3 * oracle.abs().max().item()
        assert err <= allowed, f"{arch} {what}: error {err:.3g} vs float64, allowed {allowed:.3g}"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_both_entries_handle_the_bias_alike(impl):
    """One adapter: causal_lm_logps and causal_lm_pair_loss read the same head, the bias added to the logits (not
    folded into the weight), and give the same log-probs and the same gradients of the head's weight and bias."""
    import os

    if impl == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no Triton path")
    model = tiny("phi_bias", tie_word_embeddings=False)
    input_ids, attention_mask, labels = batch(5, rows=4)  # two pairs: rows 0, 1 chosen, 2, 3 rejected
    head = model.get_output_embeddings()
    assert head.bias is not None
    logps, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl=impl)
    want = torch.autograd.grad(logps.sum(), [head.weight, head.bias])
    losses, metrics = causal_lm_pair_loss(
        model, input_ids, attention_mask, labels, summed_logps_loss, ref_logps=torch.zeros(4), impl=impl
    )
    got = torch.autograd.grad(losses.sum(), [head.weight, head.bias])
    torch.testing.assert_close(torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]]), logps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        logps.double(), reference_logps(model, input_ids, attention_mask, labels), atol=2e-4, rtol=1e-4
    )


def autocast_forward(model):
    """The scripts' one-process --dtype bfloat16: fp32 master weights, the model's forward under a bf16 autocast
    (the fused head runs outside it, on the bf16 final hidden states and the fp32 master head)."""
    forward = model.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = wrapped
    return model


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_margin_is_zero_at_step_zero(impl):
    """The README's promise: a reference scored by the policy's own weights gives the margin
    h = [logp(y_w) - ref(y_w)] - [logp(y_l) - ref(y_l)] = 0 at the first step. Under bf16 autocast over fp32 masters,
    the reference log-probs as the scripts' `score` takes them (causal_lm_logps, eval mode, no grad) equal, to the
    bit, those causal_lm_pair_loss computes for the same batch in training (the same head in the same dtypes, the
    same float64 sequence sums rounded once), and rewards/margins is exactly 0.

    Before: causal_lm_logps summed its fp32 token log-probs in fp32, the pair step in float64: two of the 8
    sequence log-probs here differed by one fp32 ulp (1.5e-5 at -174 nats, 3.1e-5 at -270), margins of 1.5e-5 and
    -3.1e-5 nats on both paths."""
    import os

    if impl == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no Triton path")
    model = autocast_forward(tiny("llama", tie_word_embeddings=False))
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, VOCAB, (8, 64), generator=g)  # 4 pairs: rows 0-3 chosen, 4-7 rejected
    attention_mask = torch.ones_like(input_ids)
    attention_mask[5, -9:] = attention_mask[2, -20:] = 0  # right padding, as the scripts collate
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # prompt
    head = model.get_output_embeddings().weight
    model.eval()
    with torch.no_grad():
        assert decoder_hidden_states(model, input_ids, attention_mask).dtype == torch.bfloat16
        ref, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl=impl)
    model.train()
    loss_fn = daa_loss_fn("dpo", beta=0.1)
    losses, metrics = causal_lm_pair_loss(model, input_ids, attention_mask, labels, loss_fn, ref_logps=ref, impl=impl)
    losses.sum().backward()
    assert head.dtype == torch.float32 and head.grad is not None and head.grad.dtype == torch.float32
    policy = torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]])
    margin = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
    assert torch.equal(policy, ref), f"policy - reference log-probs {(policy - ref).tolist()}"
    assert torch.equal(metrics["rewards/margins"], torch.zeros(4)), f"margins {margin.tolist()} nats at step 0"


def test_bf16_both_entries_give_the_master_head_one_gradient():
    """Both entry points pass an fp32 master head of bf16 hidden states to the engine as it is (the scripts' one-process
    --dtype bfloat16; OSP's stage 0 trains through causal_lm_logps): the head's gradient is summed in fp32 into the
    master's gradient by both, equal up to the order of the fp32 sums (pair-major rows in the pair step).
    Measured: 1.0e-7 of the largest entry; before, 2.6e-3: causal_lm_logps cast the master to bf16 first, and its
    gradient came back rounded to bf16."""
    model = autocast_forward(tiny("llama", tie_word_embeddings=False))
    input_ids, attention_mask, labels = batch(6, rows=4)  # two pairs: rows 0, 1 chosen, 2, 3 rejected
    head = model.get_output_embeddings().weight
    logps, _ = causal_lm_logps(model, input_ids, attention_mask, labels, impl="torch")
    (want,) = torch.autograd.grad(logps.sum(), [head])
    losses, _ = causal_lm_pair_loss(
        model, input_ids, attention_mask, labels, summed_logps_loss, ref_logps=torch.zeros(4), impl="torch"
    )
    (got,) = torch.autograd.grad(losses.sum(), [head])
    assert want.dtype == got.dtype == torch.float32
    error = ((want - got).abs().max() / got.abs().max()).item()
    assert error < 1e-6, error
