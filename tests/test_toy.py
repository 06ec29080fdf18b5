"""The toy world in assets/toy: oracle, tokenizer, model, data, and that the build reproduces them.

Everything here runs on CPU in well under two minutes; the full rebuild (minutes) is marked slow.
"""

import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy"
MODEL = TOY / "model"
DATA = TOY / "data"


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = load_module(TOY / "oracle.py", "toy_oracle")
build = load_module(ROOT / "assets" / "build_toy.py", "build_toy")

PREFIXES = [build.CHOSEN_PREFIX, build.REJECTED_PREFIX.format(score=3), build.REFINE_PREFIX]
INSTRUCTION = re.compile(r"Sort these letters:(?: [a-z])+$")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def many_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [oracle.make_prompt(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Oracle


def test_oracle_perfect_answer_scores_ten_and_garbage_about_zero():
    rng = random.Random(1)
    prompts = many_prompts(500)
    assert all(oracle.score(p, oracle.perfect_answer(p)) == 10.0 for p in prompts)
    garbage = [oracle.score(p, oracle.garbage(rng)) for p in prompts]
    assert sum(garbage) / len(garbage) < 1.0
    assert oracle.score(prompts[0], "") == 0.0


def test_oracle_hand_checked_examples():
    prompt = "Sort these letters: q d m a"
    assert oracle.perfect_answer(prompt) == "a d m q"
    assert oracle.score(prompt, "a d m q") == 10.0
    assert oracle.score(prompt, "a d n q") == 7.5  # one wrong letter of four
    assert oracle.score(prompt, "a d m") == 7.5  # one letter missing
    assert oracle.score(prompt, "a d m q q") == 8.0  # one extra letter: 4 of 5 positions
    assert oracle.score(prompt, "q d m a") == 5.0  # unsorted: d and m happen to be in place
    assert oracle.score(prompt, "A D M Q") == 0.0  # case-sensitive


def test_oracle_decreases_with_corruption():
    prompts = many_prompts(2000, seed=2)
    rng = random.Random(3)
    levels = [i / 10 for i in range(11)]
    means = [
        sum(oracle.score(p, oracle.corrupt(oracle.perfect_answer(p), level, rng)) for p in prompts) / len(prompts)
        for level in levels
    ]
    assert all(a > b for a, b in zip(means, means[1:])), means
    for level, mean in zip(levels, means):  # each letter is wrong with probability `level`
        assert abs(mean - 10 * (1 - level)) < 0.3, (level, mean)


SCORE_IN_A_FRESH_PROCESS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("toy_oracle", sys.argv[1])
oracle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oracle)
print(json.dumps([oracle.score(p, r) for p, r in json.load(sys.stdin)]))
"""


def test_oracle_is_deterministic_and_ignores_prefixes():
    """The score is the per-position credit written out here (the successor of a letter is never the letter, so a
    corrupted position earns nothing): 10 * (letters kept) / (letters); the same behind every prefix the methods
    put before the task, and the same in fresh processes with other hash seeds (no dependence on set or dict order)."""
    rng = random.Random(4)
    pairs, expected = [], []
    for prompt in many_prompts(200, seed=5):
        answer = sorted(prompt.split(": ", 1)[1].split())
        wrong = {i for i in range(len(answer)) if rng.random() < 0.5}
        response = " ".join(
            chr((ord(c) - ord("a") + 1) % 26 + ord("a")) if i in wrong else c for i, c in enumerate(answer)
        )
        pairs.append((prompt, response))
        expected.append(10.0 * (len(answer) - len(wrong)) / len(answer))
    assert 0.0 in expected and 10.0 in expected and len(set(expected)) > 5  # the cases span the scale
    assert [oracle.score(p, r) for p, r in pairs] == pytest.approx(expected, abs=1e-12)
    for prefix in PREFIXES:
        assert [oracle.score(f"{prefix} {p}", r) for p, r in pairs] == pytest.approx(expected, abs=1e-12)
    for hash_seed in ("1", "2"):
        res = subprocess.run(
            [sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS, str(TOY / "oracle.py")],
            input=json.dumps(pairs),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            check=True,
        )
        assert json.loads(res.stdout) == pytest.approx(expected, abs=1e-12), hash_seed
    with pytest.raises(ValueError, match="no toy task"):
        oracle.score("What is the capital of France?", "Paris")


def test_corruption_is_the_successor_letter():
    assert oracle.wrong_letter("a") == "b" and oracle.wrong_letter("z") == "a" and oracle.wrong_letter("Q") == "R"
    assert oracle.corrupt("a d m q", 1.0, random.Random(0)) == "b e n r"
    assert oracle.corrupt("a d m q", 0.0, random.Random(0)) == "a d m q"


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="session")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL).eval()


def test_chat_template_renders_turns_and_ends_assistant_with_eos(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort these letters: c a b"},
        {"role": "assistant", "content": "a b c"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    prompt = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nSort these letters: c a b<|end|>\n<|assistant|>\n"
    assert text == prompt + "a b c</s>"
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == prompt
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt_ids = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt is a token prefix of the conversation
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[len(prompt_ids) :], skip_special_tokens=True) == "a b c"
    assert tok("a b c")["input_ids"] == tok("a b c", add_special_tokens=False)["input_ids"]  # no implicit BOS
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


def test_judge_labels_are_single_distinct_tokens(tok):
    label_ids = []
    for label in ("A", "B"):
        ids = tok.encode(label, add_special_tokens=False)
        assert len(ids) == 1, (label, ids)
        label_ids.append(ids[-1])
        # as the first token of an assistant turn after the judge prompt
        judge = build.JUDGE_DIALOGUE.format(x="Sort these letters: b a", a="a b", b="b a")
        prompt_ids = tok.apply_chat_template(
            [{"role": "user", "content": judge}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        turns = [{"role": "user", "content": judge}, {"role": "assistant", "content": label}]
        full_ids = tok.apply_chat_template(turns, tokenize=True, return_dict=False)
        assert full_ids == prompt_ids + [ids[0], tok.eos_token_id]
    assert label_ids[0] != label_ids[1]


def test_tokenizer_knows_the_method_texts(tok):
    # the prompt texts were in the BPE corpus, so they encode to whole words, not bytes
    for text in PREFIXES + [build.JUDGE_DIALOGUE, build.JUDGE_SUMMARY]:
        assert len(tok.encode(text, add_special_tokens=False)) < 0.4 * len(text), text[:40]
    assert 800 <= len(tok) <= 2048


def test_model_loads_as_llama_with_matching_config(model, tok):
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings == 512
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert 5e5 < sum(p.numel() for p in model.parameters()) < 5e6


def mean_scores(model, tok, instructions: list[str], template: str, samples: int, seed: int) -> float:
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": template.format(x=x)}], add_generation_prompt=True, tokenize=False
        )
        for x in instructions
    ]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=16,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples,
            pad_token_id=tok.pad_token_id,
        )
    responses = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = [oracle.score(instructions[i // samples], y) for i, y in enumerate(responses)]
    return sum(scores) / len(scores)


@pytest.fixture(scope="session")
def behaviour(model, tok):
    """Mean oracle score of T=1 samples on 64 held-out prompts (4 samples each) per prompt condition."""
    instructions = [row["prompt"] for row in read_jsonl(DATA / "eval.jsonl")[:64]]
    conditions = {
        "base": "{x}",
        "opsr_10": build.CHOSEN_PREFIX + " {x}",
        "opsr_3": build.REJECTED_PREFIX.format(score=3) + " {x}",
        "refine": build.REFINE_PREFIX + " {x}",
    }
    return {
        name: mean_scores(model, tok, instructions, template, samples=4, seed=0)
        for name, template in conditions.items()
    }


def test_base_policy_is_mediocre(behaviour):
    # room to improve in both directions: neither solved nor hopeless
    assert 3.0 <= behaviour["base"] <= 7.0, behaviour


def test_opsr_prefix_controls_quality(behaviour):
    # measured about 6 and 4.3 points at build time (STATS.json); half of that is required
    assert behaviour["opsr_10"] - behaviour["opsr_3"] >= 3.0, behaviour
    assert behaviour["opsr_10"] - behaviour["base"] >= 2.0, behaviour


def test_refinement_prompt_improves_answers(behaviour):
    assert behaviour["refine"] - behaviour["base"] >= 2.0, behaviour  # measured about 4


def test_sft_model_judges_above_chance_but_far_from_perfect(model, tok):
    """OSP's premise: the SFT model can already judge a little (a real instruct LLM can), so preference
    augmentation sharpens an ability instead of creating it from nothing on noisy labels. Measured on the
    held-out judge pairs with both presentation orders, as osp.py measures it; STATS.json has the figures."""
    held_out = read_jsonl(DATA / "judge_prefs.jsonl")[-build.N_JUDGE_HELD_OUT :]
    judge = build.evaluate_judge(model, tok, held_out)
    stats = json.loads((TOY / "STATS.json").read_text())["judge"]
    assert abs(judge["oracle_accuracy"] - stats["oracle_accuracy"]) <= 0.01, (judge, stats)  # STATS is this model's
    assert 0.58 <= judge["oracle_accuracy"] <= 0.75, judge  # target 0.60-0.70: above chance, room to improve
    assert judge["position_consistency"] >= 0.1, judge  # it reads the answers: 0.13 (0.03 before judge-format SFT)


def test_build_judge_templates_are_osp_templates():
    """The toy model learned to judge in osp.py's own judge format; the two must not drift apart."""
    sys.path.insert(0, str(ROOT))
    import osp

    assert build.JUDGE_DIALOGUE == osp.JUDGE_TEMPLATES["dialogue"]
    assert build.JUDGE_SUMMARY == osp.JUDGE_TEMPLATES["summary"]


def test_judge_sft_rows_are_weak_judge_verdicts_on_their_own_prompts():
    data = build.build_data(build.SEED)
    rows = data["judge_sft"]
    assert len(rows) == build.N_JUDGE_SFT
    right, a_verdicts = 0, 0
    shipped = {
        INSTRUCTION.search(row["prompt"]).group(0) for name in ("eval", "prompts", "prefs", "sft") for row in data[name]
    }
    for row in rows:
        user, verdict = row["messages"][0]["content"], row["messages"][1]["content"]
        assert verdict in ("A", "B") and user.startswith("You are comparing two assistant replies")
        instruction = INSTRUCTION.search(user.split("\n")[3]).group(0)
        assert instruction not in shipped  # prompts of their own
        a, b = user.split("Reply A:\n")[1].split("\n\nReply B:\n")
        b = b.split("\n\n")[0]
        gap = oracle.score(instruction, a) - oracle.score(instruction, b)
        assert gap != 0
        right += (verdict == "A") == (gap > 0)
        a_verdicts += verdict == "A"
    assert 0.75 < right / len(rows) < 0.95  # a weak judge: right on 0.90 of them (short lists have large gaps), not all
    assert abs(a_verdicts / len(rows) - 0.5) < 0.03  # no position bias to learn


# ---------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    "name, flip", [("prefs.jsonl", build.FLIP_FRACTION), ("judge_prefs.jsonl", build.JUDGE_FLIP_FRACTION)]
)
def test_preference_data_schema_scores_and_flips(name, flip):
    rows = read_jsonl(DATA / name)
    assert 1000 <= len(rows) <= 2000
    keys = {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected", "flipped"}
    for index, row in enumerate(rows):
        assert set(row) == keys, index
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in row[side]] == ["user", "assistant"], index
            assert row[side][0]["content"] == row["prompt"]
        assert row["messages"] == row["chosen"]
        # scores are the oracle's, and the label is wrong exactly on the flipped rows
        assert row["score_chosen"] == oracle.score(row["prompt"], row["chosen"][1]["content"])
        assert row["score_rejected"] == oracle.score(row["prompt"], row["rejected"][1]["content"])
        assert (row["score_chosen"] < row["score_rejected"]) == row["flipped"], index
        assert row["score_chosen"] != row["score_rejected"]
    flipped = sum(row["flipped"] for row in rows) / len(rows)
    assert abs(flipped - flip) < 0.005


def test_prompt_sets_have_schema_and_are_disjoint():
    pool, held_out = read_jsonl(DATA / "prompts.jsonl"), read_jsonl(DATA / "eval.jsonl")
    prefs, sft = read_jsonl(DATA / "prefs.jsonl"), read_jsonl(DATA / "sft.jsonl")
    for rows in (pool, held_out):
        assert all(set(row) == {"prompt", "prompt_id"} and INSTRUCTION.fullmatch(row["prompt"]) for row in rows)
    for row in sft:
        assert set(row) == {"prompt", "prompt_id", "messages"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"] == row["prompt"]
    assert 400 <= len(pool) and 150 <= len(held_out) and len(sft) >= 1000
    eval_set = {row["prompt"] for row in held_out}
    assert len(eval_set) == len(held_out)
    sft_instructions = {INSTRUCTION.search(row["prompt"]).group(0) for row in sft}
    for other in (pool, prefs):
        assert not eval_set & {row["prompt"] for row in other}
    assert not eval_set & sft_instructions
    assert not {row["prompt"] for row in pool} & {row["prompt"] for row in prefs}


def test_sft_data_contains_every_prompt_condition():
    sft = read_jsonl(DATA / "sft.jsonl")
    starts = {"plain": 0, "chosen": 0, "rejected": 0, "refine": 0}
    for row in sft:
        prompt = row["prompt"]
        if prompt.startswith(build.CHOSEN_PREFIX):
            starts["chosen"] += 1
            assert oracle.score(prompt, row["messages"][1]["content"]) == 10.0
        elif prompt.startswith("Please produce a good response"):
            starts["rejected"] += 1
        elif prompt.startswith(build.REFINE_PREFIX):
            starts["refine"] += 1
        else:
            assert INSTRUCTION.fullmatch(prompt)
            starts["plain"] += 1
    assert min(starts.values()) > 0.05 * len(sft), starts


FIXTURES = ROOT / "tests" / "fixtures"


def test_dataset_fixtures_follow_their_schemas():
    def is_chat(messages, roles=("user", "assistant")):
        return [m["role"] for m in messages] == list(roles) and all(isinstance(m["content"], str) for m in messages)

    for row in read_jsonl(FIXTURES / "ultrafeedback_binarized.jsonl"):
        assert set(row) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
        assert is_chat(row["chosen"]) and is_chat(row["rejected"]) and row["messages"] == row["chosen"]
        assert row["chosen"][0]["content"] == row["rejected"][0]["content"] == row["prompt"]
        assert row["score_chosen"] > row["score_rejected"]
    for row in read_jsonl(FIXTURES / "hh_rlhf.jsonl"):
        assert set(row) == {"chosen", "rejected"} and row["chosen"].startswith("\n\nHuman: ")
        cut = row["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
        assert row["rejected"][:cut] == row["chosen"][:cut] and row["rejected"] != row["chosen"]
    for row in read_jsonl(FIXTURES / "summarize_from_feedback.jsonl"):
        assert set(row) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
        assert {"id", "post", "title", "subreddit"} <= set(row["info"]) and row["choice"] in (0, 1)
        assert len(row["summaries"]) == 2 and all(set(s) == {"text", "policy", "note"} for s in row["summaries"])
    for row in read_jsonl(FIXTURES / "ultrachat_200k.jsonl"):
        assert set(row) == {"prompt", "prompt_id", "messages"} and row["messages"][0]["content"] == row["prompt"]
        assert is_chat(row["messages"], ("user", "assistant") * (len(row["messages"]) // 2))
    for row in read_jsonl(FIXTURES / "mistral_instruct_ultrafeedback.jsonl"):
        assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "all_generated_responses", "all_rm_scores"}
        scores, responses = row["all_rm_scores"], row["all_generated_responses"]
        assert row["chosen"][1]["content"] == responses[scores.index(max(scores))]
        assert row["rejected"][1]["content"] == responses[scores.index(min(scores))]
    for path in FIXTURES.glob("*.jsonl"):
        assert 5 <= len(read_jsonl(path)) <= 20, path.name
    for name in ("ultrafeedback_binarized", "ultrachat_200k", "mistral_instruct_ultrafeedback"):
        for row in read_jsonl(FIXTURES / f"{name}.jsonl"):
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reproducibility


def manifest() -> dict[str, str]:
    lines = (TOY / "MANIFEST.sha256").read_text().splitlines()
    return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}


def test_shipped_files_match_manifest():
    entries = manifest()
    assert {"model/model.safetensors", "model/tokenizer.json", "data/prefs.jsonl"} <= set(entries)
    for path, digest in entries.items():
        assert sha256(TOY / path) == digest, path


def same_versions(*packages: str) -> bool:
    """Serialised tokenizer/model files depend on the library versions that wrote them."""
    stats = json.loads((TOY / "STATS.json").read_text())
    return all(importlib.import_module(name).__version__ == stats[name] for name in packages)


def test_data_and_tokenizer_rebuild_byte_identical(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "assets" / "build_toy.py"), "--data_only", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    rebuilt = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert rebuilt == [
        "data/eval.jsonl",
        "data/judge_prefs.jsonl",
        "data/prefs.jsonl",
        "data/prompts.jsonl",
        "data/sft.jsonl",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
    ]
    if not same_versions("tokenizers", "transformers"):
        rebuilt = [p for p in rebuilt if p.startswith("data/")]
    for relative in rebuilt:
        assert sha256(tmp_path / relative) == manifest()[relative], relative


@pytest.mark.slow
def test_full_rebuild_byte_identical(tmp_path, request):
    """Weights are bit-exact with the same torch build on the same kind of CPU (1 thread).

    About 5 minutes, so it runs only when asked for by marker: pytest -m slow tests/test_toy.py"""
    markers = request.config.option.markexpr
    if "slow" not in markers or "not slow" in markers:
        pytest.skip("full toy rebuild (~5 min): select it with -m slow")
    subprocess.run(
        [sys.executable, str(ROOT / "assets" / "build_toy.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    expected = manifest()
    if not same_versions("torch", "tokenizers", "transformers"):
        expected = {k: v for k, v in expected.items() if k.startswith("data/")}
    for relative, digest in expected.items():
        assert sha256(tmp_path / relative) == digest, relative
