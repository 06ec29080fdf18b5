"""Real tokenizers and chat templates on small random models: BOS exactly once, the prompt tokens a
prefix of the conversation's tokens, the verdict token as it follows the judge prompt, every EOS id
of the generation config, and sampling with top-k off.

Real tokenizer files of two families, both shipped inside the `mistral-common` package: Mistral-7B's
SentencePiece model and Mistral NeMo's byte-level BPE "tekken" (131072 ids, tiktoken-style ranks,
converted to a fast tokenizer here and checked against mistral-common's own encoder). Two more
byte-level BPEs are trained here with `tokenizers` only to carry the Llama-3 and ChatML control
tokens, which no shipped file has. Templates: zephyr (writes no BOS), mistral-instruct (writes BOS,
rejects a system role), NeMo's [INST] format (no spaces around the content), Llama-3 style (writes
<|begin_of_text|>, turns end with <|eot_id|>) and ChatML (no BOS, <|im_end|>)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import osp
import sera

ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NEMO = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    ([{"role": "user", "content": "Sort these letters: q d m a"}], "a d m q"),
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say A."},
        ],
        "A",
    ),
    ([{"role": "user", "content": "Ünïcode, emoji 🙂 and  double  spaces"}], " leading space and trailing "),
]


def sentencepiece_tokenizer(folder: Path, template: str):
    """Mistral-7B v0.1's SentencePiece model (32000 pieces), shipped in mistral-common."""
    from transformers import AutoTokenizer

    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(mistral_common_file("tokenizer.model.v1").read_bytes())
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"legacy": false, "add_bos_token": true}'
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    return tokenizer


def mistral_common_file(name: str) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("needs mistral-common (pip install 'selfpo[dev]')")
    return Path(spec.origin).parent / "data" / name


@pytest.fixture(scope="session")
def tekken():
    """Mistral NeMo's tekken file as a fast tokenizer: ids 0-999 are control tokens, byte sequence of rank r is
    id 1000 + r; BPE merges rebuilt from the ranks (a token merges from any two-piece split that is itself in the
    vocabulary, in the order of the merged token's rank), the file's split pattern, and BOS from the post-processor."""
    import base64
    import json

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = mistral_common_file("tekken_240718.json")
    data = json.loads(path.read_text())
    config, byte_to_char = data["config"], bytes_to_unicode()
    n_special = config["default_num_special_tokens"]
    specials = [t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    specials += [Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(specials), n_special)]
    ranks = {
        base64.b64decode(t["token_bytes"]): t["rank"] for t in data["vocab"][: config["default_vocab_size"] - n_special]
    }
    text = lambda b: "".join(byte_to_char[c] for c in b)  # noqa: E731
    merges = sorted(
        (r, text(b[:i]), text(b[i:]))
        for b, r in ranks.items()
        for i in range(1, len(b))
        if b[:i] in ranks and b[i:] in ranks
    )
    vocab = {**{t: i for i, t in enumerate(specials)}, **{text(b): n_special + r for b, r in ranks.items()}}
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges], ignore_merges=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(config["pattern"]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = NEMO
    return tokenizer, Tekkenizer.from_file(str(path))


def test_tekken_conversion_matches_mistral_common(tekken):
    tokenizer, reference = tekken
    assert len(tokenizer) == reference.n_words == 131072
    texts = [m["content"] for prompt, reply in CONVERSATIONS for m in prompt] + [reply for _, reply in CONVERSATIONS]
    for text in texts + ["def f(x):\n    return x**2  # 12345\n\n", "naïve café — 東京 🙂🙂"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference.encode(text, bos=True, eos=False)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hello world")["input_ids"]) == ["<s>", "Hello", "Ġworld"]


def byte_bpe_tokenizer(specials: list[str], bos: str | None, eos: str, template: str):
    """A byte-level BPE (GPT-2 pre-tokenizer and decoder) trained on a small corpus; with `bos`, the
    tokenizer's own encoding starts with it (Llama-3's post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [text for prompt, reply in CONVERSATIONS for text in [m["content"] for m in prompt] + [reply]] * 20
    corpus += [f"Sort these letters: {' '.join('abcdefghijklmnopqrstuvwxyz'[i : i + 5])}" for i in range(22)] * 10
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=specials[-1])
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tekken):
    folder = tmp_path_factory.mktemp("tokenizers")
    llama3 = byte_bpe_tokenizer(
        [
            "<|end_of_text|>",
            "<|eot_id|>",
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        LLAMA3,
    )
    chatml = byte_bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML)
    return {
        "zephyr": sentencepiece_tokenizer(folder / "zephyr", ZEPHYR),
        "mistral": sentencepiece_tokenizer(folder / "mistral", MISTRAL),
        "llama3": llama3,
        "chatml": chatml,
        "tekken": tekken[0],
    }


@pytest.mark.parametrize("name", ["zephyr", "mistral", "llama3", "chatml", "tekken"])
def test_bos_once_and_prompt_tokens_are_a_prefix(tokenizers, name):
    tokenizer = tokenizers[name]
    wants_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert wants_bos == (name != "chatml")
    for prompt, reply in CONVERSATIONS:
        prompt_ids, response_ids = sera.encode(tokenizer, prompt, reply)
        full_ids = prompt_ids + response_ids
        assert (
            full_ids.count(tokenizer.bos_token_id) == (1 if wants_bos else 0)
            if tokenizer.bos_token_id is not None
            else True
        )
        assert (full_ids[0] == tokenizer.bos_token_id) == wants_bos
        # the response is the tail of the whole conversation tokenized once (split at the prompt's length)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
        joint = sera.tokenize(tokenizer, full_text.rstrip())
        assert joint[: len(prompt_ids)] == prompt_ids
        assert response_ids[: len(joint) - len(prompt_ids)] == joint[len(prompt_ids) :]
        assert response_ids[-1] in tokenizer.all_special_ids  # ends with an end-of-turn / EOS token
        assert tokenizer.decode(response_ids, skip_special_tokens=True).strip() == reply.strip()


def test_sentencepiece_response_is_tokenized_as_generated(tokenizers):
    """After zephyr's '<|assistant|>\\n' the model writes 'A', not the word-initial '▁A' of encode('A')."""
    tokenizer = tokenizers["zephyr"]
    _, response_ids = sera.encode(tokenizer, [{"role": "user", "content": "Which?"}], "A")
    alone = tokenizer("A", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone) == ["▁A"]
    assert tokenizer.convert_ids_to_tokens(response_ids) == ["A", "</s>"]
    verdict = osp.verdict_ids(tokenizer, ["A", "B"], osp.JUDGE_TEMPLATES["dialogue"])
    assert tokenizer.convert_ids_to_tokens(verdict) == ["A", "B"] and verdict[0] != alone[0]
    with pytest.raises(osp.InputError, match="the judge reads one verdict token"):
        osp.verdict_ids(tokenizer, ["Answer A", "B"], osp.JUDGE_TEMPLATES["dialogue"])


@pytest.mark.parametrize("name", ["mistral", "tekken"])
def test_mistral_template_rejects_a_system_role(tokenizers, name):
    with pytest.raises(
        sera.InputError, match=r"refuses a conversation with roles \['system', 'user'\]: Only user and assistant"
    ):
        sera.encode(tokenizers[name], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


def tiny_model(kind: str, tokenizer, eos_ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = eos_ids
    return model


def scripted(model, tokens: list[int]):
    """Make the model write `tokens` (then keep writing the last one): a hook on lm_head."""
    calls = [0]

    def hook(module, inputs, logits):
        step = min(calls[0], len(tokens) - 1)
        calls[0] += 1
        forced = torch.full_like(logits[:, -1:], -1e4)
        forced[..., tokens[step]] = 0.0
        return torch.cat([logits[:, :-1], forced], 1)

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize(
    "name,kind", [("llama3", "llama"), ("chatml", "qwen2"), ("zephyr", "mistral"), ("tekken", "mistral")]
)
def test_generation_stops_on_every_eos_id(tokenizers, name, kind):
    """Finished = stopped on any generation_config.eos_token_id (Llama-3 <|eot_id|>, Qwen <|im_end|>), not only
    the tokenizer's EOS; the text ends before it."""
    tokenizer = tokenizers[name]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    end_of_turn = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "zephyr": "</s>", "tekken": "</s>"}[name]
    eos_ids = sorted(
        {
            tokenizer.convert_tokens_to_ids(end_of_turn),
            tokenizer.convert_tokens_to_ids(
                {"llama3": "<|end_of_text|>", "chatml": "<|endoftext|>", "zephyr": "</s>", "tekken": "</s>"}[name]
            ),
        }
    )
    model = tiny_model(kind, tokenizer, eos_ids)
    word = tokenizer("ok", add_special_tokens=False)["input_ids"]
    args = sera.Args(max_new_tokens=8, generation_batch_size=8)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Sort these letters: q d m a"}]]
    handle = scripted(model, word + [tokenizer.convert_tokens_to_ids(end_of_turn)] + word)
    samples = sera.generate(model, tokenizer, prompts[:1], 1, 1.0, 1.0, args, "cpu", seed=0)
    handle.remove()
    assert samples == [[("ok", True)]]
    handle = scripted(model, word)  # never stops: unfinished at max_new_tokens
    samples = sera.generate(model, tokenizer, prompts[:1], 1, 1.0, 1.0, args, "cpu", seed=0)
    handle.remove()
    assert samples[0][0][1] is False and samples[0][0][0].startswith("ok")


def test_sampling_has_no_top_k(tokenizers):
    """T 1.0 / top-p 1.0 samples from the whole distribution: transformers' unset top_k (50) is switched off."""
    tokenizer = tokenizers["llama3"]
    model = tiny_model("llama", tokenizer, [tokenizer.convert_tokens_to_ids("<|eot_id|>")])
    allowed = tokenizer.convert_tokens_to_ids([chr(c) for c in range(33, 127)])  # 94 printable characters

    def flat(module, inputs, logits):
        out = torch.full_like(logits, -1e4)
        out[..., allowed] = 0.0
        return out

    handle = model.lm_head.register_forward_hook(flat)
    samples = sera.generate(
        model,
        tokenizer,
        [[{"role": "user", "content": "Hi"}]],
        256,
        1.0,
        1.0,
        sera.Args(max_new_tokens=1, generation_batch_size=256),
        "cpu",
        seed=0,
    )
    handle.remove()
    distinct = {text for text, _ in samples[0]}
    assert len(distinct) > 60  # 256 draws from 94 equally likely characters: ~88 distinct; top-k 50 allows 50 at most


def test_hh_template_ends_only_the_response_with_eos(tokenizers):
    """Pythia's EOS is its document separator: none mid-conversation, exactly one after the response."""
    tokenizer = tokenizers["llama3"]
    saved, tokenizer.chat_template = tokenizer.chat_template, sera.HH_TEMPLATE
    try:
        prompt, reply = CONVERSATIONS[1]
        prompt_ids, response_ids = sera.encode(tokenizer, prompt, reply)
    finally:
        tokenizer.chat_template = saved
    assert tokenizer.eos_token_id not in prompt_ids and response_ids.count(tokenizer.eos_token_id) == 1
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt_ids, skip_special_tokens=False).endswith("\n\nAssistant:")
