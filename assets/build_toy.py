"""Rebuild the toy world in `assets/toy/` from a seed: data, tokenizer, tiny Llama, stats.

The toy world is a letter task (`assets/toy/oracle.py`) with an exact reward, a byte-level BPE
tokenizer with a chat template, and a ~1M-parameter `LlamaForCausalLM` SFT-trained on CPU so that
  * its plain answers are mediocre (letters a-m usually right, n-z usually wrong), and
  * it follows the methods' prompt texts: the OPSR score prefixes (10/10 -> perfect, s/10 ->
    each letter wrong with probability (10 - s) / 10) and the Sr-DPO refinement prompt
    (almost perfect), and
  * it can already judge a little: asked OSP's judge question about two answers, it prefers the
    better one more often than not, far from always (trained on judge-format conversations about
    short lists only, with verdicts that are right more often the larger the quality gap),
so every method in this repository has something to learn and a way to find it, in minutes on a CPU.

    python assets/build_toy.py                 # everything: ~4 min of CPU time, one thread
    python assets/build_toy.py --data_only     # data/*.jsonl + tokenizer only, seconds, no training
    python assets/build_toy.py --out /tmp/toy  # build elsewhere (compare with MANIFEST.sha256)
    python assets/build_toy.py --reward_model_only  # reward_model/ alone (the data and tokenizer in place), ~30 s

Every output is a function of the seed: data and tokenizer files are byte-identical across runs;
the weights are too with the same torch build, CPU and thread count (deterministic algorithms,
one thread by default). MANIFEST.sha256 records the hashes; STATS.json the measured behaviour.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_oracle():
    """assets/toy/oracle.py is a plain file, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("toy_oracle", HERE / "toy" / "oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = load_oracle()

SEED = 1234
N_EVAL, N_POOL, N_PREFS, N_SFT = 200, 500, 1500, 24000
# Judge-format comparisons mixed into the SFT data, on prompts of their own (drawn after every other
# split, so all shipped files are unchanged): the toy model gets a latent, imperfect ability to judge,
# as an instruct LLM has before OSP's preference augmentation sharpens it.
# Its judge rows cover only short lists, and their verdicts are noisy where the answers are close: it
# judges short lists fairly well and transfers little of that to longer ones. (Trained on every length,
# the tiny model either learns nothing at all or judges as well as augmentation would: measured
# 0.50-0.60 accuracy with 4000-10000 noisier rows, 0.75-0.81 with 8000 rows.)
N_JUDGE_SFT = 8000
JUDGE_SFT_MAX_LETTERS = 4
JUDGE_SFT_RELIABLE_GAP = 5.0  # verdict right w.p. 0.5 + 0.5 * min(1, |score gap| / this): a weak judge
N_SFT_SHIPPED = 3000  # sft.jsonl keeps the first rows; the rest are regenerated from the seed
FLIP_FRACTION = 0.25
# osp.py's toy human-preference set: the judge seed set and held-out judge labels (10% flipped: with
# 25%, as in prefs.jsonl, a 994k-parameter model that cannot judge at all stayed at chance).
JUDGE_FLIP_FRACTION = 0.10

# Literal prompt texts of the methods (OPSR §3.3, Sr-DPO §3.2; OSP's judge templates are ours), verbatim.
CHOSEN_PREFIX = "Please produce a top-notch response that merits a perfect score of 10 out of 10."
REJECTED_PREFIX = "Please produce a good response that merits a perfect score of {score} out of 10."
REFINE_PREFIX = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. "
    "Note that the response should be harmless. The term 100 indicates the level of usefulness, "
    "where 100 is the maximum and 1 is the minimum. Query:"
)
JUDGE_DIALOGUE = (
    "You are comparing two assistant replies to the same conversation.\n\nConversation:\n{x}\n\n"
    "Reply A:\n{a}\n\nReply B:\n{b}\n\n"
    "Which reply is more helpful, honest and harmless? Answer with a single letter: A or B."
)
JUDGE_SUMMARY = (
    "You are comparing two summaries of the same post.\n\nPost:\n{x}\n\n"
    "Summary A:\n{a}\n\nSummary B:\n{b}\n\n"
    "Which summary is more accurate, complete and concise? Answer with a single letter: A or B."
)
REFINE_ERROR_RATE = 0.05

# Chat format: BOS, then one block per turn; the assistant turn ends with EOS (its last label).
BOS, EOS, PAD, END = "<s>", "</s>", "<pad>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, END, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
VOCAB_SIZE = 1024

# A few lines of ordinary assistant English (our own text) so that the BPE also has merges for
# the words of the fixture datasets and judge prompts, not only for the letter task.
GENERAL_TEXT = """\
Human: Can you help me write a short note to my neighbour about the noise last night?
Assistant: Of course. Here is a polite note you could leave: I hope you had a good evening.
Human: What is the capital of France, and why is it famous?
Assistant: The capital of France is Paris. It is known for its museums, food and history.
Human: How do I make my tomato plants grow better in a small garden?
Assistant: Give them plenty of sun, water them deeply but not too often, and add compost.
Human: Summarize the following post in one sentence.
TL;DR: I moved to a new city for work, I feel lonely, and I do not know how to meet people.
SUBREDDIT: r/relationships TITLE: My friend keeps cancelling our plans at the last minute
POST: We have been friends for ten years, but this year she has cancelled every time.
The summary is accurate, complete and concise, and the reply is helpful, honest and harmless.
Please explain the answer step by step, and give an example so that it is easy to follow.
Write a function that returns the sum of a list of numbers, then test it with three cases.
I am sorry, but I cannot help with that request because it could cause harm to other people.
Thank you for the question! The first step is to read the instructions carefully.
Which response is better? The first one is more detailed, while the second one is shorter.
Human: Could you recommend a good book for a long train journey through the mountains?
Assistant: A light mystery novel works well: short chapters, a clever detective, and a twist.
Human: My computer runs slowly after the latest update. What should I check first?
Assistant: Look at which programs start automatically, free some disk space, and restart once.
Human: Why do leaves change colour in autumn, and why are some trees red instead of yellow?
Assistant: Green chlorophyll breaks down in the cold, revealing yellow pigments; red ones form anew.
Human: Give me a simple recipe for dinner tonight with rice, eggs, onions and frozen peas.
Assistant: Fry the onion, add cooked rice and peas, push them aside, scramble the eggs, then mix.
Human: How many hours of sleep does a teenager need, and what happens without enough rest?
Assistant: Most teenagers need eight to ten hours; too little sleep hurts memory, mood and focus.
Human: What should I pack for a weekend hiking trip if the weather forecast says rain?
Assistant: Bring a waterproof jacket, spare socks, a warm layer, snacks, a map, and a small torch.
Human: Explain the difference between weather and climate to a child who is nine years old.
Assistant: Weather is what the sky does today; climate is what it usually does over many years.
Human: Is it true that goldfish only remember things for three seconds?
Assistant: No, that is a myth. Experiments show goldfish can remember feeding times for months.
Human: Help me plan a birthday party for my grandmother, who is turning ninety next month.
Assistant: Invite family early, choose a quiet room, prepare photos from her life, and order cake.
Human: What are the benefits of learning a second language as an adult?
Assistant: It trains memory and attention, opens new friendships and travel, and helps careers.
POST: I started a new job three months ago and my manager never answers my questions.
TL;DR: New job, silent manager, unsure whether to talk to them or to human resources.
SUBREDDIT: r/personalfinance TITLE: Should I pay off my student loan early or invest?
POST: My landlord wants to raise the rent by twenty percent and the lease ends in June.
TL;DR: Rent going up a lot; should I negotiate, move out, or accept the higher price?
SUBREDDIT: r/AskDocs TITLE: Headache every afternoon for two weeks, should I worry?
The assistant should be polite, correct, and brief, and it should never invent facts or sources.
A careful answer explains its reasoning, admits uncertainty, and suggests where to learn more.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 64 99 100 128 256 512 1000 2024.
"""


# ---------------------------------------------------------------------------------------------
# Data


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def draw_prompts(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[str]]:
    """Disjoint sets of distinct instructions, one per split, in draw order."""
    seen, splits = set(), {}
    for name, size in sizes.items():
        split = []
        while len(split) < size:
            prompt = oracle.make_prompt(rng)
            if prompt not in seen:
                seen.add(prompt)
                split.append(prompt)
        splits[name] = split
    return splits


def sft_rows(prompts: list[str], rng: random.Random) -> list[dict]:
    """SFT conversations: the mediocre plain behaviour plus the prompt-conditioned behaviours.

    mix (fractions of rows):  0.40 plain prompt -> per-letter base error rates (quality hidden)
                              0.15 chosen prefix (10/10) -> perfect answer
                              0.30 rejected prefix, s ~ U{1..10} -> error rate (10 - s) / 10
                              0.15 refinement prompt -> error rate 0.05
    """
    rows = []
    for instruction in prompts:
        answer = oracle.perfect_answer(instruction)
        kind = rng.random()
        if kind < 0.40:
            user, response = instruction, oracle.base_answer(instruction, rng)
        elif kind < 0.55:
            user, response = f"{CHOSEN_PREFIX} {instruction}", answer
        elif kind < 0.85:
            score = rng.randint(1, 10)
            user = f"{REJECTED_PREFIX.format(score=score)} {instruction}"
            response = oracle.corrupt(answer, (10 - score) / 10, rng)
        else:
            user, response = f"{REFINE_PREFIX} {instruction}", oracle.corrupt(answer, REFINE_ERROR_RATE, rng)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        rows.append({"prompt": user, "prompt_id": prompt_id(user), "messages": messages})
    return rows


def pref_rows(prompts: list[str], rng: random.Random, flip_fraction: float = FLIP_FRACTION) -> list[dict]:
    """UltraFeedback-binarized pairs: two answers at random error levels, scored by the oracle;
    exactly `flip_fraction` of the rows have chosen/rejected swapped (label noise, `flipped`)."""
    rows = []
    for instruction in prompts:
        answer = oracle.perfect_answer(instruction)
        while True:
            first = oracle.corrupt(answer, rng.random(), rng)
            second = oracle.corrupt(answer, rng.random(), rng)
            first_score, second_score = oracle.score(instruction, first), oracle.score(instruction, second)
            if first_score != second_score:
                break
        if first_score < second_score:
            first, second, first_score, second_score = second, first, second_score, first_score
        rows.append(
            {
                "instruction": instruction,
                "better": first,
                "worse": second,
                "better_score": first_score,
                "worse_score": second_score,
            }
        )
    flipped = set(rng.sample(range(len(rows)), round(flip_fraction * len(rows))))
    out = []
    for index, row in enumerate(rows):
        is_flipped = index in flipped
        chosen, rejected = (row["worse"], row["better"]) if is_flipped else (row["better"], row["worse"])
        score_chosen, score_rejected = (
            (row["worse_score"], row["better_score"]) if is_flipped else (row["better_score"], row["worse_score"])
        )
        user = {"role": "user", "content": row["instruction"]}
        chosen_messages = [user, {"role": "assistant", "content": chosen}]
        out.append(
            {
                "prompt": row["instruction"],
                "prompt_id": prompt_id(row["instruction"]),
                "chosen": chosen_messages,
                "rejected": [user, {"role": "assistant", "content": rejected}],
                "messages": chosen_messages,
                "score_chosen": score_chosen,
                "score_rejected": score_rejected,
                "flipped": is_flipped,
            }
        )
    return out


def judge_sft_rows(prompts: list[str], rng: random.Random) -> list[dict]:
    """SFT conversations in OSP's dialogue judge format (osp.py JUDGE_TEMPLATES):
    two answers at random error levels, A/B order random, and a verdict that is right more often the
    larger the score gap (a coin flip for near-equal answers, reliable from a gap of
    JUDGE_SFT_RELIABLE_GAP): a weak judge, not an oracle, with no position bias."""
    rows = []
    for instruction in prompts:
        answer = oracle.perfect_answer(instruction)
        while True:
            a, b = (oracle.corrupt(answer, rng.random(), rng) for _ in range(2))
            gap = oracle.score(instruction, a) - oracle.score(instruction, b)
            if gap != 0:
                break
        right = "A" if gap > 0 else "B"
        p_right = 0.5 + 0.5 * min(1.0, abs(gap) / JUDGE_SFT_RELIABLE_GAP)
        verdict = right if rng.random() < p_right else ("B" if right == "A" else "A")
        user = JUDGE_DIALOGUE.format(x=instruction, a=a, b=b)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": verdict}]
        rows.append({"prompt": user, "prompt_id": prompt_id(user), "messages": messages})
    return rows


def build_data(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    splits = draw_prompts(
        rng, {"eval": N_EVAL, "prompts": N_POOL, "prefs": N_PREFS, "sft": N_SFT, "judge_sft": 3 * N_JUDGE_SFT}
    )  # 2/5 of prompts have <= 4 letters
    return {
        "eval": [{"prompt": p, "prompt_id": prompt_id(p)} for p in splits["eval"]],
        "prompts": [{"prompt": p, "prompt_id": prompt_id(p)} for p in splits["prompts"]],
        "prefs": pref_rows(splits["prefs"], random.Random(seed + 1)),
        "sft": sft_rows(splits["sft"], random.Random(seed + 2)),
        "judge_prefs": pref_rows(
            splits["prefs"], random.Random(seed + 5), JUDGE_FLIP_FRACTION
        ),  # same prompts, new answers
        "judge_sft": judge_sft_rows(
            [x for x in splits["judge_sft"] if len(oracle.parse_letters(x)) <= JUDGE_SFT_MAX_LETTERS][:N_JUDGE_SFT],
            random.Random(seed + 6),
        ),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus(data: dict[str, list[dict]], seed: int) -> list[str]:
    """Task conversations, every method prompt text (OPSR prefixes for s = 1..10, the refinement
    prompt, both judge templates filled with toy answers) and a few lines of general English."""
    rng = random.Random(seed + 3)
    texts = [GENERAL_TEXT] * 20
    for row in data["sft"]:
        texts.append(row["messages"][0]["content"] + "\n" + row["messages"][1]["content"])
    for row in data["prefs"][:500]:
        a, b = row["chosen"][1]["content"], row["rejected"][1]["content"]
        for template in (JUDGE_DIALOGUE, JUDGE_SUMMARY):
            texts.append(template.format(x=row["prompt"], a=a, b=b) + "\nA\nB")
    for score in range(1, 11):
        texts += [f"{REJECTED_PREFIX.format(score=score)} {oracle.make_prompt(rng)}"] * 50
    texts += [f"{CHOSEN_PREFIX} x", f"{REFINE_PREFIX} x"] * 100
    return texts


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path):
    """tokenizer.json + a plain PreTrainedTokenizerFast tokenizer_config.json (written by hand so
    that it loads the same in transformers 4.x and 5.x); no BOS is added by encode(): the chat
    template writes it."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [END, *ROLE_TOKENS],
        "model_max_length": 512,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Model


def encode_sft(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels): labels are -100 on the prompt, the answer tokens and EOS are scored."""
    examples = []
    for row in rows:
        prompt_ids = tok.apply_chat_template(
            row["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full_ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[-1] == tok.eos_token_id, row
        examples.append((full_ids, [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]))
    return examples


def length_grouped_batches(examples, batch_size: int, rng: random.Random) -> list[list]:
    """One epoch of batches of similar length (less padding), in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    group = batch_size * 32
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: len(examples[i][0]))
        batches += [[examples[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_model(tok, examples, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    start = time.time()

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    batches = []
    for step in range(args.steps):
        if not batches:
            batches = length_grouped_batches(examples, args.batch_size, random.Random(args.seed + 4 + step))
        batch = batches.pop()
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention_mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}"
                f"  ({time.time() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Reward model: a tiny sequence classifier trained Bradley-Terry on oracle-labelled pairs


N_RM_TRAIN, N_RM_HELD_OUT = 3000, 1000  # pairs on prompts of their own (drawn after every other split)
RM_HIDDEN, RM_LAYERS, RM_HEADS, RM_STEPS, RM_BATCH, RM_LR = 48, 2, 4, 600, 32, 3e-3


def reward_pairs(prompts: list[str], rng: random.Random) -> list[tuple[str, str, str]]:
    """(instruction, better, worse) by the oracle: two answers of the toy world's kinds (the plain model's
    mediocre answer, or a corruption at a random error level), never equal in score."""
    pairs = []
    for instruction in prompts:
        answer = oracle.perfect_answer(instruction)
        while True:
            a, b = (
                oracle.base_answer(instruction, rng)
                if rng.random() < 0.3
                else oracle.corrupt(answer, rng.random(), rng)
                for _ in range(2)
            )
            gap = oracle.score(instruction, a) - oracle.score(instruction, b)
            if gap != 0:
                break
        pairs.append((instruction, a, b) if gap > 0 else (instruction, b, a))
    return pairs


def build_reward_model(tok, data: dict, out: Path, args) -> dict:
    """assets/toy/reward_model: a LlamaForSequenceClassification with one output, trained for a few hundred
    Bradley-Terry steps (-log sigmoid(r(better) - r(worse))) on oracle-labelled pairs, scored on the chat
    template's rendering of (instruction, answer) at its last token (EOS). Deliberately short training: it
    ranks held-out pairs mostly, not always, as the oracle does, like a real reward model. Returns its stats."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    taken = {row["prompt"] for name in ("eval", "prompts", "prefs") for row in data[name]}
    rng = random.Random(args.seed + 7)
    prompts = []
    while len(prompts) < N_RM_TRAIN + N_RM_HELD_OUT:
        prompt = oracle.make_prompt(rng)
        if prompt not in taken:
            taken.add(prompt)
            prompts.append(prompt)
    pairs = reward_pairs(prompts, random.Random(args.seed + 8))
    train, held_out = pairs[:N_RM_TRAIN], pairs[N_RM_TRAIN:]

    def ids(instruction, answer):
        return tok.apply_chat_template(
            [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_dict=False,
        )

    def rewards(model, texts):  # right-padded: the classifier reads the last non-pad token
        rows = [ids(x, y) for x, y in texts]
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        return model(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long()).logits[:, 0]

    torch.manual_seed(args.seed + 7)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=RM_HIDDEN,
        intermediate_size=RM_HIDDEN * 2,
        num_hidden_layers=RM_LAYERS,
        num_attention_heads=RM_HEADS,
        num_key_value_heads=RM_HEADS,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(config)
    start = time.time()
    optimizer = torch.optim.AdamW(model.parameters(), lr=RM_LR, weight_decay=0.01)
    order_rng = random.Random(args.seed + 9)
    order = []
    for step in range(RM_STEPS):
        if len(order) < RM_BATCH:
            order = list(range(len(train)))
            order_rng.shuffle(order)
        batch = [train[order.pop()] for _ in range(RM_BATCH)]
        scores = rewards(model, [(x, w) for x, w, _ in batch] + [(x, worse) for x, _, worse in batch])
        loss = torch.nn.functional.softplus(scores[RM_BATCH:] - scores[:RM_BATCH]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == RM_STEPS - 1:
            print(f"reward model step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        margins = torch.cat(
            [
                rewards(model, [(x, w) for x, w, _ in held_out[i : i + 200]])
                - rewards(model, [(x, worse) for x, _, worse in held_out[i : i + 200]])
                for i in range(0, len(held_out), 200)
            ]
        )
    folder = out / "reward_model"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the toy tokenizer, byte for byte
        (folder / name).write_bytes((out / "model" / name).read_bytes())
    stats = {
        "held_out_accuracy": round((margins > 0).double().mean().item(), 3),
        "held_out_pairs": len(held_out),
        "train_pairs": len(train),
        "steps": RM_STEPS,
        "batch_size": RM_BATCH,
        "lr": RM_LR,
        "hidden": RM_HIDDEN,
        "layers": RM_LAYERS,
        "heads": RM_HEADS,
        "params": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.time() - start, 1),
        "cpu": cpu_name(),  # the weights are bit-exact only on the same kind of CPU
    }
    (folder / "STATS.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


EVAL_CONDITIONS = {  # user-turn templates of the measured prompt conditions
    "base": "{x}",
    "opsr_10": CHOSEN_PREFIX + " {x}",
    "opsr_7": REJECTED_PREFIX.format(score=7) + " {x}",
    "opsr_3": REJECTED_PREFIX.format(score=3) + " {x}",
    "refine": REFINE_PREFIX + " {x}",
}


def evaluate(model, tok, instructions: list[str], seed: int) -> dict[str, dict[str, float]]:
    """Mean oracle score on `instructions` per prompt condition: one T=1 sample each, and greedy."""
    import torch

    tok.padding_side = "left"
    stats = {}
    for name, template in EVAL_CONDITIONS.items():
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": template.format(x=x)}], add_generation_prompt=True, tokenize=False
            )
            for x in instructions
        ]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        stats[name] = {}
        for mode, sampling in (
            ("sampled", dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)),
            ("greedy", dict(do_sample=False)),
        ):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=24, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling
                )
            responses = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            scores = [oracle.score(x, y) for x, y in zip(instructions, responses)]
            stats[name][mode] = round(sum(scores) / len(scores), 3)
    tok.padding_side = "right"
    return stats


N_JUDGE_HELD_OUT = 200  # osp.py's default --num_judge_eval: the tail of judge_prefs.jsonl


def evaluate_judge(model, tok, pairs: list[dict]) -> dict[str, float]:
    """The SFT model as OSP's judge on held-out pairs, both presentation orders (as osp.py measures it):
    q = (J(w, l) + 1 - J(l, w)) / 2 with J = sigmoid(logit A - logit B) after the judge prompt;
    accuracy against the oracle and the pairs' labels, and position consistency."""
    import torch

    verdict = [tok.convert_tokens_to_ids(t) for t in ("A", "B")]
    texts = []
    for row in pairs:
        chosen, rejected = row["chosen"][1]["content"], row["rejected"][1]["content"]
        for a, b in ((chosen, rejected), (rejected, chosen)):
            user = JUDGE_DIALOGUE.format(x=row["prompt"], a=a, b=b)
            texts.append(
                tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
            )
    side, tok.padding_side = tok.padding_side, "right"  # the verdict is read at each row's last real token
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    with torch.no_grad():
        last = batch["attention_mask"].sum(1) - 1
        logits = model(**batch).logits[torch.arange(len(texts)), last][:, verdict].double()
    j = torch.sigmoid(logits[:, 0] - logits[:, 1])
    j_wl, j_lw = j[0::2], j[1::2]
    q = (j_wl + 1 - j_lw) / 2
    oracle_better = torch.tensor([row["score_chosen"] > row["score_rejected"] for row in pairs])
    return {
        "oracle_accuracy": round(((q > 0.5) == oracle_better).double().mean().item(), 3),
        "label_accuracy": round((q > 0.5).double().mean().item(), 3),
        "position_consistency": round(((j_wl > 0.5) == (j_lw < 0.5)).double().mean().item(), 3),
        "q_mean_abs_dev": round((q - 0.5).abs().mean().item(), 3),
    }


README = """\
# Toy world (generated by `assets/build_toy.py`; edit the template there)

A task with an exact reward, a byte-level BPE tokenizer with a chat template, and a tiny Llama that
is mediocre at the task but follows the methods' prompt texts, so that `sera.py`, `opsr.py`,
`osp.py` and `srdpo.py` run on a CPU in minutes and have something measurable to learn.

**Task** (`oracle.py`): `Sort these letters: q d m a` -> `a d m q` (3-7 distinct lowercase letters).
`score(prompt, response)` in [0, 10] gives per-position credit:
`10 * #matching positions / max(len(answer), len(response))` (whitespace-split, case-sensitive);
it searches the prompt for the instruction, so a method prefix in front of it does not matter.
A wrong letter is always the alphabetic successor of the right one (`corrupt`). The model's plain
answers get letters a-m right 80% of the time and n-z 30% of the time.

**Reward function contract.** Scripts take `--reward_fn path/to/file.py:function`, called as
`function(prompt: str, response: str) -> float` (higher is better), where `prompt` is the raw last
user message (no chat template, no method prefix) and `response` the decoded assistant text
without special tokens. With the toy assets the default is `assets/toy/oracle.py:score`, and
evaluation prompts come from `assets/toy/data/eval.jsonl`.

| path | what |
|---|---|
| `model/` | `LlamaForCausalLM`: hidden {hidden}, {layers} layers, {heads} heads, untied embeddings, {params:,} parameters, fp32 safetensors; `generation_config.json` (eos/pad) |
| `model/tokenizer*.json` | byte-level BPE with {vocab} tokens and a chat template (below) |
| `data/prefs.jsonl` | {n_prefs} pairs, UltraFeedback-binarized schema + `flipped` ({flip:.0%} of rows swapped on purpose: `score_chosen < score_rejected`) |
| `data/judge_prefs.jsonl` | {n_prefs} pairs on the same prompts with new answers, {judge_flip:.0%} flipped: `osp.py`'s human-preference set (judge seed set, held-out judge labels) |
| `data/prompts.jsonl` | {n_pool} prompts for online methods (`prompt`, `prompt_id`) |
| `data/eval.jsonl` | {n_eval} held-out prompts, disjoint from all other files |
| `data/sft.jsonl` | first {n_sft_shipped} of the {n_sft} UltraChat-schema SFT conversations the model was trained on (the task, under every prompt condition) |
| (not shipped) | {n_judge_sft} judge-format SFT conversations on prompts of their own (3-{judge_letters} letters only), regenerated from the seed: OSP's dialogue judge question about two answers, verdict right with probability 0.5 + 0.5 min(1, gap / {judge_gap:g}) for an oracle score gap `gap` (a weak judge, no position bias) |
| `reward_model/` | `LlamaForSequenceClassification` with one output (below), the toy tokenizer, `STATS.json` (how it was built, its accuracy) |
| `STATS.json`, `MANIFEST.sha256` | measured behaviour; sha256 of every generated file |

Special tokens: `<s>` (BOS), `</s>` (EOS), `<pad>`, `<|end|>`, `<|system|>`, `<|user|>`,
`<|assistant|>`; `encode` adds no BOS (the template writes it); `A` and `B` are single tokens.
Chat template (assistant turns end with EOS, the generation prompt is `<|assistant|>\\n`):

    <s><|system|>\\n{{system}}<|end|>\\n<|user|>\\n{{user}}<|end|>\\n<|assistant|>\\n{{answer}}</s>

**Measured** on the {n_eval} eval prompts (mean oracle score, one sample at T=1.0 / greedy):

| user turn | sampled | greedy |
|---|---|---|
{table}

**As OSP's judge** (`osp.py`'s dialogue template, both presentation orders averaged) on the
{n_judge_held_out} held-out pairs at the end of `judge_prefs.jsonl`:

| accuracy vs oracle | accuracy vs labels | position consistency (verdict survives swapping A and B) | mean abs(q - 0.5) |
|---|---|---|---|
| {judge[oracle_accuracy]:.3f} | {judge[label_accuracy]:.3f} | {judge[position_consistency]:.3f} | {judge[q_mean_abs_dev]:.3f} |

Real instruct models judge above chance before any judge training; OSP's preference augmentation
sharpens that ability, it does not have to create it from nothing.

**Reward model** (`reward_model/`, for the scripts' `--reward_model`): a `LlamaForSequenceClassification`
with one output (hidden {rm[hidden]}, {rm[layers]} layers, {rm[heads]} heads, {rm[params]:,} parameters, fp32; the toy
tokenizer and chat template), read at the last token (EOS) of the chat template's rendering of the user
instruction and the answer. `build_reward_model` trains it for {rm[steps]} Bradley-Terry steps
(`-log sigmoid(r(better) - r(worse))`, batch {rm[batch_size]}, AdamW lr {rm[lr]:g}) on {rm[train_pairs]:,} pairs on
prompts of their own, disjoint from every data file: two answers per prompt, each the plain model's kind of
answer (30%) or a corruption at a uniformly random error level, never equal in oracle score, the better one by
the oracle. It is stopped early on purpose: on {rm[held_out_pairs]:,} held-out pairs of the same kind it orders
**{rm[held_out_accuracy]:.3f}** as the oracle does, an imperfect proxy like a real reward model, so that how far
its verdicts can be trusted as a policy moves away from its training data can be measured against the oracle.

**Use**: `AutoTokenizer.from_pretrained("assets/toy/model")` and `AutoModelForCausalLM.from_pretrained(...)`
(transformers 4.x and 5.x); the tokenizer pads on the right, so set `padding_side = "left"` to
generate in batches.

**Rebuild**: `python assets/build_toy.py` ({cpu_minutes:.1f} min of CPU time on {threads} thread,
{minutes:.1f} min wall clock here); `--data_only` rewrites data and tokenizer only (seconds);
`--reward_model_only` rebuilds `reward_model/` from the data and the tokenizer in place (under a minute);
`--out DIR` builds elsewhere. Everything is seeded: data and tokenizer files are byte-identical
across runs, and so are the weights with the same torch build and CPU (torch {torch},
deterministic algorithms, one thread); compare with `MANIFEST.sha256`.
"""

CONDITION_LABELS = {
    "base": "plain instruction",
    "opsr_10": "OPSR chosen prefix (10 out of 10)",
    "opsr_7": "OPSR rejected prefix, 7 out of 10",
    "opsr_3": "OPSR rejected prefix, 3 out of 10",
    "refine": "Sr-DPO refinement prompt",
}


def write_readme(out: Path, stats: dict, args) -> None:
    rm = json.loads((out / "reward_model" / "STATS.json").read_text())
    table = "\n".join(
        f"| {CONDITION_LABELS[name]} | {stats[name]['sampled']:.2f} | {stats[name]['greedy']:.2f} |"
        for name in EVAL_CONDITIONS
    )
    (out / "README.md").write_text(
        README.format(
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            params=stats["params"],
            vocab=stats["vocab_size"],
            n_judge_sft=N_JUDGE_SFT,
            judge_letters=JUDGE_SFT_MAX_LETTERS,
            judge_gap=JUDGE_SFT_RELIABLE_GAP,
            n_judge_held_out=N_JUDGE_HELD_OUT,
            judge=stats["judge"],
            n_prefs=N_PREFS,
            flip=FLIP_FRACTION,
            judge_flip=JUDGE_FLIP_FRACTION,
            n_pool=N_POOL,
            n_eval=N_EVAL,
            n_sft_shipped=N_SFT_SHIPPED,
            n_sft=N_SFT,
            table=table,
            minutes=stats["build_seconds"] / 60,
            cpu_minutes=stats["build_cpu_seconds"] / 60,
            threads=args.threads,
            torch=stats["torch"],
            rm=rm,
        )
    )


# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path) -> None:
    files = sorted(
        p
        for p in out.rglob("*")
        if p.is_file() and p.name != "MANIFEST.sha256" and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    lines = [
        f"{sha256_file(p)}  {p.relative_to(out).as_posix()}"
        for p in files
        if p.name not in ("STATS.json", "README.md", "oracle.py")
    ]
    (out / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "toy", help="output folder (default assets/toy)")
    parser.add_argument("--data_only", action="store_true", help="write data + tokenizer only, no training")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=160)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; weights are bit-exact per count")
    parser.add_argument(
        "--reward_model_only",
        action="store_true",
        help="rebuild reward_model/ alone from the seed's data and the tokenizer in --out, then README and MANIFEST",
    )
    args = parser.parse_args()
    start, start_cpu = time.time(), time.process_time()

    data = build_data(args.seed)
    if args.reward_model_only:
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        build_reward_model(AutoTokenizer.from_pretrained(args.out / "model"), data, args.out, args)
        write_readme(args.out, json.loads((args.out / "STATS.json").read_text()), args)
        write_manifest(args.out)
        return
    for name in ("prefs", "judge_prefs", "prompts", "eval"):
        write_jsonl(args.out / "data" / f"{name}.jsonl", data[name])
    write_jsonl(args.out / "data" / "sft.jsonl", data["sft"][:N_SFT_SHIPPED])
    tok = save_tokenizer(build_tokenizer(tokenizer_corpus(data, args.seed)), args.out / "model")
    print(f"data written, tokenizer vocab {len(tok)}  ({time.time() - start:.1f}s)")
    if args.data_only:
        return

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = train_model(tok, encode_sft(tok, data["sft"] + data["judge_sft"]), args)
    model.generation_config.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(args.out / "model")
    print(f"trained ({time.time() - start:.1f}s)")
    stats = evaluate(model, tok, [row["prompt"] for row in data["eval"]], args.seed)
    stats["judge"] = evaluate_judge(model, tok, data["judge_prefs"][-N_JUDGE_HELD_OUT:])
    stats.update(
        params=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tok),
        build_seconds=round(time.time() - start, 1),
        build_cpu_seconds=round(time.process_time() - start_cpu, 1),
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
        threads=args.threads,
    )
    (args.out / "STATS.json").write_text(json.dumps(stats, indent=2) + "\n")
    rm_stats = build_reward_model(tok, data, args.out, args)
    print(f"reward model: held-out accuracy vs the oracle {rm_stats['held_out_accuracy']:.3f}")
    write_readme(args.out, stats, args)
    write_manifest(args.out)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
