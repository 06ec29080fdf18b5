"""Paper scale on CPU: work that pads to its longest member is sorted by length and dealt across ranks (score,
HF generate, osp's judge), Stage 0's examples keep no token ids, and a resume at an iteration or stage boundary
ends bit for bit where the uninterrupted run ends."""

import dataclasses
import gc
import importlib
import json
import os
import socket
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOY_MODEL = ROOT / "assets" / "toy" / "model"
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
CPU = torch.device("cpu")


def spread_sequences(n=160, seed=0):
    """(prompt_ids, response_ids) of 3 to 90 tokens in random order: the length spread of real preference data."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: torch.randint(3, 1000, (int(torch.randint(low, high, (1,), generator=g)),), generator=g)  # noqa: E731
    return [(draw(2, 40).tolist(), draw(1, 51).tolist()) for _ in range(n)]


def eval_prompts(n=12):
    rows = [json.loads(line) for line in open(ROOT / "assets" / "toy" / "data" / "eval.jsonl")][:n]
    return [[{"role": "user", "content": row["prompt"]}] for row in rows]


def judge_comparisons(prompts):
    """(prompt index, a, b) of replies from 1 to ~40 words: judge prompts of spread lengths."""
    replies = [" ".join("abcdefghij"[: 1 + i % 10] * (1 + i % 4)) for i in range(len(prompts))]
    return [(i, replies[i], replies[-1 - i]) for i in range(len(prompts))]


def padded_and_real(module, record):
    """Spy on the log-prob op `score` calls: the padded and the real tokens of each batch it is handed."""
    op = module.causal_lm_logps

    def spy(model, input_ids, attention_mask, labels, **kw):
        record.append((int(attention_mask.numel() - attention_mask.sum()), int(attention_mask.sum())))
        return op(model, input_ids, attention_mask, labels, **kw)

    module.causal_lm_logps = spy


def _worker(rank, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, out = None, {}
        for script in SCRIPTS:  # each script's copy of the runtime, on one model
            module = importlib.import_module(script)
            args = module.resolve(module.Args(device="cpu"))[0]
            tokenizer = module.load_tokenizer(str(TOY_MODEL), None)
            model = model or module.load_model(str(TOY_MODEL), CPU, args)
            mine, record = {}, []
            padded_and_real(module, record)
            for size in (1, 8):
                sized = dataclasses.replace(args, scoring_batch_size=size)
                mine[size] = [t.tolist() for t in module.score(model, spread_sequences(), sized, 2, CPU, "test")]
            mine["batches"] = record[len(spread_sequences()) // 2 :]  # those of batch size 8
            greedy = dataclasses.replace(args, generation_batch_size=4, max_new_tokens=12)
            mine["generate"] = module.generate(model, tokenizer, eval_prompts(), 1, 0.0, 1.0, greedy, CPU, seed=0)
            if script == "osp":
                template, verdict = module.judge_setup(args, tokenizer, str(TOY_MODEL))
                judge = module.make_judge(model, tokenizer, eval_prompts(), template, verdict, args, CPU)
                mine["judge"] = judge(judge_comparisons(eval_prompts()))
            out[script] = mine
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """Every script's score, generate (and osp's judge) on 2 gloo ranks, in one launch: {script: (rank 0, rank 1)}."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    return {script: (results[0][script], results[1][script]) for script in SCRIPTS}


def unsorted_scores(module, model, sequences, size):
    """The log-probs as scored before: batches of `size` in input order, each a rank's contiguous share."""
    from selfpo_kernels import causal_lm_logps

    logps, padded = [], 0
    for half in (sequences[: len(sequences) // 2], sequences[len(sequences) // 2 :]):
        for start in range(0, len(half), size):
            batch = module.collate(half[start : start + size], 2, CPU)
            logps += causal_lm_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].tolist()
            width = max(len(p) + len(r) for p, r in half[start : start + size])
            padded += sum(width - len(p) - len(r) for p, r in half[start : start + size])
    return torch.tensor(logps, dtype=torch.float64), padded


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_scoring_sorts_by_length_across_two_ranks_and_keeps_the_order(two_ranks, script):
    """2 gloo ranks score 160 sequences of 3 to 90 tokens sorted by length and dealt round-robin: every rank gets all
    log-probs in input order, equal to the unsorted computation's (to the bit at batch size 1, where no batch mixes
    sequences; at batch size 8 within fp32 rounding: a padded width changes a sum at the 1e-7 level on CPU), with
    under a quarter of its padded tokens (counted from the attention masks the model got), and like tokens on each
    rank. Greedy HF samples (and osp's judge) on two ranks are the one-process ones, in prompt order."""
    module, (two, other) = importlib.import_module(script), two_ranks[script]
    assert other["generate"] == two["generate"] and other[8] == two[8]
    args = module.resolve(module.Args(device="cpu"))[0]
    model, sequences = module.load_model(str(TOY_MODEL), CPU, args).eval(), spread_sequences()
    with torch.no_grad():
        (alone, _), (batched, unsorted_padding) = (unsorted_scores(module, model, sequences, s) for s in (1, 8))
    assert torch.equal(torch.tensor(two[1][0], dtype=torch.float64), alone)  # bit for bit, in input order
    torch.testing.assert_close(torch.tensor(two[8][0], dtype=torch.float64), batched, rtol=2e-6, atol=0)
    assert two[8][1] == two[1][1] == [float(len(r)) for _, r in sequences]  # scored tokens: each response's
    sorted_padding = sum(padded for padded, _ in two["batches"] + other["batches"])
    real = sum(len(p) + len(r) for p, r in sequences)
    print(f"{script}: padded tokens at batch size 8 per real token: {unsorted_padding / real:.3f} unsorted, ", end="")
    print(f"{sorted_padding / real:.3f} sorted")
    assert sorted_padding < unsorted_padding / 4, (sorted_padding, unsorted_padding)
    tokens = [sum(real for _, real in share["batches"]) for share in (two, other)]
    assert abs(tokens[0] - tokens[1]) <= max(len(p) + len(r) for p, r in sequences), tokens

    greedy = dataclasses.replace(args, generation_batch_size=4, max_new_tokens=12)
    tokenizer = module.load_tokenizer(str(TOY_MODEL), None)
    assert two["generate"] == module.generate(model, tokenizer, eval_prompts(), 1, 0.0, 1.0, greedy, CPU, seed=0)
    if script == "osp":
        template, verdict = module.judge_setup(args, tokenizer, str(TOY_MODEL))
        judge = module.make_judge(model, tokenizer, eval_prompts(), template, verdict, args, CPU)
        assert two["judge"] == pytest.approx(judge(judge_comparisons(eval_prompts())), rel=1e-6, abs=1e-7)


# ---- OSP: Stage 0's examples hold no token ids -----------------------------------------------------------------


def stage0_bytes(osp, tmp_path, words: int) -> tuple[int, int, int]:
    """The bytes Stage 0's examples hold (freed when they go) and their tokens, on 40 pairs whose replies have
    `words` words; the pairs themselves stay held (the offline set)."""
    rows = [
        {
            "prompt": f"Sort: {'abcdefgh'[: 1 + i % 8]}",
            "chosen": "a " * words + str(i),
            "rejected": "c " * words + str(i),
        }
        for i in range(40)
    ]
    data = tmp_path / f"pairs_{words}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(num_judge_eval=0, offline_fraction=1.0, judge_max_length=512, max_length=480)
    args = osp.resolve(osp.Args(dataset=str(data), **settings))[0]
    tokenizer = osp.load_tokenizer(str(TOY_MODEL), None)
    template, verdict = osp.judge_setup(args, tokenizer, str(TOY_MODEL))
    osp.stage0_data(args, tokenizer, template, verdict, {})  # the tokenizer's own caches, once
    gc.collect()
    tracemalloc.start()
    try:
        out = list(osp.stage0_data(args, tokenizer, template, verdict, {}))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        examples = out.pop(3)
        n_tokens, n_examples = sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples), len(examples)
        del examples
        gc.collect()
        return held - tracemalloc.get_traced_memory()[0], n_tokens, n_examples
    finally:
        tracemalloc.stop()


def test_stage0_examples_hold_no_token_ids(tmp_path):
    """OSP's Stage 0 examples (two judge instances per seed pair and the SFT conversations) are tokenized when a
    rank trains on them, not held as ids on every rank (~10 GB per rank at 480k pairs): replies 16 times longer
    leave the bytes the examples hold about the same while their tokens grow 2.5-fold and more (held as lists of
    ids, the bytes grew with them)."""
    osp = importlib.import_module("osp")
    short, short_tokens, count = stage0_bytes(osp, tmp_path, 4)
    long, long_tokens, same = stage0_bytes(osp, tmp_path, 64)
    print(f"examples: {count}; {short} bytes for {short_tokens} tokens, {long} bytes for {long_tokens} tokens")
    assert count == same and long_tokens > 2.5 * short_tokens
    assert long < 1.2 * short, (short, long)


# ---- a resume at an iteration or stage boundary ends bit for bit -----------------------------------------------


def bf16_copy(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOY_MODEL).save_pretrained(folder)
    return folder


BOUNDARY = {  # tiny runs with no step checkpoint after the boundary; stop_after_steps: a step past it
    "sera": (dict(iterations=2, num_pairs=32, rho_1=1.0, rho_2=0.0, global_batch=16, batch_size=16), 3, "iter_1"),
    "opsr": (dict(iterations=1, num_pairs=32, num_prompts=16, global_batch=16, batch_size=16), 3, "iter_0"),
    "osp": (
        dict(num_sft=32, offline_fraction=0.03, aug_epochs=1, num_prompts=16, steps=2, num_judge_eval=0),
        1,
        "stage0",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BOUNDARY))
def test_resume_at_a_boundary_from_a_bf16_checkpoint_is_bit_identical(tmp_path, script):
    """A run from a bf16 checkpoint with --dtype bfloat16, killed a step after an iteration (osp: stage) boundary
    with no step checkpoint since, resumes from that boundary and ends with every weight equal to the uninterrupted
    run's: the boundary's folder holds the fp32 masters beside its bf16 export (before, the resume restarted from
    the export and lost every update under half a bf16 step), and no run folder keeps them once a later boundary
    or the end is reached."""
    module = importlib.import_module(script)
    settings, stop, boundary = BOUNDARY[script]
    args = module.resolve(module.Args(device="cpu", num_eval=0, dtype="bfloat16", **settings))[0]
    args = dataclasses.replace(args, model=str(bf16_copy(tmp_path / "bf16")))
    module.main(dataclasses.replace(args, output_dir=str(tmp_path / "full")))
    with pytest.raises(KeyboardInterrupt):
        module.main(dataclasses.replace(args, output_dir=str(tmp_path / "cut"), stop_after_steps=stop))
    assert (tmp_path / "cut" / boundary / "masters").is_dir() and not list((tmp_path / "cut").glob("*partial"))
    assert not (tmp_path / "cut" / "checkpoint").exists()
    module.main(dataclasses.replace(args, output_dir=str(tmp_path / "cut"), resume=True))
    final = {"sera": "iter_2", "opsr": "iter_1", "osp": "final"}[script]
    a, b = (load_file(str(tmp_path / run / final / "model.safetensors")) for run in ("full", "cut"))
    assert {v.dtype for v in a.values()} == {torch.bfloat16} and sorted(a) == sorted(b)
    differ = {k: int((a[k] != b[k]).sum()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, differ
    assert not list(tmp_path.rglob("masters"))
