"""causal_lm_logps on tiny random transformers models vs model(...).logits -> log_softmax -> gather."""

import pytest
import torch
import transformers

from selfpo_kernels import causal_lm_logps, decoder_hidden_states, head_logits

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


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=g)
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
