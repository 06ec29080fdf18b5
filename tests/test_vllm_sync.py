"""--sampler vllm's weight sync, without vLLM: a strict stand-in for vllm 0.32's `LLM` (the keyword arguments,
methods and call signatures the scripts use, nothing else) whose engine holds real tensors and whose samples name
the weights it holds, so a test sees what the engine would sample from. Real vLLM on CPU: tests/test_vllm.py.

The engine runs in the trainer's process by default (VLLM_ENABLE_V1_MULTIPROCESSING=0 while it starts): new weights
are pushed in memory, one gathered tensor at a time in the engine's dtype (reload_weights' weights_iterator), and
nothing is written; with VLLM_ENABLE_V1_MULTIPROCESSING=1 (vLLM's own processes) OSP's weights go through a tmpfs
copy, never the run folder. The runtime is the same in all four scripts: its tests run against each."""

import copy
import hashlib
import importlib
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOY_MODEL = ROOT / "assets" / "toy" / "model"
SCRIPTS = ["sera", "opsr", "osp", "srdpo"]
CPU = torch.device("cpu")
PROMPTS = [[{"role": "user", "content": "Sort these letters: b a c"}], [{"role": "user", "content": "Sort: z y"}]]
ENGINE_ARGS = {  # vllm.LLM keyword arguments (EngineArgs fields) the runtime may pass
    "model", "seed", "gpu_memory_utilization", "dtype", "enable_sleep_mode", "enable_chunked_prefill",
    "max_model_len", "distributed_executor_backend",
}  # fmt: skip


def fingerprint(weights: dict) -> str:
    """A digest of the weights' names and bytes."""
    digest = hashlib.sha1()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Engine:
    """vllm.LLM as the runtime uses it. Starting it does what vLLM's in-process worker does to its process (seeds
    torch, replaces torch.set_num_threads on CPU, sets the matmul precision, sets env variables); its samples are
    `fingerprint(held weights) i.k`."""

    def __init__(self, events, **kwargs):
        assert set(kwargs) <= ENGINE_ARGS, set(kwargs) - ENGINE_ARGS
        self.events, self.dtype = events, getattr(torch, kwargs["dtype"])
        events.append(("engine", kwargs, dict(os.environ)))
        self.weights = {
            k: v.to(self.dtype) for k, v in load_file(str(Path(kwargs["model"]) / "model.safetensors")).items()
        }
        torch.manual_seed(1234)
        torch.set_num_threads = lambda n: None
        torch.set_float32_matmul_precision("medium")
        os.environ["LD_PRELOAD"] = "libgomp.so.1"

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and not args and timeout is None
        assert set(kwargs) in ({"weights_iterator"}, {"weights_path"}), kwargs
        if "weights_path" in kwargs:
            self.events.append(("reload", kwargs["weights_path"]))
            loaded = load_file(str(Path(kwargs["weights_path"]) / "model.safetensors"))
        else:
            iterator = kwargs["weights_iterator"]
            assert iter(iterator) is iterator, "the weights come as a stream, not materialized"
            loaded, dtypes = {}, set()
            for name, tensor in iterator:
                loaded[name] = tensor.detach().clone()
                dtypes.add(tensor.dtype)
            self.events.append(("push", sorted(loaded), dtypes))
        assert set(loaded) == set(self.weights), set(loaded) ^ set(self.weights)
        self.weights = {k: v.to(self.dtype) for k, v in loaded.items()}
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.events.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1, mode="abort"):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        assert tags in (["weights"], ["kv_cache"])
        self.events.append(("wake", tags[0]))
        return True

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        assert len(prompts) == len(sampling_params) and all(set(p) == {"prompt_token_ids"} for p in prompts)
        self.events.append(("generate",))
        out = lambda i, k: types.SimpleNamespace(text=f"{fingerprint(self.weights)} {i}.{k}", finish_reason="stop")  # noqa: E731
        return [types.SimpleNamespace(outputs=[out(i, k) for k in range(p.n)]) for i, p in enumerate(sampling_params)]


@pytest.fixture
def engine(monkeypatch):
    """Installs the stand-in; returns (events, set_gpu). The trainer's settings it disturbs are restored after."""
    events, gpu = [], {"on": False}
    platform = types.SimpleNamespace(is_sleep_mode_available=lambda: gpu["on"], is_cpu=lambda: not gpu["on"])
    stand_in = types.SimpleNamespace(
        LLM=lambda **kwargs: Engine(events, **kwargs), SamplingParams=lambda **k: types.SimpleNamespace(**k)
    )
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=platform))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # restored even if the runtime did not
    monkeypatch.setenv("LD_PRELOAD", os.environ.get("LD_PRELOAD", ""))  # likewise
    precision = torch.get_float32_matmul_precision()
    yield events, lambda on: gpu.update(on=on)
    torch.set_float32_matmul_precision(precision)


def script(name, monkeypatch):
    module = importlib.import_module(name)
    for field in ("llm", "path", "max_model_len", "dtype", "spill"):
        monkeypatch.setattr(module.VLLMEngine, field, None, raising=False)
    monkeypatch.setattr(module.VLLMEngine, "in_process", True, raising=False)
    return module


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32), AutoTokenizer.from_pretrained(
        TOY_MODEL
    )


def nudge(model, scale):
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "mlp" in name:
                weight.mul_(scale)


def state(model, dtype=torch.float32):
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_push_sends_the_policy_in_memory_and_writes_nothing(name, engine, toy, monkeypatch, tmp_path):
    """OSP's step (generate with push=True): the engine starts from the policy's own folder, in this process, and
    every call pushes the policy's weights as they are then, streamed one tensor at a time in the engine's dtype,
    followed by a prefix-cache reset; the samples are those of the pushed weights. Nothing is written (no run-folder
    or tmpfs copy), and the trainer keeps its random numbers, threads, matmul precision and environment."""
    events, _ = engine
    module = script(name, monkeypatch)
    model, tokenizer = toy
    policy = copy.deepcopy(model)
    args = module.resolve(module.Args(sampler="vllm"))[0] if hasattr(module.Args(), "sampler") else None
    args = args or types.SimpleNamespace(sampler="vllm", dtype="auto", max_prompt_length=64, max_new_tokens=24)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    rng, threads, environment = torch.get_rng_state(), torch.get_num_threads(), dict(os.environ)
    precision = torch.get_float32_matmul_precision()
    first = module.generate(policy, tokenizer, PROMPTS, 2, 1.0, 1.0, args, CPU, 0, desc="sample", push=True)
    nudge(policy, 1.5)  # an optimizer step
    second = module.generate(policy, tokenizer, PROMPTS, 2, 1.0, 1.0, args, CPU, 1, desc="sample", push=True)
    assert first[0][0][0].split()[0] == fingerprint(state(model)) != second[0][0][0].split()[0]
    assert second[0][0][0].split()[0] == fingerprint(state(policy)) and [len(g) for g in second] == [2, 2]
    kinds = [e[0] for e in events]
    assert kinds == ["engine", "push", "reset_prefix_cache", "generate", "push", "reset_prefix_cache", "generate"]
    engine_kwargs, engine_env = events[0][1], events[0][2]
    assert engine_kwargs["model"] == policy.name_or_path and "distributed_executor_backend" not in engine_kwargs
    assert engine_env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in this process
    assert events[1][1] == sorted(policy.state_dict()) and events[1][2] == {torch.float32}  # the engine's dtype
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert torch.set_num_threads.__module__ == "torch" and torch.get_float32_matmul_precision() == precision
    assert dict(os.environ) == environment
    assert list(tmp_path.iterdir()) == [] and module.VLLMEngine.spill is None


@pytest.mark.parametrize("name", ["sera", "opsr"])
def test_iteration_boundaries_push_a_plain_policy_and_read_a_lora_one_from_its_export(name, engine, toy, monkeypatch):
    """sera/opsr sample from an iteration's export that holds the policy's weights: the engine (started from it)
    reloads only when the export changes (no sleep, CPU) or at every wake-up (sleep mode, GPU), and then takes a
    plain policy's weights from memory (no read of the export); a LoRA-wrapped policy's from the export."""
    events, set_gpu = engine
    module = script(name, monkeypatch)
    model, tokenizer = toy
    args = module.resolve(module.Args(sampler="vllm"))[0]
    iteration = copy.deepcopy(model)
    nudge(iteration, 0.5)

    def call(policy, path):
        module.generate(policy, tokenizer, PROMPTS, 1, 1.0, 1.0, args, CPU, 0, str(path), "eval")
        return [e[0] for e in events[len(seen) :]], events[-1]

    seen = []
    assert call(model, TOY_MODEL)[0] == ["engine", "generate"]
    seen = list(events)
    assert call(model, TOY_MODEL)[0] == ["generate"]  # the same export: nothing to do
    seen = list(events)
    kinds, _ = call(iteration, "/runs/x/iter_1")  # its export need not be read: the policy is in memory
    assert kinds == ["push", "reset_prefix_cache", "generate"] and events[-3][2] == {torch.float32}
    seen = list(events)
    lora = types.SimpleNamespace(peft_config={"default": None}, generation_config=model.generation_config)
    kinds, _ = call(lora, TOY_MODEL)
    assert kinds == ["reload", "reset_prefix_cache", "generate"] and events[len(seen)][1] == str(TOY_MODEL)
    set_gpu(True)  # sleep mode: the weights are dropped after each call, so every call brings them back
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for _ in range(2):
        seen = list(events)
        kinds, _ = call(iteration, "/runs/x/iter_1")
        assert kinds == ["wake", "push", "reset_prefix_cache", "wake", "generate", "sleep"], kinds
        assert events[-2][1:] == () and events[-1] == ("sleep", 2)


def test_engine_in_vllm_processes_gets_osp_weights_through_tmpfs(engine, toy, monkeypatch, tmp_path):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 (the engine in vLLM's own processes, which take no tensors from here): OSP's
    policy is saved to rank 0's tmpfs (/dev/shm, named by its process id; not the run folder) and read from there,
    every call; the copy is the policy's weights in its checkpoint's dtype."""
    events, _ = engine
    module = script("osp", monkeypatch)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    model, tokenizer = toy
    policy = copy.deepcopy(model)
    args = module.resolve(module.Args(sampler="vllm"))[0]
    monkeypatch.chdir(tmp_path)
    spill = Path("/dev/shm") / f"selfpo-vllm-{os.getpid()}"
    try:
        for step in range(2):
            nudge(policy, 1.25)
            out = module.generate(policy, tokenizer, PROMPTS, 2, 1.0, 1.0, args, CPU, step, desc="sample", push=True)
            assert out[1][1][0].split()[0] == fingerprint(state(policy))
            saved = load_file(str(spill / "model.safetensors"))
            assert all(torch.equal(saved[k], v) for k, v in policy.state_dict().items())
        assert events[0][2]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and module.VLLMEngine.in_process is False
        kinds = [e[0] for e in events]
        assert kinds == ["engine"] + ["reload", "reset_prefix_cache", "generate"] * 2
        assert {e[1] for e in events if e[0] == "reload"} == {str(spill)} and list(tmp_path.iterdir()) == []
    finally:
        import shutil

        shutil.rmtree(spill, ignore_errors=True)


def test_torchrun_ranks_start_their_engine_in_process_on_their_own_gpu(engine, monkeypatch):
    """Under torchrun each rank's engine runs in its process with vLLM's external launcher (it joins torchrun's
    process group and takes LOCAL_RANK's GPU, as TRL's colocate mode does): CUDA_VISIBLE_DEVICES is left alone."""
    events, set_gpu = engine
    module = script("sera", monkeypatch)
    set_gpu(True)
    monkeypatch.setattr(module, "world", lambda: 2)
    monkeypatch.setattr(module, "rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    args = module.resolve(module.Args(sampler="vllm"))[0]
    module.vllm_generate([[5, 6, 7]], [0], 1, 1.0, 1.0, args, 0, str(TOY_MODEL), "eval", [1])
    kwargs, env = events[0][1], events[0][2]
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_osp_steps_push_each_updated_policy_and_write_no_sampler_folder(engine, toy, monkeypatch, tmp_path):
    """Two OSP Stage 1 steps with --sampler vllm (the judge stubbed): each step's samples come from the policy as
    it is at that step (after the previous step's update), pushed in memory; the run folder gets the steps' pairs
    and nothing else (no sampler/ checkpoint per step)."""
    import json

    events, _ = engine
    osp = script("osp", monkeypatch)
    model, tokenizer = toy
    policy, ref = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False).eval()
    a = osp.resolve(osp.Args(sampler="vllm", k=4, prompts_per_step=2, micro_batch_size=4, warmup_ratio=0.0))[0]
    pool = [[{"role": "user", "content": f"Sort these letters: {w}"}] for w in ("q d m a", "z b k", "e c", "f g")]
    judge = lambda comparisons: [1 / (1 + math.exp(int(y[-1]) - int(x[-1]))) for _, x, y in comparisons]  # noqa: E731
    monkeypatch.setattr(osp, "make_judge", lambda *args, **kwargs: judge)
    template = osp.JUDGE_TEMPLATES["dialogue"]
    judging, opt = (template, osp.verdict_ids(tokenizer, ["A", "B"], template)), osp.make_optimizer(policy, a.lr, 10, a)
    before = []
    for step in range(2):
        before.append(fingerprint(state(policy)))
        osp.online_step(policy, ref, tokenizer, pool, step, judging, opt, a, CPU, {}, tmp_path)
    assert [e[0] for e in events] == ["engine"] + ["push", "reset_prefix_cache", "generate"] * 2
    for step in range(2):
        rows = [json.loads(line) for line in open(tmp_path / "pairs" / f"step_{step + 1:05d}.jsonl")]
        assert rows and {r["chosen_text"].split()[0] for r in rows} == {before[step]}
    assert before[0] != before[1] and sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
