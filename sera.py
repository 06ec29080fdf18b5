"""SeRA: Self-Reviewing and Alignment of LLMs using Implicit Reward Margins.

Ko et al., ICLR 2025, arXiv 2410.09362. An iterative direct-alignment run
that reviews its own data: iteration 1 is a plain DPO/IPO/SLiC-HF/SimPO epoch on the offline
pairs; from iteration 2 on, the previous model keeps only the offline pairs it separates most
confidently by implicit reward margin (IRM, eq. 5, ensembled over iterations by eq. 7) and adds
self-generated pairs labelled by the same implicit reward; the reference is refreshed to the
previous iteration's model.

    python sera.py                                    # toy world on CPU, a few minutes
    python sera.py --model mistral-7b                 # paper settings (zephyr SFT, UltraFeedback, LoRA r=8)
    python sera.py --model tinyllama --loss ipo       # paper settings for TinyLlama-1.1B
    python sera.py --model ./my-sft --dataset ./pairs.jsonl --loss simpo --iterations 3
    torchrun --nproc-per-node 4 sera.py --model mistral-7b --output_dir runs/m7

Under torchrun, full fine-tuning shards the policy with FSDP2 (`fully_shard`); with LoRA the
frozen base is replicated and the adapter gradients are averaged across ranks. With LoRA each
iteration trains a fresh adapter, merged into its checkpoint iter_t.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import numbers
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

from selfpo_kernels import causal_lm_logps, causal_lm_pair_loss, daa_loss_fn


@dataclass
class Args:
    model: str = "toy"
    """preset (toy, tinyllama, pythia-2.8b, mistral-7b), hub id or local path"""
    dataset: str | None = None
    """preset (ultrafeedback, hh-rlhf, tldr, toy) or a local jsonl/json/parquet file or save_to_disk folder"""
    loss: Literal["dpo", "ipo", "hinge", "simpo"] = "dpo"
    """direct alignment loss: DPO, IPO, SLiC-HF hinge or SimPO (SeRA eq. 6, 8, 9, 18)"""
    iterations: int = 3
    """T, one epoch per iteration (SeRA Table 4)"""
    epochs: int = 1
    """passes over each iteration's pairs (the paper: 1; --iterations 1 --epochs 3 is plain offline DPO)"""
    rho_1: float = 0.7
    """fraction of offline pairs kept by IRM selection, k1 = ceil(rho_1 * N)"""
    rho_2: float | None = None
    """fraction of generated pairs, k2 = ceil(rho_2 * N); default k2 = N - k1 ("SeRA"); larger = best-SeRA"""
    n_cand: int = 4
    """samples per prompt for preference bootstrapping (App. B.2)"""
    sample_temperature: float = 0.7
    """sampling temperature of the bootstrap candidates (App. B.2)"""
    sample_top_p: float = 0.95
    """nucleus (top-p) of the bootstrap candidates, in (0, 1]"""
    gamma_e: float = 0.3
    """ensemble weight on the older model's reward, eq. 7 [ours: 0.3 in the paper's best range]"""
    irm_reference: Literal["previous", "sft"] = "previous"
    """which model defines each model's implicit reward: the previous iteration's or the SFT model [ours, README]"""
    beta: float | None = None
    """KL strength of the DAA loss and of the implicit reward (unset: the preset's for --loss)"""
    gamma: float | None = None
    """SimPO target margin"""
    length_norm: Literal["sum", "avg"] = "sum"
    """log-prob convention for DPO/IPO/hinge and the IRM (SimPO always averages)"""
    lr: float | None = None
    """peak learning rate"""
    batch_size: int | None = None
    """pairs per device per micro-batch"""
    global_batch: int | None = None
    """pairs per optimizer step over all ranks: batch_size x ranks x micro-batches (the paper's at any world size)"""
    scheduler: Literal["cosine", "constant"] | None = None
    """learning-rate schedule after the linear warmup"""
    long_prompts: Literal["error", "skip", "truncate"] | None = None
    """prompts over max_prompt_length: fail, drop the pair (counted), or keep the prompt's end"""
    num_pairs: int | None = None
    """use only the first N offline pairs"""
    sampler: Literal["hf", "vllm"] = "hf"
    """HF generate, or vLLM (pip install 'selfpo[vllm]') for the bootstrap and evaluation samples"""
    save_every: int = 0
    """also save a resumable checkpoint every N optimizer steps (0 = only at iteration ends)"""
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
    """also log to wandb (pip install 'selfpo[wandb]'): the resolved config, TensorBoard's records synced"""
    wandb_project: str | None = None
    """wandb project (unset: $WANDB_PROJECT, else selfpo)"""
    wandb_entity: str | None = None
    """wandb entity, a user or team (unset: $WANDB_ENTITY, else wandb's default)"""
    dist_timeout_minutes: int = 180
    """how long a rank waits in a collective for the others (ranks sample and judge at different speeds)"""
    scoring_batch_size: int | None = None
    """sequences per no-grad scoring forward"""
    generation_batch_size: int | None = None
    """sequences (prompts x samples) per generate call"""
    overwrite: bool = False
    """start over in an --output_dir that holds a run: what it holds is deleted first (see --resume)"""
    max_skipped_steps: int = 3
    """stop when this many optimizer steps in a row have a non-finite loss or gradient norm (each is skipped)"""
    allow_changed_inputs: bool = False
    """--resume even where --model's or a data file's contents differ from those the run started with"""


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: implicit rewards, IRM selection and preference bootstrapping (SeRA §3.1-3.4)


def implicit_reward(j: int, logps: dict, counts: torch.Tensor, args: Args) -> torch.Tensor:
    """r_j(x, y) = beta * [S(theta_j) - S(ref_j)] (eq. 5); SimPO: beta * A(theta_j) (App. C.3 eq. 17)."""
    if args.loss == "simpo":
        return args.beta * logps[j] / counts
    ref = j - 1 if args.irm_reference == "previous" else 0
    ratio = logps[j] - logps[ref]
    return args.beta * (ratio / counts if args.length_norm == "avg" else ratio)


def ensemble_reward(j: int, logps: dict, counts: torch.Tensor, args: Args) -> torch.Tensor:
    """r~_j = (1 - gamma_e) r_j + gamma_e r_{j-1} for j >= 2, r~_1 = r_1 (eq. 7)."""
    reward = implicit_reward(j, logps, counts, args)
    if j >= 2 and args.gamma_e > 0:
        reward = (1 - args.gamma_e) * reward + args.gamma_e * implicit_reward(j - 1, logps, counts, args)
    return reward


def reward_models(j: int, args: Args) -> set[int]:
    """Models whose log-probs r~_j needs: j, its reference, and j-1 (with its reference) for eq. 7."""
    needed = {j} if args.loss == "simpo" else {j, j - 1 if args.irm_reference == "previous" else 0}
    if j >= 2 and args.gamma_e > 0:
        needed |= reward_models(j - 1, dataclasses.replace(args, gamma_e=0.0))
    return needed


def selection_sizes(n_pairs: int, rho_1: float, rho_2: float | None) -> tuple[int, int]:
    """k1 = ceil(rho_1 N) offline pairs; k2 = N - k1 generated ("SeRA", k1 + k2 = N) or ceil(rho_2 N)."""
    k1 = math.ceil(rho_1 * n_pairs)
    return k1, (n_pairs - k1 if rho_2 is None else math.ceil(rho_2 * n_pairs))


def distinct_samples(samples: list[list[tuple[str, bool]]]) -> tuple[list[list[str]], int]:
    """Per prompt, the distinct non-empty samples that ended with EOS [ours, README]; and how many did not end."""
    candidates, unfinished = [], 0
    for prompt_samples in samples:
        texts = []
        for text, finished in prompt_samples:
            unfinished += not finished
            if finished and text and text not in texts:
                texts.append(text)
        candidates.append(texts)
    return candidates, unfinished


def top_k(margins: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest margins; ties broken by original index (stable, deterministic)."""
    order = sorted(range(len(margins)), key=lambda i: (-float(margins[i]), i))
    return sorted(order[:k])


def bootstrap_pairs(prompt_keys: list, candidates: list[list[str]], rewards: list[torch.Tensor]) -> list[dict]:
    """Per prompt: argmax / argmin implicit reward among distinct samples, g = r(y+) - r(y-) >= 0."""
    pairs = []
    for key, texts, reward in zip(prompt_keys, candidates, rewards):
        if len(texts) < 2:
            continue
        best, worst = int(torch.argmax(reward)), int(torch.argmin(reward))
        pairs.append(
            {"key": key, "chosen": texts[best], "rejected": texts[worst], "margin": float(reward[best] - reward[worst])}
        )
    return pairs


def offline_pair(pairs: list[dict], i: int, logps: torch.Tensor, margin: float | None = None) -> dict:
    """Offline pair i of D with its reference log-probs (logps = [chosen; rejected] of every pair of D)."""
    return dict(
        pairs[i], source="offline", margin=margin, ref_chosen=float(logps[i]), ref_rejected=float(logps[len(pairs) + i])
    )


def select_offline(t: int, pairs: list[dict], logps: dict, k1: int, args: Args) -> tuple[list[dict], dict]:
    """IRM-based off-policy selection (Algorithm 1 lines 7-8): the k1 offline pairs with the largest ensembled
    implicit reward margin m~_{t-1}(x, y_w, y_l) (eq. 5, 7), referenced to theta_{t-1}; and the statistics."""
    n = len(pairs)
    counts = torch.tensor([len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]).double()
    rewards = ensemble_reward(t - 1, logps, counts, args)
    irm = rewards[:n] - rewards[n:]
    kept = top_k(irm, k1)
    stats = {"iteration": t, "irm/mean": float(irm.mean()), "irm/std": float(irm.std()), "irm/min": float(irm.min())}
    stats |= {"irm/max": float(irm.max()), "irm/negative_fraction": float((irm < 0).double().mean())}
    stats |= {"irm/kept_threshold": float(min(irm[i] for i in kept)), "data/offline_kept": len(kept)}
    if "flipped" in pairs[0]:  # toy data: the share of deliberately swapped labels that survives selection
        flipped, kept_mask = torch.tensor([p["flipped"] for p in pairs]), torch.zeros(n, dtype=torch.bool)
        kept_mask[kept] = True
        stats["data/flipped_kept_fraction"] = float(kept_mask[flipped].double().mean()) if flipped.any() else 0.0
        stats["data/clean_kept_fraction"] = float(kept_mask[~flipped].double().mean())
    return [offline_pair(pairs, i, logps[t - 1], float(irm[i])) for i in kept], stats


def bootstrap(
    model, tokenizer, pairs: list[dict], t: int, k2: int, model_paths: dict, args: Args, device, counts: dict
):
    """IRM-based preference bootstrapping (Algorithm 1 lines 9-16): n_cand samples per distinct prompt from
    theta_{t-1}; per prompt chosen = argmax, rejected = argmin of r~_{t-1} over its distinct samples; the k2 pairs
    of largest margin, referenced to theta_{t-1}. Returns (pairs, statistics)."""
    prev = t - 1
    prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values()) if k2 > 0 else []
    samples = []
    if prompts:
        seed = args.seed * 1000 + t
        samples = generate(
            model,
            tokenizer,
            prompts,
            args.n_cand,
            args.sample_temperature,
            args.sample_top_p,
            args,
            device,
            seed,
            model_paths[prev],
            "bootstrap samples",
        )
    candidates, unfinished = distinct_samples(samples)
    sequences = {}  # (prompt index, text) -> (prompt_ids, response_ids), prompts with two or more samples
    for pi, texts in enumerate(candidates):
        for text in texts if len(texts) >= 2 else []:
            fitted = fit(*encode(tokenizer, prompts[pi], text), args, "generated sample", counts)
            if fitted is not None:
                sequences[(pi, text)] = fitted
    keys, logps, rewards = list(sequences), {}, None
    for j in sorted(reward_models(prev, args)) if keys else []:  # the models r~_{t-1} is made of
        scorer = model if j == prev else load_model(model_paths[j], device, args, frozen=True)
        desc = f"score samples under theta_{j}"
        logps[j], lengths = score(scorer, list(sequences.values()), args, tokenizer.pad_token_id, device, desc)
        del scorer
    if keys:
        rewards = ensemble_reward(prev, logps, lengths, args)
    by_prompt = {}  # prompt index -> indices into keys
    for index, (pi, _) in enumerate(keys):
        by_prompt.setdefault(pi, []).append(index)
    texts = [[keys[i][1] for i in indices] for indices in by_prompt.values()]
    boot = bootstrap_pairs(list(by_prompt), texts, [rewards[indices] for indices in by_prompt.values()])
    index = {key: i for i, key in enumerate(keys)}
    d_gen = []
    for b in [boot[i] for i in top_k(torch.tensor([b["margin"] for b in boot]), min(k2, len(boot)))] if boot else []:
        c, r = index[(b["key"], b["chosen"])], index[(b["key"], b["rejected"])]
        d_gen.append(
            dict(
                prompt=prompts[b["key"]],
                chosen=b["chosen"],
                rejected=b["rejected"],
                source="generated",
                margin=b["margin"],
                prompt_ids=sequences[keys[c]][0],
                chosen_ids=sequences[keys[c]][1],
                rejected_ids=sequences[keys[r]][1],
                ref_chosen=float(logps[prev][c]),
                ref_rejected=float(logps[prev][r]),
            )
        )
    margins = torch.tensor([p["margin"] for p in d_gen] or [0.0])
    return d_gen, {
        "data/generated_pairs": len(d_gen),
        "data/prompts_with_pair": len(boot),
        "data/samples_unfinished": unfinished,
        "bootstrap/margin_mean": float(margins.mean()),
    }


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: one DAA epoch on D_t (reference log-probs precomputed: no reference model in memory)


def daa_loss(args: Args):
    """The DAA loss of --loss on each pair's sequence log-probs (SeRA eq. 6, 8, 9, 18), as the fused pair op calls
    it: per-pair losses and implicit rewards. DPO softplus(-beta h), IPO (h - 1/(2 beta))^2, SLiC-HF
    max(0, 1 - beta h); SimPO (and --length_norm avg) on averaged log-probs (selfpo_kernels.daa_loss_fn)."""
    return daa_loss_fn(args.loss, beta=args.beta, gamma=args.gamma, length_norm=args.length_norm == "avg")


DAA_STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "pairs",
    "tokens",
)  # train_iteration's sums per step; the first seven are per-pair means


def train_iteration(
    model,
    pairs: list[dict],
    t: int,
    args: Args,
    lr: float,
    device,
    pad_id: int,
    log,
    save_step,
    start_step=0,
    saved=None,
):
    order = [
        i
        for epoch in range(args.epochs)  # a fresh permutation of D_t per epoch
        for i in torch.randperm(
            len(pairs), generator=torch.Generator().manual_seed(args.seed * 1000 + t + 100_000 * epoch)
        ).tolist()
    ]
    grad_accum, per_step = accumulation(args.global_batch, args.batch_size), args.global_batch
    n_steps = max(1, len(order) // per_step)
    # every rank runs the same micro-batches (FSDP collectives): the remainder is dropped, counted
    used = order[: n_steps * per_step] if len(order) >= per_step else order[: len(order) - len(order) % world()]
    dropped = len(order) - len(used)
    local = used[rank() :: world()]
    micro = max(1, math.ceil(len(local) / (n_steps * grad_accum)))
    trainable, optimizer, scheduler = make_optimizer(model, lr, n_steps, args, args.scheduler, saved)
    log(
        {
            "iteration": t,
            "train/pairs": len(pairs),
            "train/pairs_dropped_remainder": dropped,
            "train/steps": n_steps,
            "train/grad_accum": grad_accum,
        }
    )
    use_avg, loss_fn = args.loss == "simpo" or args.length_norm == "avg", daa_loss(args)
    bar = progress(range(start_step, n_steps), desc=f"iteration {t}")
    for step in signal_safe_steps(bar):
        tic, stats = time.perf_counter(), StepStats(DAA_STATS, device)
        offsets = [(step * grad_accum + accum) * micro for accum in range(grad_accum)]
        for batch_pairs in micro_batches(model, [[pairs[i] for i in local[o : o + micro]] for o in offsets]):
            n = len(batch_pairs)
            batch = collate(
                [(p["prompt_ids"], p["chosen_ids"]) for p in batch_pairs]
                + [(p["prompt_ids"], p["rejected_ids"]) for p in batch_pairs],
                pad_id,
                device,
            )
            ref = [p["ref_chosen"] for p in batch_pairs] + [p["ref_rejected"] for p in batch_pairs]
            ref = torch.tensor(ref, device=device, dtype=torch.float32)
            # log-probs, the pair losses and their gradients in one pass over the head (causal_lm_pair_loss)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            losses, out = causal_lm_pair_loss(model, ids, mask, labels, loss_fn, ref_logps=ref)
            (losses.sum() / (micro * grad_accum)).backward()
            with torch.no_grad():
                for side in ("chosen", "rejected"):  # the logged log-probs in the loss's convention
                    out[f"logps/{side}"] = out[f"logps/{side}"] / (out[f"tokens/{side}"] if use_avg else 1)
                stats.add(**{name: out[name] for name in DAA_STATS[:7]}, pairs=n, tokens=batch["attention_mask"])
        total, grad_norm = optimizer_step(
            trainable, optimizer, scheduler, stats, args, f"iteration {t} step {step + 1}"
        )
        metrics = {
            "iteration": t,
            "step": step + 1,
            **{name: total[name] / total["pairs"] for name in DAA_STATS[:7]},
            "grad_norm": grad_norm,
            "train/skipped_nonfinite": total["skipped_nonfinite"],
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_sec": total["tokens"] / (time.perf_counter() - tic),
        }
        log(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}", refresh=False)
        save_step(step + 1, n_steps, optimizer, scheduler)
    return model


def main(args: Args) -> dict:
    args, preset = resolve(args)
    quiet_library_bars()
    check_resume(args)
    # Everything that can fail on bad input is checked before anything is written.
    tokenizer = load_tokenizer(preset["path"], args.chat_template, args)
    rows, source = load_rows(args.dataset)
    pairs, length_counts = build_dataset(rows, source, tokenizer, args)
    scorers, eval_prompts = load_evaluation(args, pairs[0])

    device = init_device(args.seed, args.dist_timeout_minutes, args.device)
    run_name = f"sera__{Path(args.model).name}__{args.seed}__{now()}"
    out_dir = Path(args.output_dir or f"runs/{run_name}")
    state_file, cache_file = out_dir / "state.json", out_dir / "offline_logps.pt"
    state = run_state(state_file, args, {"completed": 0, "eval": {}})
    model_paths = {0: preset["path"], **{j: str(out_dir / f"iter_{j}") for j in range(1, state["completed"] + 1)}}
    model = load_model(model_paths[state["completed"]], device, args)
    lock_run(out_dir, args)
    log = Logs(args, out_dir, run_name)
    log({"data/pairs": len(pairs), **{f"data/{k}": v for k, v in length_counts.items()}})
    # offline_logps[j] = [S(theta_j, y_w); S(theta_j, y_l)] of every offline pair, computed while theta_j is the
    # current model: the IRM inputs and the training reference
    offline_logps = read_run_file(cache_file) if args.resume and cache_file.exists() else {}
    k1, k2 = selection_sizes(len(pairs), args.rho_1, args.rho_2)

    def evaluate_and_log(t: int):  # win rates against the starting model's samples, kept in eval_start.json
        path, start_file = model_paths[t], out_dir / "eval_start.json"
        state["eval"][str(t)], metrics = evaluate(
            model, tokenizer, eval_prompts, scorers, args, device, path, start_file, t == 0
        )
        log({"iteration": t, **metrics})
        if rank() == 0:
            start = f" (start): eval reward {state['eval']['0']:.3f} on {len(eval_prompts)} prompts"
            print(f"iteration {t}" + (start if t == 0 else f": eval reward {state['eval'][str(t)]:.3f}{wins(metrics)}"))

    if scorers and eval_prompts and "0" not in state["eval"]:
        evaluate_and_log(0)

    for t in range(state["completed"] + 1, args.iterations + 1):
        partial, pairs_file = out_dir / f"iter_{t}_partial", out_dir / f"pairs_iter_{t}.jsonl"
        saved = trainer_state(partial) if args.resume else None  # resume inside the iteration from its checkpoint
        # theta_{t-1} as it trains (sharded once: its fp32 shards stay the masters from iteration to iteration), so
        # the reference log-probs below are computed exactly as the policy's at the first step (h = 0 there).
        model = prepare_for_training(model, args)
        if t - 1 not in offline_logps:  # log-probs of every offline pair under theta_{t-1}, once per iteration
            sequences = [(p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
            desc = f"score D under theta_{t - 1}"
            offline_logps[t - 1] = score(model, sequences, args, tokenizer.pad_token_id, device, desc)[0]
            write_atomic(cache_file, offline_logps)
        if args.resume and pairs_file.exists():  # the selection of an interrupted iteration, as it was
            d_t = read_run_file(pairs_file)
        elif t == 1:  # ALGO LOGIC: iteration 1 is a plain DAA epoch on all of D with the SFT reference
            d_t = [offline_pair(pairs, i, offline_logps[0]) for i in range(len(pairs))]
        else:  # ALGO LOGIC: D_t = the IRM-selected offline pairs + the self-bootstrapped pairs
            d_off, stats = select_offline(t, pairs, offline_logps, k1, args)
            d_gen, gen_stats = bootstrap(model, tokenizer, pairs, t, k2, model_paths, args, device, length_counts)
            d_t = d_off + d_gen
            log(stats | gen_stats)
            if rank() == 0:
                print(
                    f"iteration {t}: kept {len(d_off)}/{len(pairs)} offline pairs (IRM >= "
                    f"{stats['irm/kept_threshold']:.3f}), {len(d_gen)} generated pairs from "
                    f"{gen_stats['data/prompts_with_pair']} prompts"
                    + (
                        "; flipped kept "
                        f"{stats['data/flipped_kept_fraction']:.2f} vs clean {stats['data/clean_kept_fraction']:.2f}"
                        if "data/flipped_kept_fraction" in stats
                        else ""
                    )
                )
        if not (args.resume and pairs_file.exists()):
            write_atomic(pairs_file, d_t)

        def save_step(step, n_steps, optimizer, scheduler):
            if args.save_every and step % args.save_every == 0 and step < n_steps or Stop.where and not args.lora_r:
                save_checkpoint(model, partial, optimizer, scheduler, step)
            stop_after_step(args.lora_r > 0)
            log.step_done(args.stop_after_steps)

        start = saved["step"] if saved else 0
        model = train_iteration(
            model, d_t, t, args, args.lr, device, tokenizer.pad_token_id, log, save_step, start, saved
        )
        model = save_atomic(model, tokenizer, out_dir / f"iter_{t}", t < args.iterations)  # masters but at the end
        model_paths[t] = str(out_dir / f"iter_{t}")
        # The reference of iteration t+1 is theta_t: its log-probs are computed at the top of the loop.
        if scorers and eval_prompts:
            evaluate_and_log(t)
        state["completed"] = t
        write_atomic(state_file, state)
        shutil.rmtree(partial, ignore_errors=True)  # only now: a kill in the evaluation resumes from it
        shutil.rmtree(out_dir / f"iter_{t - 1}" / "masters", ignore_errors=True)  # iter_t's resume from here
    log.close()
    if rank() == 0:
        print(f"final model: {model_paths[args.iterations]}")
    return state


# ---------------------------------------------------------------------------------------------
# Presets (the paper's settings per model; None fields of Args are filled from here) and their resolution

HERE = Path(__file__).resolve().parent
KIT = Path(sys.modules["selfpo_kernels"].__file__).parents[1]  # the checkout selfpo_kernels was installed from
# the shipped toy world: next to this script, else (a copied script) in that checkout
TOY = next((d / "assets" / "toy" for d in (HERE, KIT) if (d / "assets" / "toy").is_dir()), HERE / "assets" / "toy")


# Human/Assistant format for base models without a chat template (HH-RLHF style) [ours].
HH_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


# Per-model settings (SeRA App. B.2, Table 4; README "What is the paper's and what is ours"): the paper models share
# PAPER and list what differs; beta is per loss. None fields of Args are filled from here.
PAPER = dict(
    dataset="ultrafeedback", beta=dict(dpo=0.2, hinge=0.2, ipo=1.0, simpo=2.0), gamma=1.6, lr=5e-7, batch_size=8,
    global_batch=16, lora_r=0, max_length=1024, max_prompt_length=512, max_new_tokens=512, scheduler="cosine",
    long_prompts="skip", num_eval=500, scoring_batch_size=16, generation_batch_size=64,
)  # fmt: skip
MODELS = {
    "toy": PAPER
    | dict(  # the shipped tiny model; learning rate and beta scaled to it [ours]
        path=str(TOY / "model"),
        dataset="toy",
        beta=dict(dpo=0.1, ipo=1.0, hinge=0.2, simpo=2.0),
        gamma=1.0,
        lr=2e-5,
        batch_size=16,
        max_length=96,
        max_prompt_length=64,
        max_new_tokens=24,
        scheduler="constant",
        long_prompts="error",
        num_eval=200,
        scoring_batch_size=128,
        generation_batch_size=256,
    ),  # fmt: skip
    # [ours] public stand-in, already DPO-aligned on UltraFeedback; the paper SFTs TinyLlama on UltraChat itself
    # (pass that SFT checkpoint with --model ./sft)
    "tinyllama": PAPER | dict(path="TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    # base model: give it the HH format [ours]; the paper SFTs it first (pass --model ./sft)
    "pythia-2.8b": PAPER | dict(path="EleutherAI/pythia-2.8b", chat_template=HH_TEMPLATE, batch_size=4),
    "mistral-7b": PAPER
    | dict(  # alignment-handbook Zephyr DPO LoRA recipe with rank 8 (SeRA App. B.2, Table 4)
        path="alignment-handbook/zephyr-7b-sft-full",
        gradient_checkpointing=True,
        lr=5e-6,
        batch_size=4,
        beta=dict(dpo=0.01, hinge=0.01, ipo=1.0, simpo=2.0),
        lora_r=8,
        lora_alpha=128,
        lora_dropout=0.05,
        scoring_batch_size=8,
    ),  # fmt: skip
}

DATASETS = {
    "ultrafeedback": dict(path="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs"),
    "hh-rlhf": dict(path="Anthropic/hh-rlhf", split="train"),
    "tldr": dict(path="openai/summarize_from_feedback", name="comparisons", split="train"),
    "toy": dict(
        path=str(TOY / "data" / "prefs.jsonl"),
        eval=str(TOY / "data" / "eval.jsonl"),
        reward_fn=f"{TOY / 'oracle.py'}:score",
    ),
}


def resolve(args: Args) -> tuple[Args, dict]:
    preset, filled = model_preset(args, MODELS, "tinyllama")  # a custom model: tinyllama's settings
    fill = "lr batch_size global_batch max_length max_prompt_length max_new_tokens scheduler long_prompts num_eval"
    filled |= {
        k: preset[k] for k in fill.split() + ["scoring_batch_size", "generation_batch_size"] if getattr(args, k) is None
    }
    if args.beta is None:
        filled["beta"] = preset["beta"][args.loss]
    if args.gamma is None:
        filled["gamma"] = preset.get("gamma", 1.0)
    args = dataclasses.replace(args, **filled)
    if "batch_size" in filled:  # the preset's micro-batch, or the largest below it that fits this many ranks
        args = dataclasses.replace(args, batch_size=micro_batch(args.global_batch, args.batch_size))
    domains = {"iterations": ">= 1", "epochs": ">= 1", "n_cand": ">= 2", "num_pairs": ">= 2", "save_every": ">= 0"}
    domains |= {"rho_1": "(0, 1]", "rho_2": ">= 0", "gamma_e": "[0, 1]", "beta": "> 0", "gamma": ">= 0", "lr": "> 0"}
    domains |= {"batch_size": ">= 1", "global_batch": ">= 1", "sample_temperature": ">= 0", "sample_top_p": "(0, 1]"}
    check_args(
        args,
        [
            (accumulation(args.global_batch, args.batch_size) >= 1, "--global_batch must be >= 1"),
            (
                args.save_every == 0 or args.lora_r == 0,
                "--save_every is not supported with LoRA (checkpoints are per iteration)",
            ),
        ],
        domains,
    )
    return args, preset


# ---------------------------------------------------------------------------------------------
# The offline pairs D, tokenized (parse_pair reads every supported schema)


def build_dataset(rows: list[dict], source: str, tokenizer, args: Args) -> tuple[list[dict], dict]:
    pairs, counts = [], {}
    for index, pair in parse_rows(rows[: args.num_pairs] if args.num_pairs else rows, source, args, counts):
        where = f"dataset {row_name(source, index)}"
        sides = [
            fit(*encode(tokenizer, pair["prompt"], pair[side]), args, where, counts) for side in ("chosen", "rejected")
        ]
        if sides[0] is None:
            continue
        pairs.append(dict(pair, index=index, prompt_ids=sides[0][0], chosen_ids=sides[0][1], rejected_ids=sides[1][1]))
    if len(pairs) < 2:
        raise InputError(f"dataset {source}: {len(pairs)} usable pairs, need at least 2 ({counts})")
    return pairs, counts


# =============================================================================================
# RUNTIME: written in sera.py, pasted unchanged into srdpo.py, opsr.py and osp.py (do not edit it in those):
# edit it in sera.py, then run `python tests/check_copies.py --fix` (the tests fail while the four differ).
# Data, argument checks, distributed helpers, run files and logging, models, sampling, evaluation.
# =============================================================================================


class InputError(ValueError):
    """Bad user input: printed as one line, no traceback, nothing written."""


def model_preset(args, models: dict, custom: str) -> tuple[dict, dict]:
    """--model's preset (another hub id or path: preset `custom`'s, with --dataset) and the shared Args it fills."""
    if args.model not in models and not Path(args.model).expanduser().exists():
        if args.model.startswith((".", "/", "~")) or "/" not in args.model:
            raise InputError(
                f"--model: {args.model!r} is neither a preset ({', '.join(models)}), "
                "an existing local path, nor a hub id of the form org/name"
            )
    preset = dict(models[args.model]) if args.model in models else dict(models[custom], path=args.model, dataset=None)
    if args.model == "toy" and not Path(preset["path"]).exists():  # a copied script; selfpo not from a checkout
        raise InputError(
            f"--model toy: the toy world (assets/toy) is neither next to this script nor in {KIT}, where "
            "selfpo_kernels is installed from; install selfpo from its checkout (pip install -e <checkout>), copy "
            "the checkout's assets/ next to this script, or pass --model and --dataset"
        )
    preset["dataset"] = args.dataset or preset["dataset"]
    if preset["dataset"] is None:
        raise InputError("--dataset is required with a custom --model")
    paper = f"--model {args.model} (a paper preset)" if args.model in models and args.model != "toy" else None
    device = choose_device(args.device, paper)
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device == "cuda" else "float32"  # masters fp32
    filled = {"dataset": preset["dataset"], "device": device, "dtype": dtype}
    shared = dict(lora_r=0, lora_alpha=16, lora_dropout=0.0, gradient_checkpointing=False, chat_template=None)
    return preset, filled | {k: preset.get(k, v) for k, v in shared.items() if getattr(args, k) is None}


DOMAINS = {  # the options all four scripts share (check_args; each script adds its own): an interval or a bound
    **dict.fromkeys(("max_bad_fraction", "warmup_ratio"), "[0, 1]"),
    **dict.fromkeys(("max_grad_norm", "lora_alpha"), "> 0"),
    **dict.fromkeys(("lora_r", "num_eval", "eval_temperature", "seed"), ">= 0"),  # 0: "off" or "none"
    **dict.fromkeys("max_prompt_length max_new_tokens stop_after_steps dist_timeout_minutes".split(), ">= 1"),
    **dict.fromkeys(("scoring_batch_size", "generation_batch_size", "max_skipped_steps"), ">= 1"),
    "max_length": ">= 2",
    "lora_dropout": "[0, 1)",
}


def in_domain(value: float, domain: str) -> bool:
    """value in "[a, b]", "(a, b]", ... or satisfies "> x" / ">= x"."""
    if domain[0] == ">":
        return value > float(domain[2:]) if domain[1] == " " else value >= float(domain[3:])
    low, high = (float(x) for x in domain[1:-1].split(","))
    return (low < value or domain[0] == "[" and low == value) and (value < high or domain[-1] == "]" and value == high)


def check_args(args, checks: list[tuple[bool, str]], domains: dict):
    """InputError for the first option outside its domain (a list's elements each), then the first failed check."""
    for name, domain in {**DOMAINS, **domains}.items():
        values = getattr(args, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and not in_domain(value, domain):
                raise InputError(f"--{name} must be {'in ' * (domain[0] != '>')}{domain}, got {values}")
    output, template, prompts = args.output_dir, args.chat_template, args.eval_prompts
    for ok, message in [
        (not (output and Path(output).is_file()), f"--output_dir: {output!r} is a file; expected a folder"),
        (args.resume is False or output is not None, "--resume needs --output_dir of the run to continue"),
        (not (args.resume and args.overwrite), "--resume continues the run in --output_dir, --overwrite deletes it"),
        (prompts is None or Path(prompts).is_file(), f"--eval_prompts: file {prompts!r} not found"),
        (not template or "{%" in template or Path(template).is_file(), f"--chat_template: file {template!r} not found"),
        (0 < args.max_prompt_length < args.max_length, "--max_prompt_length must be in (0, --max_length)"),
        (not args.track or importlib.util.find_spec("wandb"), "--track needs wandb: pip install 'selfpo[wandb]'"),
        *checks,
    ]:
        if not ok:
            raise InputError(message)


class BadRow(InputError):
    """A degenerate row of real data (HH-RLHF has some): skipped and counted per reason by parse_rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_rows(spec: str, what: str = "--dataset") -> tuple[list[dict], str]:
    """Rows of a DATASETS preset, a .jsonl file, or by `datasets` a .json or .parquet file or save_to_disk folder."""
    import datasets

    info, formats = DATASETS.get(spec, {"path": spec}), "a .jsonl, .json or .parquet file, or a save_to_disk folder"
    if spec in DATASETS and not info["path"].endswith(".jsonl"):  # on the hub
        data = datasets.load_dataset(info["path"], info.get("name"), split=info["split"])
        record_input(what, hash_files(f["filename"] for f in data.cache_files))
        return list(data), info["path"]
    spec, path = info["path"], Path(info["path"]).expanduser()
    if not path.exists() and (spec.endswith((".jsonl", ".json", ".parquet")) or spec.startswith((".", "/", "~"))):
        raise InputError(f"{what}: path {spec!r} not found (or use a preset: {', '.join(DATASETS)})")
    if not path.exists():
        raise InputError(f"{what}: unknown preset or path {spec!r}; presets: {', '.join(DATASETS)}")
    readers = {".json": datasets.Dataset.from_json, ".parquet": datasets.Dataset.from_parquet}
    if path.is_file() and path.suffix == ".jsonl":
        data = read_jsonl(path, what)
    elif path.is_dir() or path.suffix in readers:
        try:
            data = datasets.load_from_disk(str(path)) if path.is_dir() else readers[path.suffix](str(path))
            record_input(what, hash_files(sorted(f for f in path.rglob("*") if f.is_file()) or [path]))
            data = list(data["train"] if isinstance(data, datasets.DatasetDict) else data)
        except Exception as err:  # pyarrow's, datasets' own errors: one line, theirs first
            raise InputError(f"{what}: {spec} cannot be read ({first_line(err)[:200]}); expected {formats}") from None
    else:
        raise InputError(f"{what}: {spec!r} is not {formats}")
    if not data:
        raise InputError(f"{what}: {spec} has no rows")
    return data, str(path)


def read_jsonl(path: Path, what: str) -> list[dict]:
    """JSON objects, one a line; an error names the line (or the byte that is not UTF-8), as row_name does later."""
    try:
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{what}: {path} is not UTF-8 text (byte {err.start}); expected JSON lines") from None
    record_input(what, f"{len(raw)} {hashlib.sha256(raw).hexdigest()}")
    rows, ROW_LINES[str(path)] = [], []
    for number, line in enumerate(lines, 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            raise InputError(f"{what}: {path} line {number}: not valid JSON ({err.msg})") from None
        if rows and not isinstance(rows[-1], dict):
            raise InputError(f"{what}: {path} line {number}: expected a JSON object, got {type(rows[-1]).__name__}")
        ROW_LINES[str(path)] += [number] if line.strip() else []
    return rows


ROW_LINES: dict[str, list[int]] = {}  # read_jsonl's files: each row's line (blank lines hold none)


def row_name(source, index: int) -> str:
    """Row `index` as an editor finds it: "line N" of a jsonl file, else "row N", both counted from 1."""
    lines = ROW_LINES.get(str(Path(source)))
    return f"{source} line {lines[index]}" if lines else f"{source} row {index + 1}"


def load_prompts(spec: str, what: str) -> list[str]:
    """The 'prompt' column of a jsonl file (--eval_prompts, --prompts), every row checked."""
    if not Path(spec).is_file():
        raise InputError(f"{what}: file {spec!r} not found")
    rows = read_jsonl(Path(spec), what)
    if not rows:
        raise InputError(f"{what}: {spec} has no rows; expected JSON lines with a 'prompt'")
    return [_text(row.get("prompt"), f"{what} {row_name(spec, i)}: 'prompt'") for i, row in enumerate(rows)]


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
    for i, m in enumerate(value):
        _text(m.get("role"), f"{where}[{i}].role"), _text(m.get("content"), f"{where}[{i}].content", empty)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _hh_turns(text: str, where: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ?", _text(text, where, "empty_response"))
    if len(parts) < 3 or parts[0].strip():
        raise InputError(f"{where} is not in HH-RLHF format ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [
        {"role": {"Human": "user"}.get(r, "assistant"), "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])
    ]


def parse_pair(row: dict, where: str) -> dict:
    """UltraFeedback, HH-RLHF, TL;DR or prompt/chosen/rejected rows -> {prompt (messages), chosen, rejected}."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object, got {type(row).__name__}")
    sides, columns, pair = ("chosen", "rejected"), ", ".join(sorted(row)), f"{where}: 'chosen' and 'rejected'"
    if "summaries" in row and "choice" in row:  # openai/summarize_from_feedback, comparisons
        info, summaries, choice = row.get("info") or {}, row["summaries"], row["choice"]
        post = _text(info.get("post"), f"{where}: 'info.post'")
        prompt = f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\nPOST: {post}\n\nTL;DR:"
        if choice not in (0, 1) or not isinstance(summaries, list) or len(summaries) != 2:
            raise InputError(f"{where}: 'choice' must be 0 or 1 with two 'summaries'")
        texts = [(s or {}).get("text") for s in summaries]
        texts = [_text(t, f"{where}: 'summaries[{i}].text'", "empty_response").strip() for i, t in enumerate(texts)]
        out = dict(prompt=[{"role": "user", "content": prompt}], chosen=texts[choice], rejected=texts[1 - choice])
    else:
        for column in sides:
            if row.get(column) is None:  # absent, or null (datasets fills columns other rows have)
                raise InputError(f"{where}: missing column '{column}' (columns: {columns})")
        if isinstance(row["chosen"], list) or "\n\nHuman:" in str(row["chosen"]):  # UltraFeedback / Anthropic/hh-rlhf
            if isinstance(row["chosen"], list):
                chosen, rejected = (_messages(row[s], f"{where}: '{s}'", "empty_message") for s in sides)
            else:
                chosen, rejected = (_hh_turns(row[s], f"{where}: '{s}'") for s in sides)
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise BadRow("not_ending_with_assistant", f"{pair} must end with an assistant turn")
            if chosen[:-1] != rejected[:-1]:
                raise BadRow("differ_before_last_turn", f"{pair} differ before the last assistant turn")
            out = {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
        elif row.get("prompt") is None:
            raise InputError(f"{where}: missing column 'prompt' (columns: {columns})")
        else:  # plain strings
            out = {"prompt": [{"role": "user", "content": _text(row["prompt"], f"{where}: 'prompt'")}]}
            out |= {side: _text(row[side], f"{where}: '{side}'", "empty_response") for side in sides}
        if not out["prompt"] or out["prompt"][-1]["role"] != "user":
            raise BadRow("prompt_not_ending_with_user", f"{where}: the prompt must end with a user message")
    for side in sides:
        _text(out[side], f"{where}: '{side}' response", "empty_response")
    if out["chosen"].strip() == out["rejected"].strip():
        raise BadRow("identical", f"{pair} responses are identical")
    if "flipped" in row:  # toy data: which labels were deliberately swapped
        out["flipped"] = bool(row["flipped"])
    return out


def parse_rows(rows: list[dict], source: str, args: Args, counts: dict) -> list[tuple[int, dict]]:
    """(row index, parse_pair) of the usable rows; BadRows (a repeated row too) counted in counts['skipped_<reason>'],
    at most a fraction."""
    pairs, bad, seen = [], [], {}
    for index, row in enumerate(rows):
        where = f"dataset {row_name(source, index)}"
        try:
            pair = parse_pair(row, where)
            first = seen.setdefault(hash((json.dumps(pair["prompt"]), pair["chosen"], pair["rejected"])), where)
            if first != where:
                raise BadRow("duplicate", f"{where}: the same prompt, chosen and rejected as {first}")
            pairs.append((index, pair))
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


def set_chat_template(tokenizer, template: str | None, option: str, owner: str):
    """`template` (a jinja file or the template itself) set on `tokenizer`, which must end up with one."""
    if template and "{%" not in template and not Path(template).is_file():
        raise InputError(f"{option}: file {template!r} not found")
    if template:
        tokenizer.chat_template = template if "{%" in template else Path(template).read_text()
    if not tokenizer.chat_template:
        raise InputError(f"{owner} has no chat template; pass {option} file.jinja")
    return tokenizer


def load_tokenizer(model_path: str, chat_template: str | None, args: Args | None = None):
    """The tokenizer with --chat_template and a pad token, left-padded for generation (collate pads the rest); the
    lengths in `args` checked against the model's context."""
    from transformers import AutoConfig, AutoTokenizer

    if model_path.startswith((".", "/", "~")) and not Path(model_path).expanduser().exists():
        raise InputError(f"--model: {model_path!r} not found")
    try:  # a folder without config.json or tokenizer files fails here, before the data is read
        config, tokenizer = AutoConfig.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise InputError(f"--model: no config and tokenizer load from {model_path!r} ({first_line(err)})") from None
    record_input("--model", model_digest(model_path))
    set_chat_template(tokenizer, chat_template, "--chat_template", f"--model: the tokenizer of {model_path!r}")
    context, source = model_context(config, tokenizer)
    if args is not None and max(args.max_prompt_length + args.max_new_tokens, args.max_length) > context:
        raise InputError(
            f"--max_prompt_length {args.max_prompt_length} + --max_new_tokens {args.max_new_tokens} and --max_length "
            f"{args.max_length} must fit the context of --model {model_path}: {context} tokens ({source})"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_context(config, tokenizer=None) -> tuple[float, str]:
    """The most tokens the model reads and who says so: its config, else its tokenizer where set, else none (inf)."""
    if getattr(config, "max_position_embeddings", None):
        return config.max_position_embeddings, "max_position_embeddings in its config.json"
    longest = getattr(tokenizer, "model_max_length", None) or math.inf  # transformers' "unset" is 1e30
    return (longest, "model_max_length of its tokenizer") if longest < 1e9 else (math.inf, "unknown")


def first_line(err: Exception) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def tokenize(tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text with BOS exactly once where the tokenizer's own encoding starts with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and ids[:2] == [bos, bos]:  # templates that write BOS (toy, Llama-3) and those that do not
        ids = ids[1:]
    if bos is not None and ids[:1] != [bos] and tokenizer("a")["input_ids"][:1] == [bos]:
        ids = [bos] + ids
    return ids


def encode(tokenizer, prompt: list[dict], response: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the templated prompt (up to the assistant header) and of the response (to its end-of-turn token)."""
    from jinja2 import TemplateError

    try:  # templates may refuse a conversation (mistral-instruct: no system role)
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        turn = [{"role": "assistant", "content": response}]
        full = None if response is None else tokenizer.apply_chat_template(prompt + turn, tokenize=False)
    except TemplateError as err:
        roles = [m["role"] for m in prompt]
        raise InputError(f"the chat template refuses a conversation with roles {roles}: {err}") from None
    prompt_ids = tokenize(tokenizer, prompt_text)
    if response is None:
        return prompt_ids, []
    if not full.startswith(prompt_text):
        raise InputError("the chat template renders the prompt differently with and without the assistant turn")
    # The conversation tokenized once and split at the prompt's length: the tokens a sampler writes after prompt_ids
    # (SentencePiece: 'A' after a newline, not '▁A'); where a merge crosses the boundary, the response on its own.
    full_ids = tokenize(tokenizer, full.rstrip())
    response_ids = full_ids[len(prompt_ids) :]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        response_ids = tokenizer(full[len(prompt_text) :].rstrip(), add_special_tokens=False)["input_ids"]
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
        key = "long_prompt_skipped" if args.long_prompts == "skip" else "long_prompt_truncated"
        counts[key] = counts.get(key, 0) + 1
        if args.long_prompts == "skip":
            return None
        prompt_ids = prompt_ids[-args.max_prompt_length :]
    if len(response_ids) > args.max_length - len(prompt_ids):
        counts["response_truncated"] = counts.get("response_truncated", 0) + 1
    return prompt_ids, response_ids[: args.max_length - len(prompt_ids)]


def load_reward_fn(spec: str | None, example: dict | None = None):
    """path/to/file.py:function, checked on every call (an exception, a non-number, NaN) and tried on `example`."""
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
        frames = reversed(traceback.extract_tb(err.__traceback__))
        line = getattr(err, "lineno", None) or next((f.lineno for f in frames if f.filename == str(Path(path))), "?")
        raise InputError(f"--reward_fn: {path}:{line}: {type(err).__name__}: {err}") from None
    if not callable(function := getattr(module, name, None)):
        raise InputError(f"--reward_fn: {path!r} has no function {name!r}")

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
    """(scorers: name -> score(prompts, responses), held-out prompts), each scorer tried on `example`."""
    preset = DATASETS.get(args.dataset, {})
    eval_file = args.eval_prompts or preset.get("eval")
    reward_fn = load_reward_fn(args.reward_fn or preset.get("reward_fn"), example)
    scorers = {"reward": lambda prompts, responses: list(map(reward_fn, prompts, responses))} if reward_fn else {}
    if args.reward_model:
        tokenizer = load_reward_model(args.reward_model, args.reward_chat_template)
        reward_model_ids(tokenizer, [example["prompt"][-1]["content"]], [example["chosen"]])  # its template, tried now
        scorers["rm_score"] = functools.partial(reward_model_scores, args.reward_model, tokenizer, args=args)
    return scorers, load_prompts(eval_file, "--eval_prompts")[: args.num_eval] if eval_file else []


def micro_batch(global_batch: int, most: int) -> int:
    """The largest micro-batch up to `most` dividing --global_batch over the ranks (none: accumulation() says why)."""
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    return next((b for b in range(most, 0, -1) if global_batch % (b * ranks) == 0), most)


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
    """ "cuda" where torch sees a GPU per rank; "cpu" only where nothing (a preset, --device, a driver) asks for one."""
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
    """This rank's GPU (kind "cuda") or the CPU, the process group under torchrun (NCCL on GPUs), torch seeded."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        import datetime

        gpu, timeout = device.type == "cuda", datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout, device_id=device if gpu else None)
    torch.manual_seed(seed)
    return device


def comm_device() -> torch.device:
    """Where collectives' tensors live: NCCL has no CPU, so this rank's GPU; the CPU under gloo and on one process."""
    gpu = dist.is_initialized() and dist.get_backend() != dist.Backend.GLOO
    return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")


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
    return mine + [items[-1]] * (per_rank - len(mine)), len(mine)


def shard_by_length(lengths: list[int]) -> tuple[list[int], int]:
    """This rank's indices for work that pads to its longest: sorted by length (ties in input order), dealt round-robin
    (ranks get like tokens and like batches), padded with the shortest as shard pads."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    mine = order[rank() :: world()]
    return mine + order[:1] * (math.ceil(len(order) / world()) - len(mine)), len(mine)


def gather(values: list) -> list:
    if world() == 1:
        return values
    out = [None] * world()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def gather_in_order(results: list[tuple[int, object]], n: int) -> list:
    """Every rank's (input index, result) pairs as one list in input order."""
    merged = dict(gather(results))
    return [merged[i] for i in range(n)]


def all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier():
    if world() > 1:
        dist.barrier()


class StepStats:
    """A step's statistics summed in named slots of one device tensor: one all-reduce and host copy per step."""

    def __init__(self, names, device):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, **values):
        for name, value in values.items():  # a device tensor (summed) or a number
            self.sums[self.names.index(name)] += value.detach().sum() if torch.is_tensor(value) else value


def micro_batches(model, batches: list):
    """The non-empty micro-batches of a step; FSDP2 reduce-scatters gradients after the last one only."""
    batches = [batch for batch in batches if batch]
    for index, batch in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
            model.set_requires_gradient_sync(index == len(batches) - 1)
        yield batch


class _LogLines:
    """tqdm's output as whole timestamped lines for log files (tqdm has only carriage-return refreshes)."""

    last = None

    def write(self, text: str):
        text = text.strip("\r\n")
        if text and text != self.last:  # the closing refresh repeats the last periodic line
            sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.last = text or self.last

    def flush(self):
        sys.stderr.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", inner: bool = False):
    """Rank 0's bar: tqdm on a terminal (inner ones vanish); in a log a timestamped line with elapsed time and ETA at
    the start, at most every 60 s ($SELFPO_LOG_INTERVAL) and at the end of every phase."""
    tty, every = sys.stderr.isatty(), float(os.environ.get("SELFPO_LOG_INTERVAL", 60))
    log = {} if tty else dict(file=_LogLines(), mininterval=every, maxinterval=max(every, 10), ascii=True, ncols=100)
    return tqdm(iterable, total=total, desc=desc, leave=not inner or not tty, disable=rank() != 0, **log)


class _Stamped:
    """A log file's stdout: each line starts with the time (a terminal gets the lines as they are)."""

    def __init__(self, stream):
        self.stream, self.fresh = stream, True

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            self.stream.write(time.strftime("%Y-%m-%d %H:%M:%S ") * self.fresh + line)
            self.fresh = line.endswith("\n")
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_library_bars():
    """In a log file (no terminal): the run's lines timestamped, the libraries' own bars (dataset preparation, weight
    loading and saving) off."""
    if not sys.stdout.isatty() and not isinstance(sys.stdout, _Stamped):
        sys.stdout = _Stamped(sys.stdout)
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def check_resume(args: Args):
    """--resume continues the run in --output_dir only with the arguments it started with (on any number of ranks)."""
    RunFiles.saved, RunFiles.digests, RunFiles.allow_changed = None, {}, args.allow_changed_inputs
    RunFiles.verified = set()
    if not args.resume:
        return
    saved = Path(args.output_dir) / "resolved_config.json"
    if not saved.exists():
        raise InputError(f"--resume: {saved} not found; nothing to resume")
    stored, given = read_run_file(saved), json.loads(json.dumps(dataclasses.asdict(args)))  # tuples as lists
    ignored = ("resume", "overwrite", "stop_after_steps", "output_dir", "batch_size", "device")  # moved, other ranks
    ignored += ("track", "wandb_project", "wandb_entity", "max_skipped_steps", "allow_changed_inputs")  # tolerances
    changed = sorted(k for k, v in given.items() if k not in ignored and stored.get(k) != v)
    if changed:
        raise InputError(f"--resume: arguments differ from the saved run: {', '.join(changed)}")
    RunFiles.saved = stored


class RunFiles:
    """The run's resolved_config.json on --resume (None: a fresh run), the digests of this process's inputs, the
    model folders verified (the policy and its reference load one folder: hashed once)."""

    saved, digests, allow_changed, verified = None, {}, False, set()


def record_input(what: str, digest: str):
    """An input's digest, recorded at the start (resolved_config.json); on --resume a changed one is refused."""
    RunFiles.digests[what] = digest
    started = (RunFiles.saved or {}).get("inputs", {}).get(what, digest)
    if started != digest and not RunFiles.allow_changed:
        raise InputError(
            f"--resume: {what}'s contents differ from those the run started with (digest {digest[:16]}, then "
            f"{started[:16]}); pass --allow_changed_inputs to continue on them anyway"
        )


def model_digest(path: str) -> str:
    """A hub model's commit, or a folder's names, sizes and 64 KiB at 16 places a file: cheap at 7B."""
    folder, digest = Path(path).expanduser(), hashlib.sha256()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        return f"{path}@{Path(cached).parent.name}" if isinstance(cached, str) else path
    for file in sorted(f for f in folder.iterdir() if f.is_file() and f.name != "manifest.json"):
        size = file.stat().st_size
        digest.update(f"{file.name} {size}\n".encode())
        with open(file, "rb") as f:
            for offset in range(0, size, max(1, size // 16)):
                f.seek(offset)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()


HELP_GROUPS = {  # --help's sections beside the method's own options; every flag keeps its name
    "data": "model dataset num_pairs prompts num_prompts prompt_split sft_data num_sft offline_fraction max_length "
    "max_prompt_length max_new_tokens long_prompts max_bad_fraction chat_template",
    "training": "lr lrs optimizer epochs batch_size global_batch micro_batch_size scheduler warmup_ratio max_grad_norm "
    "lora_r lora_alpha lora_dropout gradient_checkpointing dtype device save_every",
    "evaluation": "reward_fn reward_model reward_chat_template eval_prompts num_eval eval_temperature eval_every "
    "eval_pairs num_judge_eval",
    "run": "output_dir seed resume stop_after_steps track wandb_project wandb_entity dist_timeout_minutes "
    "sampler scoring_batch_size generation_batch_size judge_batch_size",
}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (tyro's help text), read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    pairs = zip(body, body[1:])
    return {a.target.id: b.value.value for a, b in pairs if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


def cli(args_type, models: dict, doc: str):
    """tyro's command line: --help opens with `doc` and shows the options in sections (the method's own, then
    HELP_GROUPS'), flags under their own names, each option a preset fills with every preset's value; parsed into
    the flat `args_type`."""
    hints, docs = typing.get_type_hints(args_type, include_extras=True), field_docs(args_type)
    groups = {title: [] for title in ("method", *HELP_GROUPS)}
    for f in dataclasses.fields(args_type):
        conf = dict(help=docs.get(f.name))
        if f.default is None and (shown := "; ".join(f"{k} {p[f.name]}" for k, p in models.items() if f.name in p)):
            conf["help_behavior_hint"] = f"(unset: the --model preset's: {shown})"
        group = next((g for g, names in HELP_GROUPS.items() if f.name in names.split()), "method")
        keep = (
            dict(default=f.default)
            if f.default_factory is dataclasses.MISSING
            else dict(default_factory=f.default_factory)
        )
        option = typing.Annotated[hints[f.name], tyro.conf.arg(**conf)]
        groups.setdefault(group, []).append((f.name, option, dataclasses.field(**keep)))
    sections = {title: dataclasses.make_dataclass(title, fields) for title, fields in groups.items() if fields}
    for section in sections.values():
        section.__doc__ = ""  # tyro titles the section by its name
    command = dataclasses.make_dataclass(
        args_type.__name__,
        [(name, tyro.conf.OmitArgPrefixes[s], dataclasses.field(default_factory=s)) for name, s in sections.items()],
    )
    parsed = tyro.cli(command, description=doc)
    return args_type(**{k: v for name in sections for k, v in vars(getattr(parsed, name)).items()})


def run_state(state_file: Path, args, fresh: dict) -> dict:
    """The run's progress (state.json) when --resume finds one, else `fresh`."""
    if not (args.resume and state_file.exists()):
        if args.resume and rank() == 0:
            print(f"resuming {state_file.parent}: nothing completed yet (no {state_file.name})")
        return fresh
    state = read_run_file(state_file)
    if rank() == 0:
        where = [f"{k} {v}" for k, v in state.items() if k in ("completed", "stage0_done", "step", "done")]
        print(f"resuming {state_file.parent}: " + ", ".join(where))
    return state


def resume_hint() -> str:
    """The command that continues an interrupted run: this interpreter (under torchrun, the launcher's command line)
    and the script as invoked, the same arguments with --resume and its folder."""
    if Logs.run_dir is None:
        return "nothing was written yet"
    argv, given = [], iter(sys.argv[1:])
    dropped = ("__resume", "__no_resume", "__overwrite", "__no_overwrite", "__output_dir", "__stop_after_steps")
    for arg in given:
        name = arg.split("=")[0].replace("-", "_")
        if name in ("__output_dir", "__stop_after_steps") and "=" not in arg:
            next(given, None)  # its value
        argv += [] if name in dropped else [arg]
    launcher = [sys.executable]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's options precede the script on its command line
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_text().split("\0")
            launcher = parent[: parent.index(sys.argv[0])]
        except (OSError, ValueError):
            launcher = ["torchrun", "..."]
    command = [*launcher, sys.argv[0], *argv, "--resume", "--output_dir", str(Logs.run_dir)]
    return f"continue with: {shlex.join(command)}"


def lock_run(out_dir: Path, args):
    """Before anything is written in out_dir, rank 0 holds an flock on its run.lock for the run (the OS drops it when
    the process ends): a second job there is refused, and so is a run without --resume into a folder holding a run
    (--overwrite empties it). Every rank raises rank 0's refusal."""
    import fcntl
    import socket

    error, Logs.lock = None, Logs.lock and Logs.lock.close()  # an earlier run of this process (tests call main())
    if rank() == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = open(out_dir / "run.lock", "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another job"
                error = f"--output_dir: {out_dir} is in use by {holder} (one job per folder)"
                lock.close()
            except OSError as err:  # a file system without locks (Lustre without -o flock): said, not refused
                print(f"{lock.name}: no lock ({err.strerror}); a second job in this folder would go unseen")
            if error is None:
                Logs.lock = lock  # (closed on a refusal: the lock goes with it)
                os.ftruncate(lock.fileno(), 0)
                os.write(lock.fileno(), f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as err:
            error = f"--output_dir: {out_dir} cannot be written ({err.strerror or err})"
        held = [name for name in ("resolved_config.json", "state.json") if (out_dir / name).exists()]
        if error is None and held and not args.resume and not args.overwrite:
            error = f"--output_dir: {out_dir} holds a run ({held[0]}); --resume continues it, --overwrite starts over"
        elif error is None and held and args.overwrite:
            for path in out_dir.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.name != "run.lock":
                    path.unlink()
            print(f"--overwrite: deleted the run in {out_dir}")
    if world() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, 0)
        error = shared[0]
    if error:
        Logs.lock = Logs.lock and Logs.lock.close()
        raise InputError(error)


class Logs:
    """Rank 0 saves the resolved config, then logs to metrics.jsonl, TensorBoard (tb/) and, with --track, wandb. Every
    record carries the run's global step (TensorBoard's and wandb's), the same for a step redone after --resume."""

    POSITION = ("iteration", "stage", "step", "aug_step")  # where in the run a record was logged
    run_dir = lock = None  # this process's run folder, once made (resume_hint names it); its lock_run file

    def __init__(self, args: Args, out_dir: Path, run_name: str):
        self.out_dir, self.step, self.writer, self.global_step, self.steps = out_dir, 0, None, 0, {}
        if rank() == 0:
            config = {**dataclasses.asdict(args), "output_dir": str(out_dir), "world_size": world()}
            config = (RunFiles.saved or config) | {"inputs": RunFiles.digests}  # a resumed run's as it started
            path = out_dir / "metrics.jsonl"
            for line in path.read_text().splitlines() if args.resume and path.exists() else []:
                with contextlib.suppress(ValueError):  # (a line a full disk cut short is passed over)
                    if "global_step" in (record := json.loads(line)):  # what a resumed run redoes keeps its number
                        self.steps[self.key(record)] = self.global_step = record["global_step"]
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f"--output_dir: {out_dir} cannot be written ({err.strerror or err})") from None
            if config != RunFiles.saved:
                write_atomic(out_dir / "resolved_config.json", config)
            print(f"run folder: {out_dir} (its resolved_config.json, metrics.jsonl, tb/)", flush=True)
            if args.track:  # before TensorBoard's writer: wandb mirrors its events (sync_tensorboard)
                import wandb

                project = args.wandb_project or os.environ.get("WANDB_PROJECT") or "selfpo"
                wandb.init(project=project, entity=args.wandb_entity, name=run_name, config=config, dir=str(out_dir),
                           sync_tensorboard=True)  # fmt: skip
            import threading

            from torch.utils.tensorboard import SummaryWriter

            hook = threading.excepthook  # TensorBoard's writer thread's error comes again in __call__: one line there
            threading.excepthook = lambda a: None if type(a.thread).__name__ == "_AsyncWriterThread" else hook(a)
            with writing(out_dir / "tb"):  # flushed: a full disk shows here
                self.writer = SummaryWriter(str(out_dir / "tb"))
                self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```")
                self.writer.flush()
        Logs.run_dir = out_dir

    def key(self, record: dict) -> str:
        """A record's place in the run and kind (its first metric): what a resumed run redoes has the same key."""
        kind = next((k for k in record if k not in self.POSITION), None)
        return json.dumps([record.get(k) for k in self.POSITION] + [kind])

    def __call__(self, metrics: dict):
        """One record, with the global step: as logged before in this run (a record redone after --resume), a new one
        for a new training step, else the last one. Its finite numbers that are no position also go to TensorBoard
        (and through it to wandb)."""
        if rank() == 0:
            if "step" in metrics or "aug_step" in metrics:  # a training step: where later records are logged
                self.global_step = self.steps.setdefault(self.key(metrics), max(self.steps.values(), default=0) + 1)
            step = self.steps.get(self.key(metrics), self.global_step)
            with writing(self.out_dir / "metrics.jsonl"), open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**metrics, "global_step": step}) + "\n")
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key not in self.POSITION and math.isfinite(value):
                        self.writer.add_scalar(key, value, step)

    def step_done(self, stop_after: int | None):
        """One more optimizer step in this process; --stop_after_steps stops after that many."""
        self.step += 1
        if stop_after is not None and self.step >= stop_after:
            raise KeyboardInterrupt(f"--stop_after_steps {stop_after} reached")

    def close(self):
        """metrics.jsonl keeps one record per position and kind: what a resumed run redid replaces the old in place."""
        if self.writer is not None:
            with writing(self.out_dir / "tb"):
                self.writer.close()
            path, records = self.out_dir / "metrics.jsonl", {}
            for line in path.read_text().splitlines() if path.exists() else []:
                try:
                    record = json.loads(line)
                except ValueError:  # a line a full disk cut short
                    continue
                records[self.key(record)] = record
            write_atomic(path, list(records.values()))
            if getattr(sys.modules.get("wandb"), "run", None) is not None:  # --track: the run's last events synced
                sys.modules["wandb"].finish()
        Logs.lock = Logs.lock and Logs.lock.close()  # the run is over (a process that ends drops its lock anyway)


def write_atomic(path: Path, obj):
    """Rank 0 writes .json, .jsonl (rows) or .pt to a .tmp renamed in once manifest.json lists it (and the last)."""
    if rank() == 0:
        if path.suffix in (".json", ".jsonl"):
            text = json.dumps(obj, indent=2) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in obj)
            data = text.encode()
        else:
            torch.save(obj, buffer := io.BytesIO())
            data = buffer.getvalue()
        tmp, manifest = path.with_name(path.name + ".tmp"), path.parent / "manifest.json"
        with writing(path, leftover=tmp):
            tmp.write_bytes(data)
            if path != manifest:
                listed = json.loads(manifest.read_text()) if manifest.exists() else {}
                versions = [f"{len(data)} {hashlib.sha256(data).hexdigest()}"] + listed.get(path.name, [])[:1]
                write_atomic(manifest, listed | {path.name: versions})
            os.replace(tmp, path)


def read_run_file(path: Path):
    """A file write_atomic wrote, parsed once its size and sha256 are found in its folder's manifest.json."""
    manifest = path.parent / "manifest.json"
    try:
        data, listed = path.read_bytes(), json.loads(manifest.read_text())
        if f"{len(data)} {hashlib.sha256(data).hexdigest()}" not in listed.get(path.name, []):
            raise InputError(f"its size and sha256 are not those {manifest.name} lists")
        if path.suffix == ".pt":
            return torch.load(io.BytesIO(data))
        return json.loads(data) if path.suffix == ".json" else [json.loads(line) for line in data.splitlines()]
    except Exception as err:  # unreadable, not listed, or (listed by another version) not parsed
        raise InputError(
            f"--resume: {path} is not as this run wrote it ({first_line(err)}): changed or damaged since (an edit, "
            "a copy, a disk fault); restore it, or start over in a new --output_dir"
        ) from None


@contextlib.contextmanager
def writing(path: Path, leftover: Path | None = None):
    """A write fault (full disk, quota, read-only) in the block as one line naming `path`, `leftover` removed."""
    try:
        yield
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit, InputError)) or not (code := write_fault(err, path.parent)):
            raise
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        raise InputError(
            f"cannot write {path}: {os.strerror(code)}; the previous checkpoint is intact: --resume continues from "
            "it once there is room (or the folder can be written)"
        ) from None


def write_fault(err: BaseException, folder: Path) -> int | None:
    """The errno of a failed write: found in the error, else (torch.save drops it) met by 1 MiB written to `folder`."""
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        if found := re.search(r"\[Errno (\d+)\]|\(os error (\d+)\)", str(err)):
            return int(found[1] or found[2])
        err = err.__cause__ or err.__context__
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        probe.write_bytes(bytes(1 << 20))
        probe.unlink()
    except OSError as fault:
        with contextlib.suppress(OSError):
            probe.unlink()
        return fault.errno


# transformers' own layers, the ones we test: no layer swapped for a Hub kernel at load time (transformers >= 5.25's
# default where the `kernels` package is installed; an offline node fails). Every from_pretrained of a model passes it.
NO_HUB_KERNELS = {"use_kernels": False}


def load_model(path: str, device: torch.device, args: Args | None = None, frozen: bool = False):
    """fp32 master weights under bf16 autocast; frozen: a copy that never trains and computes as the policy does."""
    bf16 = args is not None and args.dtype == "bfloat16"
    sharded = args is not None and world() > 1 and args.lora_r == 0  # FSDP2 (load_shards): policy and frozen copies
    held_in_bf16 = bf16 and (args.lora_r > 0 or (frozen and sharded))  # a LoRA base, a sharded frozen copy
    dtype = torch.bfloat16 if held_in_bf16 else torch.float32
    if args is not None and args.resume and Path(path).resolve().parent == Path(args.output_dir).resolve():
        if Path(path).resolve() not in RunFiles.verified:  # the run's own model folder (iter_t, stage0), as written
            verify_folder(Path(path))
            RunFiles.verified.add(Path(path).resolve())
    model, full = meta_copy(path, dtype) if sharded else (read_model(path, dtype), None)
    if frozen:  # no gradients: autocast caches a cast of every weight that requires grad
        model.requires_grad_(False).eval()
    if bf16:
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*a, **k):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return forward(*a, **k)

        model.forward = autocast_forward
    model = load_shards(shard_model(model, args), full, device) if sharded else model.to(device)
    if not frozen and (Path(path) / "masters").is_dir():  # save_atomic's: a resume at an iteration or stage boundary
        load_weights(model, Path(path) / "masters")
    return model


def read_model(path: str, dtype: torch.dtype):
    """The save_pretrained folder (or hub id) of one causal LM on the CPU, checked, or an InputError."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # a config of another architecture than the weights would otherwise train a randomly initialised model
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **NO_HUB_KERNELS
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise InputError(f"--model: {path} does not load as a causal LM ({first_line(err)})") from None
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise InputError(f"--model: {path} has no linear output embedding (lm_head) for the fused log-prob kernels")
    wrong = [f"{len(keys)} {kind.replace('_keys', '')}" for kind, keys in info.items() if keys and kind != "error_msgs"]
    if wrong:
        raise InputError(
            f"--model: the weights in {path} do not fit its config ({', '.join(wrong)} weights); expected the "
            "save_pretrained folder of one causal LM"
        )
    model.checkpoint_dtype = AutoConfig.from_pretrained(path).dtype or torch.float32  # what save_atomic writes
    return model


def meta_copy(path: str, dtype: torch.dtype):
    """Rank 0 reads the model (its InputError raised on every rank); every rank builds it on the meta device."""
    from transformers import AutoModelForCausalLM

    full, sent = None, [None]
    if rank() == 0:
        try:
            full = read_model(path, dtype)
            sent = [(full.config, full.generation_config, full.checkpoint_dtype)]
        except InputError as err:
            sent = [err]
    dist.broadcast_object_list(sent, 0)
    if isinstance(sent[0], InputError):
        raise sent[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(sent[0][0], dtype=dtype)
    model.generation_config, model.checkpoint_dtype = sent[0][1:]
    return model.eval(), full  # eval: as from_pretrained returns it


def load_shards(model, full, device: torch.device):
    """Rank 0's weights (`full`) sent tensor by tensor, each rank keeping its FSDP2 shards; rank 0's non-persistent
    buffers (rotary frequencies: not in the state dict, uninitialised by to_empty) too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if rank() == 0 else {}, options=options)
    persistent = set(model.state_dict())
    for name, buffer in [(name, b) for name, b in model.named_buffers() if name not in persistent]:
        dist.broadcast(buffer.copy_(full.get_buffer(name)) if rank() == 0 else buffer, 0)
    return model


def load_weights(model, folder: Path):
    """DCP's weights (saved on any number of ranks) into `model`, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    weights = {"model": sd.get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=str(folder))
    sd.set_model_state_dict(model, weights["model"])


def shard_model(model, args: Args):
    """FSDP2: each decoder layer, then the root, which keeps lm_head gathered for the fused kernel after forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the fp32 shards are the masters: gathered in bf16 and gradients reduced in fp32 under --dtype bfloat16
    dtypes = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.dtype == "bfloat16" else {}
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in layers] + [model]:  # the root last
        fully_shard(module, mp_policy=MixedPrecisionPolicy(**dtypes), reshard_after_forward=module is not model)
    return model


def prepare_for_training(model, args: Args):
    """LoRA adapter (--lora_r > 0), else FSDP2 under torchrun (once); gradient checkpointing on request."""
    from torch.distributed.fsdp import FSDPModule

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        try:
            import peft
        except ImportError:
            raise InputError("--lora_r > 0 needs peft: pip install 'selfpo[lora]'") from None
        lora = dict(lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules="all-linear")
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_r, task_type="CAUSAL_LM", **lora))
        for p in model.parameters() if world() > 1 else []:  # ranks' RNGs differ (generate): rank 0's adapter
            if p.requires_grad:
                dist.broadcast(p.data, 0)
    elif world() > 1 and not isinstance(model, FSDPModule):
        model = shard_model(model, args)
    return model.train()


def make_optimizer(model, lr, n_steps, args, schedule="constant", state=None, kind="adamw"):
    """AdamW (no weight decay) or RMSprop, warmup then a constant or cosine rate; `state` restores a checkpoint."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    extra = {} if kind == "rmsprop" else {"weight_decay": 0.0}
    optimizer = (torch.optim.RMSprop if kind == "rmsprop" else torch.optim.AdamW)(trainable, lr=lr, **extra)
    name = "cosine" if schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, int(args.warmup_ratio * n_steps), n_steps)
    if state is not None:  # resharded to this run's ranks by DCP
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd

        load_weights(model, Path(state["model"]))
        saved = {"optimizer": sd.get_optimizer_state_dict(model, optimizer)}
        dcp.load(saved, checkpoint_id=state["optimizer"])
        sd.set_optimizer_state_dict(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
    return trainable, optimizer, scheduler


def optimizer_step(trainable: list, optimizer, scheduler, stats: StepStats, args: Args, where: str):
    """Average LoRA gradients, clip, sum the statistics (and the ranks' pending signals) over ranks, step; a non-finite
    loss (first slot) or gradient norm skips the step (skipped_nonfinite 1), --max_skipped_steps of them in a row stop
    the run before the update."""
    Stop.steps += 1
    if (hook := os.environ.get("SELFPO_SIGNAL_AT", "")).endswith(f"@{Stop.steps}"):  # tests: SIGTERM@3, in step 3
        os.kill(os.getpid(), getattr(signal, hook.split("@")[0]))
    if world() > 1 and args.lora_r > 0:  # a replicated base: one flat all-reduce, a missing gradient adds zeros
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(trainable, torch.split(flat / world(), [g.numel() for g in grads])):
            p.grad = g.view_as(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2 DTensor
    sums = torch.cat([stats.sums, stats.sums.new_full((1,), float(Stop.signum is not None))])
    if world() > 1:  # a signal reaches ranks at different times: every rank stops after the same step
        dist.all_reduce(sums)
    *values, signalled, grad_norm = torch.cat([sums, grad_norm.reshape(1).to(sums)]).tolist()
    Stop.where = where if signalled and Stop.defer else Stop.where
    checks = (("loss", values[0]), ("gradient norm", grad_norm))
    bad = next((f"{name} ({value})" for name, value in checks if not math.isfinite(value)), "")
    n = optimizer.skipped_in_a_row = getattr(optimizer, "skipped_in_a_row", 0) + 1 if bad else 0  # same on all ranks
    if not bad:
        optimizer.step()
        scheduler.step()
    elif n >= args.max_skipped_steps:
        raise InputError(
            f"non-finite {bad} at {where}: stopping before the update ({n} in a row, --max_skipped_steps "
            f"{args.max_skipped_steps}; the last checkpoint is intact); lower --lr or --beta, or check that step's data"
        )
    elif rank() == 0:
        print(f"non-finite {bad} at {where}: skipped the step ({n} of --max_skipped_steps {args.max_skipped_steps})")
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(stats.names, values), skipped_nonfinite=int(bool(bad))), grad_norm


class Stop:
    """SIGTERM, SIGUSR1 (SLURM's --signal) or SIGINT: in a training loop the step finishes, the same one on every rank,
    and a step checkpoint is written (stop_after_step); any other phase ends at once (it is redone on resume)."""

    signum = at = where = None  # the first signal, when it came (time.monotonic), the step the run stops after
    defer, steps = False, 0  # inside signal_safe_steps; this process's optimizer steps


def on_signal(signum: int, frame):
    """A repeat within a second is the same request (torchrun forwards what its process group got too); a later
    one ends the process at once."""
    if Stop.signum is None:
        Stop.signum, Stop.at = signum, time.monotonic()
        if not Stop.defer:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name}; what it cut short is redone on resume")
    elif time.monotonic() - Stop.at > 1:
        os.write(2, f"{Path(sys.argv[0]).name}: a second {signal.Signals(signum).name}: exiting now\n".encode())
        os._exit(128 + signum)


def signal_safe_steps(steps):
    """A training loop's steps: a signal waits for the end of its step (stop_after_step). One that comes after the
    last step's statistics ends the run when the loop does."""
    Stop.defer = True
    try:
        yield from steps
    finally:
        Stop.defer = False
    if Stop.signum is not None:
        raise KeyboardInterrupt(
            f"{signal.Signals(Stop.signum).name} after the loop's last step; it is redone on resume"
        )


def stop_after_step(lora: bool):
    """Ends the run after the step a signal stopped (Stop.where), once its step checkpoint is written."""
    if Stop.where is not None:
        name = signal.Signals(Stop.signum).name if Stop.signum else "a signal to another rank"
        Stop.signum, Stop.at = Stop.signum or signal.SIGTERM, Stop.at or time.monotonic()  # a later one: a second
        kept = "no step checkpoints with LoRA: --resume redoes the steps since the last saved model"
        raise KeyboardInterrupt(f"{name} after {Stop.where}: {kept if lora else 'step checkpoint written'}")


def save_atomic(model, tokenizer, directory: Path, masters: bool = False):
    """The model as a save_pretrained folder in its checkpoint's dtype (LoRA merged: returned), by write_folder;
    masters: with the weights that dtype rounds in masters/ (DCP), from which a resume at this boundary goes on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = hasattr(model, "peft_config")
    model = model.merge_and_unload() if lora else model
    if world() > 1 and not lora:  # FSDP2: gather the full weights (to the CPU)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    dtype = getattr(model, "checkpoint_dtype", torch.float32)  # the loaded checkpoint's, not the masters'
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    check_finite(state, directory)
    masters = masters and any(p.dtype != dtype for p in model.parameters())

    def write(folder: Path):
        if masters:
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder / "masters"))
        if rank() == 0:
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            live, model.config.dtype = model.config.dtype, dtype  # save_pretrained recorded the masters' dtype
            model.config.save_pretrained(folder)
            model.config.dtype = live
            tokenizer.save_pretrained(folder)

    write_folder(directory, write)
    return model


def check_finite(state: dict, directory: Path):
    """Nothing non-finite is saved: a NaN or inf in any rank's tensors of `state` (nested) refuses the save."""
    from torch.utils._pytree import tree_leaves

    mine = [t.to_local() if hasattr(t, "to_local") else t for t in tree_leaves(state) if torch.is_tensor(t)]
    if count := int(all_sum([sum(not t.isfinite().all() for t in mine if t.is_floating_point())])[0]):
        raise InputError(
            f"{directory}: not saved: {count} tensor(s) hold NaN or inf; the previous checkpoint is intact"
        )


def write_folder(directory: Path, write, step: int | None = None):
    """`write` fills .tmp on every rank, then its manifest.json; renames swap it in: a kill leaves one whole."""
    recover_folder(directory)
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    with writing(directory, leftover=tmp), write_lines(directory, tmp):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        files = folder_hashes(tmp)
        kill_point("files")
        if rank() == 0:
            manifest = {"files": files, "step": step, "inputs": RunFiles.digests}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            mode = 0o666 & ~process_umask()
            for file in tmp.rglob("*"):  # as open() gives (save_pretrained and DCP write some through private files)
                if file.is_file():
                    file.chmod(mode)
            kill_point("manifest")
            shutil.rmtree(old, ignore_errors=True)
            if directory.exists():
                os.replace(directory, old)
            kill_point("moved")
            os.replace(tmp, directory)
            kill_point("swapped")
            shutil.rmtree(old, ignore_errors=True)
    barrier()


@contextlib.contextmanager
def write_lines(directory: Path, tmp: Path):
    """Rank 0's log of a folder write: what .tmp holds every 60 s ($SELFPO_LOG_INTERVAL, >= 1) while it lasts, then
    the size written and the time taken."""
    import threading

    start, done, every = (
        time.perf_counter(),
        threading.Event(),
        max(1.0, float(os.environ.get("SELFPO_LOG_INTERVAL", 60))),
    )

    def size(folder: Path) -> str:
        total = 0
        for file in folder.rglob("*"):
            with contextlib.suppress(OSError):  # (a file renamed as it is written)
                total += file.stat().st_size if file.is_file() else 0
        return f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"

    def beat():
        while not done.wait(every):
            print(f"writing {directory}: {size(tmp)} so far, {time.perf_counter() - start:.0f} s", flush=True)

    if rank() == 0:
        threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        done.set()
    if rank() == 0:
        print(f"wrote {directory} ({size(directory)}) in {time.perf_counter() - start:.1f} s", flush=True)


def kill_point(window: str):
    """Test hook: SELFPO_KILL_AT=<window> kills this process there, as a cluster can (tests/test_run_files.py)."""
    if os.environ.get("SELFPO_KILL_AT") == window:
        os.kill(os.getpid(), 9)


def recover_folder(directory: Path):
    """Completes a swap a kill cut: a missing folder becomes its .tmp if whole (has a manifest), else its .old."""
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    if rank() == 0 and not directory.exists() and ((tmp / "manifest.json").exists() or old.exists()):
        os.replace(tmp if (tmp / "manifest.json").exists() else old, directory)
        print(f"completed the interrupted replacement of {directory}")
    if rank() == 0:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()


def verify_folder(directory: Path) -> dict:
    """The manifest of a folder write_folder wrote, once every file's size and sha256 are found as it lists them."""
    file = directory / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"--resume: {file} cannot be read ({first_line(err)}): {directory} was not written whole by this version"
        ) from None
    found = folder_hashes(directory)
    for name in sorted(listed.keys() | found.keys()):
        if found.get(name) != listed.get(name):
            raise InputError(
                f"--resume: {directory / name} is {found.get(name, 'missing')} (size sha256), written as "
                f"{listed.get(name, 'nothing')} ({file.name}): changed or damaged since; restore it (a step checkpoint "
                "may be deleted instead: its steps are redone)"
            )
    return manifest


def folder_hashes(folder: Path) -> dict:
    """{file: "size sha256"} of a folder's files but its manifest, shared out over the ranks and 4 threads each."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")
    mine = files[rank() :: world()]
    with ThreadPoolExecutor(4) as pool:
        return dict(sorted(gather(list(zip(mine, pool.map(lambda f: hash_files([folder / f]), mine))))))


def hash_files(paths) -> str:
    """ "size sha256" of the files' bytes one after the other, read in 16 MiB blocks (~1.7 GB/s a core, SHA-NI)."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
                size += len(block)
    return f"{size} {digest.hexdigest()}"


def process_umask() -> int:
    """The umask, from /proc on Linux; elsewhere set to 0o077 for an instant to read it (a file made then is private)"""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def rng_state() -> dict:
    """This rank's generators: the CPU's and, on a GPU run, its own GPU's (so it resumes on any number of GPUs)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():  # saved by a GPU run: this rank's GPU (lazily, if need be)
        torch.cuda.set_rng_state(state["cuda"])


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    pad_sequence = torch.nn.utils.rnn.pad_sequence
    ids = [torch.tensor(prompt + response) for prompt, response in sequences]
    labels = [torch.tensor([-100] * len(prompt) + response) for prompt, response in sequences]
    batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id)}
    batch["attention_mask"] = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
    batch["labels"] = pad_sequence(labels, batch_first=True, padding_value=-100)
    return {name: value.to(device) for name, value in batch.items()}


# ---------------------------------------------------------------------------------------------
# Runtime that only some of the scripts use


def save_checkpoint(model, directory: Path, optimizer, scheduler, step: int):
    """A resumable step checkpoint without pickle: weights, optimizer (DCP: any ranks), JSON state, generators."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights, moments = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    check_finite({"model": weights, "optimizer": moments}, directory)

    def write(folder: Path):
        dcp.save({"model": weights}, checkpoint_id=str(folder / "model"))
        dcp.save({"optimizer": moments}, checkpoint_id=str(folder / "optimizer"))
        if rank() == 0:
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": world()}
            (folder / "trainer_state.json").write_text(json.dumps(state))
        save_file(rng_state(), str(folder / f"rng_rank{rank()}.safetensors"))

    write_folder(directory, write, step)


def trainer_state(directory: Path) -> dict | None:
    """save_checkpoint's state for make_optimizer (rng None on a rank the run did not have), None without one."""
    from safetensors.torch import load_file

    recover_folder(directory)
    file, generators = directory / "trainer_state.json", directory / f"rng_rank{rank()}.safetensors"
    if not directory.exists():
        return None
    verify_folder(directory)
    state = json.loads(file.read_text()) | {folder: str(directory / folder) for folder in ("model", "optimizer")}
    state["rng"] = load_file(str(generators)) if generators.exists() else None
    if rank() == 0:
        saved = f"saved on {state['world_size']} ranks, resumed on {world()}"
        print(f"resuming from the step checkpoint {directory} at step {state['step']} ({saved})")
    return state


@torch.no_grad()
def score(model, sequences: list[tuple[list[int], list[int]]], args: Args, pad_id: int, device, desc: str):
    """Summed log-probs and response lengths of (prompt_ids, response_ids) under `model`, as it trains; all ranks."""
    training, _ = model.training, model.eval()
    mine, real = shard_by_length([len(prompt) + len(response) for prompt, response in sequences])
    logps, counts = [], []
    for start in progress(range(0, len(mine), args.scoring_batch_size), desc=desc, inner=True):
        batch = collate([sequences[i] for i in mine[start : start + args.scoring_batch_size]], pad_id, device)
        out, _ = causal_lm_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps += out.tolist()
        counts += (batch["labels"][:, 1:] != -100).sum(1).tolist()
    if hasattr(model, "reshard"):  # FSDP2 keeps the root gathered after a forward without backward: 2 ranks then
        model.reshard()  # trained away from one process (tests/test_runs.py, two ranks match one process)
    model.train(training)
    merged = gather_in_order(list(zip(mine[:real], zip(logps, counts))), len(sequences))
    return tuple(torch.tensor([values[k] for values in merged], dtype=torch.float64) for k in (0, 1))


class VLLMEngine:  # --sampler vllm: this process's engine for the run, the checkpoint it holds, its longest sequence
    llm, path, max_model_len, dtype, in_process, spill = None, None, None, None, True, None


def vllm_generate(
    prompt_ids, indices, n, temperature, top_p, args, seed, model_path, desc, stop, policy=None, tokenizer=None
):
    """generate() by vLLM: one engine per process on this rank's GPU, asleep between calls where it can sleep. New
    weights: `policy`'s pushed in memory where the engine runs in this process, else read from model_path."""
    import atexit

    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        raise InputError("--sampler vllm needs vLLM: pip install 'selfpo[vllm]' (or use --sampler hf)") from None
    sleeps, longest = current_platform.is_sleep_mode_available(), max(map(len, prompt_ids))
    fresh = VLLMEngine.llm is None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM checks the free memory against gpu_memory_utilization
    if fresh:
        from transformers import AutoConfig

        start = model_path or policy.name_or_path  # its config and tokenizer (the weights pushed: model_path None)
        context = model_context(AutoConfig.from_pretrained(start))[0]  # never above the model's
        VLLMEngine.max_model_len = min(max(args.max_prompt_length, longest) + args.max_new_tokens, context)
        dtype = {"auto": "bfloat16" if torch.cuda.is_available() else "float32"}.get(args.dtype, args.dtype)
        kwargs = dict(model=start, seed=seed, gpu_memory_utilization=0.3, dtype=dtype)
        # sleep mode (CUDA): asleep at level 2 between calls (weights dropped, the trainer has the GPU), every wake-up
        # reloads the weights; refused where the platform has none (CPU). A split seeded prefill crashes on CPU.
        kwargs |= {"enable_sleep_mode": True} if sleeps else {}
        kwargs |= {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        before, threads, precision = dict(os.environ), torch.get_num_threads(), torch.get_float32_matmul_precision()
        # in this process (TRL's colocate mode): new weights go in as tensors (~1 s at 7B), not as a 14.5 GB file
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # 1: vLLM's own processes, weights by tmpfs
        VLLMEngine.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        VLLMEngine.dtype = getattr(torch, dtype)
        if VLLMEngine.in_process and world() > 1:  # torchrun's ranks: each its own engine on its own GPU (LOCAL_RANK)
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif torch.cuda.is_available():  # a one-GPU engine in its own processes takes the first it sees: every rank's 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[int(os.environ.get("LOCAL_RANK", 0))]
        gpu = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        set_threads = torch.set_num_threads
        try:  # the trainer's environment, random numbers (vLLM seeds torch), threads and matmul precision, kept
            with torch.random.fork_rng(devices=gpu):
                VLLMEngine.llm = vllm.LLM(**kwargs, max_model_len=VLLMEngine.max_model_len)
        finally:
            os.environ.clear()
            os.environ.update(before)
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it
            torch.set_num_threads(threads)
            torch.set_float32_matmul_precision(precision)
    elif sleeps:
        VLLMEngine.llm.wake_up(tags=["weights"])
    llm, plain = VLLMEngine.llm, policy is not None and not hasattr(policy, "peft_config")
    if model_path is None or not fresh and (VLLMEngine.path != model_path or sleeps):
        if plain and VLLMEngine.in_process:  # one tensor at a time, gathered from its shards, in the engine's dtype
            weights = full_weights(policy, VLLMEngine.dtype)
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            if model_path is None:  # an engine in other processes: via rank 0's tmpfs, never the run folder
                if VLLMEngine.spill is None:  # removed at exit (14.5 GB of RAM at 7B)
                    VLLMEngine.spill = Path("/dev/shm") / f"selfpo-vllm-{gather([os.getpid()])[0]}"
                    atexit.register(shutil.rmtree, VLLMEngine.spill, True)
                save_atomic(policy, tokenizer, VLLMEngine.spill)
                model_path = str(VLLMEngine.spill)
            llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
        llm.reset_prefix_cache()  # its cached prompts' keys and values were computed with the old weights
    VLLMEngine.path = model_path
    if sleeps and not fresh:
        llm.wake_up(tags=["kv_cache"])
    if longest + args.max_new_tokens > VLLMEngine.max_model_len:
        raise InputError(
            f"{desc}: a prompt of {longest} tokens + --max_new_tokens {args.max_new_tokens} is over the vLLM engine's "
            f"max_model_len {VLLMEngine.max_model_len} (--max_prompt_length + --max_new_tokens when it started, at "
            "most the model's context); shorten the prompt or raise --max_prompt_length"
        )
    # vLLM seeds sample j of a request seed + j: one seed per prompt, n apart, from the call's seed and prompt index
    sampling = dict(n=n, temperature=temperature, top_p=top_p, top_k=-1, repetition_penalty=1.0, stop_token_ids=stop)
    sampling["max_tokens"] = args.max_new_tokens
    params = [vllm.SamplingParams(**sampling, seed=seed * 1_000_003 + i * n) for i in indices]
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    if sleeps:
        llm.sleep(level=2)
    return [[(o.text.strip(), o.finish_reason == "stop") for o in r.outputs] for r in results]


def full_weights(model, dtype):
    """(name, weight) of the whole model in `dtype`, one at a time, each gathered from its FSDP2 shards (all ranks)."""
    for name, value in model.state_dict().items():
        yield name, (value.full_tensor() if hasattr(value, "full_tensor") else value).to(dtype)


@torch.no_grad()
def generate(
    model, tokenizer, prompts, n, temperature, top_p, args, device, seed, model_path=None, desc="generate", push=False
):
    """n samples per prompt as (text, stopped on an end-of-turn id), all ranks: exactly temperature and top-p. vLLM
    samples model_path, which holds `model`'s weights, or (push) `model`'s weights as they train (OSP, every step)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # often a list: Llama-3, Qwen
    stop = sorted({i for i in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id] if i is not None})
    # each rank samples its share, dealt by length in characters: a rank encodes its own prompts only
    mine, real = shard_by_length([sum(len(turn["content"]) for turn in prompt) for prompt in prompts])
    if (model_path is not None or push) and args.sampler == "vllm":  # vLLM batches by itself: the share in order
        mine = sorted(mine)
        prompt_ids = [encode(tokenizer, prompts[i])[0] for i in mine]
        vllm_args = (n, temperature, top_p, args, seed, model_path, desc, stop, model, tokenizer)
        samples = vllm_generate(prompt_ids, mine, *vllm_args)
        return gather_in_order(list(zip(mine, samples)), len(prompts))
    prompt_ids = [encode(tokenizer, prompts[i])[0] for i in mine]
    from torch.distributed.fsdp import FSDPModule

    sampler = unsharded_copy(model, args) if isinstance(model, FSDPModule) else model
    training, _ = sampler.training, sampler.eval()
    torch.manual_seed(seed + rank())
    order = sorted(range(len(mine)), key=lambda k: (len(prompt_ids[k]), mine[k]))  # batches of like lengths
    sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy; transformers fills top_k 50
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)
    sampling |= dict(max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    outputs, batch_size = {}, max(1, args.generation_batch_size // n)
    for start in progress(range(0, len(order), batch_size), desc=desc, inner=True):
        indices = order[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in indices]}, return_tensors="pt").to(device)
        # one autocast around the whole call: the bf16 casts of trainable fp32 weights are made once, not per token
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            out = sampler.generate(**enc, **sampling, num_return_sequences=n)
        for row_index, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):  # n rows per prompt, in order
            end = next((j for j, token in enumerate(row) if token in stop), None)
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            outputs.setdefault(indices[row_index // n], []).append((text, end is not None))
    sampler.train(training)
    return gather_in_order([(mine[k], outputs[k]) for k in range(real)], len(prompts))


def unsharded_copy(model, args: Args):
    """A sharded policy as a plain frozen copy in the compute dtype: HF generate would gather layers per token."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    copy.load_state_dict(dict(full_weights(model, dtype)), assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        module, _, attr = name.rpartition(".")
        copy.get_submodule(module).register_buffer(attr, buffer, persistent=False)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.requires_grad_(False).eval()


# --reward_model: a trained sequence classifier scores the held-out samples; win rates against the start


def load_reward_model(path: str, chat_template: str | None):
    """--reward_model's tokenizer, checked before anything is written: one output (num_labels 1), a chat template."""
    from transformers import AutoConfig, AutoTokenizer

    if not Path(path).expanduser().is_dir() and (path.count("/") != 1 or path.startswith((".", "/", "~"))):
        raise InputError(f"--reward_model: folder {path!r} not found")  # (nor a hub id)
    try:
        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"--reward_model: no model could be loaded from {path!r} ({first_line(err)})") from None
    if config.num_labels != 1:
        raise InputError(
            f"--reward_model: {path!r} has {config.num_labels} outputs (num_labels); expected a sequence "
            "classifier with one (AutoModelForSequenceClassification, num_labels=1)"
        )
    owner = f"--reward_model: the tokenizer of {path!r}"
    return set_chat_template(tokenizer, chat_template, "--reward_chat_template", owner)


def reward_model_ids(tokenizer, prompts: list[str], responses: list[str]) -> list[list[int]]:
    """Each (prompt, response) as a user and an assistant turn in the reward model's own chat template."""
    from jinja2 import TemplateError

    turns = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    try:
        return [tokenize(tokenizer, tokenizer.apply_chat_template(turn, tokenize=False)) for turn in turns]
    except TemplateError as err:
        raise InputError(f"--reward_model: its chat template refuses a user and an assistant turn: {err}") from None


@torch.no_grad()
def reward_model_scores(path, tokenizer, prompts: list[str], responses: list[str], args, device=None) -> list[float]:
    """The reward model's scores, all ranks; loaded for this call only (at 7B it would hold memory in training)."""
    from transformers import AutoModelForSequenceClassification

    if device is None:  # this rank's: init_device sets it after the scorer is made
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    ids = reward_model_ids(tokenizer, prompts, responses)
    mine, real = shard_by_length(list(map(len, ids)))  # batches of like lengths
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.random.fork_rng(devices=[]):  # loading draws nothing from the run's random numbers
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **NO_HUB_KERNELS)
    model, pad_id, scores = model.to(device).eval(), getattr(model.config, "pad_token_id", None), []
    for start in progress(range(0, len(mine), args.scoring_batch_size), desc="reward model", inner=True):
        batch = [ids[i] for i in mine[start : start + args.scoring_batch_size]]
        if pad_id is None:  # without a pad id the model reads the last token: pad with one no sequence here ends on
            model.config.pad_token_id = min(set(range(len(batch) + 1)) - {seq[-1] for seq in batch})
        width, pad = max(map(len, batch)), model.config.pad_token_id  # on the right: the classifier reads its token
        input_ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in batch], device=device)
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        scores += logits[:, 0].float().tolist()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return gather_in_order(list(zip(mine[:real], scores)), len(ids))


def win_rate(scores: list[float], start_scores: list[float]) -> tuple[float, float, float]:
    """The share of samples that beat the start's (a tie 1/2) and its 95% Wilson interval (conservative with ties)."""
    n, z = len(scores), 1.959964  # the normal distribution's 97.5% quantile
    p = sum((a > b) + 0.5 * (a == b) for a, b in zip(scores, start_scores)) / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, center - half), min(1.0, center + half)


def pairwise_agreement(scores, start_scores, gold, gold_start) -> float:
    """How often `scores` order a sample and the start's as `gold` does (a tie 1/2), where gold differs; else NaN."""
    pairs = [(a - b, g - h) for a, b, g, h in zip(scores, start_scores, gold, gold_start) if g != h]
    return sum((d > 0) == (gd > 0) if d != 0 else 0.5 for d, gd in pairs) / len(pairs) if pairs else float("nan")


def wins(metrics: dict) -> str:
    """ ", win rate p [lo, hi]" of an evaluation's metrics, or nothing without a win rate."""
    if "eval/win_rate" not in metrics:
        return ""
    return ", win rate {:.3f} [{:.3f}, {:.3f}]".format(*(metrics[f"eval/win_rate{k}"] for k in ("", "_lo", "_hi")))


def evaluate(model, tokenizer, eval_prompts, scorers, args, device, model_path=None, start_file=None, is_start=False):
    """(First scorer's mean, metrics) of one sample per held-out prompt, with win rates against the start's samples."""
    prompts, seed = [[{"role": "user", "content": p}] for p in eval_prompts], args.seed + 10_000
    samples = generate(model, tokenizer, prompts, 1, args.eval_temperature, 1.0, args, device, seed, model_path, "eval")
    responses = [s[0][0] for s in samples]
    scores = {name: scorer(eval_prompts, responses) for name, scorer in scorers.items()}
    metrics = {f"eval/{name}": sum(values) / len(values) for name, values in scores.items()}
    start = {"responses": responses, "scores": scores}
    if is_start and start_file is not None:
        write_atomic(start_file, start)
    elif not is_start:
        start = read_run_file(start_file) if start_file is not None and start_file.exists() else None
    if start is not None:
        judge, old = "rm_score" if "rm_score" in scores else next(iter(scores)), start["scores"]
        rate = win_rate(scores[judge], old[judge])
        metrics.update(zip(("eval/win_rate", "eval/win_rate_lo", "eval/win_rate_hi"), rate))
        if "rm_score" in scores and "reward" in scores:  # the proxy against gold on the run's own samples
            metrics["eval/reward_win_rate"] = win_rate(scores["reward"], old["reward"])[0]
            agreement = pairwise_agreement(scores["rm_score"], old["rm_score"], scores["reward"], old["reward"])
            metrics["eval/rm_oracle_agreement"] = agreement
    metrics["eval/response_words"] = sum(len(r.split()) for r in responses) / len(responses)
    if start is not None:
        metrics["eval/start_response_words"] = sum(len(r.split()) for r in start["responses"]) / len(start["responses"])
    return metrics[f"eval/{next(iter(scores))}"], metrics


if __name__ == "__main__":
    script = Path(__file__).name
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop_signal, on_signal)
    try:
        main(cli(Args, MODELS, __doc__))
    except InputError as err:
        sys.exit(f"{script}: error: {err}")
    except KeyboardInterrupt as err:  # (every rank stops at the same step: rank 0 says it)
        if rank() == 0:
            print(f"{script}: interrupted{f' ({err})' if str(err) else ''}; " + resume_hint(), file=sys.stderr)
        sys.exit(128 + (Stop.signum or signal.SIGINT))  # the shell's convention: SIGINT 130, SIGUSR1 138, SIGTERM 143
    finally:
        if VLLMEngine.llm is not None:  # an engine in this process takes its process groups (and torch's) down first
            VLLMEngine.llm.llm_engine.engine_core.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
