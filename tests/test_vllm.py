"""--sampler vllm against real vLLM, on CPU (the `vllm-cpu` build): run in their own environment, see the README
("Run the tests"). Skipped where vLLM is not installed. One engine per process: the in-process tests share sera's
engine (sera.VLLMEngine, in this process: weights pushed in memory), the script runs start their own in a subprocess
(one of them in vLLM's own processes, VLLM_ENABLE_V1_MULTIPROCESSING=1: the weights through a tmpfs copy).

The model is a re-headed copy of the toy (tests/vllm_toy.py): vLLM's CPU attention has no head size 40."""

import json
import os
import subprocess
import sys
import time
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


def sample(world, prompts, n, temperature, path, seed=0, sampler="vllm", model=None, push=False, **overrides):
    """generate() with the module's settings; vLLM gets no model unless given (it reads `path`), HF the fixture's."""
    args, tokenizer, hf_model = world
    import dataclasses

    args = dataclasses.replace(args, sampler=sampler, **overrides)
    model = hf_model if model is None and sampler == "hf" else model
    path = None if path is None else str(path)
    return sera.generate(model, tokenizer, chats(prompts), n, temperature, 1.0, args, CPU, seed, path, push=push)


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
    sleep mode on CPU (vLLM refuses enable_sleep_mode there). It runs in this process (its worker reachable), and
    starting it left the trainer's random numbers (vLLM seeds torch), threads and environment as they were."""
    args = world[0]
    torch.manual_seed(11)
    kept = ("VLLM_ENABLE_V1_MULTIPROCESSING", "LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")  # vLLM sets
    rng, threads, environment = torch.get_rng_state(), torch.get_num_threads(), [os.environ.get(k) for k in kept]
    sample(world, EVAL[:1], 1, 0.0, model_dir)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert [os.environ.get(k) for k in kept] == environment and torch.set_num_threads.__module__ == "torch"
    assert sera.VLLMEngine.in_process and hasattr(sera.VLLMEngine.llm.llm_engine, "model_executor")
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
    """A new checkpoint is reloaded into the engine in place from its folder (the path where no model is given, or
    a LoRA one is): its greedy answers are then HF's on the new weights, its samples differ, and going back to the
    first checkpoint gives the first samples again."""
    prompts = EVAL[:16]
    before = sample(world, prompts, 2, 1.0, model_dir, seed=7)
    other = perturbed(model_dir, tmp_path, 1.5)
    assert sample(world, prompts, 1, 0.0, tmp_path) == sample(
        world, prompts, 1, 0.0, tmp_path, sampler="hf", model=other
    )
    assert sera.VLLMEngine.path == str(tmp_path)
    assert sample(world, prompts, 2, 1.0, tmp_path, seed=7) != before
    assert sample(world, prompts, 2, 1.0, model_dir, seed=7) == before


def test_pushing_weights_in_memory_samples_them_and_writes_nothing(world, model_dir, tmp_path, monkeypatch):
    """OSP's step: the policy's weights as they are in memory, pushed into the engine (no file, no tmpfs copy):
    greedy then equals HF greedy on those weights, and after the policy changes in place the next call samples the
    new ones. sera/opsr's boundary (model_path holding the plain policy's weights): pushed too, not read from it."""
    prompts, pushed = EVAL[:16], []
    policy = perturbed(model_dir, tmp_path / "perturbed", 0.6)
    assert sample(world, prompts, 1, 0.0, None, model=policy, push=True) == sample(
        world, prompts, 1, 0.0, None, sampler="hf", model=policy
    )
    rpc = sera.VLLMEngine.llm.collective_rpc
    spy = lambda method, **k: pushed.append(sorted(k["kwargs"])) or rpc(method, **k)  # noqa: E731
    monkeypatch.setattr(sera.VLLMEngine.llm, "collective_rpc", spy)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "self_attn" in name:
                weight.mul_(1.3)
    again = sample(world, prompts, 1, 0.0, None, model=policy, push=True)
    assert again == sample(world, prompts, 1, 0.0, None, sampler="hf", model=policy)
    assert again != sample(world, prompts, 1, 0.0, model_dir, model=world[2])  # the first checkpoint, pushed
    assert pushed == [["weights_iterator"]] * 2 and sera.VLLMEngine.spill is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perturbed"]
    assert not list(Path("/dev/shm").glob(f"selfpo-vllm-{os.getpid()}*"))


TWO_RANKS = """
import dataclasses, json, sys
import torch
sys.path.insert(0, {root!r})
import sera

device = sera.init_device(0, 5, "cpu")
args = sera.resolve(sera.Args(sampler="vllm"))[0]
tokenizer = sera.load_tokenizer({model!r}, None)
model = sera.prepare_for_training(sera.load_model({model!r}, device, args), args)
with torch.no_grad():  # an update, through the FSDP2 shards
    for name, weight in model.named_parameters():
        weight.mul_(0.6 if "mlp" in name else 1.0)
prompts = [[dict(role="user", content=p)] for p in {prompts!r}]
try:
    pushed = sera.generate(model, tokenizer, prompts, 1, 0.0, 1.0, args, device, 0, desc="sample", push=True)
    hf_args = dataclasses.replace(args, sampler="hf")
    hf = sera.generate(sera.unsharded_copy(model, args), tokenizer, prompts, 1, 0.0, 1.0, hf_args, device, 0)
    backend = sera.VLLMEngine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    out = dict(pushed=pushed, hf=hf, backend=backend, sharded=type(model).__name__, world=sera.world())
    if sera.rank() == 0:
        open({result!r}, "w").write(json.dumps(out))
finally:
    sera.VLLMEngine.llm.llm_engine.engine_core.shutdown()
"""


def test_two_torchrun_ranks_push_their_fsdp2_policy_into_their_own_in_process_engine(model_dir, tmp_path):
    """Two gloo ranks under torchrun, the policy sharded by FSDP2 and updated: each rank's engine runs in its
    process (vLLM's external launcher, inside torchrun's process group) and gets the policy pushed one tensor at a
    time, gathered from the shards on both ranks; greedy = HF greedy on the unsharded weights, and the trainer's
    collectives (the gathers after it) still work."""
    script, result = tmp_path / "two_ranks.py", tmp_path / "result.json"
    script.write_text(TWO_RANKS.format(root=str(ROOT), model=str(model_dir), prompts=EVAL[:8], result=str(result)))
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    subprocess.run(run, check=True, cwd=ROOT, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(result.read_text())
    assert out["world"] == 2 and out["sharded"].startswith("FSDP") and out["backend"] == "external_launcher"
    assert out["pushed"] == out["hf"] and len(out["hf"]) == 8


OSP = "--num_eval 16 --num_prompts 16 --steps 2 --num_judge_eval 16 --aug_epochs 1 --num_sft 64 --offline_fraction 0.25"


@pytest.mark.parametrize(
    "script, budget, processes",
    [
        ("sera.py", "--num_pairs 64 --num_eval 16 --iterations 2", False),
        ("opsr.py", "--num_eval 16 --iterations 2 --num_pairs 64", False),
        ("osp.py", OSP, False),
        ("osp.py", OSP, True),  # vLLM's own processes: OSP's weights through a tmpfs copy
    ],
    ids=["sera", "opsr", "osp", "osp-vllm-processes"],
)
def test_script_runs_with_the_vllm_sampler(script, budget, processes, tmp_path):
    """The script's toy run, tiny budget, sampling with vLLM (its own engine, in its own process or, with
    VLLM_ENABLE_V1_MULTIPROCESSING=1, in vLLM's) to the end. Watched while it runs: OSP's per-step weights never
    land in the run folder (no sampler/, nothing but the run's own outputs), nor (engine in this process) in tmpfs;
    a tmpfs copy is removed at exit; the exit prints no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the default: unset
    out, env = tmp_path / "run", env | ({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"} if processes else {})
    argv = [sys.executable, str(ROOT / "tests" / "vllm_toy.py"), str(tmp_path / "model"), script, "--sampler", "vllm"]
    log = open(tmp_path / "stderr.txt", "w")
    run = subprocess.Popen([*argv, "--output_dir", str(out), *budget.split()], cwd=ROOT, env=env, stderr=log)
    seen, spill, deadline = set(), Path("/dev/shm") / f"selfpo-vllm-{run.pid}", time.time() + 900
    while run.poll() is None and time.time() < deadline:
        seen |= {p.name for p in out.iterdir()} if out.is_dir() else set()
        seen |= {"(tmpfs copy)"} if spill.exists() else set()
        time.sleep(0.1)
    assert run.wait(timeout=max(1, deadline - time.time())) == 0
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()  # the engine shut down before torch's groups
    assert not any("sampler" in name for name in seen) and not spill.exists(), seen
    if script == "osp.py":
        assert ("(tmpfs copy)" in seen) == processes, seen
    config = json.loads((out / "resolved_config.json").read_text())
    assert config["sampler"] == "vllm"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("eval/reward" in r for r in records)
