"""One DPO training step on the toy model: sera.py vs TRL's DPOTrainer, side by side on CPU.

    python benchmarks/sera_vs_trl.py                          # shipped toy model and pairs, B = 16
    python benchmarks/sera_vs_trl.py --model /tmp/toy/model --dataset /tmp/toy/data/prefs.jsonl
    python benchmarks/sera_vs_trl.py --batch_size 32 --rounds 5 --steps 4 --out ''   # print only
    python benchmarks/sera_vs_trl.py --batch_size 2 --rounds 1 --steps 1 --threads 1 --out /tmp/r.md  # the test's

The report goes to benchmarks/results/sera_vs_trl_cpu-<date>.md (sera_vs_trl_cpu.md is the 2026-11-23 run). It
needs TRL (`pip install -e ".[bench]"`); exit status 1 when a sanity check below fails.

Everything runs in one process on the same B preference pairs (the first B usable rows of the
dataset), tokenized once by `sera.build_dataset`, in fp32 with `torch.set_num_threads(--threads)`:

  ours         the body of `sera.train_iteration` for one optimizer step (batch_size = B,
               global_batch = batch_size), replicated here with a persistent AdamW and constant schedule:
               `sera.collate` of chosen + rejected, `selfpo_kernels.causal_lm_pair_loss` with `sera.daa_loss`,
               backward, sera's per-step metric reductions, `clip_grad_norm_`, AdamW, scheduler,
               zero_grad. Reference log-probs are precomputed once with `sera.score`, as sera does
               once per iteration. Before timing, one replicated step is checked against one call
               of `sera.train_iteration` from the same weights (the updated weights must agree).
  ours (call)  one whole `sera.train_iteration` call on the B pairs per step: the same step plus
               its per-call set-up (a fresh AdamW and scheduler, shuffling, progress bar).
  TRL          `trl.DPOTrainer` (sigmoid loss, same beta, lr, max_length, max_grad_norm, constant
               schedule, fp32, no gradient checkpointing, `adamw_torch`) with its default frozen
               reference model, which runs a reference forward on every step.
  TRL precomp  the same with `precompute_ref_log_probs=True` (reference log-probs computed
               before training, no reference model in memory): what sera does.

The TRL dataset holds the B pairs repeated, read in order (`train_sampling_strategy=
"sequential"`), so every TRL step sees exactly the batch ours does; the script checks that TRL's
tokenization gives the same token ids. A TRL step is timed from `on_step_begin` to `on_step_end`
(forward, backward, clipping, optimizer and scheduler step; the batch is collated and the step
logged outside that window, so this favours TRL); "step to step" is the time between consecutive
`on_step_end`s, everything included. The configurations are run in rounds, in rotating order, so
background load hits all alike: round 0 is warm-up; each later round runs, per configuration, one
untimed step and then --steps timed ones (a fresh `trainer.train()` call per round for TRL).
tokens/s = non-padding tokens of the 2B chosen + rejected sequences / median step time, the same
count for every configuration. Peak RSS growth is measured on one extra step per configuration
after the timing (malloc_trim, reset of VmHWM, then VmHWM - VmRSS before the step), so it does not
disturb the timings. Sanity check: with policy = reference every configuration's first loss must be
log 2 = 0.6931, and TRL's first-step chosen/rejected log-probs must equal ours.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import io
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sera  # noqa: E402  (the repository root's single-file implementation)
from selfpo_kernels import causal_lm_pair_loss  # noqa: E402

CONFIGS = ("ours", "ours (call)", "TRL", "TRL precomp")


@dataclass
class Args:
    model: str = str(ROOT / "assets" / "toy" / "model")
    """toy model folder (LlamaForCausalLM + tokenizer with chat template)"""
    dataset: str = str(ROOT / "assets" / "toy" / "data" / "prefs.jsonl")
    """preference pairs (UltraFeedback schema or any schema sera.py reads)"""
    batch_size: int = 16
    """B: preference pairs per optimizer step (2B sequences)"""
    rounds: int = 4
    """timed rounds after the warm-up round"""
    steps: int = 4
    """timed steps per configuration per round (after one untimed step)"""
    threads: int = 2
    """torch.set_num_threads for all configurations"""
    trl_optim: str = "adamw_torch"
    """TRL optimizer; adamw_torch = torch.optim.AdamW as sera uses (TRL's own default is adamw_torch_fused)"""
    out: str = str(ROOT / "benchmarks" / "results" / f"sera_vs_trl_cpu-{datetime.date.today():%Y-%m-%d}.md")
    """markdown report to write ('' = print only); by default a new dated file, earlier results are kept"""


# ---------------------------------------------------------------------------------------------
# Memory: peak RSS growth of one step (Linux /proc; None elsewhere)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Return freed heap to the OS, reset VmHWM to the current RSS; the RSS (kB) or None if unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def _peak_growth_mib(base_kb: int | None) -> float | None:
    peak = _status_kb("VmHWM") if base_kb is not None else None
    return None if peak is None else (peak - base_kb) / 1024


# ---------------------------------------------------------------------------------------------
# Ours


def sera_step(model, batch_pairs, optimizer, scheduler, trainable, args: sera.Args, pad_id: int) -> dict:
    """One optimizer step of `sera.train_iteration` (one micro-batch per step, one process), line for line: the
    same collation, fused pair op, backward, `sera.StepStats` sums and `sera.optimizer_step` (clip, AdamW,
    scheduler, zero_grad)."""
    device = torch.device("cpu")
    n = len(batch_pairs)
    stats = sera.StepStats(sera.DAA_STATS, device)
    batch = sera.collate(
        [(p["prompt_ids"], p["chosen_ids"]) for p in batch_pairs]
        + [(p["prompt_ids"], p["rejected_ids"]) for p in batch_pairs],
        pad_id,
        device,
    )
    ref = [p["ref_chosen"] for p in batch_pairs] + [p["ref_rejected"] for p in batch_pairs]
    ref = torch.tensor(ref, device=device, dtype=torch.float32)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    losses, out = causal_lm_pair_loss(model, ids, mask, labels, sera.daa_loss(args), ref_logps=ref)
    (losses.sum() / n).backward()
    with torch.no_grad():
        use_avg = args.loss == "simpo" or args.length_norm == "avg"
        for side in ("chosen", "rejected"):
            out[f"logps/{side}"] = out[f"logps/{side}"] / (out[f"tokens/{side}"] if use_avg else 1)
        stats.add(**{name: out[name] for name in sera.DAA_STATS[:7]}, pairs=n, tokens=batch["attention_mask"])
    total, grad_norm = sera.optimizer_step(trainable, optimizer, scheduler, stats, args, "benchmark step")
    return {
        "loss": total["loss"] / total["pairs"],
        "logps/chosen": total["logps/chosen"] / total["pairs"],
        "logps/rejected": total["logps/rejected"] / total["pairs"],
        "grad_norm": grad_norm,
        "tokens": total["tokens"],
    }


def make_optimizer(model, args: sera.Args):
    """`sera.make_optimizer` as `sera.train_iteration` calls it for a one-step call (AdamW, warm-up int(0.1 * 1) =
    0), with a constant schedule (TRL's here too) so that it can be kept across the timed steps; its first step has
    the full lr, as a one-step call's does whatever the schedule. Returns (optimizer, scheduler, trainable)."""
    trainable, optimizer, scheduler = sera.make_optimizer(model, args.lr, 1, args, "constant")
    return optimizer, scheduler, trainable


def train_iteration_call(model, pairs, args: sera.Args, pad_id: int):
    """One `sera.train_iteration` call = one optimizer step on exactly these B pairs (its bar silenced, nothing
    logged or saved)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return sera.train_iteration(
            model, pairs, 1, args, args.lr, torch.device("cpu"), pad_id, lambda metrics: None, lambda *a: None
        )


def check_replica(model, pairs, args: sera.Args, pad_id: int) -> float:
    """Max |difference| between the weights after one replicated step and after one train_iteration call."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    train_iteration_call(a, pairs, args, pad_id)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed * 1000 + 1)).tolist()
    optimizer, scheduler, trainable = make_optimizer(b, args)
    sera_step(b, [pairs[i] for i in order], optimizer, scheduler, trainable, args, pad_id)
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------
# TRL


def make_trl(policy, ref_model, tokenizer, pairs, args: sera.Args, cli: Args, precompute: bool, out_dir: str):
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step, self.cycle, self.logs, self.memory = [], [], [], []
            self.measure_memory, self._last_end, self._begin, self._base = False, None, None, None

        def on_train_begin(self, *a, **k):
            self._last_end = None
            self.step, self.cycle = [], []

        def on_step_begin(self, *a, **k):
            if self.measure_memory:
                self._base = _reset_peak()
            self._begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.step.append(now - self._begin)
            if self._last_end is not None:
                self.cycle.append(now - self._last_end)
            self._last_end = now
            if self.measure_memory:
                self.memory.append(_peak_growth_mib(self._base))

        def on_log(self, *a, logs=None, **k):
            self.logs.append(dict(logs or {}))

    rows = [
        {
            "prompt": p["prompt"],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]
    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=len(pairs),
        gradient_accumulation_steps=1,
        max_steps=1 + cli.steps,
        max_length=args.max_length,
        loss_type=["sigmoid"],
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        optim=cli.trl_optim,
        precompute_ref_log_probs=precompute,
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=args.seed,
    )
    timer = StepTimer()
    # B pairs repeated: with sequential sampling every step's batch is exactly the B pairs, in order.
    trainer = DPOTrainer(
        model=policy,
        ref_model=None if precompute else ref_model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows * (1 + cli.steps)),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, timer


def check_trl_tokens(trainer, pairs) -> int:
    """Number of the B pairs whose TRL token ids differ from sera's."""
    data = trainer.train_dataset
    bad = 0
    for i, p in enumerate(pairs):
        row = data[i]
        bad += (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (
            p["prompt_ids"],
            p["chosen_ids"],
            p["rejected_ids"],
        )
    return bad


# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def busy_warning() -> str | None:
    """A warning when other processes keep the CPUs busy (1-minute load average over half the CPUs)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        return (
            f"**busy machine** (1-minute load average {load:.2f} on {os.cpu_count()} CPUs, including this run): "
            "the timings are noisy and slower than on a quiet machine; compare the best column, or re-run"
        )
    return None


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main(cli: Args) -> dict:
    try:
        import trl
    except ImportError:
        raise SystemExit('sera_vs_trl.py: needs TRL (pip install -e ".[bench]", or pip install "trl>=1.16")') from None
    import datasets
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    if not Path(cli.model).exists():
        raise SystemExit(
            f"sera_vs_trl.py: --model {cli.model} not found (build it: python assets/build_toy.py "
            "--out /tmp/toy, then --model /tmp/toy/model --dataset /tmp/toy/data/prefs.jsonl)"
        )
    if not Path(cli.dataset).exists():
        raise SystemExit(f"sera_vs_trl.py: --dataset {cli.dataset} not found")
    if cli.batch_size < 1 or cli.rounds < 1 or cli.steps < 1:
        raise SystemExit("sera_vs_trl.py: --batch_size, --rounds and --steps must be >= 1")
    torch.set_num_threads(cli.threads)
    load_start = load_text()
    warnings_seen = [w for w in [busy_warning()] if w]
    t_start = time.perf_counter()

    # Data and models exactly as sera.main prepares them.
    args, _ = sera.resolve(
        sera.Args(
            model=cli.model, dataset=cli.dataset, loss="dpo", batch_size=cli.batch_size, global_batch=cli.batch_size
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    rows, source = sera.load_rows(cli.dataset)
    all_pairs, _ = sera.build_dataset(rows[: 4 * cli.batch_size + 16], source, tokenizer, args)
    if len(all_pairs) < cli.batch_size:
        raise SystemExit(f"sera_vs_trl.py: only {len(all_pairs)} usable pairs, need --batch_size {cli.batch_size}")
    pairs = all_pairs[: cli.batch_size]
    pad_id = tokenizer.pad_token_id
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    model = sera.prepare_for_training(sera.load_model(cli.model, device), args)
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]
    with contextlib.redirect_stderr(io.StringIO()):
        ref_logps, _ = sera.score(model, sequences, args, pad_id, device, desc="reference")
    n = len(pairs)
    pairs = [dict(p, ref_chosen=float(ref_logps[i]), ref_rejected=float(ref_logps[n + i])) for i, p in enumerate(pairs)]
    lengths = [len(p) + len(r) for p, r in sequences]
    tokens = sum(lengths)
    padded = 2 * n * max(lengths)
    replica_diff = check_replica(model, pairs, args, pad_id)
    model_call = copy.deepcopy(model)
    optimizer, scheduler, trainable = make_optimizer(model, args)

    trl_tokenizer = AutoTokenizer.from_pretrained(cli.model)
    trl_tokenizer.pad_token = tokenizer.pad_token
    trl_tokenizer.padding_side = "left"
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, precompute in (("TRL", False), ("TRL precomp", True)):
            policy = sera.load_model(cli.model, device)
            ref = None if precompute else sera.load_model(cli.model, device).eval()
            with contextlib.redirect_stderr(io.StringIO()):
                trainers[name] = make_trl(policy, ref, trl_tokenizer, pairs, args, cli, precompute, f"{tmp}/{name}")
        token_mismatch = {name: check_trl_tokens(tr, pairs) for name, (tr, _) in trainers.items()}
        print(f"set-up done in {time.perf_counter() - t_start:.0f} s, load {load_text()}", flush=True)

        step_times = {c: [] for c in CONFIGS}
        cycle_times = {c: [] for c in CONFIGS}
        first, checkpointing = {}, {}

        def run_ours(timed: bool):
            last = None
            for i in range(1 + cli.steps):
                tic = time.perf_counter()
                metrics = sera_step(model, pairs, optimizer, scheduler, trainable, args, pad_id)
                toc = time.perf_counter()
                first.setdefault("ours", metrics)
                if timed and i > 0:
                    step_times["ours"].append(toc - tic)
                    cycle_times["ours"].append(toc - last)
                last = toc

        def run_call(timed: bool):
            last = None
            for i in range(1 + cli.steps):
                tic = time.perf_counter()
                train_iteration_call(model_call, pairs, args, pad_id)
                toc = time.perf_counter()
                if timed and i > 0:
                    step_times["ours (call)"].append(toc - tic)
                    cycle_times["ours (call)"].append(toc - last)
                last = toc

        def run_trl(name: str, timed: bool):
            trainer, timer = trainers[name]
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            if name not in first:
                first[name] = next(log for log in timer.logs if "loss" in log)
                checkpointing[name] = bool(getattr(trainer.model, "is_activation_checkpointing", False))
            if timed:  # the first step of each train() call is untimed
                step_times[name] += timer.step[1:]
                cycle_times[name] += timer.cycle  # end of step k-1 to end of step k, for k >= 2

        runners = {
            "ours": run_ours,
            "ours (call)": run_call,
            "TRL": lambda timed: run_trl("TRL", timed),
            "TRL precomp": lambda timed: run_trl("TRL precomp", timed),
        }
        for r in range(1 + cli.rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for c in order:
                runners[c](timed=r > 0)
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: done, load {load_text()}", flush=True)

        # One extra step per configuration for memory (not timed).
        memory = {}
        base = _reset_peak()
        sera_step(model, pairs, optimizer, scheduler, trainable, args, pad_id)
        memory["ours"] = _peak_growth_mib(base)
        base = _reset_peak()
        train_iteration_call(model_call, pairs, args, pad_id)
        memory["ours (call)"] = _peak_growth_mib(base)
        for name, (trainer, timer) in trainers.items():
            timer.measure_memory, timer.memory = True, []
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            timer.measure_memory = False
            values = [m for m in timer.memory[1:] if m is not None]
            memory[name] = max(values) if values else None
    load_end = load_text()
    end_warning = busy_warning()
    if end_warning and not warnings_seen:
        warnings_seen.append(end_warning)
    elapsed = time.perf_counter() - t_start

    # Report
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    results = {}
    for c in CONFIGS:
        med = statistics.median(step_times[c])
        results[c] = dict(
            median=med,
            best=min(step_times[c]),
            p10=quantile(step_times[c], 0.1),
            p90=quantile(step_times[c], 0.9),
            cycle=statistics.median(cycle_times[c]) if cycle_times[c] else float("nan"),
            tokens_per_s=tokens / med,
            n=len(step_times[c]),
            memory=memory.get(c),
        )
    base_tps = results["TRL"]["tokens_per_s"]
    header = (
        "| configuration | step median (ms) | best (ms) | p10-p90 (ms) | step to step (ms) | tokens/s | "
        "vs TRL | peak RSS growth / step (MiB) | timed steps |"
    )
    lines = [header, "|" + "---|" * 9]
    for c in CONFIGS:
        res = results[c]
        mem = "n/a" if res["memory"] is None else f"{res['memory']:.1f}"
        lines.append(
            f"| {c} | {1e3 * res['median']:.1f} | {1e3 * res['best']:.1f} | "
            f"{1e3 * res['p10']:.1f}-{1e3 * res['p90']:.1f} | "
            f"{1e3 * res['cycle']:.1f} | {res['tokens_per_s']:,.0f} | {res['tokens_per_s'] / base_tps:.2f}x | "
            f"{mem} | {res['n']} |"
        )
    table = "\n".join(lines)
    log2 = math.log(2)
    checks = [
        f"first-step loss (policy = reference, expected log 2 = {log2:.4f}): "
        + ", ".join(f"{c} {float(first[c]['loss']):.4f}" for c in ("ours", "TRL", "TRL precomp")),
        "first-step mean log-probs chosen / rejected: "
        + ", ".join(
            f"{c} {float(first[c]['logps/chosen']):.4f} / {float(first[c]['logps/rejected']):.4f}"
            for c in ("ours", "TRL", "TRL precomp")
        ),
        f"replicated step vs sera.train_iteration: max |weight difference| after one step {replica_diff:.2e} "
        f"(lr {args.lr:g})",
        "TRL token ids differing from sera's (pairs): "
        + ", ".join(f"{name} {bad}/{n}" for name, bad in token_mismatch.items()),
        "TRL activation checkpointing during training: "
        + ", ".join(f"{name} {'on' if on else 'off'}" for name, on in checkpointing.items()),
    ]
    ok = (
        all(abs(float(first[c]["loss"]) - log2) < 1e-3 for c in ("ours", "TRL", "TRL precomp"))
        and all(
            abs(float(first[c][k]) - float(first["ours"][k])) < 1e-3 * max(1.0, abs(float(first["ours"][k])))
            for c in ("TRL", "TRL precomp")
            for k in ("logps/chosen", "logps/rejected")
        )
        and replica_diff <= 1e-3 * args.lr
        and not any(token_mismatch.values())
        and not any(checkpointing.values())
    )
    checks.append("sanity checks: " + ("all passed" if ok else "FAILED (see above)"))
    prompt_lens = [len(p["prompt_ids"]) for p in pairs]
    response_lens = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}",
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "load": f"load average (1/5/15 min) at start {load_start}, at end {load_end}",
        "model": f"{cli.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters "
        f"({param_mib:.1f} MiB fp32)",
        "batch": f"B = {n} pairs = {2 * n} sequences from {cli.dataset}; prompt {min(prompt_lens)}-{max(prompt_lens)} "
        f"tokens, responses {min(response_lens)}-{max(response_lens)}, sequences {min(lengths)}-{max(lengths)} "
        f"(mean {tokens / len(lengths):.1f}); {tokens} non-padding tokens per step, padded batch "
        f"{2 * n} x {max(lengths)} = {padded}; max_length {args.max_length}, beta {args.beta}, lr {args.lr:g}",
        "protocol": f"1 warm-up round + {cli.rounds} timed rounds, per round and configuration 1 untimed + "
        f"{cli.steps} timed steps, rotating order; total run time {elapsed:.0f} s",
    }
    report = "\n".join(
        [
            "# One DPO training step: sera.py vs TRL DPOTrainer (CPU, toy model)",
            "",
            *[f"- {k}: {v}" for k, v in info.items()],
            *[f"- {w}" for w in warnings_seen],
            "",
            table,
            "",
            *[f"- {line}" for line in checks],
            "",
            "Configurations: **ours** = one optimizer step of `sera.train_iteration` (collate, "
            "`selfpo_kernels.causal_lm_pair_loss`, backward, metrics, clip, AdamW) with a persistent optimizer and "
            "precomputed reference log-probs; **ours (call)** = a whole `sera.train_iteration` call per step "
            "(adds a fresh AdamW/scheduler, shuffling, progress bar); **TRL** = `DPOTrainer` with its default frozen "
            "reference model (a reference forward every step); **TRL precomp** = `precompute_ref_log_probs=True`. "
            "TRL's step also computes per-token entropy, mean logits and top-1 accuracy for its logged metrics. "
            "TRL steps are timed from `on_step_begin` to `on_step_end` (its collation and logging fall outside, "
            "ours include collation); *step to step* includes everything. tokens/s = non-padding tokens of the "
            "2B sequences / median step time.",
            "",
        ]
    )
    print()
    print(report)
    if cli.out:
        Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.out).write_text(report)
        print(f"written to {cli.out}")
    return {"results": results, "first": first, "ok": ok, "tokens": tokens}


if __name__ == "__main__":
    sys.exit(0 if main(tyro.cli(Args))["ok"] else 1)
