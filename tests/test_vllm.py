"""--sampler vllm against real vLLM, on CPU (the `vllm-cpu` build): run in their own environment, see the README
("Run the tests"). Skipped where vLLM is not installed. One engine per process: the in-process tests share sera's
engine (sera.VLLMEngine), the script runs start their own in a subprocess.

The model is a re-headed copy of the toy (tests/vllm_toy.py): vLLM's CPU attention has no head size 40."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: start-up in about half a minute
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_toy import ROOT, reheaded_toy  # noqa: E402

import sera  # noqa: E402

CPU = torch.device("cpu")
EVAL = [json.loads(line)["prompt"] for line in open(ROOT / "assets" / "toy" / "data" / "eval.jsonl")]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return reheaded_toy(tmp_path_factory.mktemp("vllm_toy") / "model")


@pytest.fixture(scope="module")
def world(model_dir):
    args = sera.resolve(sera.Args(sampler="vllm"))[0]
    tokenizer = sera.load_tokenizer(str(model_dir), None)  # left padding for HF generate, as the scripts have it
    model = sera.load_model(str(model_dir), CPU, args).eval()
    yield args, tokenizer, model
    sera.VLLMEngine.llm = sera.VLLMEngine.path = None


def chats(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def sample(world, prompts, n, temperature, path, seed=0, sampler="vllm", model=None, **overrides):
    args, tokenizer, hf_model = world
    import dataclasses

    args = dataclasses.replace(args, sampler=sampler, **overrides)
    return sera.generate(
        model or hf_model, tokenizer, chats(prompts), n, temperature, 1.0, args, CPU, seed=seed, model_path=str(path)
    )


def perturbed(model_dir, tmp_path, scale):
    """A second checkpoint: the copy's weights with the MLPs scaled (its samples differ)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "mlp" in name:
                weight.mul_(scale)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((model_dir / "tokenizer_config.json").read_bytes())
    return model


def test_engine_settings(world, model_dir):
    """The engine reserves for --max_prompt_length + --max_new_tokens, not the model's 512-token context, computes
    in fp32 like the HF sampler on CPU, and has chunked prefill off (seeded requests crash with it on CPU); no
    sleep mode on CPU (vLLM refuses enable_sleep_mode there)."""
    args = world[0]
    sample(world, EVAL[:1], 1, 0.0, model_dir)
    config = sera.VLLMEngine.llm.llm_engine.vllm_config
    assert config.model_config.max_model_len == args.max_prompt_length + args.max_new_tokens == 88
    assert config.model_config.dtype == torch.float32
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.model_config.enable_sleep_mode is False


def test_greedy_equals_hf_greedy(world, model_dir):
    """Same token ids, same stop ids, same length limit: vLLM's greedy answers are HF's, word for word (fp32)."""
    prompts = EVAL[:32]
    hf = sample(world, prompts, 1, 0.0, model_dir, sampler="hf")
    ours = sample(world, prompts, 1, 0.0, model_dir)
    assert ours == hf
    assert any(finished for ((_, finished),) in hf) and len({text for ((text, _),) in hf}) > 4


def test_samples_are_deterministic_per_seed_and_distinct_across_prompts(world, model_dir):
    """The same call gives the same samples; another seed others. 8 copies of one prompt x 4 samples: with
    consecutive per-prompt seeds vLLM (sample j of a request = seed + j) would draw at most 8 + 4 - 1 = 11
    distinct random streams; strided by n, 32 streams give many more distinct answers."""
    prompts = EVAL[:1] * 8
    first = sample(world, prompts, 4, 1.0, model_dir, seed=3)
    assert sample(world, prompts, 4, 1.0, model_dir, seed=3) == first
    assert sample(world, prompts, 4, 1.0, model_dir, seed=4) != first
    distinct = {text for group in first for text, _ in group}
    assert len(distinct) > 11, sorted(distinct)


def test_seeded_batch_whose_prefill_spans_steps(world, model_dir):
    """The toy's first 64 eval prompts x 4 seeded samples: more than one scheduler step of prefill (with chunked
    prefill on, vLLM's CPU sampler fails here with 'CPU Generator does not use offset' and the engine dies)."""
    out = sample(world, EVAL[:64], 4, 1.0, model_dir, seed=5)
    assert len(out) == 64 and all(len(group) == 4 for group in out)


def test_reloading_weights_changes_samples_and_reloading_the_old_ones_restores_them(world, model_dir, tmp_path):
    """A new checkpoint is reloaded into the engine in place: its greedy answers are then HF's on the new weights,
    its samples differ, and going back to the first checkpoint gives the first samples again."""
    prompts = EVAL[:16]
    before = sample(world, prompts, 2, 1.0, model_dir, seed=7)
    other = perturbed(model_dir, tmp_path, 1.5)
    assert sample(world, prompts, 1, 0.0, tmp_path) == sample(
        world, prompts, 1, 0.0, tmp_path, sampler="hf", model=other
    )
    assert sera.VLLMEngine.path == str(tmp_path)
    assert sample(world, prompts, 2, 1.0, tmp_path, seed=7) != before
    assert sample(world, prompts, 2, 1.0, model_dir, seed=7) == before


@pytest.mark.parametrize(
    "script, budget",
    [
        ("sera.py", ["--num_pairs", "64", "--num_eval", "16", "--iterations", "2"]),
        ("opsr.py", ["--num_eval", "16", "--iterations", "2", "--num_pairs", "64"]),
        (
            "osp.py",
            [
                "--num_eval",
                "16",
                "--num_prompts",
                "16",
                "--steps",
                "2",
                "--num_judge_eval",
                "16",
                "--aug_epochs",
                "1",
                "--num_sft",
                "64",
                "--offline_fraction",
                "0.25",
            ],
        ),
    ],
)
def test_script_runs_with_the_vllm_sampler(script, budget, tmp_path):
    """The script's toy run, tiny budget, sampling with vLLM (its own engine, in its own process) to the end."""
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "vllm_toy.py"),
            str(tmp_path / "model"),
            script,
            "--sampler",
            "vllm",
            "--output_dir",
            str(out),
            *budget,
        ],
        check=True,
        cwd=ROOT,
        timeout=900,
    )
    config = json.loads((out / "resolved_config.json").read_text())
    assert config["sampler"] == "vllm"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("eval/reward" in r for r in records)
