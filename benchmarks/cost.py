"""What each paper preset's run costs on H100s, predicted before renting: hours per phase on 1 and 8 GPUs.

    python benchmarks/cost.py                  # every non-toy preset of the four scripts, 1 and 8 GPUs, hf and vllm
    python benchmarks/cost.py --json           # the same rows as JSON (script, preset, gpus, sampler, hours, ...)
    python benchmarks/cost.py --markdown       # one line per preset: the README's table
    python benchmarks/cost.py --only osp --gpus 8 --sampler vllm --set steps=2000   # one script, a what-if

The work is counted from each script's own settings (`script.resolve(script.Args(model=preset))`, at the run's
number of ranks) and its main() loop, as the code runs today: samples x generated tokens, sequences x tokens scored
or judged, tokens trained, bytes written by exports, step checkpoints and the fp32 masters kept at iteration and
stage boundaries, bytes read by loads and (LoRA) sampler reloads, bytes gathered to sample (HF under FSDP2; vLLM's
in-memory weight push). The dataset sizes are the published row counts; the average token lengths are assumptions.
The work is divided by THROUGHPUT, the one table of rates, each figure marked published, measured (on a GPU) or
assumed, with its source. Phases run one after another (the scripts' ranks move in lockstep), the work of a phase
split evenly over the ranks. Whether a preset fits: the fake-GPU dry run's per-rank peak where it has the (preset,
ranks) pair (benchmarks/results/dryrun-*.txt, the newest), otherwise a lower bound (weights, gradients, optimizer
state and a frozen reference, sharded by FSDP2 over the ranks): over 74.5 GiB is "no", under is "unchecked".
Nothing here needs a GPU or the fake-GPU virtualenv.

Not counted: evaluation (the paper presets run none: no held-out prompts or reward function for their datasets),
the LoRA adapters' extra kernels in HF sampling, FSDP2's per-step collectives, data loading and tokenization.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCRIPTS = ("sera", "opsr", "osp", "srdpo")
GIB = 1 << 30
GPU_GIB = 74.5  # 80 GB per H100, the dry run's --limit_gib


@dataclass(frozen=True)
class Figure:
    value: float
    status: str  # published | measured | assumed
    source: str


# The rates, for Mistral-7B (7.24 B parameters, 32 layers) in bf16 on one H100 SXM. Other sizes: SCALING.
# Replace an assumed figure by a GPU measurement (status "measured", with the command and the date).
THROUGHPUT = {
    "train_tokens_per_s": Figure(
        5762,
        "published",
        "torchtitan docs/performance.md Table 1 (Dec 2024): Llama 3.1 8B, FSDP2 on 8 H100 (96 GB HBM2e, 500 W), "
        "selective activation checkpointing, local batch 2 x 8192 tokens, no torch.compile: 5,762 tokens/s/GPU. "
        "Used as is for a full fine-tune with gradient checkpointing (the planning estimate was 5-6k); ours runs full "
        "recompute, sequences of <= 2048 tokens and small micro-batches, which a GPU measurement should check",
    ),
    "lora_train_speedup": Figure(
        4 / 3,
        "assumed",
        "LoRA (frozen base): no weight gradients for the base, so forward + recompute + backward is ~3 forward "
        "passes instead of ~4",
    ),
    "forward_tokens_per_s": Figure(
        20000,
        "assumed",
        "no-grad scoring forward (score, the judge, Sr-DPO's refinement pass, prefill): a planning estimate, "
        "~20k tokens/s/GPU, ~3.5x the training figure (a forward is ~1/4 of forward + recompute + backward)",
    ),
    "hf_decode_step_s": Figure(
        0.0275,
        "assumed",
        "HF generate, eager, one decode step at batch <= 64: a planning estimate of 25-30 ms (launch-bound, so "
        "about the same at smaller batches)",
    ),
    "vllm_tokens_per_s": Figure(
        7000,
        "assumed",
        "vLLM generated tokens/s per GPU at gpu_memory_utilization 0.3 (~9 GB of KV cache, ~64 sequences in "
        "flight): a planning estimate of 6-8k",
    ),
    "vllm_decode_step_s": Figure(
        0.007,
        "assumed",
        "vLLM decode step with few sequences in flight (CUDA graphs): the weights read once per step, 14.5 GB at "
        "H100 SXM's published 3.35 TB/s = 4.3 ms, plus overhead; a call lasts at least max_new_tokens steps",
    ),
    "vllm_start_s": Figure(90, "assumed", "vLLM engine start-up once per process (load, profiling, CUDA graphs)"),
    "disk_write_bytes_per_s": Figure(
        1.0e9,
        "assumed",
        "exports and step checkpoints to the run folder on shared storage, all ranks together: 1 GB/s",
    ),
    "disk_read_bytes_per_s": Figure(
        2.0e9, "assumed", "checkpoint reads (model loads, vLLM reloads), per rank, in parallel: 2 GB/s"
    ),
    "gather_bytes_per_s": Figure(
        1.0e11,
        "assumed",
        "full weights gathered from FSDP2 shards (to sample, or to the host to save): 100 GB/s effective, tensor "
        "by tensor over NVLink / PCIe",
    ),
    "padding_factor": Figure(
        1.5,
        "assumed",
        "sequences batched unsorted (training micro-batches, Sr-DPO's refinement forward) pad to their longest "
        "member: a planning estimate of 1.5-2x on UltraFeedback's length spread (1.57 for uniform 3-90 token "
        "sequences in batches of 8, tests/test_paper_scale.py)",
    ),
    "sorted_padding_factor": Figure(
        1.08,
        "assumed",
        "scoring, the reward model and the OSP judge batch each rank's share sorted by length (the shares dealt by "
        "length across ranks): a planning estimate of 1.05-1.1x at the scripts' batch sizes on a large set "
        "(1.07 for 160 toy sequences of 3-90 tokens in batches of 8 on 2 ranks, tests/test_paper_scale.py)",
    ),
}

# How the rates move with the model's size (the throughput table is for Mistral-7B).
SCALING = {
    "compute": Figure(
        1.0, "assumed", "token rates (train, forward, vLLM) scale with 7.24e9 / parameters (compute-bound)"
    ),
    "decode": Figure(1.0, "assumed", "HF decode step time scales with layers / 32 (kernel launches per layer)"),
}

# Model sizes of the presets' hub ids, from their config.json (published): layers, hidden, intermediate, vocabulary,
# key-value heads / heads, weight matrices per MLP (3 gated, 2 GPT-NeoX). Parameters are counted from these.
MODELS = {
    "alignment-handbook/zephyr-7b-sft-full": (32, 4096, 14336, 32000, 8 / 32, 3),
    "mistralai/Mistral-7B-Instruct-v0.2": (32, 4096, 14336, 32000, 8 / 32, 3),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (22, 2048, 5632, 32000, 4 / 32, 3),
    "EleutherAI/pythia-2.8b": (32, 2560, 10240, 50304, 1.0, 2),
}
REFERENCE_PARAMS, REFERENCE_LAYERS = 7.24e9, 32


@dataclass(frozen=True)
class Data:
    rows: int  # published
    source: str
    prompt_tokens: int  # assumed averages (Mistral / Llama tokenizers)
    response_tokens: int  # the dataset's responses
    sample_tokens: int  # the policy's own samples before --max_new_tokens cuts them


DATASETS = {
    "ultrafeedback": Data(
        61_135,
        "HuggingFaceH4/ultrafeedback_binarized train_prefs: 61,135 rows "
        "(huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized, README dataset_info)",
        180,
        300,
        350,
    ),
    "mistral-instruct-ultrafeedback": Data(
        59_700,
        "princeton-nlp/mistral-instruct-ultrafeedback train: 59.7k rows (the dataset viewer's rounded count)",
        180,
        350,
        400,
    ),
    "hh-rlhf": Data(
        160_800,
        "Anthropic/hh-rlhf train: 160,800 rows (161k in its viewer; 160,800 in "
        "trl-internal-testing/hh-rlhf-trl-style's README, a reformatting of the same split)",
        150,
        70,
        200,
    ),
}
LENGTHS = Figure(
    0, "assumed", "average prompt / response / sample tokens per dataset (DATASETS); every prompt assumed distinct"
)
JUDGE_TEMPLATE_TOKENS = 70  # assumed: osp's judge template around {x}, {a}, {b}
OPSR_PREFIX_TOKENS = 20  # assumed: opsr's "merits a perfect score of s out of 10" prefix
TOKENS_PER_WORD = 1.3  # assumed: Sr-DPO's refinement prompt, counted in words


def params(path: str) -> float:
    layers, h, inter, vocab, kv, mlp = MODELS[path]
    return layers * (2 * h * h + 2 * h * h * kv + mlp * h * inter) + 2 * vocab * h


@dataclass
class Rates:
    """THROUGHPUT for one model size."""

    train: float
    forward: float
    hf_step: float
    vllm: float
    vllm_step: float
    vllm_start: float
    write: float
    read: float
    gather: float
    lora: float
    pad: float
    sorted_pad: float

    @classmethod
    def for_model(cls, path: str) -> Rates:
        f = {k: v.value for k, v in THROUGHPUT.items()}
        compute, layers = REFERENCE_PARAMS / params(path), MODELS[path][0] / REFERENCE_LAYERS
        return cls(
            train=f["train_tokens_per_s"] * compute,
            forward=f["forward_tokens_per_s"] * compute,
            hf_step=f["hf_decode_step_s"] * layers,
            vllm=f["vllm_tokens_per_s"] * compute,
            vllm_step=f["vllm_decode_step_s"] / compute,
            vllm_start=f["vllm_start_s"],
            write=f["disk_write_bytes_per_s"],
            read=f["disk_read_bytes_per_s"],
            gather=f["gather_bytes_per_s"],
            lora=f["lora_train_speedup"],
            pad=f["padding_factor"],
            sorted_pad=f["sorted_padding_factor"],
        )


class Ledger:
    """Seconds per phase and the work counted, for one run on `gpus` ranks."""

    def __init__(self, rates: Rates, gpus: int, args, n_params: float):
        self.r, self.g, self.args, self.params = rates, gpus, args, n_params
        self.seconds: dict[str, float] = {}
        self.work: dict[str, float] = {}
        self.vllm_started = False

    def add(self, phase: str, seconds: float, **work):
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        for name, value in work.items():
            self.work[f"{phase}/{name}"] = self.work.get(f"{phase}/{name}", 0) + value

    def per_rank(self, n: int) -> int:
        return math.ceil(n / self.g)

    def forward(self, phase: str, sequences: int, tokens: float, sorted_by_length: bool = True):
        """No-grad forwards of `sequences` sequences of `tokens` tokens, split over the ranks, padded in batches
        sorted by length (score, the judge) or not (a training micro-batch's)."""
        seconds = self.per_rank(sequences) * tokens / self.r.forward
        self.add(phase, seconds, sequences=sequences, tokens=sequences * tokens)
        self.add("padding", seconds * ((self.r.sorted_pad if sorted_by_length else self.r.pad) - 1))

    def train(self, phase: str, sequences: int, tokens: float, lora: bool, reference_forward: bool = False):
        """Forward + backward (with the scripts' gradient checkpointing) of `sequences` sequences, padded."""
        seconds = self.per_rank(sequences) * tokens / (self.r.train * (self.r.lora if lora else 1.0))
        if reference_forward:  # osp: the frozen reference in the same fused call
            seconds += self.per_rank(sequences) * tokens / self.r.forward
        self.add(phase, seconds, sequences=sequences, tokens=sequences * tokens)
        self.add("padding", seconds * (self.r.pad - 1))

    def sample(self, prompts: int, n: int, prompt_tokens: float, new_tokens: float, weight_bytes: float):
        """--sampler hf or vllm: n samples of each prompt, each rank its share. vLLM: new weights at every call (sleep
        mode drops them), pushed from memory into the engine in the trainer's process, each fp32 master gathered from
        its FSDP2 shards (one rank: cast in place); a LoRA policy's are read from its export (`weight_bytes`). HF
        samples the policy in memory, through an unsharded copy gathered from the FSDP2 shards on more than one rank
        (full fine-tuning)."""
        a, mine = self.args, self.per_rank(prompts)
        generated = prompts * n * new_tokens
        if a.sampler == "vllm":
            if not self.vllm_started:
                self.add("load", self.r.vllm_start, vllm_starts=1)
                self.vllm_started = True
            if a.lora_r == 0:
                self.gather("sync", (4 if self.g > 1 else 2) * self.params)
            else:
                self.read("sync", weight_bytes)
            seconds = max(mine * n * new_tokens / self.r.vllm, a.max_new_tokens * self.r.vllm_step)
            seconds += mine * prompt_tokens / self.r.forward  # prefill, shared by the n samples
            self.add("sample", seconds, generated_tokens=generated, samples=prompts * n)
            return
        if self.g > 1 and a.lora_r == 0:
            self.gather("sync", 4 * self.params)  # unsharded_copy: every fp32 master, gathered on every rank
        calls = math.ceil(mine / max(1, a.generation_batch_size // n))
        steps = calls * a.max_new_tokens  # a batch decodes until its longest sample stops: max_new_tokens
        seconds = steps * self.r.hf_step + mine * n * prompt_tokens / self.r.forward
        self.add("sample", seconds, generated_tokens=generated, samples=prompts * n, decode_steps_per_rank=steps)

    def read(self, phase: str, nbytes: float):
        self.add(phase, nbytes / self.r.read, bytes_read=nbytes)

    def write(self, phase: str, nbytes: float):
        self.add(phase, nbytes / self.r.write, bytes_written=nbytes)

    def gather(self, phase: str, nbytes: float):
        self.add(phase, nbytes / self.r.gather, bytes_gathered=nbytes)

    def export(self, phase: str = "save", masters: bool = False):
        """save_atomic: the full weights to rank 0's host (from the FSDP2 shards: fp32), written in the checkpoint's
        dtype (bf16/fp16 for every preset model); at a boundary a later iteration or stage resumes from, a full
        fine-tune's fp32 masters beside them (DCP, each rank its shard; a LoRA base is exact in bf16)."""
        sharded = self.g > 1 and self.args.lora_r == 0
        self.gather(phase, (4 if sharded else 2) * self.params)
        self.write(phase, (2 + (4 if masters and self.args.lora_r == 0 else 0)) * self.params)


# ---------------------------------------------------------------------------------------------------------------
# Each script's main() loop, as work (read the script's main() beside it)


def sera_work(led: Ledger, a, data: Data):
    """Iterations t = 1..T: score D (2N sequences) under theta_{t-1}; from t = 2 sample n_cand per distinct prompt
    from theta_{t-1}, score the samples under every model r~_{t-1} needs (the older ones loaded from their exports);
    train one epoch (x --epochs) on D_t = k1 offline + k2 generated pairs; export iter_t (with the masters but
    the last)."""
    n = min(data.rows, a.num_pairs) if a.num_pairs else data.rows
    k1 = math.ceil(a.rho_1 * n)
    k2 = n - k1 if a.rho_2 is None else math.ceil(a.rho_2 * n)
    p, offline, new = data.prompt_tokens, data.prompt_tokens + data.response_tokens, sample_len(a, data)
    lora = a.lora_r > 0
    led.read("load", 2 * led.params)
    for t in range(1, a.iterations + 1):
        led.forward("score", 2 * n, offline)
        pairs, tokens = n, offline
        if t >= 2:
            if k2 > 0:
                led.sample(n, a.n_cand, p, new, 2 * led.params)
                needed = reward_models(t - 1, a)
                for j in needed:
                    if j != t - 1:
                        led.read("load", 2 * led.params)  # load_model(model_paths[j], frozen=True)
                    led.forward("score", n * a.n_cand, p + new)
            generated = min(k2, n)  # at most one pair per distinct prompt
            pairs = k1 + generated
            tokens = (k1 * offline + generated * (p + new)) / pairs
        used = pairs * a.epochs // a.global_batch * a.global_batch or pairs * a.epochs
        led.train("train", 2 * used, tokens, lora)
        led.export(masters=t < a.iterations)


def reward_models(j: int, a) -> set[int]:
    """The models r~_j needs (sera's ALGO LOGIC): j and its reference, and j-1's for eq. 7 when gamma_e > 0."""
    needed = {j} if a.loss == "simpo" else {j, j - 1 if a.irm_reference == "previous" else 0}
    if j >= 2 and a.gamma_e > 0:
        needed |= reward_models(j - 1, dataclasses.replace(a, gamma_e=0.0))
    return needed


def opsr_work(led: Ledger, a, data: Data):
    """m = 0: one SimPO epoch on the offline pairs (unless --init_checkpoint); m = 1..M: one chosen-prefix and one
    rejected-prefix sample per pool prompt from pi_{m-1} (pushed into the vLLM engine at each call), the
    reference scored under --loss dpo, one epoch on the pairs (all kept: an upper bound); export iter_m (with the
    masters but the last)."""
    n = min(data.rows, a.num_pairs) if a.num_pairs else data.rows
    pool = min(n, a.num_prompts) if a.num_prompts else n
    offline, new = data.prompt_tokens + data.response_tokens, sample_len(a, data)
    led.read("load", 2 * led.params)
    for m in range(0 if a.init_checkpoint is None else 1, a.iterations + 1):
        if m == 0:
            pairs, tokens = n, offline
        else:
            prompts = pool if a.prompt_split == "full" else pool * m // 3 - pool * (m - 1) // 3
            for _ in ("chosen", "rejected"):
                led.sample(prompts, 1, data.prompt_tokens + OPSR_PREFIX_TOKENS, new, 2 * led.params)
            pairs, tokens = prompts, data.prompt_tokens + new
            if a.loss == "dpo":
                led.forward("score", 2 * pairs, tokens)
        used = pairs * a.epochs // a.global_batch * a.global_batch or pairs * a.epochs
        led.train("train", 2 * used, tokens, a.lora_r > 0)
        led.export(masters=m < a.iterations)


def srdpo_work(led: Ledger, a, data: Data):
    """Reference log-probs once on both contexts (4 sequences per pair, held-out ones too); one pass (x --epochs) of
    training, each micro-batch with a no-grad forward on the refinement-prompted pairs (--lam > 0; the shared prefix
    once, so about a plain forward); export final; the held-out pairs scored again."""
    held_out = a.eval_pairs
    n = data.rows - held_out
    n = min(n, a.num_pairs) if a.num_pairs else n
    plain = data.prompt_tokens + data.response_tokens
    refine = len(a.refine_prompt.split()) * TOKENS_PER_WORD
    led.read("load", 2 * led.params)
    led.forward("score", 2 * (n + held_out), plain)
    led.forward("score", 2 * (n + held_out), plain + refine)
    used = n * a.epochs // a.global_batch * a.global_batch or n * a.epochs
    if a.lam > 0:
        led.forward("refine", 2 * used, plain, sorted_by_length=False)
    led.train("train", 2 * used, plain, a.lora_r > 0)
    led.export()
    if held_out:
        led.forward("score", 2 * held_out, plain)


def osp_work(led: Ledger, a, data: Data):
    """Stage 0: one --aug_batch_size step per batch of judge instances (two per seed pair) and SFT examples, for
    --aug_epochs; export stage0 with the masters; the frozen reference loaded. Stage 1, every step: K samples of
    --prompts_per_step prompts (vLLM: the policy's weights pushed from memory into every rank's engine, each step),
    the policy judges its samples (in batches sorted by length), SPCE on floor(K/2) pairs per prompt with the
    reference in the same call; a step checkpoint (fp32 masters + AdamW state) every --save_every steps; export
    final. The judge report on the held-out pairs at sft, augmented and final."""
    p, new = data.prompt_tokens, sample_len(a, data)
    lora, held_out = a.lora_r > 0, a.num_judge_eval
    seeds = math.ceil(a.offline_fraction * (data.rows - held_out))
    judge_offline = JUDGE_TEMPLATE_TOKENS + p + 2 * data.response_tokens + 1
    led.read("load", 2 * led.params)
    reports = 2 if a.skip_augmentation else 3
    if held_out:
        led.forward("judge", 2 * held_out * reports, judge_offline)
    if not a.skip_augmentation:
        sft = min(seeds, a.num_sft) if a.num_sft else seeds
        examples = 2 * seeds + sft
        mean = (2 * seeds * judge_offline + sft * (p + data.response_tokens)) / examples
        used = examples // a.aug_batch_size * a.aug_batch_size * a.aug_epochs
        led.train("train", used, mean, lora)
        led.export(masters=True)
    if not lora:
        led.read("load", 2 * led.params)  # the frozen reference
    pool = min(data.rows, a.num_prompts) if a.num_prompts else data.rows
    steps = a.steps or max(1, pool // a.prompts_per_step)
    pps, half = a.prompts_per_step, a.k // 2
    if a.rank_by == "baseline":  # 2(K-1) ranking comparisons; the formed pairs without the baseline: 2 more each
        comparisons = 2 * (a.k - 1) + 2 * half * (1 - 2 / a.k)  # the baseline is in a pair unless it ranks middle
    else:
        comparisons = a.k * (a.k - 1)
    for _ in range(steps):
        led.sample(pps, a.k, p, new, 2 * led.params)
        led.forward("judge", round(pps * comparisons), JUDGE_TEMPLATE_TOKENS + p + 2 * new + 1)
        led.train("train", 2 * pps * half, p + new, lora, reference_forward=True)
    if a.save_every:
        checkpoints = (steps - 1) // a.save_every
        led.write("save", checkpoints * (4 + 8) * led.params)  # DCP: the fp32 masters and AdamW's two moments
    led.export()


def sample_len(a, data: Data) -> int:
    return min(data.sample_tokens, a.max_new_tokens)


WORK = {"sera": sera_work, "opsr": opsr_work, "osp": osp_work, "srdpo": srdpo_work}


# ---------------------------------------------------------------------------------------------------------------
# Settings, memory, rows


def load_script(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


@contextlib.contextmanager
def world_size(gpus: int):
    """resolve() reads WORLD_SIZE (the micro-batch that divides the global batch over this many ranks)."""
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(gpus)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = before


def settings(module, preset: str, gpus: int, sampler: str | None, overrides: dict):
    """The script's own resolved Args for this preset at `gpus` ranks (the stable API: Args, resolve)."""
    fields = {f.name for f in dataclasses.fields(module.Args)}
    given = {k: v for k, v in overrides.items() if k in fields} | ({"sampler": sampler} if sampler else {})
    with world_size(gpus):
        args, found = module.resolve(module.Args(model=preset, device="cpu", **given))
    return args, found


def dry_run_peaks(path: Path | None = None) -> dict:
    """(script, preset, ranks) -> (peak GiB per rank, fits) from the newest dry-run results file."""
    files = sorted(RESULTS.glob("dryrun-*.txt")) if path is None else [path]
    peaks = {}
    for line in files[-1].read_text().splitlines() if files else []:
        m = re.match(r"(\w+) (\S+) ranks=(\d+): peak ([\d.]+) GiB/rank .*?\| (fits|OVER [\d.]+) \|", line)
        if m:
            peaks[(m[1], m[2], int(m[3]))] = (float(m[4]), m[5] == "fits")
    return peaks


def state_gib(script: str, a, n_params: float, gpus: int) -> float:
    """A lower bound per rank: fp32 masters + gradients + optimizer state (FSDP2 shards them), or a LoRA run's
    replicated bf16 base; osp's frozen reference (fp32 on one process, sharded bf16 on several)."""
    if a.lora_r > 0:
        total = 2 * n_params
    else:
        optimizer = 4 if getattr(a, "optimizer", "adamw") == "rmsprop" else 8
        total = (4 + 4 + optimizer) * n_params / gpus
        if script == "osp":
            total += 4 * n_params if gpus == 1 else 2 * n_params / gpus
    return total / GIB


def fit(script: str, preset: str, a, n_params: float, gpus: int, peaks: dict) -> tuple[str, str]:
    if (script, preset, gpus) in peaks:
        peak, fits = peaks[(script, preset, gpus)]
        return ("yes" if fits else "no"), f"dry run {peak:.1f} GiB"
    bound = state_gib(script, a, n_params, gpus)
    return ("no" if bound > GPU_GIB else "unchecked"), f">= {bound:.1f} GiB"


def estimate(
    script: str,
    preset: str,
    gpus: int,
    sampler: str | None = None,
    overrides: dict | None = None,
    peaks: dict | None = None,
) -> dict:
    """One row: the run's hours per phase on `gpus` H100s, its total and dominant phase, the work counted."""
    module = load_script(script)
    a, found = settings(module, preset, gpus, sampler, overrides or {})
    if a.dataset not in DATASETS:
        raise SystemExit(f"cost.py: no published size for dataset {a.dataset!r} (known: {', '.join(DATASETS)})")
    if found["path"] not in MODELS:
        raise SystemExit(f"cost.py: no size for model {found['path']!r} (known: {', '.join(MODELS)})")
    n_params = params(found["path"])
    fits, memory = fit(script, preset, a, n_params, gpus, dry_run_peaks() if peaks is None else peaks)
    led = Ledger(Rates.for_model(found["path"]), gpus, a, n_params)
    WORK[script](led, a, DATASETS[a.dataset])
    hours = {phase: s / 3600 for phase, s in sorted(led.seconds.items())}
    row = {"script": script, "preset": preset, "gpus": gpus, "sampler": sampler, "fits": fits, "memory": memory}
    if fits == "no":
        return row | {"hours": None, "dominant": None, "phases": {}, "work": {}}
    total = sum(hours.values())
    dominant = max(hours, key=hours.get)
    return row | {
        "hours": round(total, 3),
        "dominant": dominant,
        "phases": {k: round(v, 3) for k, v in hours.items()},
        "work": {k: round(v) for k, v in sorted(led.work.items())},
    }


def presets(script: str) -> list[str]:
    return [name for name in load_script(script).MODELS if name != "toy"]


def has_sampler(script: str) -> bool:
    return "sampler" in {f.name for f in dataclasses.fields(load_script(script).Args)}


def rows(scripts=SCRIPTS, gpus=(1, 8), samplers=("hf", "vllm"), overrides: dict | None = None) -> list[dict]:
    peaks, out = dry_run_peaks(), []
    for spec in scripts:
        script, _, only = spec.partition(":")
        for preset in [only] if only else presets(script):
            for g in gpus:
                for sampler in samplers if has_sampler(script) else [None]:
                    out.append(estimate(script, preset, g, sampler, overrides, peaks))
    return out


def table(found: list[dict]) -> str:
    lines = [
        f"{'script':6} {'preset':20} {'GPUs':>4} {'sampler':7} {'fits':22} {'hours':>7}  {'dominant':14}  phases (h)"
    ]
    for r in found:
        fits = f"{r['fits']} ({r['memory']})"
        head = f"{r['script']:6} {r['preset']:20} {r['gpus']:>4} {r['sampler'] or '-':7} {fits:22}"
        if r["hours"] is None:
            lines.append(f"{head} {'-':>7}  does not fit")
            continue
        share = r["phases"][r["dominant"]] / r["hours"] if r["hours"] else 0
        phases = " ".join(f"{k} {v:.2f}" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
        lines.append(f"{head} {r['hours']:7.1f}  {r['dominant'] + f' {share:.0%}':14}  {phases}")
    return "\n".join(lines)


def markdown(found: list[dict]) -> str:
    """One line per (script, preset): hours on each GPU count with each sampler (a script without one in the HF
    column), the dominant phase on the most GPUs, and whether it fits (GiB per rank)."""
    gpus = sorted({r["gpus"] for r in found})
    head = [f"{g}xH100 {s}" for g in gpus for s in ("HF", "vLLM")]
    lines = [
        "| script, preset | "
        + " | ".join(head)
        + f" | dominant phase on {gpus[-1]} (HF / vLLM) | fits: GiB per rank |",
        "|---" * (len(head) + 3) + "|",
    ]
    for key in dict.fromkeys((r["script"], r["preset"]) for r in found):
        mine = {(r["gpus"], r["sampler"] or "hf"): r for r in found if (r["script"], r["preset"]) == key}
        cells, dominant, fits = [], [], {}
        for g in gpus:
            for sampler in ("hf", "vllm"):
                r = mine.get((g, sampler))
                if r is None:
                    cells.append("-")
                    continue
                fits[g] = f"{g}: {r['fits']} ({r['memory']})"
                cells.append("does not fit" if r["hours"] is None else f"{r['hours']:.1f} h")
                if g == gpus[-1] and r["hours"] is not None:
                    dominant.append(f"{r['dominant']} {r['phases'][r['dominant']] / r['hours']:.0%}")
        row = f"| {' '.join(key)} | " + " | ".join(cells)
        lines.append(f"{row} | {' / '.join(dominant) or '-'} | {'; '.join(fits.values())} |")
    return "\n".join(lines)


def sources() -> str:
    lines = ["throughput (Mistral-7B, bf16, one H100; other sizes: scaled):"]
    for name, f in {**THROUGHPUT, **SCALING}.items():
        value = "" if name in SCALING else f" {f.value:g}"
        lines.append(f"  {name}{value} [{f.status}]: {f.source}")
    lines.append("datasets (rows published; token lengths assumed):")
    for name, d in DATASETS.items():
        lines.append(
            f"  {name}: {d.rows:,} rows; prompt {d.prompt_tokens}, response {d.response_tokens}, "
            f"sample {d.sample_tokens} tokens [assumed]. {d.source}"
        )
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"cost.py: --set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table, one line per preset")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="H100 counts (default: 1 8)")
    parser.add_argument("--sampler", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--only", nargs="+", default=list(SCRIPTS), help="script or script:preset (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="an Args option, e.g. n_cand=8")
    opts = parser.parse_args(argv)
    overrides = parse_overrides(opts.set)
    for spec in opts.only:
        script, _, preset = spec.partition(":")
        if script not in SCRIPTS:
            raise SystemExit(f"cost.py: --only {spec!r}: the scripts are {', '.join(SCRIPTS)}")
        if preset and preset not in presets(script):
            raise SystemExit(f"cost.py: --only {spec!r}: {script}'s presets are {', '.join(presets(script))}")
    known = {f.name for s in opts.only for f in dataclasses.fields(load_script(s.partition(":")[0]).Args)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"cost.py: --set {unknown[0]}: not an option of the selected scripts' Args")
    if min(opts.gpus) < 1:
        raise SystemExit("cost.py: --gpus must be >= 1")
    try:
        found = rows(opts.only, opts.gpus, opts.sampler, overrides)
    except Exception as err:  # the scripts' InputError on a bad --set: one line
        if type(err).__name__ != "InputError":
            raise
        raise SystemExit(f"cost.py: {err}") from None
    if opts.json:
        print(json.dumps(found, indent=1))
        return 0
    if opts.markdown:
        print(markdown(found))
        return 0
    print(table(found))
    print()
    print(sources())
    return 0


if __name__ == "__main__":
    sys.exit(main())
