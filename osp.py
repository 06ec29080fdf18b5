"""OSP: Online Self-Preferring language models.

Zhai et al., "Online Self-Preferring Language Models", arXiv 2405.14103.
The policy samples K answers per prompt, judges its own answers as an LLM-as-a-judge (the
probability of the verdict token, both presentation orders averaged), pairs them best-with-worst
after ranking against a baseline answer, and is trained with the soft-preference cross-entropy
(SPCE) so that its Bradley-Terry probability sigma(z) matches the judged strength q instead of
being pushed to 1 as DPO does. Before online training a small seed set of judge instructions
built from offline human preferences teaches the judging ("preference augmentation").

Only the abstract and secondary summaries of the paper were available: the judge template, the
choice of baseline, how the formed pairs get their strength and every hyperparameter marked
[ours] are our reconstruction (README, "OSP").

    python osp.py                                        # toy world on CPU: augmentation + online SPCE
    python osp.py --dataset hh-rlhf --model ./my-sft     # dialogue judge template, HH-RLHF prompts and seed judge set
    python osp.py --dataset tldr --offline_fraction 0.02 # the paper's limited-data regime
    python osp.py --skip_augmentation --num_prompts 200  # self-improvement mode for a model that already judges well
    python osp.py --loss dpo                             # ablation: same self-judged pairs, hard labels
    python osp.py --rank_by roundrobin                   # ablation: all-pairs judging instead of the baseline response
    torchrun --nproc-per-node 8 osp.py --model mistral-7b --output_dir runs/osp
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import numbers
import os
import re
import shlex
import shutil
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from selfpo_kernels import causal_lm_logps, causal_lm_pair_loss, decoder_hidden_states, head_logits

# Judge templates (paper §3.2: the policy as its own judge). OURS, not the paper's wording (not available to us).
JUDGE_TEMPLATES = {
    "dialogue": (
        "You are comparing two assistant replies to the same conversation.\n\nConversation:\n{x}\n\n"
        "Reply A:\n{a}\n\nReply B:\n{b}\n\n"
        "Which reply is more helpful, honest and harmless? Answer with a single letter: A or B."
    ),
    "summary": (
        "You are comparing two summaries of the same post.\n\nPost:\n{x}\n\n"
        "Summary A:\n{a}\n\nSummary B:\n{b}\n\n"
        "Which summary is more accurate, complete and concise? Answer with a single letter: A or B."
    ),
}


@dataclass
class Args:
    model: str = "toy"
    """preset (toy, pythia-2.8b, mistral-7b), hub id or local path of the SFT model"""
    dataset: str | None = None
    """offline human preferences: judge seed set, held-out judge labels and (unless --prompts) the prompt pool"""
    prompts: str | None = None
    """jsonl with a 'prompt' column: the online prompt pool X (default: the distinct prompts of --dataset)"""
    num_prompts: int | None = None
    """use only the first N prompts of the pool"""
    sft_data: str | None = None
    """SFT conversations ('messages' column) mixed into Stage 0 (default: the toy SFT file, or the chosen
    answers of the seed pairs)"""
    num_sft: int | None = None
    """SFT conversations mixed into Stage 0"""
    offline_fraction: float = 1.0
    """share of the offline pairs (after the held-out judge pairs) used as the judge seed set, e.g. 0.02"""
    num_judge_eval: int | None = None
    """held-out offline pairs (the tail of --dataset) on which judge accuracy is measured"""
    skip_augmentation: bool = False
    """skip Stage 0: self-improvement mode for a model that already judges well"""
    aug_epochs: int | None = None
    """epochs of Stage 0 (SFT + preference augmentation)"""
    aug_lr: float | None = None
    """learning rate of Stage 0"""
    aug_batch_size: int | None = None
    """examples per device per micro-batch in Stage 0"""
    k: int = 7
    """samples per prompt (floor(K/2) pairs)"""
    rank_by: Literal["baseline", "roundrobin"] = "baseline"
    """rank against the first sample (paper §3.1), or by all-pairs judging (ablation)"""
    loss: Literal["spce", "dpo"] = "spce"
    """SPCE with the judged strengths, or DPO on the same pairs with hard labels (ablation)"""
    beta: float = 0.1
    """KL strength beta of SPCE / DPO"""
    lr: float | None = None
    """learning rate of Stage 1"""
    steps: int | None = None
    """online steps (default: one pass over the prompt pool)"""
    prompts_per_step: int | None = None
    """prompts per Stage 1 update (the paper: 8)"""
    micro_batch_size: int | None = None
    """pairs per forward/backward (gradient accumulation inside a step)"""
    judge_template: str | None = None
    """text file with {x}, {a}, {b} placeholders (default: ours, README "OSP", by dataset family)"""
    judge_family: Literal["dialogue", "summary"] | None = None
    """which judge template: dialogue (HH-RLHF style) or summary (TL;DR; unset: the dataset's)"""
    verdict_tokens: list[str] = field(default_factory=lambda: ["A", "B"])
    """the judge's two verdict tokens, for 'first reply better' and 'second reply better'"""
    judge_max_length: int | None = None
    """longest judge prompt (conversation + two replies + template) in tokens"""
    long_prompts: Literal["error", "skip"] | None = None
    """prompts over max_prompt_length (or whose judge prompt would not fit): fail, or drop them (counted)"""
    sample_temperature: float = 1.0
    """sampling temperature of the K samples per prompt"""
    sample_top_p: float = 1.0
    """nucleus (top-p) of the K samples, in (0, 1]"""
    sampler: Literal["hf", "vllm"] = "hf"
    """who samples the K answers: HF generate on the policy, or a vLLM engine holding the policy's current weights"""
    eval_every: int | None = None
    """also evaluate every N Stage 1 steps (0 = only at the stages' ends)"""
    save_every: int | None = None
    """Stage 1 checkpoint (weights + optimizer) every N steps; 0 = only at the end"""
    judge_batch_size: int | None = None
    """judge prompts per no-grad forward"""
    # Options all four scripts share (checked copies of sera.Args's; tests/check_copies.py)
    max_bad_fraction: float = 0.05
    """stop when more of --dataset's rows than this are degenerate (the README's quirks); fewer are skipped, counted"""
    warmup_ratio: float = 0.1
    """linear learning-rate warmup over this share of the steps, in [0, 1]"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this before each optimizer step (> 0)"""
    max_length: int | None = None
    """most tokens of prompt + response"""
    max_prompt_length: int | None = None
    """most prompt tokens (see --long_prompts)"""
    max_new_tokens: int | None = None
    """most tokens a sample may have"""
    lora_r: int | None = None
    """0 = full fine-tuning; > 0 trains a LoRA adapter, merged into each saved checkpoint"""
    lora_alpha: int | None = None
    """LoRA scaling numerator (16 where the preset sets none)"""
    lora_dropout: float | None = None
    """LoRA dropout (0.0 where the preset sets none)"""
    gradient_checkpointing: bool | None = None
    """recompute activations in the backward pass (unset: on in the 7B presets)"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype; master weights and optimizer state stay fp32. auto = bfloat16 on CUDA, float32 on CPU"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto = this rank's GPU; the CPU only where nothing needs a GPU (the toy on a machine without one).
    cpu = the CPU on purpose"""
    chat_template: str | None = None
    """jinja file (or the template itself) for tokenizers without a chat template"""
    reward_fn: str | None = None
    """path/to/file.py:function(prompt, response) -> float, the evaluation score (unset: the dataset preset's)"""
    reward_model: str | None = None
    """folder (or hub id) of an AutoModelForSequenceClassification with one output: it scores the held-out samples
    too (eval/rm_score), and the win rate against the starting model is its verdict"""
    reward_chat_template: str | None = None
    """jinja file (or the template itself) for a --reward_model tokenizer without a chat template"""
    eval_prompts: str | None = None
    """jsonl with a 'prompt' column (unset: the dataset preset's held-out prompts)"""
    num_eval: int | None = None
    """evaluate on the first N of them (0 = no evaluation)"""
    eval_temperature: float = 1.0
    """sampling temperature of the evaluation samples"""
    output_dir: str | None = None
    """the run's folder (unset: runs/<script>__<model>__<seed>__<time>)"""
    seed: int = 0
    """random seed of data order, sampling and initialisation"""
    resume: bool = False
    """continue the run in --output_dir from its last checkpoint (same arguments, same number of ranks)"""
    stop_after_steps: int | None = None
    """stop (as if interrupted) after this many training steps in this process; for testing --resume"""
    track: bool = False
    """log to wandb"""
    dist_timeout_minutes: int = 180
    """how long a rank waits in a collective for the others (ranks sample and judge at different speeds)"""
    scoring_batch_size: int | None = None
    """sequences per no-grad scoring forward"""
    generation_batch_size: int | None = None
    """sequences (prompts x samples) per generate call"""


# ---------------------------------------------------------------------------------------------
# Stage 1: the SPCE update on a step's self-judged tuples (x, y_h, y_l, q) (paper §3.1)


def spce_loss(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """OSP's soft-preference cross-entropy (Zhai et al. 2024, §3.1): -[q log sigma(z) + (1 - q) log sigma(-z)] per
    pair, in the stable softplus form. z = beta * h is the pair's DPO logit, q the judged strength, a constant. Its
    gradient in z is sigma(z) - q: a margin past the strength is pushed back, which DPO (q = 1) never does."""
    return q * F.softplus(-z) + (1 - q) * F.softplus(z)


SPCE_STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "osp/abs_sigma_z_minus_q",
    "osp/sigma_z_mean",
)  # spce_backward's means (and the count)


def spce_backward(model, ref_model, tuples: list[dict], args: Args, device, pad_id: int) -> StepStats:
    """Accumulate d(mean loss)/d(theta) over this step's tuples; returns this rank's summed statistics.

    z = beta * [S(pi,y_h) - S(ref,y_h) - S(pi,y_l) + S(ref,y_l)] with summed log-probs; the reference is scored
    in the same fused kernel call (a frozen copy, or the same weights with the LoRA adapter switched off).
    SPCE: -[q log sigma(z) + (1-q) log sigma(-z)]; --loss dpo: -log sigma(z) on the same pairs."""
    local, real = shard(tuples)
    stats = StepStats(SPCE_STATS + ("pairs",), device)

    def loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, q, weight):
        chosen, rejected = args.beta * (policy_chosen - ref_chosen), args.beta * (policy_rejected - ref_rejected)
        return spce_loss(chosen - rejected, q) * weight, chosen.detach(), rejected.detach()

    chunks = [
        list(enumerate(local))[start : start + args.micro_batch_size]
        for start in range(0, len(local), args.micro_batch_size)
    ]
    for indexed in micro_batches(model, chunks):
        chunk, start = [t for _, t in indexed], indexed[0][0]
        n = len(chunk)
        batch = collate(
            [(t["prompt_ids"], t["chosen_ids"]) for t in chunk] + [(t["prompt_ids"], t["rejected_ids"]) for t in chunk],
            pad_id,
            device,
        )
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        ref_hidden = None
        if ref_model is None:  # LoRA: the reference is the base weights
            with torch.no_grad(), model.disable_adapter():
                ref_hidden = decoder_hidden_states(model, ids, mask)[:, :-1]
        q = torch.tensor([t["q"] for t in chunk], device=device, dtype=torch.float32)
        q = q if args.loss == "spce" else torch.ones_like(q)  # --loss dpo: q = 1
        weights = torch.tensor([1.0 if start + i < real else 0.0 for i in range(n)], device=device)  # shard padding
        losses, out = causal_lm_pair_loss(
            model,
            ids,
            mask,
            labels,
            loss_fn,
            ref_model=ref_model if ref_model is not None else model,
            ref_hidden=ref_hidden,
            extras={"q": q, "weight": weights},
        )
        (losses.sum() * world() / len(tuples)).backward()  # FSDP averages over ranks
        with torch.no_grad():
            z, q = out["rewards/margins"], torch.tensor([t["q"] for t in chunk], device=device)
            values = [out[name] for name in SPCE_STATS[:7]] + [(torch.sigmoid(z) - q).abs(), torch.sigmoid(z), 1.0]
            stats.add(**{name: value * weights for name, value in zip(stats.names, values)})
    return stats


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the judge (paper §3.1-3.2)


def render_context(prompt: list[dict], family: str) -> str:
    """{x} of the judge template [ours]: the post (summary family) or single user turn as is; a longer
    conversation as 'Human: ... / Assistant: ...' turns."""
    if len(prompt) == 1 or family == "summary":
        return prompt[-1]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def judge_text(template: str, context: str, a: str, b: str) -> str:
    """The filled template; one pass, so braces inside the texts are left alone."""
    values = {"x": context, "a": a, "b": b}
    return re.sub(r"\{([xab])\}", lambda m: values[m.group(1)], template)


def judge_ids(tokenizer, template: str, context: str, a: str, b: str) -> list[int]:
    """Token ids of the judge prompt (one user turn, up to the assistant header): the same for the seed judge
    instances, the online judge and the pool's length check."""
    return encode(tokenizer, [{"role": "user", "content": judge_text(template, context, a, b)}])[0]


def verdict_ids(tokenizer, tokens: list[str], template: str) -> list[int]:
    """[ours, README] the id the model produces for each verdict right after the judge prompt's assistant header
    (judge prompt + verdict tokenized as one conversation, as encode() does; SentencePiece gives 'A', not the
    word-initial '▁A' of encode("A")). Each verdict must be one token before the end of turn; the two must differ."""
    judge_prompt = [{"role": "user", "content": judge_text(template, "x", "a", "b")}]
    ids = []
    for token in tokens:
        response = encode(tokenizer, judge_prompt, token)[1]
        if len(response) < 1 or any(i not in tokenizer.all_special_ids for i in response[1:]):
            raise InputError(
                f"--verdict_tokens: {token!r} is {tokenizer.convert_ids_to_tokens(response)} after the judge "
                "prompt with this tokenizer; the judge reads one verdict token"
            )
        ids.append(response[0])
    if ids[0] == ids[1]:
        raise InputError(f"--verdict_tokens: {tokens} map to the same token id {ids[0]}")
    return ids


def strength(j_ab: float, j_ba: float) -> float:
    """q(a > b) = 0.5 * [J(a, b) + 1 - J(b, a)]: both presentation orders averaged, so q(a>b) + q(b>a) = 1."""
    return 0.5 * (j_ab + 1.0 - j_ba)


def rank_and_pair(samples: list[list[str]], judge, rank_by: str) -> tuple[list[list[dict]], int]:
    """Ranked pairing (paper §3.1) for each prompt p with samples[p] = [y^1 .. y^K].

    `judge(comparisons)` takes (p, a, b) triples and returns J(a, b) = P(verdict "A" | judge_prompt(x_p, a, b)).
    baseline: s_i = q(y_i > y_b) with b = the first sample, s_b = 0.5; roundrobin: s_i = mean_j q(y_i > y_j).
    Order by (-s_i, i), pair rank r with rank K+1-r, r = 1..floor(K/2); each formed pair's strength is the judge's
    q of that pair (a pair with the baseline reuses its ranking comparison). Identical texts are never sent to
    the judge (q = 0.5). Returns the pairs per prompt and the number of judge forward passes."""
    J: dict = {}

    def ask(comparisons) -> int:
        todo = list(dict.fromkeys(c for c in comparisons if c[1] != c[2] and c not in J))
        for c, value in zip(todo, judge(todo) if todo else []):
            J[c] = float(value)
        return len(todo)

    def q(p, a, b):
        return 0.5 if a == b else strength(J[(p, a, b)], J[(p, b, a)])

    needed = []
    for p, ys in enumerate(samples):
        if rank_by == "baseline":
            needed += [c for i in range(1, len(ys)) for c in ((p, ys[i], ys[0]), (p, ys[0], ys[i]))]
        else:
            needed += [(p, ys[i], ys[j]) for i in range(len(ys)) for j in range(len(ys)) if i != j]
    passes = ask(needed)
    ranked = []
    for p, ys in enumerate(samples):
        k = len(ys)
        if rank_by == "baseline":
            scores = [0.5] + [q(p, ys[i], ys[0]) for i in range(1, k)]
        else:
            scores = [sum(q(p, ys[i], ys[j]) for j in range(k) if j != i) / (k - 1) for i in range(k)]
        order = sorted(range(k), key=lambda i: (-scores[i], i))
        ranked.append((scores, [(order[r], order[k - 1 - r]) for r in range(k // 2)]))
    passes += ask(
        [
            c
            for p, (_, pairs) in enumerate(ranked)
            for i, j in pairs
            for c in ((p, samples[p][i], samples[p][j]), (p, samples[p][j], samples[p][i]))
        ]
    )
    out = [
        [
            {
                "chosen": i,
                "rejected": j,
                "rank": r + 1,
                "q": q(p, samples[p][i], samples[p][j]),
                "score_chosen": scores[i],
                "score_rejected": scores[j],
            }
            for r, (i, j) in enumerate(pairs)
        ]
        for p, (scores, pairs) in enumerate(ranked)
    ]
    return out, passes


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the Stage 0 examples (judge instances + SFT) and the online prompt pool


def judge_instances(
    pairs: list[dict], tokenizer, template: str, verdict: list[int], args: Args, counts: dict
) -> list[dict]:
    """Preference augmentation (paper §3.2): two judge instances per offline pair, (y_w, y_l) -> "A" and
    (y_l, y_w) -> "B"; only the verdict token is scored. Instances over --judge_max_length follow --long_prompts."""
    out = []
    for pair in pairs:
        context = render_context(pair["prompt"], args.judge_family)
        both = [(pair["chosen"], pair["rejected"], verdict[0]), (pair["rejected"], pair["chosen"], verdict[1])]
        encoded = [(judge_ids(tokenizer, template, context, a, b), target) for a, b, target in both]
        longest = max(len(ids) for ids, _ in encoded) + 1
        if longest > args.judge_max_length:
            if args.long_prompts == "error":
                raise InputError(
                    f"{pair['where']}: the judge prompt with both responses has {longest} tokens, over "
                    f"--judge_max_length {args.judge_max_length} (see --long_prompts skip)"
                )
            counts["judge_instance_too_long"] = counts.get("judge_instance_too_long", 0) + 1
            continue
        out += [{"prompt_ids": ids, "response_ids": [target], "kind": "judge"} for ids, target in encoded]
    return out


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: judging with the policy itself (one forward, two verdict logits)


def make_judge(
    model,
    tokenizer,
    prompts: list[list[dict]],
    template: str,
    verdict: list[int],
    args: Args,
    device,
    desc: str = "judge",
):
    """J(a, b) for (p, a, b) comparisons: sigma(logit["A"] - logit["B"]) of the policy's next token after
    judge_prompt(x_p, a, b) (paper §3.1), all ranks. The decoder body runs once per batch (sorted by length); only the
    last hidden state of each row is projected, onto the two verdict rows: no vocabulary-wide softmax."""
    contexts = [render_context(p, args.judge_family) for p in prompts]

    @torch.no_grad()
    def judge(comparisons) -> list[float]:
        training, _ = model.training, model.eval()
        mine, _ = shard(list(enumerate(comparisons)))
        mine = sorted(
            ((i, judge_ids(tokenizer, template, contexts[p], a, b)) for i, (p, a, b) in mine),
            key=lambda item: len(item[1]),
        )
        results = []
        for start in progress(range(0, len(mine), args.judge_batch_size), desc=desc, inner=True):
            chunk = mine[start : start + args.judge_batch_size]
            batch = collate([(ids, []) for _, ids in chunk], tokenizer.pad_token_id, device)
            hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            logits = head_logits(
                model, hidden[torch.arange(len(chunk), device=device), batch["attention_mask"].sum(1) - 1], verdict
            )
            results += [(i, value) for (i, _), value in zip(chunk, (logits[:, 0] - logits[:, 1]).tolist())]
        model.train(training)
        merged = dict(gather(results))
        return torch.sigmoid(torch.tensor([merged[i] for i in range(len(comparisons))], dtype=torch.float64)).tolist()

    return judge


# ---------------------------------------------------------------------------------------------
# Stage 0: SFT + preference augmentation (§4.3 steps 1-3)


def augment(model, examples: list[dict], args: Args, device, pad_id: int, log):
    """L_SFT on SFT data + judge instances, each example weighted equally (its mean token log-likelihood;
    a judge instance scores its verdict token only) [ours]. One optimizer step per --aug_batch_size examples."""
    per_epoch = max(1, len(examples) // args.aug_batch_size)
    n_steps = per_epoch * args.aug_epochs
    trainable, optimizer, scheduler = make_optimizer(model, args.aug_lr, n_steps, args, "cosine")
    bar = progress(total=n_steps, desc="stage 0 (augmentation)")
    for epoch in range(args.aug_epochs):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        for step in range(per_epoch):
            batch_examples = [examples[i] for i in order[step * args.aug_batch_size : (step + 1) * args.aug_batch_size]]
            local, real = shard(batch_examples)
            batch = collate([(e["prompt_ids"], e["response_ids"]) for e in local], pad_id, device)
            logps, _ = causal_lm_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="mean"
            )
            weights = torch.tensor([1.0] * real + [0.0] * (len(local) - real), device=device)
            (-(logps * weights).sum() * world() / len(batch_examples)).backward()  # FSDP averages over ranks
            judge_mask = torch.tensor([e["kind"] == "judge" for e in local[:real]], device=device)
            nll, stats = -logps[:real].detach(), StepStats(("nll", "examples", "judge_nll", "judge_examples"), device)
            stats.add(nll=nll, examples=real, judge_nll=nll * judge_mask, judge_examples=judge_mask)
            total, grad_norm = optimizer_step(trainable, optimizer, scheduler, stats, args, "stage 0")
            total = list(total.values())
            metrics = {
                "stage": 0,
                "aug_step": epoch * per_epoch + step + 1,
                "aug/loss": total[0] / total[1],
                "aug/judge_nll": total[2] / max(total[3], 1),
                "aug/sft_nll": (total[0] - total[2]) / max(total[1] - total[3], 1),
                "aug/grad_norm": grad_norm,
                "aug/lr": scheduler.get_last_lr()[0],
            }
            log(metrics)
            bar.update()
            bar.set_postfix(
                judge_nll=f"{metrics['aug/judge_nll']:.3f}", sft_nll=f"{metrics['aug/sft_nll']:.3f}", refresh=False
            )
    bar.close()
    return model


PAIR_FIELDS = (  # what pairs/step_N.jsonl keeps of each tuple
    "prompt chosen_text rejected_text q rank score_chosen score_rejected chosen_reward rejected_reward chosen_rm_score "
    "rejected_rm_score"
).split()


def online_step(model, ref_model, tokenizer, pool, step: int, judge, opt, args: Args, device, scorers, out_dir: Path):
    """One Stage 1 update (paper §3.1): K samples per prompt from the current policy, which judges them itself;
    ranked pairing with strength q; SPCE (or DPO) against the frozen pi_0; one optimizer step. Returns its
    statistics; the step's tuples go to pairs/step_N.jsonl. judge = (template, verdict ids), opt = make_optimizer's."""
    (template, verdict), (trainable, optimizer, scheduler) = judge, opt
    epoch, offset = divmod(step, max(1, len(pool) // args.prompts_per_step))  # a fresh order of the pool per epoch
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
    prompts = [pool[i] for i in order[offset * args.prompts_per_step : (offset + 1) * args.prompts_per_step]]
    times, sampler_weights = [time.perf_counter()], None
    # step 6: K samples per prompt from the current policy
    if args.sampler == "vllm":  # vLLM takes no weights in memory from another process: they go through the run folder
        save_atomic(model, tokenizer, out_dir / "sampler")  # (no LoRA with vLLM: the policy object is unchanged)
        sampler_weights, VLLMEngine.path = str(out_dir / "sampler"), None  # new weights under the same path
    seed = args.seed * 100_003 + step
    samples = generate(
        model,
        tokenizer,
        prompts,
        args.k,
        args.sample_temperature,
        args.sample_top_p,
        args,
        device,
        seed,
        sampler_weights,
        "sample",
    )
    times.append(time.perf_counter())
    # steps 7-9: the current policy judges; rank, pair best-with-worst, strength q of each formed pair
    judge = make_judge(model, tokenizer, prompts, template, verdict, args, device)
    formed, passes = rank_and_pair([[text for text, _ in group] for group in samples], judge, args.rank_by)
    times.append(time.perf_counter())
    tuples, dropped, truncated = [], {}, {}
    for p, pair in ((p, pair) for p, pairs in enumerate(formed) for pair in pairs):
        (y_h, done_h), (y_l, done_l) = samples[p][pair["chosen"]], samples[p][pair["rejected"]]
        reason = "empty" if not y_h or not y_l else "unfinished" if not (done_h and done_l) else None
        reason = reason or ("identical" if y_h == y_l else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        sides = [fit(*encode(tokenizer, prompts[p], y), args, f"step {step + 1} sample", truncated) for y in (y_h, y_l)]
        ids = dict(prompt_ids=sides[0][0], chosen_ids=sides[0][1], rejected_ids=sides[1][1])
        tuples.append(dict(pair, prompt=prompts[p], chosen_text=y_h, rejected_text=y_l, **ids))
    if not tuples:
        raise InputError(
            f"step {step + 1}: all {sum(dropped.values())} formed pairs were filtered ({dropped}); raise "
            "--max_new_tokens if samples are 'unfinished', or use --k > 2 / a model whose samples differ"
        )
    qs = torch.tensor([t["q"] for t in tuples], dtype=torch.float64)
    stats = {
        "stage": 1,
        "step": step + 1,
        "data/pairs": len(tuples),
        **{f"data/dropped_{k}": v for k, v in dropped.items()},
    }
    stats |= {**{f"data/{k}": v for k, v in truncated.items()}, "judge/forward_passes": passes}
    stats |= {"osp/q_mean": float(qs.mean()), "osp/q_std": float(qs.std()) if len(qs) > 1 else 0.0}
    stats["osp/q_hist"] = torch.histc(qs, bins=5, min=0, max=1).int().tolist()
    for side in ("chosen", "rejected"):
        stats[f"gen/{side}_tokens_mean"] = sum(len(t[f"{side}_ids"]) for t in tuples) / len(tuples)
    for name, scorer in scorers.items():  # does the self-judge agree with the reward function (model) on its pairs?
        texts = [t[f"{k}_text"] for k in ("chosen", "rejected") for t in tuples]
        values = scorer([t["prompt"][-1]["content"] for t in tuples] * 2, texts)
        for t, chosen_value, rejected_value in zip(tuples, values[: len(tuples)], values[len(tuples) :]):
            t[f"chosen_{name}"], t[f"rejected_{name}"] = chosen_value, rejected_value
        gaps = [t[f"chosen_{name}"] - t[f"rejected_{name}"] for t in tuples]
        agree = [gap > 0 for gap in gaps if gap != 0]
        for k in ("chosen", "rejected"):
            stats[f"osp/{k}_{name}"] = sum(t[f"{k}_{name}"] for t in tuples) / len(tuples)
        stats[f"judge/online_{SCORER_NAMES[name]}_agreement"] = sum(agree) / len(agree) if agree else float("nan")
    # steps 10-11: SPCE (or DPO) against the frozen pi_0, one optimizer step
    model.train()
    sums = spce_backward(model, ref_model, tuples, args, device, tokenizer.pad_token_id)
    lr = scheduler.get_last_lr()[0]  # this step's
    total, grad_norm = optimizer_step(trainable, optimizer, scheduler, sums, args, f"step {step + 1}")
    stats.update({name: total[name] / total["pairs"] for name in SPCE_STATS}, grad_norm=grad_norm, lr=lr)
    stats |= {"time/generation_s": times[1] - times[0], "time/judging_s": times[2] - times[1]}
    stats["time/training_s"] = time.perf_counter() - times[2]
    (out_dir / "pairs").mkdir(exist_ok=True)
    write_atomic(
        out_dir / "pairs" / f"step_{step + 1:05d}.jsonl", [{k: t[k] for k in PAIR_FIELDS if k in t} for t in tuples]
    )
    return stats


def main(args: Args) -> dict:
    args, preset = resolve(args)
    quiet_library_bars()
    check_resume(args)
    # Everything that can fail on bad input is checked before anything is written.
    model_path, counts = preset["path"], {}
    tokenizer = load_tokenizer(model_path, args.chat_template)
    template, verdict = judge_setup(args, tokenizer, model_path)
    offline, held_out, seed_pairs, examples = stage0_data(args, tokenizer, template, verdict, counts)
    pool = online_prompt_pool(args, offline, tokenizer, template, counts)
    scorers, eval_prompts = load_evaluation(args, offline[0])
    n_steps = args.steps or max(1, len(pool) // args.prompts_per_step)

    device = init_device(args.seed, args.dist_timeout_minutes, args.device)
    run_name = f"osp__{Path(args.model).name}__{args.seed}__{now()}"
    out_dir = Path(args.output_dir or f"runs/{run_name}")
    state_file, checkpoint, stage0 = out_dir / "state.json", out_dir / "checkpoint", out_dir / "stage0"
    state = run_state(state_file, args, {"stage0_done": False, "step": 0, "eval": {}, "judge": {}})
    if state.get("done"):
        print(f"{out_dir}: this run is complete (final/); nothing to resume")
        return state
    saved = trainer_state(checkpoint) if args.resume and state["stage0_done"] else None
    if state["step"] and saved is None:  # the state file counts steps whose weights are nowhere to be found
        raise InputError(f"--resume: {state_file} says step {state['step']} but {checkpoint} holds no step checkpoint")
    state["step"] = saved["step"] if saved else 0
    model = load_model(model_path, device, args) if not state["stage0_done"] else None  # Stage 0 starts from it
    logs = Logs(args, out_dir, run_name)

    def log(metrics: dict):  # one TensorBoard step per logged record
        logs.step += 1
        logs(metrics)

    def report(name: str, model):  # judge accuracy on held-out labels; held-out policy reward and win rate
        if held_out and name not in state["judge"]:
            state["judge"][name] = judge_report(model, tokenizer, held_out, template, verdict, args, device, scorers)
            log({"stage": name, **state["judge"][name]})
        metrics, start, first = {}, out_dir / "eval_start.json", name == "sft"  # the win rates' other side
        if scorers and eval_prompts and name not in state["eval"]:
            state["eval"][name], metrics = evaluate(
                model, tokenizer, eval_prompts, scorers, args, device, None, start, first
            )
            log({"stage": name, **metrics})
        shown = dict(
            state["judge"].get(name, {}), **{"eval/reward": state["eval"][name]} if name in state["eval"] else {}
        )
        if rank() == 0:  # what was measured: no judge without --num_judge_eval, no reward without --num_eval
            print(
                f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if k != "judge/pairs") + wins(metrics)
            )
        write_atomic(state_file, state)

    data = {"stage": "data", "data/offline_pairs": len(offline), "data/judge_eval_pairs": len(held_out)}
    data |= {"data/seed_pairs": len(seed_pairs) * (not args.skip_augmentation), "data/prompt_pool": len(pool)}
    log({**data, "data/stage0_examples": len(examples), **{f"data/{k}": v for k, v in counts.items()}})

    # ALGO LOGIC: Stage 0 — SFT + preference augmentation (paper §3.2); pi_0 is also the frozen reference
    if not state["stage0_done"]:
        report("sft", model)
        if not args.skip_augmentation:
            model = prepare_for_training(model, args)
            model = augment(model, examples, args, device, tokenizer.pad_token_id, log)
            model = save_atomic(model, tokenizer, stage0)  # the policy goes on in memory: its fp32 are the masters
            report("augmented", model)
        state["stage0_done"] = True
        write_atomic(state_file, state)
    start = str(stage0) if (stage0 / "config.json").exists() else model_path
    if model is None:  # a resumed run: pi_0's, then make_optimizer restores the step checkpoint's weights
        model = load_model(start, device, args)
    # a frozen copy, computing as the policy does; with LoRA the base weights under the adapter are the reference
    ref_model = load_model(start, device, args, frozen=True) if args.lora_r == 0 else None

    # ALGO LOGIC: Stage 1 — online self-preferring (paper §3.1)
    model = prepare_for_training(model, args)
    opt = make_optimizer(model, args.lr, n_steps, args, "constant", saved)  # (trainable, optimizer, scheduler)
    judge, bar = (template, verdict), progress(range(state["step"], n_steps), desc="stage 1 (online)")
    for done, step in enumerate(bar, 1):  # step is 0-based here, 1-based in logs and file names
        stats = online_step(model, ref_model, tokenizer, pool, step, judge, opt, args, device, scorers, out_dir)
        log(stats)
        gap = stats["osp/abs_sigma_z_minus_q"]
        bar.set_postfix_str(f"loss={stats['loss']:.4f}, q={stats['osp/q_mean']:.2f}, gap={gap:.3f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < n_steps:
            report(f"step_{step + 1}", model)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < n_steps:
            save_checkpoint(model, checkpoint, *opt[1:], step + 1)
            state["step"] = step + 1
            write_atomic(state_file, state)
        if args.stop_after_steps is not None and done >= args.stop_after_steps:  # steps done in this process
            raise KeyboardInterrupt(f"--stop_after_steps {args.stop_after_steps} reached")
    model, state["step"] = save_atomic(model, tokenizer, out_dir / "final"), n_steps
    report("final", model)
    state["done"] = True
    write_atomic(state_file, state)
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(out_dir / "sampler", ignore_errors=True)
    logs.close()
    if rank() == 0:
        print(f"final model: {out_dir / 'final'}")
    return state


# ---------------------------------------------------------------------------------------------
# Presets (the paper's settings per model; None fields of Args are filled from here) and their resolution

HERE = Path(__file__).resolve().parent
TOY = HERE / "assets" / "toy"


# Human/Assistant format for base models without a chat template (HH-RLHF style) [ours].
# Copied from sera.HH_TEMPLATE
HH_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


# The paper's settings (§4): K = 7, beta 0.1, 8 prompts x 3 pairs per update, AdamW without weight decay, warmup
# 0.1 and the learning rates are [2nd]/[ours]; Stage 0 (augmentation) settings are ours throughout. The paper models
# share PAPER and list what differs.
PAPER = dict(
    dataset="hh-rlhf", lr=5e-7, prompts_per_step=8, micro_batch_size=4, lora_r=0, max_length=768,
    max_prompt_length=512, max_new_tokens=256, judge_max_length=2048, long_prompts="skip", aug_epochs=1, aug_lr=1e-5,
    aug_batch_size=16, num_sft=None, num_judge_eval=500, num_eval=0, eval_every=0, save_every=50,
    scoring_batch_size=16, generation_batch_size=64, judge_batch_size=16,
)  # fmt: skip
MODELS = {
    "toy": PAPER
    | dict(  # the shipped tiny model; learning rates scaled to it [ours]
        path=str(TOY / "model"),
        dataset="toy",
        lr=2e-4,
        micro_batch_size=24,
        max_length=96,
        max_prompt_length=64,
        max_new_tokens=24,
        judge_max_length=192,
        long_prompts="error",
        aug_epochs=6,
        aug_lr=1e-3,
        aug_batch_size=32,
        num_sft=1000,
        num_judge_eval=200,
        num_eval=200,
        eval_every=20,
        save_every=10,
        scoring_batch_size=128,
        generation_batch_size=256,
        judge_batch_size=128,
    ),  # fmt: skip
    # base model: give it the HH format; SFT it first (pass --model ./sft)
    "pythia-2.8b": PAPER | dict(path="EleutherAI/pythia-2.8b", chat_template=HH_TEMPLATE),
    "mistral-7b": PAPER
    | dict(  # zephyr SFT start, full fine-tuning (shard with torchrun)
        path="alignment-handbook/zephyr-7b-sft-full", gradient_checkpointing=True, aug_lr=1e-6, scoring_batch_size=8
    ),
}

DATASETS = {  # family: which judge template; max_new_tokens as the paper's (HH 256, TL;DR 64)
    "hh-rlhf": dict(path="Anthropic/hh-rlhf", split="train", family="dialogue", max_new_tokens=256),
    "tldr": dict(
        path="openai/summarize_from_feedback", name="comparisons", split="train", family="summary", max_new_tokens=64
    ),
    "ultrafeedback": dict(path="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", family="dialogue"),
    "toy": dict(
        path=str(TOY / "data" / "judge_prefs.jsonl"),
        family="dialogue",
        eval=str(TOY / "data" / "eval.jsonl"),
        prompts=str(TOY / "data" / "prompts.jsonl"),
        sft=str(TOY / "data" / "sft.jsonl"),
        reward_fn=f"{TOY / 'oracle.py'}:score",
    ),
}


def resolve(args: Args) -> tuple[Args, dict]:
    preset, filled = model_preset(args, MODELS, "mistral-7b")  # a custom model: mistral-7b's settings
    dataset_preset = DATASETS.get(preset["dataset"], {})
    filled |= {
        k: dataset_preset.get(k, preset[k])
        for k in (
            "lr prompts_per_step micro_batch_size max_length max_prompt_length max_new_tokens judge_max_length "
            "long_prompts aug_epochs aug_lr aug_batch_size num_sft num_judge_eval num_eval eval_every save_every "
            "scoring_batch_size generation_batch_size judge_batch_size"
        ).split()
        if getattr(args, k) is None
    }
    if args.judge_family is None:
        filled["judge_family"] = dataset_preset.get("family", "dialogue")
    if args.lora_r and args.save_every is None:
        filled["save_every"] = 0  # LoRA runs checkpoint at the end only (see the check below)
    args = dataclasses.replace(args, **filled)
    domains = {"k": ">= 2", "offline_fraction": "(0, 1]", "beta": "> 0", "lr": "> 0", "aug_lr": "> 0", "steps": ">= 1"}
    domains |= {"prompts_per_step": ">= 1", "micro_batch_size": ">= 1", "aug_batch_size": ">= 1", "aug_epochs": ">= 1"}
    domains |= {"num_judge_eval": ">= 0", "save_every": ">= 0", "eval_every": ">= 0", "num_prompts": ">= 1"}
    domains |= {"num_sft": ">= 0", "judge_max_length": ">= 2", "judge_batch_size": ">= 1", "sample_temperature": ">= 0"}
    domains |= {"sample_top_p": "(0, 1]"}
    check_args(
        args,
        [
            (len(args.verdict_tokens) == 2, f"--verdict_tokens needs two tokens, got {args.verdict_tokens}"),
            (args.save_every == 0 or args.lora_r == 0, "--save_every is not supported with LoRA (it saves at the end)"),
            (args.sampler == "hf" or args.lora_r == 0, "--sampler vllm is not supported with LoRA in osp (use hf)"),
            (
                args.judge_template is None or Path(args.judge_template).exists(),
                f"--judge_template: file {args.judge_template!r} not found",
            ),
        ],
        domains,
    )
    return args, preset


def load_sft(spec: str | None, seed_pairs: list[dict], tokenizer, args: Args, counts: dict) -> list[dict]:
    """Stage 0's SFT examples: the 'messages' conversations of --sft_data, else [ours] the seed pairs' chosen
    conversations; the first --num_sft, those over the length limits skipped and counted."""
    rows, source = (
        load_rows(spec, "--sft_data")
        if spec
        else (
            [{"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]} for p in seed_pairs],
            "(seed pairs)",
        )
    )
    out, skipped = [], {}
    args = dataclasses.replace(args, long_prompts="skip")  # SFT rows over the limits are skipped, counted
    for index, row in enumerate(rows[: args.num_sft] if args.num_sft else rows):
        where = f"--sft_data {source} row {index}"
        try:  # an empty message is a quirk of real SFT data: skipped, counted
            messages = _messages(
                row.get("messages") if isinstance(row, dict) else None, f"{where}: 'messages'", "empty_message"
            )
        except BadRow as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            continue
        if messages[-1]["role"] != "assistant":
            raise InputError(f"{where}: the last message must be the assistant's")
        fitted = fit(*encode(tokenizer, messages[:-1], messages[-1]["content"]), args, where, skipped)
        if fitted is not None:
            out.append({"prompt_ids": fitted[0], "response_ids": fitted[1], "kind": "sft"})
    counts.update({f"sft_{k}": v for k, v in skipped.items()})
    return out


# ---------------------------------------------------------------------------------------------


def judge_setup(args: Args, tokenizer, model_path: str) -> tuple[str, list[int]]:
    """The judge template (with its {x}, {a}, {b}) and the verdict token ids, checked against the model."""
    from transformers import AutoConfig

    template = Path(args.judge_template).read_text() if args.judge_template else JUDGE_TEMPLATES[args.judge_family]
    missing = [f"{{{name}}}" for name in "xab" if f"{{{name}}}" not in template]
    if missing:
        raise InputError(f"--judge_template: the template has no {', '.join(missing)} placeholder")
    verdict = verdict_ids(tokenizer, args.verdict_tokens, template)
    context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if context is not None and args.judge_max_length > context:
        raise InputError(f"--judge_max_length {args.judge_max_length} is over the model's context of {context} tokens")
    return template, verdict


def stage0_data(args: Args, tokenizer, template: str, verdict: list[int], counts: dict):
    """The offline pairs, split into the held-out judge evaluation (the last --num_judge_eval) and the seed pool; the
    seed set (--offline_fraction of the pool) and Stage 0's examples: its judge instances and the SFT data."""
    rows, source = load_rows(args.dataset)
    offline = [dict(pair, where=f"dataset {source} row {i}") for i, pair in parse_rows(rows, source, args, counts)]
    held_out = offline[len(offline) - args.num_judge_eval :] if args.num_judge_eval else []
    seed_pool = offline[: len(offline) - len(held_out)]
    order = torch.randperm(len(seed_pool), generator=torch.Generator().manual_seed(args.seed)).tolist()
    seed_pairs = [seed_pool[i] for i in sorted(order[: math.ceil(args.offline_fraction * len(seed_pool))])]
    examples = []
    if not args.skip_augmentation:
        if not seed_pairs:
            raise InputError(
                f"dataset {source}: no pairs left for the judge seed set after holding out "
                f"--num_judge_eval {args.num_judge_eval} of {len(offline)}"
            )
        examples = judge_instances(seed_pairs, tokenizer, template, verdict, args, counts)
        sft = args.sft_data or DATASETS.get(args.dataset, {}).get("sft")
        examples += load_sft(sft, seed_pairs, tokenizer, args, counts)
        if not any(e["kind"] == "judge" for e in examples):
            raise InputError(
                f"dataset {source}: every judge instance is over --judge_max_length {args.judge_max_length}"
            )
    return offline, held_out, seed_pairs, examples


def online_prompt_pool(args: Args, offline: list[dict], tokenizer, template: str, counts: dict) -> list:
    """Stage 1's prompts: --prompts, else the dataset preset's, else the offline pairs'. A prompt whose judge prompt
    with two replies of --max_new_tokens would be over --judge_max_length is a long prompt (--long_prompts)."""

    def judge_problem(prompt):
        length = len(judge_ids(tokenizer, template, render_context(prompt, args.judge_family), "", ""))
        length += 2 * args.max_new_tokens + 9
        if length > args.judge_max_length:
            return (
                f"its judge prompt with two replies of --max_new_tokens {args.max_new_tokens} can reach {length} "
                f"tokens, over --judge_max_length {args.judge_max_length}"
            )

    prompts_file = args.prompts or DATASETS.get(args.dataset, {}).get("prompts")
    return load_prompt_pool(prompts_file, offline, tokenizer, args, counts, judge_problem)


# Copied from opsr.load_prompt_pool
def load_prompt_pool(
    spec: str | None, pairs: list[dict], tokenizer, args: Args, counts: dict, problem=None
) -> list[list[dict]]:
    """The online prompt pool X: the 'prompt' rows of `spec` (--prompts), else the distinct prompts of the offline
    pairs; the first --num_prompts. A prompt over --max_prompt_length (pairs are trained on it), or one for which
    `problem(prompt)` names another limit, stops the run, or with --long_prompts skip is dropped and counted."""
    pool = (
        [[{"role": "user", "content": prompt}] for prompt in load_prompts(spec, "--prompts")]
        if spec
        else list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values())
    )
    pool = pool[: args.num_prompts] if args.num_prompts else pool
    kept = []
    for index, prompt in enumerate(pool):
        length = len(encode(tokenizer, prompt)[0])
        too_long = f"prompt has {length} tokens, over --max_prompt_length {args.max_prompt_length}"
        issue = too_long if length > args.max_prompt_length else problem(prompt) if problem else None
        if issue is None:
            kept.append(prompt)
        elif args.long_prompts == "error":
            raise InputError(f"prompt pool row {index}: {issue} (see --long_prompts skip)")
        else:
            counts["pool_prompt_too_long"] = counts.get("pool_prompt_too_long", 0) + 1
    if not kept:
        raise InputError(f"the online prompt pool is empty ({len(pool)} prompts before the length checks)")
    return kept


SCORER_NAMES = {"reward": "oracle", "rm_score": "rm"}  # judge/oracle_accuracy (--reward_fn), judge/rm_accuracy


def judge_report(model, tokenizer, pairs: list[dict], template, verdict, args, device, scorers: dict) -> dict:
    """Judge quality on held-out offline pairs: agreement with the human label, with the reward function and the
    reward model (pairs each scores differently) and position consistency (the verdict survives swapping A and B)."""
    if not pairs:
        return {}
    judge = make_judge(model, tokenizer, [p["prompt"] for p in pairs], template, verdict, args, device, "judge eval")
    values = judge(
        [c for i, p in enumerate(pairs) for c in ((i, p["chosen"], p["rejected"]), (i, p["rejected"], p["chosen"]))]
    )
    j_wl, j_lw = values[0::2], values[1::2]
    q = [strength(a, b) for a, b in zip(j_wl, j_lw)]
    report = {
        "judge/human_accuracy": sum((x > 0.5) + 0.5 * (x == 0.5) for x in q) / len(q),
        "judge/position_consistency": sum((a > 0.5) == (b < 0.5) for a, b in zip(j_wl, j_lw)) / len(q),
        "judge/q_mean": sum(q) / len(q),
        "judge/pairs": len(q),
    }
    for name, scorer in scorers.items():
        values = scorer(
            [p["prompt"][-1]["content"] for p in pairs] * 2,
            [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
        )
        scored = [(x > 0.5) == (c > r) for x, c, r in zip(q, values[: len(pairs)], values[len(pairs) :]) if c != r]
        if scored:
            report[f"judge/{SCORER_NAMES[name]}_accuracy"] = sum(scored) / len(scored)
    return report


# =============================================================================================
# RUNTIME: written in sera.py, pasted unchanged into srdpo.py, opsr.py and osp.py (do not edit it in those):
# edit it in sera.py, then run `python tests/check_copies.py --fix` (the tests fail while the four differ).
# Data, argument checks, distributed helpers, run files and logging, models, sampling, evaluation.
# =============================================================================================


class InputError(ValueError):
    """Bad user input: printed as one line, no traceback, nothing written."""


def model_preset(args, models: dict, custom: str) -> tuple[dict, dict]:
    """--model's preset, with "dataset" set to --dataset or the preset's, and the shared Args it fills (dataset,
    compute dtype, LoRA, gradient checkpointing, chat template). Any other hub id or local path gets the settings
    of preset `custom` (each one can be overridden on the command line) and needs --dataset."""
    if args.model in models:
        preset = dict(models[args.model])
    elif not Path(args.model).expanduser().exists() and (
        args.model.startswith((".", "/", "~")) or "/" not in args.model
    ):
        raise InputError(
            f"--model: {args.model!r} is neither a preset ({', '.join(models)}), "
            "an existing local path, nor a hub id of the form org/name"
        )
    else:
        preset = dict(models[custom], path=args.model, dataset=None)
    preset["dataset"] = args.dataset or preset["dataset"]
    if preset["dataset"] is None:
        raise InputError("--dataset is required with a custom --model")
    paper_preset = f"--model {args.model} (a paper preset)" if args.model in models and args.model != "toy" else None
    device = choose_device(args.device, paper_preset)
    filled = {
        "dataset": preset["dataset"],
        "device": device,
        "dtype": args.dtype if args.dtype != "auto" else "bfloat16" if device == "cuda" else "float32",  # masters fp32
    }
    for key, default in (
        ("lora_r", 0),
        ("lora_alpha", 16),
        ("lora_dropout", 0.0),
        ("gradient_checkpointing", False),
        ("chat_template", None),
    ):
        if getattr(args, key) is None:
            filled[key] = preset.get(key, default)
    return preset, filled


DOMAINS = {  # the options all four scripts share (check_args; each script adds its own): an interval, or a bound
    # (">= 1" for sizes and counts, ">= 0" where 0 means "off" or "none")
    "max_bad_fraction": "[0, 1]",
    "warmup_ratio": "[0, 1]",
    "max_grad_norm": "> 0",
    "max_length": ">= 2",
    "max_prompt_length": ">= 1",
    "max_new_tokens": ">= 1",
    "lora_r": ">= 0",
    "lora_alpha": "> 0",
    "lora_dropout": "[0, 1)",
    "num_eval": ">= 0",
    "eval_temperature": ">= 0",
    "seed": ">= 0",
    "stop_after_steps": ">= 1",
    "dist_timeout_minutes": ">= 1",
    "scoring_batch_size": ">= 1",
    "generation_batch_size": ">= 1",
}


def in_domain(value: float, domain: str) -> bool:
    """value in "[a, b]", "(a, b]", ... or satisfies "> x" / ">= x"."""
    if domain[0] == ">":
        op, bound = domain.split()
        return value > float(bound) if op == ">" else value >= float(bound)
    low, high = (float(x) for x in domain[1:-1].split(","))
    return (low <= value if domain[0] == "[" else low < value) and (
        value <= high if domain[-1] == "]" else value < high
    )


def check_args(args, checks: list[tuple[bool, str]], domains: dict):
    """One InputError for the first option outside its domain (DOMAINS, then the script's `domains`; a list
    option element by element), then for the first failed (ok, message) of the shared checks and `checks`."""
    for name, domain in {**DOMAINS, **domains}.items():
        values = getattr(args, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and not in_domain(value, domain):
                given = values if isinstance(values, (list, tuple)) else value
                raise InputError(f"--{name} must be {'in ' * (domain[0] != '>')}{domain}, got {given}")
    checks = [
        (
            not (args.output_dir and Path(args.output_dir).is_file()),
            f"--output_dir: {args.output_dir!r} is a file; expected a folder",
        ),
        (args.resume is False or args.output_dir is not None, "--resume needs --output_dir of the run to continue"),
        (
            args.eval_prompts is None or Path(args.eval_prompts).is_file(),
            f"--eval_prompts: file {args.eval_prompts!r} not found",
        ),
        (
            args.chat_template is None or "{%" in args.chat_template or Path(args.chat_template).is_file(),
            f"--chat_template: file {args.chat_template!r} not found",
        ),
        (0 < args.max_prompt_length < args.max_length, "--max_prompt_length must be in (0, --max_length)"),
        (args.lora_r >= 0, f"--lora_r must be >= 0, got {args.lora_r}"),
        (args.dist_timeout_minutes >= 1, f"--dist_timeout_minutes must be >= 1, got {args.dist_timeout_minutes}"),
    ] + checks
    for ok, message in checks:
        if not ok:
            raise InputError(message)


class BadRow(InputError):
    """A degenerate row of real data (HH-RLHF has some): skipped and counted per reason by parse_rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_rows(spec: str, what: str = "--dataset") -> tuple[list[dict], str]:
    import datasets

    if spec in DATASETS:
        info = DATASETS[spec]
        spec = info["path"]
        if not spec.endswith(".jsonl"):
            return list(datasets.load_dataset(spec, info.get("name"), split=info["split"])), spec
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.endswith((".jsonl", ".json", ".parquet")) or spec.startswith((".", "/", "~")):
            raise InputError(f"{what}: path {spec!r} not found (or use a preset: {', '.join(DATASETS)})")
        raise InputError(f"{what}: unknown preset or path {spec!r}; presets: {', '.join(DATASETS)}")
    formats = "a .jsonl, .json or .parquet file, or a datasets save_to_disk folder"
    if path.suffix in (".jsonl", ".json") and path.is_file():
        data = read_jsonl(path, what)
    elif path.is_dir() or path.suffix == ".parquet":
        try:
            if path.is_dir():
                data = datasets.load_from_disk(str(path))
                data = list(data["train"] if isinstance(data, datasets.DatasetDict) else data)
            else:
                data = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        except Exception as err:  # pyarrow's, datasets' own errors: one line, theirs first
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{what}: {spec} cannot be read ({first[:200]}); expected {formats}") from None
    else:
        raise InputError(f"{what}: {spec!r} is not {formats}")
    if not data:
        raise InputError(f"{what}: {spec} has no rows")
    return data, str(path)


def read_jsonl(path: Path, what: str) -> list[dict]:
    """JSON objects, one a line (or a .json list of them); not UTF-8, not JSON or not an object names the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what}: {path} is not UTF-8 text (byte {err.start}); expected JSON lines") from None
    rows, line_number = [], 0
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for line_number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as err:
        raise InputError(f"{what}: {path} line {line_number or err.lineno}: not valid JSON ({err.msg})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{what}: {path} row {index}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_prompts(spec: str, what: str) -> list[str]:
    """The 'prompt' column of a jsonl file (--eval_prompts, --prompts), every row checked."""
    if not Path(spec).is_file():
        raise InputError(f"{what}: file {spec!r} not found")
    rows = read_jsonl(Path(spec), what)
    if not rows:
        raise InputError(f"{what}: {spec} has no rows; expected JSON lines with a 'prompt'")
    return [_text(row.get("prompt"), f"{what} {spec} row {index}: 'prompt'") for index, row in enumerate(rows)]


def _text(value, where: str, empty: str | None = None) -> str:
    """A non-empty string; an empty one is a BadRow(`empty`) when it is a known quirk of real data."""
    if not isinstance(value, str):
        raise InputError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(empty, f"{where} is empty") if empty else InputError(f"{where} is empty")
    return value


def _messages(value, where: str, empty: str | None = None) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise InputError(f"{where} must be a non-empty list of {{role, content}} messages")
    return [
        {
            "role": _text(m.get("role"), f"{where}[{i}].role"),
            "content": _text(m.get("content"), f"{where}[{i}].content", empty),
        }
        for i, m in enumerate(value)
    ]


def _hh_turns(text: str, where: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ?", _text(text, where, "empty_response"))
    if len(parts) < 3 or parts[0].strip():
        raise InputError(f"{where} is not in HH-RLHF format ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [
        {"role": "user" if r == "Human" else "assistant", "content": c.strip()}
        for r, c in zip(parts[1::2], parts[2::2])
    ]


def parse_pair(row: dict, where: str) -> dict:
    """UltraFeedback messages, HH-RLHF raw text, TL;DR comparisons, or prompt/chosen/rejected strings:
    {"prompt": [messages], "chosen": str, "rejected": str}. Malformed rows raise InputError; the quirks
    of real data raise BadRow (identical or empty replies, conversations that differ before the last
    turn or do not end with the assistant, prompts not ending with the user)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object, got {type(row).__name__}")
    if "summaries" in row and "choice" in row:  # openai/summarize_from_feedback, comparisons
        info = row.get("info") or {}
        post = _text(info.get("post"), f"{where}: 'info.post'")
        prompt = f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\nPOST: {post}\n\nTL;DR:"
        if row["choice"] not in (0, 1) or not isinstance(row["summaries"], list) or len(row["summaries"]) != 2:
            raise InputError(f"{where}: 'choice' must be 0 or 1 with two 'summaries'")
        texts = [
            _text((s or {}).get("text"), f"{where}: 'summaries[{i}].text'", "empty_response").strip()
            for i, s in enumerate(row["summaries"])
        ]
        out = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": texts[row["choice"]],
            "rejected": texts[1 - row["choice"]],
        }
    else:
        for column in ("chosen", "rejected"):
            if row.get(column) is None:  # absent, or null (datasets fills columns other rows have)
                raise InputError(f"{where}: missing column '{column}' (columns: {', '.join(sorted(row))})")
        if isinstance(row["chosen"], list) or "\n\nHuman:" in str(row["chosen"]):  # UltraFeedback / Anthropic/hh-rlhf
            if isinstance(row["chosen"], list):
                chosen = _messages(row["chosen"], f"{where}: 'chosen'", "empty_message")
                rejected = _messages(row["rejected"], f"{where}: 'rejected'", "empty_message")
            else:
                chosen = _hh_turns(row["chosen"], f"{where}: 'chosen'")
                rejected = _hh_turns(row["rejected"], f"{where}: 'rejected'")
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise BadRow(
                    "not_ending_with_assistant", f"{where}: 'chosen' and 'rejected' must end with an assistant turn"
                )
            if chosen[:-1] != rejected[:-1]:
                raise BadRow(
                    "differ_before_last_turn", f"{where}: 'chosen' and 'rejected' differ before the last assistant turn"
                )
            out = {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
        else:  # plain strings
            if row.get("prompt") is None:
                raise InputError(f"{where}: missing column 'prompt' (columns: {', '.join(sorted(row))})")
            out = {
                "prompt": [{"role": "user", "content": _text(row["prompt"], f"{where}: 'prompt'")}],
                "chosen": _text(row["chosen"], f"{where}: 'chosen'", "empty_response"),
                "rejected": _text(row["rejected"], f"{where}: 'rejected'", "empty_response"),
            }
        if not out["prompt"] or out["prompt"][-1]["role"] != "user":
            raise BadRow("prompt_not_ending_with_user", f"{where}: the prompt must end with a user message")
    for side in ("chosen", "rejected"):
        _text(out[side], f"{where}: '{side}' response", "empty_response")
    if out["chosen"].strip() == out["rejected"].strip():
        raise BadRow("identical", f"{where}: 'chosen' and 'rejected' responses are identical")
    if "flipped" in row:  # toy data: which labels were deliberately swapped
        out["flipped"] = bool(row["flipped"])
    return out


def parse_rows(rows: list[dict], source: str, args: Args, counts: dict) -> list[tuple[int, dict]]:
    """(row index, parse_pair) of every usable row. Degenerate rows (BadRow) are skipped and counted per
    reason in counts['skipped_<reason>']; over --max_bad_fraction of them stops with the first examples."""
    pairs, bad = [], []
    for index, row in enumerate(rows):
        try:
            pairs.append((index, parse_pair(row, f"dataset {source} row {index}")))
        except BadRow as err:
            counts[f"skipped_{err.reason}"] = counts.get(f"skipped_{err.reason}", 0) + 1
            bad.append(str(err))
    reasons = ", ".join(f"{k[8:]} {v}" for k, v in counts.items() if k.startswith("skipped_"))
    if len(bad) > args.max_bad_fraction * len(rows) or not pairs:
        raise InputError(
            f"dataset {source}: {len(bad)} of {len(rows)} rows are degenerate ({reasons}), over "
            f"--max_bad_fraction {args.max_bad_fraction}; first: {' | '.join(bad[:3])}"
        )
    if bad and rank() == 0:
        print(f"dataset {source}: skipped {len(bad)} of {len(rows)} rows as degenerate ({reasons})")
    return pairs


def check_model_dir(path: Path):
    """A local model folder has a config, tokenizer files and complete safetensors (safetensors checks that each
    file holds the data its header declares), so a bad folder fails before anything is written."""
    from safetensors import SafetensorError, safe_open

    missing = [
        name
        for name, found in (
            ("config.json", (path / "config.json").is_file()),
            ("tokenizer files", any(path.glob("tokenizer*")) or any(path.glob("vocab*"))),
        )
        if not found
    ]
    if missing:
        raise InputError(f"--model: {path} has no {' or '.join(missing)}; expected a save_pretrained folder")
    for file in sorted(path.glob("*.safetensors")):
        try:
            safe_open(file, "pt").keys()
        except SafetensorError as err:
            raise InputError(f"--model: {file} is truncated or not safetensors ({err})") from None


def load_tokenizer(model_path: str, chat_template: str | None):
    """The tokenizer with --chat_template (a jinja file, or the template itself) and a pad token."""
    from transformers import AutoTokenizer

    if model_path.startswith((".", "/", "~")) and not Path(model_path).expanduser().exists():
        raise InputError(f"--model: {model_path!r} not found")
    if Path(model_path).expanduser().is_dir():
        check_model_dir(Path(model_path).expanduser())
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"--model: no tokenizer could be loaded from {model_path!r} ({str(err).splitlines()[0]})"
        ) from None
    if chat_template and "{%" not in chat_template and not Path(chat_template).exists():
        raise InputError(f"--chat_template: file {chat_template!r} not found")
    if chat_template:
        tokenizer.chat_template = chat_template if "{%" in chat_template else Path(chat_template).read_text()
    if not tokenizer.chat_template:
        raise InputError(f"tokenizer of {model_path!r} has no chat template; pass --chat_template file.jinja")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # for generation; training and scoring batches are padded by collate()
    return tokenizer


def tokenize(tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text. BOS exactly once when the tokenizer's own encoding starts with it, whether
    the template writes it (toy, Llama-3) or not (zephyr): never missing, never twice."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    if bos is not None and ids[:1] != [bos] and tokenizer("a")["input_ids"][:1] == [bos]:
        ids = [bos] + ids
    return ids


def encode(tokenizer, prompt: list[dict], response: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the templated prompt (ending with the assistant header) and of the response
    (the rest of the templated conversation, ending with the end-of-turn token)."""
    from jinja2 import TemplateError

    try:  # templates may refuse a conversation (mistral-instruct: no system role)
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = (
            None
            if response is None
            else tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        )
    except TemplateError as err:
        raise InputError(
            f"the chat template refuses a conversation with roles {[m['role'] for m in prompt]}: {err}"
        ) from None
    prompt_ids = tokenize(tokenizer, prompt_text)
    if response is None:
        return prompt_ids, []
    if not full.startswith(prompt_text):
        raise InputError("the chat template renders the prompt differently with and without the assistant turn")
    # The whole conversation tokenized once and split at the prompt's length: the response tokens a sampler
    # would produce after prompt_ids (SentencePiece: 'A' after a newline, not the word-initial '▁A'). Where a
    # merge crosses the boundary the prompt ids are no prefix, and the response is tokenized on its own.
    full_ids = tokenize(tokenizer, full.rstrip())
    response_ids = (
        full_ids[len(prompt_ids) :]
        if full_ids[: len(prompt_ids)] == prompt_ids
        else tokenizer(full[len(prompt_text) :].rstrip(), add_special_tokens=False)["input_ids"]
    )
    if not response_ids or response_ids[-1] not in tokenizer.all_special_ids:
        response_ids.append(tokenizer.eos_token_id)  # y includes the final EOS: the model learns to stop
    return prompt_ids, response_ids


def fit(prompt_ids, response_ids, args: Args, where: str, counts: dict) -> tuple[list[int], list[int]] | None:
    """Apply the length limits: long prompts per --long_prompts, long responses truncated (counted)."""
    if len(prompt_ids) > args.max_prompt_length:
        if args.long_prompts == "error":
            raise InputError(
                f"{where}: prompt has {len(prompt_ids)} tokens, over --max_prompt_length "
                f"{args.max_prompt_length} (see --long_prompts)"
            )
        if args.long_prompts == "skip":
            counts["long_prompt_skipped"] = counts.get("long_prompt_skipped", 0) + 1
            return None
        counts["long_prompt_truncated"] = counts.get("long_prompt_truncated", 0) + 1
        prompt_ids = prompt_ids[-args.max_prompt_length :]
    budget = args.max_length - len(prompt_ids)
    if len(response_ids) > budget:
        counts["response_truncated"] = counts.get("response_truncated", 0) + 1
        response_ids = response_ids[:budget]
    return prompt_ids, response_ids


def load_reward_fn(spec: str | None, example: dict | None = None):
    """path/to/file.py:function -> the function, checked on every call (an exception, a non-number or
    NaN/inf stops the run naming the input) and tried once on `example` (a pair) now; None -> None."""
    if spec is None:
        return None
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise InputError(f"--reward_fn must look like path/to/file.py:function, got {spec!r}")
    if not Path(path).is_file():
        raise InputError(f"--reward_fn: file {path!r} not found")
    if Path(path).suffix != ".py":
        raise InputError(f"--reward_fn: {path!r} is not a .py file")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem + "_reward", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the module's own error, where it is: file:line: message
        line = getattr(err, "lineno", None) or next(
            (f.lineno for f in reversed(traceback.extract_tb(err.__traceback__)) if f.filename == str(Path(path))), "?"
        )
        raise InputError(f"--reward_fn: {path}:{line}: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, name, None)):
        raise InputError(f"--reward_fn: {path!r} has no function {name!r}")
    function = getattr(module, name)

    def reward_fn(prompt: str, response: str) -> float:
        where = f"--reward_fn {spec} on prompt {prompt[:60]!r}, response {response[:60]!r}"
        try:
            value = function(prompt, response)
        except Exception as err:
            raise InputError(f"{where}: raised {type(err).__name__}: {err}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InputError(f"{where}: returned {value!r}; expected a finite number")
        return float(value)

    if example is not None:
        reward_fn(example["prompt"][-1]["content"], example["chosen"])
    return reward_fn


def load_evaluation(args: Args, example: dict) -> tuple:
    """(scorers, held-out prompts). Scorers map a metric name to score(prompts, responses) -> list[float] (all
    ranks): "reward" for --reward_fn (else the dataset preset's), "rm_score" for --reward_model; each is tried on
    `example`. The prompts: --eval_prompts (else the preset's), the first --num_eval. ({}, []) when there are none."""
    preset = DATASETS.get(args.dataset, {})
    eval_file = args.eval_prompts or preset.get("eval")
    reward_fn = load_reward_fn(args.reward_fn or preset.get("reward_fn"), example)
    scorers = (
        {"reward": lambda prompts, responses: [reward_fn(p, r) for p, r in zip(prompts, responses)]}
        if reward_fn
        else {}
    )
    if args.reward_model:
        scorers["rm_score"] = reward_model_scorer(args, example)
    return scorers, load_prompts(eval_file, "--eval_prompts")[: args.num_eval] if eval_file else []


def micro_batch(global_batch: int, most: int) -> int:
    """The largest micro-batch up to `most` (a preset's --batch_size) that divides --global_batch over this run's
    ranks, so that a preset runs as it is on any number of ranks that divides its global batch."""
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    fits = [b for b in range(most, 0, -1) if global_batch % (b * ranks) == 0]
    return fits[0] if fits else most  # none: accumulation() says why


def accumulation(global_batch: int, batch_size: int) -> int:
    """Micro-batches per optimizer step, so that a step sees global_batch examples at any number of ranks."""
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # known before the process group is joined
    if global_batch < 1 or batch_size < 1 or global_batch % (batch_size * ranks):
        raise InputError(
            f"--global_batch {global_batch} must be a positive multiple of --batch_size {batch_size} x {ranks} ranks"
        )
    return global_batch // (batch_size * ranks)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def nvidia_driver() -> bool:
    """An NVIDIA driver is loaded on this machine (whether or not this torch build can use it)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def choose_device(requested: str, needs_gpu: str | None) -> str:
    """--device as "cuda" or "cpu", decided before anything is written. A GPU for each rank on this node where torch
    sees them; the CPU only when nothing asks for a GPU: not `needs_gpu` (a paper preset), not --device cuda, and
    no NVIDIA driver on the machine (a CUDA build of torch newer than the driver sees no GPU: a 7B run would
    otherwise "train" on the CPU for weeks). Under torchrun with more ranks on a node than GPUs: refused."""
    if requested == "cpu":
        return "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if gpus >= ranks and gpus > 0:
        return "cuda"
    driver = "an NVIDIA driver is loaded on this machine" if nvidia_driver() else None
    why = f"{ranks} ranks on this node" if gpus else "--device cuda" if requested == "cuda" else needs_gpu or driver
    if why is None:
        return "cpu"
    raise InputError(
        f"--device: {why} needs {max(ranks, 1)} GPU(s), but torch {torch.__version__} (CUDA "
        f"{torch.version.cuda or 'none: a CPU build'}) sees {gpus} (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); install the torch build for this node's driver "
        "(nvidia-smi shows its CUDA version; https://pytorch.org/get-started/locally), or pass --device cpu"
    )


def init_device(seed: int, timeout_minutes: int = 180, kind: str = "cpu") -> torch.device:
    """This rank's GPU (kind "cuda", from choose_device) or the CPU, then the process group under torchrun (NCCL on
    GPUs: every tensor handed to a collective must be on this device, see comm_device); seeds torch."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        import datetime

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    torch.manual_seed(seed)
    return device


def comm_device() -> torch.device:
    """Where the tensors of collectives live: NCCL has no CPU backend, so this rank's GPU; the CPU under gloo (the
    backend of --device cpu) and on one process."""
    gpu = dist.is_initialized() and dist.get_backend() != dist.Backend.GLOO
    return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")


def run_device(args: Args) -> torch.device:
    """This rank's device as choose_device decided it (init_device has set the current GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def now() -> int:
    """Rank 0's clock in seconds: every rank names the same run folder."""
    stamp = [int(time.time())]
    if world() > 1:
        dist.broadcast_object_list(stamp, 0)
    return stamp[0]


def shard(items: list) -> tuple[list, int]:
    """This rank's share, padded (with its last item) so every rank runs the same number of batches."""
    per_rank = math.ceil(len(items) / world())
    mine = items[rank() * per_rank : (rank() + 1) * per_rank]
    real = len(mine)
    return mine + [items[-1]] * (per_rank - real), real


def gather(values: list) -> list:
    if world() == 1:
        return values
    out = [None] * world()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


class StepStats:
    """One optimizer step's statistics as a device tensor with named slots, summed over micro-batches on the
    device: one all-reduce and one host copy per step (optimizer_step), no `.item()` behind every backward."""

    def __init__(self, names, device):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, **values):
        for name, value in values.items():  # a device tensor (summed) or a number
            self.sums[self.names.index(name)] += value.detach().sum() if torch.is_tensor(value) else value


def micro_batches(model, batches: list):
    """The micro-batches of one optimizer step. FSDP2 reduce-scatters gradients after the last one only
    (every rank has the same number, so the collectives match)."""
    batches = [batch for batch in batches if batch]
    for index, batch in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
            model.set_requires_gradient_sync(index == len(batches) - 1)
        yield batch


class _LogLines:
    """tqdm's output as whole lines (no carriage returns, no repeat of the line before), for log files."""

    last = None

    def write(self, text: str):
        text = text.strip("\r\n")
        if text and text != self.last:
            sys.stderr.write(text + "\n")
        self.last = text or self.last

    def flush(self):
        sys.stderr.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", inner: bool = False):
    """A progress bar on rank 0. On a terminal: tqdm bars (inner loops' bars vanish when done). When stderr
    is not a terminal (a cluster log): outer loops only, one plain line at most every 60 s and at the end."""
    if rank() != 0 or (inner and not sys.stderr.isatty()):
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, leave=not inner)
    return tqdm(iterable, total=total, desc=desc, file=_LogLines(), mininterval=60, ascii=True, ncols=100)


def quiet_library_bars():
    """In a log file the libraries' own bars (dataset preparation, weight loading and saving) are off too."""
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def check_resume(args: Args):
    """--resume continues the run in --output_dir only with the arguments it was started with, on any number of
    ranks (every step covers the same global batch, whatever the micro-batch; step checkpoints are resharded)."""
    if not args.resume:
        return
    saved = Path(args.output_dir) / "resolved_config.json"
    if not saved.exists():
        raise InputError(f"--resume: {saved} not found; nothing to resume")
    stored = json.loads(saved.read_text())
    changed = {
        k
        for k, v in json.loads(json.dumps(dataclasses.asdict(args))).items()
        # a moved folder resumes too; the micro-batch and the device follow the machine and the number of ranks
        if k not in ("resume", "stop_after_steps", "output_dir", "batch_size", "device") and stored.get(k) != v
    }
    if changed:
        raise InputError(f"--resume: arguments differ from the saved run: {', '.join(sorted(changed))}")


def cli(args_type, models: dict, doc: str):
    """The command line (tyro), its --help opening with the script's docstring; an option a --model preset fills
    when it is left unset shows each preset's value instead of tyro's "(default: None)"."""
    hints = typing.get_type_hints(args_type, include_extras=True)
    for option in (f.name for f in dataclasses.fields(args_type) if f.default is None):
        values = {name: preset[option] for name, preset in models.items() if option in preset}
        if values:
            shown = "; ".join(f"{name} {value}" for name, value in values.items())
            hint = tyro.conf.arg(help_behavior_hint=f"(unset: the --model preset's: {shown})")
            args_type.__annotations__[option] = typing.Annotated[hints[option], hint]
    return tyro.cli(args_type, description=doc)


def run_state(state_file: Path, args, fresh: dict) -> dict:
    """The run's progress (state.json) when --resume finds one, else `fresh`; a resumed run says where it stands."""
    if not (args.resume and state_file.exists()):
        return fresh
    state = json.loads(state_file.read_text())
    where = {k: v for k, v in state.items() if k in ("completed", "stage0_done", "step", "done")}
    if rank() == 0:
        print(f"resuming {state_file.parent}: " + ", ".join(f"{k} {v}" for k, v in where.items()))
    return state


def resume_hint(script: str) -> str:
    """How to continue an interrupted run: the same command with --resume and its folder (Logs.run_dir)."""
    if Logs.run_dir is None:
        return "nothing was written yet"
    argv, given = [], iter(sys.argv[1:])
    for arg in given:  # the same arguments, less --resume, --output_dir and --stop_after_steps
        name = arg.split("=")[0].replace("-", "_")
        if name in ("__output_dir", "__stop_after_steps") and "=" not in arg:
            next(given, None)
        if name not in ("__resume", "__no_resume", "__output_dir", "__stop_after_steps"):
            argv.append(arg)
    launcher = "torchrun ... " if world() > 1 else "python "
    return f"continue with: {launcher}{shlex.join([script, *argv, '--resume', '--output_dir', str(Logs.run_dir)])}"


class Logs:
    """Rank 0 prints and saves the resolved config, then logs to metrics.jsonl, TensorBoard (tb/) and, with
    --track, wandb. `step` is the TensorBoard/wandb step; counters and non-finite values stay in the jsonl."""

    POSITION = ("iteration", "stage", "step", "aug_step")  # where in the run a record was logged
    run_dir = None  # this process's run folder, once made (resume_hint names it)

    def __init__(self, args: Args, out_dir: Path, run_name: str):
        self.out_dir, self.track, self.step, self.writer = out_dir, args.track, 0, None
        if rank() == 0:
            config = json.dumps({**dataclasses.asdict(args), "world_size": world()}, indent=2)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "resolved_config.json").write_text(config)
            except OSError as err:
                raise InputError(f"--output_dir: {out_dir} cannot be written ({err.strerror or err})") from None
            print(config)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
            if args.track:
                import wandb

                wandb.init(project="selfpo", name=run_name, config=dataclasses.asdict(args))
        Logs.run_dir = out_dir

    def __call__(self, metrics: dict):
        if rank() != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in self.POSITION and math.isfinite(value):
                self.writer.add_scalar(key, value, self.step)
        if self.track:
            import wandb

            wandb.log(metrics, step=self.step)

    def step_done(self, stop_after: int | None):
        """One more optimizer step in this process (the TensorBoard step); --stop_after_steps stops after that many."""
        self.step += 1
        if stop_after is not None and self.step >= stop_after:
            raise KeyboardInterrupt(f"--stop_after_steps {stop_after} reached")

    def close(self):
        """At the end of the run, metrics.jsonl keeps one record per position and kind (its first metric): a resumed
        run logs what it redoes after its checkpoint again, and the newer record replaces the older in its place."""
        if self.writer is None:
            return
        self.writer.close()
        records, path = {}, self.out_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            kind = next((k for k in record if k not in self.POSITION), None)
            records[json.dumps([record.get(k) for k in self.POSITION] + [kind])] = record
        write_atomic(path, list(records.values()))


def write_atomic(path: Path, obj):
    """Rank 0 writes .json, .jsonl (a list of rows) or torch.save's (.pt) to a temporary file, then renames it."""
    if rank() == 0:
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".json":
            tmp.write_text(json.dumps(obj))
        elif path.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(row) + "\n" for row in obj))
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)


# transformers' own layers on every machine, the ones this project tests: no layer swapped for a kernel fetched from
# the Hub at load time (transformers >= 5.25 does that by default where the `kernels` package is installed, and an
# offline node fails). Every from_pretrained of a model passes it; transformers >= 4.56 (our floor) accepts it.
NO_HUB_KERNELS = {"use_kernels": False}


def load_model(path: str, device: torch.device, args: Args | None = None, frozen: bool = False):
    """fp32 master weights; --dtype bfloat16 computes in bf16 by autocast around the forward. With LoRA the
    frozen base is held in the compute dtype (peft keeps the adapters fp32). Checkpoints keep `path`'s dtype.

    frozen=True: a copy that never trains (a reference, an older model), computing exactly as the policy does:
    no gradients (autocast caches a cast of every weight that requires grad). Under FSDP2
    it is held in the compute dtype (half the memory) and sharded like the policy, whose shards are gathered in
    that dtype; on
    one process it stays fp32 under autocast like the policy (bf16 linear layers alone did not give the same
    log-probs on the toy: 0.11 nats per sequence)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    bf16 = args is not None and args.dtype == "bfloat16"
    sharded = frozen and world() > 1 and args.lora_r == 0
    dtype = torch.bfloat16 if bf16 and (args.lora_r > 0 or sharded) else torch.float32
    try:  # a config of another architecture than the weights would otherwise train a randomly initialised model
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **NO_HUB_KERNELS
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"--model: {path} does not load as a causal LM ({str(err).strip().splitlines()[0]})") from None
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise InputError(f"--model: {path} has no linear output embedding (lm_head) for the fused log-prob kernels")
    wrong = {kind: len(keys) for kind, keys in info.items() if keys and kind != "error_msgs"}
    if wrong:
        counts = ", ".join(f"{n} {kind.replace('_keys', '')}" for kind, n in wrong.items())
        raise InputError(
            f"--model: the weights in {path} do not fit its config ({counts} weights); expected the "
            "save_pretrained folder of one causal LM"
        )
    model.checkpoint_dtype = AutoConfig.from_pretrained(path).dtype or torch.float32  # what save_atomic writes
    if frozen:
        model.requires_grad_(False).eval()
    if bf16:
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*a, **k):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return forward(*a, **k)

        model.forward = autocast_forward
    model = model.to(device)
    return shard_model(model, args) if sharded else model


def shard_model(model, args: Args):
    """FSDP2 under torchrun: each decoder layer, then the root. The root keeps embeddings, final norm and
    lm_head gathered from forward to backward: the fused log-prob kernel reads lm_head.weight after the
    model's forward returns. The shards are the fp32 masters; --dtype bfloat16 gathers them in bf16 and
    reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = args.dtype == "bfloat16"
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, reshard_after_forward=False, mp_policy=policy)
    return model


def prepare_for_training(model, args: Args):
    """LoRA adapter (--lora_r > 0), else FSDP2 under torchrun (once: a sharded policy stays sharded, its fp32
    shards are the masters for the whole run); gradient checkpointing on request."""
    from torch.distributed.fsdp import FSDPModule

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        try:
            import peft
        except ImportError:
            raise InputError("--lora_r > 0 needs peft: pip install 'selfpo[lora]'") from None
        config = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
        for p in model.parameters() if world() > 1 else []:  # ranks' RNGs differ (generate): rank 0's adapter
            if p.requires_grad:
                dist.broadcast(p.data, 0)
    elif world() > 1 and not isinstance(model, FSDPModule):
        model = shard_model(model, args)
    model.train()
    return model


def make_optimizer(
    model,
    lr: float,
    n_steps: int,
    args: Args,
    schedule: str = "constant",
    state: dict | None = None,
    kind: str = "adamw",
):
    """AdamW without weight decay (or RMSprop) over the trainable parameters; linear warmup over --warmup_ratio of
    n_steps, then constant or cosine. `state` (a step checkpoint's trainer_state) restores the weights as they
    trained, the optimizer, the scheduler and the random number generators. Returns (trainable parameters,
    optimizer, scheduler)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.RMSprop(trainable, lr=lr)
        if kind == "rmsprop"
        else torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    )
    name = "cosine" if schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, int(args.warmup_ratio * n_steps), n_steps)
    if state is not None:  # a step checkpoint's (trainer_state): resharded to this run's ranks by DCP
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd

        weights = {"model": sd.get_model_state_dict(model)}
        dcp.load(weights, checkpoint_id=state["model"])
        sd.set_model_state_dict(model, weights["model"])
        saved = {"optimizer": sd.get_optimizer_state_dict(model, optimizer)}
        dcp.load(saved, checkpoint_id=state["optimizer"])
        sd.set_optimizer_state_dict(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
    return trainable, optimizer, scheduler


def optimizer_step(trainable: list, optimizer, scheduler, stats: StepStats, args: Args, where: str):
    """Average LoRA gradients over ranks (replicated base: one flat all-reduce, a rank without a gradient adds
    zeros), clip, sum the step's statistics over ranks (one all-reduce, one host copy with the gradient norm),
    stop on a non-finite loss (stats' first slot), step. Returns (summed statistics by name, gradient norm)."""
    if world() > 1 and args.lora_r > 0:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(trainable, torch.split(flat / world(), [g.numel() for g in grads])):
            p.grad = g.view_as(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2 DTensor
    if world() > 1:
        dist.all_reduce(stats.sums)
    *values, grad_norm = torch.cat([stats.sums, grad_norm.reshape(1).to(stats.sums)]).tolist()
    total = dict(zip(stats.names, values))
    if not math.isfinite(values[0]):
        raise InputError(
            f"non-finite loss ({values[0]}) at {where}: stopping before the update (the last checkpoint "
            "is intact); lower --lr or --beta, or check that step's data"
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def save_atomic(model, tokenizer, directory: Path):
    """The model as a save_pretrained folder (safetensors in the loaded checkpoint's dtype, config, tokenizer),
    loadable by from_pretrained and vLLM: an iteration's or the run's final model. With LoRA the adapter is merged
    first (the merged model is returned). Written by write_folder: a crash never leaves half a model."""
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
        state = model.state_dict()
    elif world() > 1:  # FSDP2: gather the full weights (to the CPU)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    dtype = getattr(model, "checkpoint_dtype", torch.float32)  # the loaded checkpoint's, not the masters'
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    def write(folder: Path):
        if rank() == 0:
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            live, model.config.dtype = model.config.dtype, dtype  # save_pretrained recorded the masters' dtype
            model.config.save_pretrained(folder)
            model.config.dtype = live  # the weights in memory are still the masters
            tokenizer.save_pretrained(folder)

    write_folder(directory, write)
    return model


def write_folder(directory: Path, write):
    """`write(folder)`, called on every rank, fills a fresh temporary folder (.tmp), which then takes `directory`'s
    place by renames (the previous one is moved aside to .old first, then removed): a crash leaves the previous
    folder or the new one whole (between the two renames, an instant, under those names). Its files get the mode
    open() gives the run's other files (0o666 less the umask; save_pretrained and DCP write some through private
    files), folders keep theirs."""
    recover_folder(directory)
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world() > 1:
        dist.barrier()
    write(tmp)
    if world() > 1:
        dist.barrier()
    if rank() == 0:
        mode = 0o666 & ~process_umask()
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode)
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    if world() > 1:
        dist.barrier()


def recover_folder(directory: Path):
    """Finishes a swap of write_folder that a kill cut between its two renames: `directory` is gone, the previous
    folder is whole under .old and the new one under .tmp (written, barriers passed), which takes its place."""
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    if rank() == 0 and not directory.exists() and old.exists():
        os.replace(tmp if tmp.exists() else old, directory)
        print(f"completed the interrupted replacement of {directory}")
    if world() > 1:
        dist.barrier()


def process_umask() -> int:
    """This process's umask, read without changing it: Linux says it in /proc/self/status. Elsewhere the only way
    to read it is to set it: to 0o077 for that instant, so a file another thread makes meanwhile is private."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def rng_state() -> dict:
    """This rank's random number generators as tensors: the CPU's and, on a GPU run, its own GPU's (sampling draws
    from it). One GPU per rank, so a run resumes on a node with another number of GPUs."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():  # saved by a GPU run: this rank's GPU (lazily, if need be)
        torch.cuda.set_rng_state(state["cuda"])


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(prompt + response) for prompt, response in sequences]
    labels = [torch.tensor([-100] * len(prompt) + response) for prompt, response in sequences]
    batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id)}
    batch["attention_mask"] = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
    batch["labels"] = pad_sequence(labels, batch_first=True, padding_value=-100)
    return {name: value.to(device) for name, value in batch.items()}


# ---------------------------------------------------------------------------------------------
# Step checkpoints, scoring, sampling and evaluation


def save_checkpoint(model, directory: Path, optimizer, scheduler, step: int):
    """A resumable step checkpoint holding the training state exactly, in one folder (write_folder): the weights as
    they train (the fp32 masters, a LoRA model's base and adapter) and the optimizer state by
    torch.distributed.checkpoint (each rank its shards; read back at any number of ranks), the step and the
    scheduler as JSON, each rank's random number generators as safetensors. No pickle: resuming a run folder from
    elsewhere cannot run code. (save_atomic's export, in the checkpoint's dtype, is for iteration and final models.)"""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    def write(folder: Path):
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder / "model"))
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder / "optimizer"))
        if rank() == 0:
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": world()}
            (folder / "trainer_state.json").write_text(json.dumps(state))
        save_file(rng_state(), str(folder / f"rng_rank{rank()}.safetensors"))

    write_folder(directory, write)


def trainer_state(directory: Path) -> dict | None:
    """save_checkpoint's step, scheduler, weights and optimizer folders and this rank's generators (None for a
    rank the run did not have: it keeps its seed's), or None when there is no step checkpoint."""
    from safetensors.torch import load_file

    recover_folder(directory)
    file, generators = directory / "trainer_state.json", directory / f"rng_rank{rank()}.safetensors"
    if not file.exists():
        return None
    if not (directory / "model").is_dir():
        raise InputError(
            f"--resume: {directory} is a step checkpoint without its weights folder (model/); expected one "
            "written by this version (earlier ones held bf16 exports): delete the folder to redo its steps"
        )
    state = json.loads(file.read_text()) | {
        "model": str(directory / "model"),
        "optimizer": str(directory / "optimizer"),
    }
    state["rng"] = load_file(str(generators)) if generators.exists() else None
    if rank() == 0:
        print(
            f"resuming from the step checkpoint {directory} at step {state['step']} (saved on {state['world_size']} "
            f"ranks, resumed on {world()})"
        )
    return state


@torch.no_grad()
def score(model, sequences: list[tuple[list[int], list[int]]], args: Args, pad_id: int, device, desc: str):
    """Summed log-probs and response lengths [n] of (prompt_ids, response_ids) under `model`, all ranks. A
    sharded policy scores as it trains (the same FSDP2 precision): a reference from it matches at step 0."""
    training, _ = model.training, model.eval()
    mine, real = shard(list(enumerate(sequences)))
    logps, counts = [], []
    for start in progress(range(0, len(mine), args.scoring_batch_size), desc=desc, inner=True):
        batch = collate([s for _, s in mine[start : start + args.scoring_batch_size]], pad_id, device)
        out, _ = causal_lm_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps += out.tolist()
        counts += (batch["labels"][:, 1:] != -100).sum(1).tolist()
    if hasattr(model, "reshard"):  # FSDP2: the root stays gathered after a forward without backward; left so, 2 ranks
        model.reshard()  # trained away from one process (tests/test_runs.py, two ranks match one process)
    model.train(training)
    merged = {i: (lp, c) for i, lp, c in gather([(i, lp, c) for (i, _), lp, c in zip(mine[:real], logps, counts)])}
    order = [merged[i] for i in range(len(sequences))]
    return (
        torch.tensor([o[0] for o in order], dtype=torch.float64),
        torch.tensor([o[1] for o in order], dtype=torch.float64),
    )


class VLLMEngine:
    """--sampler vllm: this process's engine for the whole run, the checkpoint it holds, its longest sequence."""

    llm, path, max_model_len = None, None, None


def vllm_devices() -> str | None:
    """CUDA_VISIBLE_DEVICES for this rank's vLLM engine: its own GPU alone. A single-GPU engine takes device 0 of
    what it sees, so under torchrun every rank's engine would otherwise land on GPU 0. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids[int(os.environ.get("LOCAL_RANK", 0))]


def start_vllm(vllm, model_path: str, args: Args, seed: int, sleeps: bool, longest_prompt: int):
    """The engine, started once per process in its own processes (so CUDA_VISIBLE_DEVICES set around the
    constructor pins it to this rank's GPU and leaves the trainer's view alone). It reserves KV cache for
    --max_prompt_length + --max_new_tokens tokens, not the model's whole context, and computes in the HF
    sampler's dtype."""
    from vllm.platforms import current_platform

    max_model_len = max(args.max_prompt_length, longest_prompt) + args.max_new_tokens
    kwargs = dict(
        model=model_path,
        seed=seed,
        gpu_memory_utilization=0.3,
        max_model_len=max_model_len,
        dtype={"auto": "bfloat16" if torch.cuda.is_available() else "float32"}.get(args.dtype, args.dtype),
    )
    if sleeps:
        kwargs["enable_sleep_mode"] = True  # refused where the platform has none (CPU)
    if current_platform.is_cpu():
        kwargs["enable_chunked_prefill"] = False  # a seeded request's prefill split across steps crashes on CPU
    devices, before = vllm_devices(), dict(os.environ)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        llm = vllm.LLM(**kwargs)
    finally:
        os.environ.clear()
        os.environ.update(before)
    VLLMEngine.llm, VLLMEngine.max_model_len = llm, max_model_len
    return llm


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: generation_config.eos_token_id (often a list: Llama-3 <|eot_id|>, Gemma
    <end_of_turn>, Qwen <|im_end|>) and the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({i for i in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    n: int,
    temperature: float,
    top_p: float,
    args: Args,
    device,
    seed: int,
    model_path: str | None = None,
    desc: str = "generate",
) -> list[list[tuple[str, bool]]]:
    """n samples per prompt as (text, finished) where finished = stopped on a stop_ids token within
    max_new_tokens. Prompts are encode()'s ids. Sampling is exactly temperature / top-p: top-k off (transformers
    would fill 50) and no repetition penalty from the model's generation_config. With --sampler vllm (and a
    saved model_path) vLLM samples instead of HF generate, with the same settings and stop ids."""
    stop = stop_ids(model, tokenizer)
    if model_path is not None and args.sampler == "vllm":
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise InputError("--sampler vllm needs vLLM: pip install 'selfpo[vllm]' (or use --sampler hf)") from None
        # One engine per process for the whole run. Where the platform has sleep mode (CUDA) it sleeps between
        # calls so that training has the GPU, at level 2 (weights dropped, not copied to CPU RAM): every wake-up
        # reloads the checkpoint in place. Elsewhere (CPU) a new checkpoint is reloaded in place when it changes.
        sleeps = current_platform.is_sleep_mode_available()
        mine, real = shard(prompts)  # each rank samples its share
        prompt_ids = [encode(tokenizer, p)[0] for p in mine]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # vLLM checks the free memory against gpu_memory_utilization
        llm = VLLMEngine.llm
        if llm is None:
            llm = start_vllm(vllm, model_path, args, seed, sleeps, max(map(len, prompt_ids)))
        else:
            if sleeps:
                llm.wake_up(tags=["weights"])
            if sleeps or VLLMEngine.path != model_path:
                llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
            if sleeps:
                llm.wake_up(tags=["kv_cache"])
        VLLMEngine.path = model_path
        longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        if len(prompt_ids[longest]) + args.max_new_tokens > VLLMEngine.max_model_len:
            raise InputError(
                f"{desc}: a prompt of {len(prompt_ids[longest])} tokens + --max_new_tokens "
                f"{args.max_new_tokens} is over the vLLM engine's max_model_len {VLLMEngine.max_model_len} "
                "(--max_prompt_length + --max_new_tokens when it started); raise --max_prompt_length"
            )
        # vLLM seeds sample j of a request seed + j: one seed per prompt, n apart, so that no two samples share a
        # random stream, and from the call's seed and the prompt's index (not the engine's history)
        params = [
            vllm.SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                top_k=-1,
                repetition_penalty=1.0,
                max_tokens=args.max_new_tokens,
                stop_token_ids=stop,
                seed=seed * 1_000_003 + (rank() * len(mine) + i) * n,
            )
            for i in range(len(mine))
        ]
        results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        if sleeps:
            llm.sleep(level=2)
        return gather([[(o.text.strip(), o.finish_reason == "stop") for o in r.outputs] for r in results[:real]])
    from torch.distributed.fsdp import FSDPModule

    sampler = unsharded_copy(model, args) if isinstance(model, FSDPModule) else model
    training, _ = sampler.training, sampler.eval()
    torch.manual_seed(seed + rank())
    mine, real = shard(prompts)
    prompt_ids = [encode(tokenizer, p)[0] for p in mine]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths together: little padding
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    outputs = {}
    batch_size = max(1, args.generation_batch_size // n)
    for start in progress(range(0, len(order), batch_size), desc=desc, inner=True):
        indices = order[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in indices]}, return_tensors="pt").to(device)
        # one autocast around the whole call: the bf16 casts of trainable fp32 weights are made once, not per token
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            out = sampler.generate(
                **enc,
                **sampling,
                max_new_tokens=args.max_new_tokens,
                num_return_sequences=n,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        rows = out[:, enc["input_ids"].shape[1] :].tolist()
        for k, i in enumerate(indices):  # num_return_sequences rows per prompt, consecutive
            ends = [
                next((j for j, token in enumerate(row) if token in stop), None) for row in rows[k * n : (k + 1) * n]
            ]
            outputs[i] = [
                (tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is not None)
                for row, end in zip(rows[k * n : (k + 1) * n], ends)
            ]
    sampler.train(training)
    return gather([outputs[i] for i in range(real)])


def unsharded_copy(model, args: Args):
    """An FSDP2-sharded policy as one plain frozen model per rank in the compute dtype, for sampling: HF generate
    on the sharded model would gather every layer for every decoded token. Gathered one tensor at a time (one
    fp32 tensor beyond the copy at the peak); the policy's fp32 shards stay the masters."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    state = {
        name: (value.full_tensor() if hasattr(value, "full_tensor") else value).to(dtype)
        for name, value in model.state_dict().items()
    }
    copy.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        module, _, attr = name.rpartition(".")
        copy.get_submodule(module).register_buffer(attr, buffer, persistent=False)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.requires_grad_(False).eval()


# --reward_model: a trained sequence classifier scores the held-out samples; win rates against the start


def load_reward_model(path: str, chat_template: str | None):
    """--reward_model's tokenizer with its chat template (or --reward_chat_template), checked before anything is
    written: a folder (or hub id) whose config has one output (num_labels 1) and whose tokenizer loads."""
    from transformers import AutoConfig, AutoTokenizer

    hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not Path(path).expanduser().is_dir() and not hub_id:
        raise InputError(f"--reward_model: folder {path!r} not found")
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"--reward_model: no model could be loaded from {path!r} ({str(err).splitlines()[0]})"
        ) from None
    if config.num_labels != 1:
        raise InputError(
            f"--reward_model: {path!r} has {config.num_labels} outputs (num_labels); expected a sequence "
            "classifier with one (AutoModelForSequenceClassification, num_labels=1)"
        )
    if chat_template and "{%" not in chat_template and not Path(chat_template).is_file():
        raise InputError(f"--reward_chat_template: file {chat_template!r} not found")
    if chat_template:
        tokenizer.chat_template = chat_template if "{%" in chat_template else Path(chat_template).read_text()
    if not tokenizer.chat_template:
        raise InputError(
            f"--reward_model: the tokenizer of {path!r} has no chat template; pass --reward_chat_template file.jinja"
        )
    return tokenizer


def reward_model_ids(tokenizer, prompts: list[str], responses: list[str]) -> list[list[int]]:
    """Each (prompt, response) as a user and an assistant turn in the reward model's own chat template."""
    from jinja2 import TemplateError

    try:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses)
        ]
    except TemplateError as err:
        raise InputError(f"--reward_model: its chat template refuses a user and an assistant turn: {err}") from None
    return [tokenize(tokenizer, text) for text in texts]


def reward_model_scorer(args: Args, example: dict | None = None):
    """score(prompts, responses) -> list[float] by --reward_model (all ranks); its template is tried on `example`."""
    tokenizer = load_reward_model(args.reward_model, args.reward_chat_template)
    if example is not None:
        reward_model_ids(tokenizer, [example["prompt"][-1]["content"]], [example["chosen"]])
    return lambda prompts, responses: reward_model_scores(
        args.reward_model, tokenizer, prompts, responses, args, run_device(args)
    )


@torch.no_grad()
def reward_model_scores(
    path: str, tokenizer, prompts: list[str], responses: list[str], args: Args, device
) -> list[float]:
    """The reward model's score of each (prompt, response), on all ranks: each rank scores its share in batches
    sorted by length, in the compute dtype; the model is loaded for this call and freed after it (at 7B it
    would otherwise hold a second model's memory through training). Batches are padded on the right, so every
    position is where it is in an unpadded forward and the classifier's own rule (the last token that is not
    its pad id) picks the same token as it does on the sequence alone."""
    from transformers import AutoModelForSequenceClassification

    ids = reward_model_ids(tokenizer, prompts, responses)
    mine, real = shard(list(range(len(ids))))
    with torch.random.fork_rng(devices=[]):  # loading draws nothing from the run's random numbers
        model = (
            AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32, **NO_HUB_KERNELS
            )
            .to(device)
            .eval()
        )
    pad_id = getattr(model.config, "pad_token_id", None)
    order = sorted(range(len(mine)), key=lambda k: len(ids[mine[k]]))
    scores = {}
    for start in progress(range(0, len(order), args.scoring_batch_size), desc="reward model", inner=True):
        batch = [ids[mine[k]] for k in order[start : start + args.scoring_batch_size]]
        if pad_id is None:  # without a pad id the model reads the last token: pad with one no sequence here ends on
            model.config.pad_token_id = min(set(range(len(batch) + 1)) - {seq[-1] for seq in batch})
        width = max(map(len, batch))
        input_ids = torch.tensor(
            [seq + [model.config.pad_token_id] * (width - len(seq)) for seq in batch], device=device
        )
        attention_mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        scores.update(zip(order[start : start + args.scoring_batch_size], logits[:, 0].float().tolist()))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    merged = dict(gather([(mine[k], scores[k]) for k in range(real)]))
    return [merged[i] for i in range(len(ids))]


def win_rate(scores: list[float], start_scores: list[float]) -> tuple[float, float, float]:
    """The share of prompts whose sample out-scores the starting model's (a tie counts 1/2) and its 95% Wilson
    score interval, with ties as half wins: an outcome in {0, 1/2, 1} with mean p has a variance of at most
    p(1 - p), so the interval is exact without ties and conservative with them."""
    n, z = len(scores), 1.959964  # the normal distribution's 97.5% quantile
    p = sum((a > b) + 0.5 * (a == b) for a, b in zip(scores, start_scores)) / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, center - half), min(1.0, center + half)


def pairwise_agreement(scores, start_scores, gold, gold_start) -> float:
    """How often `scores` order a prompt's sample and the start's sample as `gold` does (a tie in `scores` counts
    1/2), over the prompts where `gold` scores the two differently; NaN where there are none."""
    pairs = [(a - b, g - h) for a, b, g, h in zip(scores, start_scores, gold, gold_start) if g != h]
    return sum((d > 0) == (gd > 0) if d != 0 else 0.5 for d, gd in pairs) / len(pairs) if pairs else float("nan")


def wins(metrics: dict) -> str:
    """ ", win rate p [lo, hi]" of an evaluation's metrics, or nothing without a win rate."""
    if "eval/win_rate" not in metrics:
        return ""
    return ", win rate {:.3f} [{:.3f}, {:.3f}]".format(*(metrics[f"eval/win_rate{k}"] for k in ("", "_lo", "_hi")))


def evaluate(
    model, tokenizer, eval_prompts, scorers, args, device, model_path=None, start_file=None, is_start=False
) -> tuple[float, dict]:
    """One sample per held-out prompt, scored by every scorer of load_evaluation: the first scorer's mean and the
    metrics (eval/reward, eval/rm_score; eval/win_rate with its interval against the starting model's samples, by
    the reward model where there is one; the reward model's agreement with --reward_fn; both mean lengths in
    words). The starting model's evaluation (is_start) keeps its samples and scores in start_file; every later one
    (same seed and settings) is compared with them, in a resumed run too."""
    samples = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in eval_prompts],
        1,
        args.eval_temperature,
        1.0,
        args,
        device,
        seed=args.seed + 10_000,
        model_path=model_path,
        desc="eval",
    )
    responses = [s[0][0] for s in samples]
    scores = {name: scorer(eval_prompts, responses) for name, scorer in scorers.items()}
    metrics = {f"eval/{name}": sum(values) / len(values) for name, values in scores.items()}
    if is_start and start_file is not None:
        write_atomic(start_file, {"responses": responses, "scores": scores})
    start = (
        {"responses": responses, "scores": scores}
        if is_start
        else json.loads(start_file.read_text())
        if start_file is not None and start_file.exists()
        else None
    )
    if start is not None:
        judge = "rm_score" if "rm_score" in scores else next(iter(scores))
        metrics.update(
            zip(
                ("eval/win_rate", "eval/win_rate_lo", "eval/win_rate_hi"),
                win_rate(scores[judge], start["scores"][judge]),
            )
        )
        if "rm_score" in scores and "reward" in scores:  # proxy against gold on the run's own samples
            metrics["eval/reward_win_rate"] = win_rate(scores["reward"], start["scores"]["reward"])[0]
            metrics["eval/rm_oracle_agreement"] = pairwise_agreement(
                scores["rm_score"], start["scores"]["rm_score"], scores["reward"], start["scores"]["reward"]
            )
    metrics["eval/response_words"] = sum(len(r.split()) for r in responses) / len(responses)
    if start is not None:
        metrics["eval/start_response_words"] = sum(len(r.split()) for r in start["responses"]) / len(start["responses"])
    return metrics[f"eval/{next(iter(scores))}"], metrics


if __name__ == "__main__":
    script = Path(__file__).name
    try:
        main(cli(Args, MODELS, __doc__))
    except InputError as err:
        sys.exit(f"{script}: error: {err}")
    except KeyboardInterrupt as err:
        print(f"{script}: interrupted{f' ({err})' if str(err) else ''}; " + resume_hint(script), file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
