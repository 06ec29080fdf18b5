"""Cost of Sr-DPO's refinement pass: one training step with lambda > 0 vs lambda = 0, same batch, one process.

    python benchmarks/srdpo_overhead.py                       # toy model, CPU, B = 16 pairs
    python benchmarks/srdpo_overhead.py --model ./sft --dataset ./pairs.jsonl --batch 8

Both configurations run `srdpo.sr_losses` (lambda = 0 skips the prompted pass, exactly plain DPO),
backward, clipping and an RMSprop step on the same pairs with cached reference log-probs,
alternating, after warm-up; the median step times give the overhead ratio the paper reports as
+24% (HH-RLHF, Table 5). Prints a markdown table.
"""

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import srdpo  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    from transformers import AutoTokenizer

    args, preset = srdpo.resolve(srdpo.Args(model=cli.model, dataset=cli.dataset, eval_pairs=0, num_pairs=cli.batch))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(preset["path"])
    rows, source = srdpo.load_rows(args.dataset)
    pairs, _ = srdpo.build_dataset(rows, source, tokenizer, args)
    model = srdpo.load_model(preset["path"], device)
    n = len(pairs)
    sequences = (
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
        + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
        + [(p["aug_prompt_ids"], p["aug_chosen_ids"]) for p in pairs]
        + [(p["aug_prompt_ids"], p["aug_rejected_ids"]) for p in pairs]
    )
    ref, _ = srdpo.score(model, sequences, args, tokenizer.pad_token_id, device, desc="reference")
    for i, p in enumerate(pairs):
        p.update(
            ref_chosen=float(ref[i]),
            ref_rejected=float(ref[n + i]),
            ref_aug_chosen=float(ref[2 * n + i]),
            ref_aug_rejected=float(ref[3 * n + i]),
        )
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-12)  # tiny lr: the weights stay comparable
    configs = {"lambda=0 (DPO)": dataclasses.replace(args, lam=0.0), f"lambda={args.lam} (Sr-DPO)": args}
    times = {name: [] for name in configs}
    refine = []
    for repeat in range(cli.repeats + 2):
        for name, config in configs.items():
            tic = time.perf_counter()
            out = srdpo.sr_losses(model, pairs, config, device, tokenizer.pad_token_id)
            out["losses"].mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - tic)
                if config.lam > 0:
                    refine.append(out["refine_seconds"])
    base, sr = (statistics.median(t) for t in times.values())
    plain_tokens = sum(len(p["prompt_ids"]) + (len(p["chosen_ids"]) + len(p["rejected_ids"])) / 2 for p in pairs) / n
    aug_tokens = (
        sum(len(p["aug_prompt_ids"]) + (len(p["aug_chosen_ids"]) + len(p["aug_rejected_ids"])) / 2 for p in pairs) / n
    )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} {device_name}, torch {torch.__version__}, "
        f"{cli.threads} threads, model {cli.model}, B = {n} pairs, mean tokens per sequence: plain {plain_tokens:.0f}, "
        f"augmented {aug_tokens:.0f}\n"
    )
    print("| configuration | median step (ms) | ratio |\n|---|---|---|")
    print(f"| lambda = 0 (plain DPO, no refinement pass) | {1000 * base:.1f} | 1.00 |")
    print(f"| lambda = {args.lam} (Sr-DPO) | {1000 * sr:.1f} | {sr / base:.2f} |")
    print(f"\nrefinement pass alone: median {1000 * statistics.median(refine):.1f} ms")


if __name__ == "__main__":
    main()
