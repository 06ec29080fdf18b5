"""A fake-GPU dry run of every 7B preset: the scripts' own GPU-path functions at the presets' real settings, with
fake CUDA tensors, a fake process group as strict as NCCL, and the per-rank peak memory of each phase.

    python3 -m venv .venv-fakegpu  # once: the CUDA build of torch (about 5 GB), see README "GPUs and many ranks"
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv-fakegpu/bin/pip install torch==2.13.0
    .venv-fakegpu/bin/pip install transformers peft safetensors tyro datasets
    .venv-fakegpu/bin/pip install -e . --no-deps
    .venv-fakegpu/bin/python benchmarks/dryrun.py --phases   # all presets; --only sera:mistral-7b:8 for one

Each (script, preset, ranks) runs in its own process as the last rank of `ranks` (a FakeTensorMode process: no
weights, no values, no kernels; benchmarks/fakegpu/fakecudart.c answers torch's device queries, built on first
use). from_pretrained is replaced by the preset's config (see CONFIGS), materialised on the fake host; the script's
own `load_model` moves it to the fake GPU, or under FSDP2 sends each rank its shards from rank 0, which this
process plays while a model loads (with no peers here; every rank's GPU work in that load is rank 0's: one full
tensor in flight besides its shards). Every tensor collective must get tensors on
cuda:current_device(), as NCCL requires (benchmarks/fakegpu/guard.py). One line per (script, preset, ranks): the
largest phase's peak (what was resident before it + what the phase added, and the ops whose outputs held the
most), the peak of every phase, the collectives checked; GiB per rank. Exit status 1 on any failure or a peak
over --limit_gib.

Host reads of fake tensors (`.tolist()`, `.item()`, `bool()`: a sampled permutation, the step statistics, scored
log-probs) have no values; here they read as ones, booleans as False (`host_reads_as_ones`), so control flow that
depends on data takes one arbitrary branch. What the dry run does not see: numerics, kernel launch limits, NCCL
hangs between ranks (each process is alone), allocator fragmentation, the CUDA context and NCCL buffers (a few GB
per GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKEGPU = Path(__file__).resolve().parent / "fakegpu"

# The scripts' names this dry run calls (a refactor of the runtime section should keep them, or update this list).
SCRIPT_API = {
    "all": ("MODELS", "Args", "resolve", "load_model", "prepare_for_training", "make_optimizer", "world"),
    # -> micro_batches, collate, causal_lm_pair_loss, daa_loss, StepStats, optimizer_step (its all-reduces)
    "sera": ("train_iteration", "score", "unsharded_copy"),
    "opsr": ("train_iteration", "score", "unsharded_copy"),
    "srdpo": ("train", "score"),  # -> sr_losses, shared_prefix_logps, all_sum, micro_batches, optimizer_step
    "osp": ("augment", "spce_backward", "optimizer_step", "unsharded_copy"),
}
SCRIPTS = ("sera", "srdpo", "opsr", "osp")

# Model configs of the presets' hub ids (no download here), from their config.json.
MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "alignment-handbook/zephyr-7b-sft-full": ("mistral", dict(MISTRAL_7B, rope_theta=10000.0, sliding_window=4096)),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", dict(MISTRAL_7B, rope_theta=1e6, sliding_window=None)),
}
PAD_ID = 2  # zephyr's and Mistral-Instruct's pad = eos
REFINE_TOKENS = 64  # srdpo: the refinement prompt's tokens (the paper's ~45 words), added to the length budget
GIB = 1 << 30
# Micro-batches per optimizer step in the training phase: 2 shows gradient accumulation (FSDP2 without gradient
# sync before the last one holds unsharded gradients); the presets' own counts (up to 8) cost time, not memory.
MICRO_BATCHES = int(os.environ.get("DRYRUN_MICRO_BATCHES", "2"))


def presets() -> list[tuple[str, str, int]]:
    """(script, preset, ranks) for every preset of the four scripts whose model is 7B-sized (a path in CONFIGS or
    '7b' in its name): LoRA presets at 1 and 8 ranks, full fine-tuning at 8 (FSDP2)."""
    runs = []
    for script in SCRIPTS:
        module = load_script(script)
        for name, preset in module.MODELS.items():
            if preset["path"] in CONFIGS or "7b" in name.lower() or "7b" in preset["path"].lower():
                runs += [(script, name, ranks) for ranks in ((1, 8) if preset.get("lora_r", 0) > 0 else (8,))]
    return runs


def load_script(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------------------------
# The fake device, the host reads of fake tensors, the model without weights


def fake_runtime_env() -> dict:
    """LD_PRELOAD for the stand-in CUDA runtime, built with gcc against the CUDA headers of the triton wheel."""
    build = FAKEGPU / "build"
    library = build / "libfakecudart.so"
    source = FAKEGPU / "fakecudart.c"
    if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
        import triton

        include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
        build.mkdir(exist_ok=True)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-I", str(include), "-o", str(library), str(source)], check=True
        )
        (build / "libcuda.so.1").unlink(missing_ok=True)
        (build / "libcuda.so.1").symlink_to(library.name)  # the driver library torch dlopens: the same stand-in
    env = dict(os.environ, LD_PRELOAD=str(library), LD_LIBRARY_PATH=f"{build}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    env.update(TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", KERNELS_IMPL="auto")
    return env


@contextlib.contextmanager
def host_reads_as_ones():
    """`.tolist()`, `.item()`, `bool/int/float()` of a fake tensor without a known value give ones (False for
    booleans: no validation check fires) instead of raising (a fake tensor has no values); real tensors and fake
    ones with a known constant are untouched."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, is_fake
    from torch.utils._python_dispatch import _disable_current_modes

    saved = []
    for cls in (torch.Tensor, FakeTensor):
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
            if name not in cls.__dict__ and cls is FakeTensor:
                continue
            original = getattr(cls, name)
            saved.append((cls, name, original))

            def read(self, *args, _original=original, _name=name):
                try:
                    return _original(self, *args)
                except DataDependentOutputException:
                    if not is_fake(self):
                        raise
                    with _disable_current_modes():  # no fake mode, no memory tracker: a plain CPU tensor
                        fill = torch.zeros if self.dtype == torch.bool else torch.ones
                        return getattr(fill(self.shape, dtype=self.dtype), _name)(*args)

            setattr(cls, name, read)
    try:
        yield
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


@contextlib.contextmanager
def configs_for_from_pretrained():
    """transformers' from_pretrained -> the preset's config on the meta device, materialised (uninitialised) on
    the fake host inside the active FakeTensorMode, as from_pretrained reads; AutoConfig.from_pretrained -> that
    config."""
    import torch
    import transformers
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def config(path):
        model_type, values = CONFIGS[path]
        config = transformers.AutoConfig.for_model(model_type, **values)
        config.dtype = torch.bfloat16
        return config

    def model_from_pretrained(path, dtype=torch.float32, output_loading_info=False, **kwargs):
        with unset_fake_temporarily(), torch.device("meta"):  # plain meta: to_empty then swaps in fake tensors
            model = transformers.AutoModelForCausalLM.from_config(config(path), dtype=dtype)
        model = model.to_empty(device=torch.device("cpu"))
        if output_loading_info:  # every weight "loaded": the config is the checkpoint's own
            return model, dict(missing_keys=[], unexpected_keys=[], mismatched_keys=[], error_msgs=[])
        return model

    auto_model, auto_config = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoConfig.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(model_from_pretrained)
    transformers.AutoConfig.from_pretrained = staticmethod(lambda path, **kwargs: config(path))
    try:
        yield
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = auto_model
        transformers.AutoConfig.from_pretrained = auto_config


@contextlib.contextmanager
def rebinding_module_apply():
    """nn.Module.to/.cuda/.half on fake parameters: torch swaps them in place (swap_tensors), which fails on fake
    tensors ("has weakref associated with it"); rebind new Parameters instead, as the model is only being built."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    original = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        tensors = [t for t in list(self._parameters.values()) + list(self._buffers.values()) if t is not None]
        if not any(is_fake(t) for t in tensors):
            return original(self, fn, recurse)
        if recurse:
            for module in self.children():
                module._apply(fn)
        for key, param in self._parameters.items():
            if param is None:
                continue
            with torch.no_grad():
                applied = fn(param)
            if applied is not param:
                new = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
                if param.grad is not None:
                    new.grad = fn(param.grad)
                self._parameters[key] = new
        for key, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[key] = fn(buffer)
        return self

    torch.nn.Module._apply = _apply
    try:
        yield
    finally:
        torch.nn.Module._apply = original


def as_rank_0(load):
    """`load` (the script's load_model) with this process as rank 0, which reads the weights and sends them."""
    import torch.distributed as dist

    def loaded(*args, **kwargs):
        get_rank, dist.get_rank = dist.get_rank, lambda group=None: 0
        try:
            return load(*args, **kwargs)
        finally:
            dist.get_rank = get_rank

    return loaded


# ---------------------------------------------------------------------------------------------------------------
# Phases: each measured on its own, with what stays resident from the phases before tracked as well


class NoConstantsOnDevice:
    """FakeTensorMode folds ops on small constant tensors (torch.tensor([...])) by running them for real, copies
    to the GPU included, unless it sees no GPU (`avoid_device_init`); there is none to run them on here."""

    @staticmethod
    def install():
        from torch._subclasses.fake_tensor import FakeTensorMode

        FakeTensorMode.avoid_device_init = property(lambda self: True)


class LiveMemory:
    """Bytes of live storages on one device, and their peak, seen by a dispatch mode (every op's outputs) plus the
    tensors said to be resident when it starts. A storage counts once (views and in-place ops share it) until its
    last reference dies. (torch's MemTracker categorises by module hooks; it fails on frozen weights and on a root
    module run twice in one tracked region, as two micro-batches are.)"""

    def __init__(self, device):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.device, self.live, self.current, self.peak = device, {}, 0, 0
        self.origin, self.at_peak = {}, {}  # storage -> the op that made it; bytes by op at the peak
        self.collect, self.snapshot_peak = os.environ.get("DRYRUN_GC", "0") == "1", 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in torch.utils._pytree.tree_leaves(out):
                    tracker.add(leaf, func.__name__.split(".")[0])
                return out

        self.mode = Mode()

    def add(self, tensor, origin: str = "resident") -> int:
        """Count `tensor`'s storage if new; returns the bytes added."""
        import weakref

        import torch

        if not isinstance(tensor, torch.Tensor):
            return 0
        if hasattr(tensor, "to_local"):  # a DTensor: its shard
            tensor = tensor.to_local()
        if tensor.device != self.device:
            return 0
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return 0
        self.live[key] = size = storage.nbytes()
        self.origin[key] = origin
        self.current += size
        if self.current > self.peak + (1 << 30) and self.collect:
            import gc

            gc.collect()  # storages only in reference cycles are not live: count them out before a new peak
        if self.current > self.peak:
            if self.current > self.snapshot_peak + (256 << 20):  # a breakdown every 256 MB of new peak, not per op
                self.at_peak, self.snapshot_peak = {}, self.current
                for k, nbytes in self.live.items():
                    self.at_peak[self.origin[k]] = self.at_peak.get(self.origin[k], 0) + nbytes
            self.peak = self.current
        weakref.finalize(storage, self._free, key)
        return size

    @contextlib.contextmanager
    def storage_resizes(self):
        """FSDP2 frees and re-allocates unsharded parameters by resizing their storages in place
        (`untyped_storage().resize_(0)`), which no op output shows: count those resizes too."""
        import torch

        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            key, before = storage._cdata, storage.nbytes()
            out = original(storage, size)
            if key in tracker.live:
                delta = storage.nbytes() - before
                tracker.live[key] += delta
                tracker.current += delta
                tracker.peak = max(tracker.peak, tracker.current)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    def _free(self, key):
        self.current -= self.live.pop(key, 0)
        self.origin.pop(key, None)

    def top(self, n: int = 4) -> str:
        """The ops whose outputs held the most at (about) the peak."""
        ranked = sorted(((v, k) for k, v in self.at_peak.items() if k != "resident"), reverse=True)[:n]
        return ", ".join(f"{k} {v / GIB:.1f}" for v, k in ranked)


def resident_tensors(obj):
    """Parameters, buffers and gradients of a module; the state of an optimizer."""
    import torch

    if isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class Phases:
    def __init__(self, rank: int):
        self.rank = rank
        self.peaks: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []
        self.top: dict[str, str] = {}

    def run(self, name: str, fn, resident=None):
        """fn() with live memory tracked; `resident` = {label: module or optimizer} made before it, counted by label.
        The rest of the peak is the phase's own (activations, gradients, gathered shards, temporaries)."""
        import torch

        memory = LiveMemory(torch.device("cuda", self.rank))
        parts = {}
        for label, obj in (resident or {}).items():
            if obj is not None:
                parts[label] = parts.get(label, 0) + sum(memory.add(t) for t in resident_tensors(obj)) / GIB
        tic = time.perf_counter()
        with memory.mode, memory.storage_resizes():
            result = fn()
        peak = memory.peak / GIB
        self.peaks[name] = dict(parts, Total=peak, phase=peak - sum(parts.values()), seconds=time.perf_counter() - tic)
        self.top[name] = memory.top()
        return result


def categories(peak: dict[str, float]) -> str:
    return " + ".join(f"{k} {v:.2f}" for k, v in peak.items() if k not in ("Total", "seconds"))


def sequences(count: int, prompt: int, response: int, offset: int = 3) -> list[tuple[list[int], list[int]]]:
    return [
        ([offset + (i + t) % 1000 for t in range(prompt)], [offset + (i * 7 + t) % 1000 for t in range(response)])
        for i in range(count)
    ]


def pair_rows(count: int, prompt: int, response: int) -> list[dict]:
    return [
        dict(prompt_ids=p, chosen_ids=c, rejected_ids=list(reversed(c)), ref_chosen=-1.0, ref_rejected=-2.0, q=0.7)
        for p, c in sequences(count, prompt, response)
    ]


def prefill(sampler, batch: int, length: int, device):
    """The memory of HF generate at its longest: a KV cache over prompt + max_new_tokens for the whole generation
    batch, in one no-grad forward under autocast, logits for the last position only (as generate asks)."""
    import torch

    ids = torch.full((batch, length), 5, dtype=torch.long, device=device)
    training, _ = sampler.training, sampler.eval()  # as generate() does
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = sampler(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    sampler.train(training)
    return out.past_key_values


def warmed_optimizer(script, model, lr, args, schedule, kind=None):
    """The script's optimizer with its state created (one step on zero gradients, outside the trackers: the state
    then counts as resident optimizer state, and the tracked step sees only its own temporaries)."""
    import torch

    extra = {} if kind is None else {"kind": kind}
    trainable, optimizer, scheduler = script.make_optimizer(model, lr, 1, args, schedule, None, **extra)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return trainable, optimizer, scheduler


@contextlib.contextmanager
def same_optimizer(script, made):
    """The script's make_optimizer returns `made` (warmed) while the training function runs."""
    original = script.make_optimizer
    script.make_optimizer = lambda *args, **kwargs: made
    try:
        yield
    finally:
        script.make_optimizer = original


@contextlib.contextmanager
def one_host(script):
    """score() shards its sequences over ranks and merges (index, log-prob) lists with all_gather_object, which a
    fake process group cannot carry; give this rank one scoring batch of its own instead (the same device work per
    rank; the host-side merge is not exercised)."""
    world, rank = script.world, script.rank
    script.world, script.rank = (lambda: 1), (lambda: 0)
    try:
        yield
    finally:
        script.world, script.rank = world, rank


def scored(script, model, args, prompt, response, device):
    with one_host(script):
        return script.score(model, sequences(args.scoring_batch_size, prompt, response), args, PAD_ID, device, "score")


def drive(script_name: str, preset_name: str, ranks: int, phases: Phases):
    """The script's GPU path for one preset, phase by phase, in the order its main() runs them."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    import selfpo_kernels

    S = load_script(script_name)
    overrides = {}
    preset = S.MODELS[preset_name]
    if "global_batch" in preset and preset["global_batch"] % (preset["batch_size"] * ranks):
        # the preset's global batch does not split into its micro-batch on this many ranks: the largest that does
        per_rank = preset["global_batch"] // ranks
        overrides["batch_size"] = max(b for b in range(1, preset["batch_size"] + 1) if per_rank % b == 0)
        phases.notes.append(
            f"--batch_size {overrides['batch_size']} (global_batch {preset['global_batch']} is not a "
            f"multiple of the preset's {preset['batch_size']} x {ranks} ranks)"
        )
    args, preset = S.resolve(S.Args(model=preset_name, **overrides))
    device = torch.device("cuda", torch.cuda.current_device())
    impl = selfpo_kernels.resolve_impl("auto", device)
    if impl != "triton":
        raise RuntimeError(f"the kernels would take impl={impl!r} on the GPU, not the Triton path")
    path, world, lora = preset["path"], S.world(), args.lora_r > 0
    assert world == ranks, (world, ranks)
    prompt, response = args.max_prompt_length, args.max_length - args.max_prompt_length

    def no_log(*a, **k):
        return None

    load_model = as_rank_0(S.load_model)
    model = phases.run("load", lambda: S.prepare_for_training(load_model(path, device, args), args))
    sharded = isinstance(model, FSDPModule)
    ref_model = None
    if script_name == "osp":
        made = warmed_optimizer(S, model, args.aug_lr, args, "cosine")
        examples = [
            dict(prompt_ids=p, response_ids=r, kind="judge")
            for p, r in sequences(args.aug_batch_size, args.judge_max_length - 8, 8)
        ]  # stage 0's longest: judge instances
        with same_optimizer(S, made):
            phases.run(
                "augment",
                lambda: S.augment(model, examples, args, device, PAD_ID, no_log),
                {"weights": model, "opt": made[1]},
            )
        del made
        if not lora:
            ref_model = phases.run("load-ref", lambda: load_model(path, device, args, frozen=True), {"weights": model})

    if script_name != "srdpo":  # sampling: HF generate on the policy, or on an unsharded bf16 copy of it
        n = {"sera": getattr(args, "n_cand", 1), "opsr": 1, "osp": getattr(args, "k", 1)}[script_name]
        per_call = max(1, args.generation_batch_size // n) * n  # generate(): prompts per call x samples each

        def sample():
            sampler = S.unsharded_copy(model, args) if sharded else model
            prefill(sampler, per_call, args.max_prompt_length + args.max_new_tokens, device)

        phases.run("sample", sample, {"weights": model, "ref": ref_model})

    if script_name in ("sera", "opsr", "srdpo"):  # reference log-probs, as the policy trains (scoring_batch_size)
        phases.run("score", lambda: scored(S, model, args, prompt, response, device), {"weights": model})
    if script_name == "sera":  # candidates scored under an older model, loaded frozen next to the policy

        def frozen_score():
            scored(S, load_model(path, device, args, frozen=True), args, prompt, response, device)

        phases.run("score-older", frozen_score, {"weights": model})
    if script_name == "osp":  # the policy judges: decoder body once per batch, two verdict rows of the head
        from selfpo_kernels import decoder_hidden_states, head_logits

        def judge():
            ids = torch.full((args.judge_batch_size, args.judge_max_length), 5, dtype=torch.long, device=device)
            with torch.no_grad():
                hidden = decoder_hidden_states(model, ids, torch.ones_like(ids))
                head_logits(model, hidden[:, -1], [330, 365])
            if hasattr(model, "reshard"):
                model.reshard()

        phases.run("judge", judge, {"weights": model, "ref": ref_model})

    # training: MICRO_BATCHES per rank, one optimizer step with its reductions
    if script_name == "osp":
        made = warmed_optimizer(S, model, args.lr, args, "constant")
        tuples = pair_rows(MICRO_BATCHES * args.micro_batch_size * world, prompt, response)

        def step():
            sums = S.spce_backward(model, ref_model, tuples, args, device, PAD_ID)
            S.optimizer_step(*made, sums, args, "step 1")

        phases.run("train", step, {"weights": model, "ref": ref_model, "opt": made[1]})
        return
    micro = args.batch_size
    per_step = MICRO_BATCHES * micro * world
    import dataclasses

    os.environ["WORLD_SIZE"] = str(world)
    args = dataclasses.replace(args, global_batch=per_step)
    pairs = pair_rows(per_step, prompt, response)
    if script_name == "srdpo":
        aug = prompt + REFINE_TOKENS + 4
        for p in pairs:
            p.update(
                aug_prompt_ids=[9] * 8 + p["prompt_ids"][: aug - 8],
                aug_chosen_ids=p["chosen_ids"],
                aug_rejected_ids=p["rejected_ids"],
                ref_aug_chosen=-1.0,
                ref_aug_rejected=-2.0,
            )
        made = warmed_optimizer(S, model, args.lr, args, "constant", args.optimizer)
        with same_optimizer(S, made):
            phases.run(
                "train",
                lambda: S.train(model, pairs, args, device, PAD_ID, no_log, no_log),
                {"weights": model, "opt": made[1]},
            )
    else:
        lr = args.lr if script_name == "sera" else args.lrs[0]
        made = warmed_optimizer(S, model, lr, args, args.scheduler)
        with same_optimizer(S, made):
            phases.run(
                "train",
                lambda: S.train_iteration(model, pairs, 1, args, lr, device, PAD_ID, no_log, no_log),
                {"weights": model, "opt": made[1]},
            )


def child(script_name: str, preset_name: str, ranks: int, limit_gib: float) -> int:
    """One (script, preset, ranks) in this process, as the last rank. Prints one line; 0 if clean and under limit."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    sys.path.insert(0, str(FAKEGPU))
    import guard

    rank = ranks - 1  # not rank 0: a tensor on cuda:0 by accident is then off the current device
    os.environ.update(WORLD_SIZE=str(ranks), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    if ranks > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
        # fully_shard's default mesh, made once here: building one under fake mode reads rank coordinates back
        import torch.distributed.fsdp._fully_shard._fully_shard as fully_shard_module
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (ranks,))
        fully_shard_module._init_default_mesh = lambda *args, **kwargs: mesh
    guard.install()
    if ranks > 1:  # the rule is in force: a CPU tensor in a collective fails
        try:
            dist.all_reduce(torch.zeros(1))
            raise AssertionError("the NCCL device guard let a CPU tensor through")
        except guard.CollectiveDeviceError:
            guard.CHECKED.clear()
    NoConstantsOnDevice.install()
    phases = Phases(rank)
    label = f"{script_name} {preset_name} ranks={ranks}"
    tic = time.perf_counter()
    try:
        with (
            FakeTensorMode(allow_non_fake_inputs=True),
            host_reads_as_ones(),
            configs_for_from_pretrained(),
            rebinding_module_apply(),
        ):
            drive(script_name, preset_name, ranks, phases)
    except Exception as err:  # noqa: BLE001 - reported, and the run fails
        import traceback

        traceback.print_exc()
        done = " ".join(f"{k} {v['Total']:.1f}" for k, v in phases.peaks.items() if "Total" in v)
        print(
            f"{label}: FAILED in phase {len(phases.peaks) + 1} after [{done}]: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}",
            flush=True,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    worst = max(phases.peaks, key=lambda k: phases.peaks[k].get("Total", 0.0))
    total = phases.peaks[worst].get("Total", 0.0)
    per_phase = " ".join(f"{k} {v.get('Total', 0.0):.1f}" for k, v in phases.peaks.items())
    verdict = "fits" if total <= limit_gib else f"OVER {limit_gib:.0f}"
    if ranks > 1:
        checked = ", ".join(f"{k} {v}" for k, v in sorted(guard.CHECKED.items()))
        phases.notes.append(f"collectives checked on cuda:{rank}: {checked}")
    notes = "".join(f" | note: {n}" for n in phases.notes)
    print(
        f"{label}: peak {total:.1f} GiB/rank in {worst} ({categories(phases.peaks[worst])}; phase's largest: "
        f"{phases.top[worst]}) | phases: {per_phase} "
        f"| {verdict} | {time.perf_counter() - tic:.0f}s{notes}",
        flush=True,
    )
    for name, peak in phases.peaks.items():
        print(f"    {label} {name}: {peak['Total']:.1f} GiB ({categories(peak)}); largest: {phases.top[name]}")
    return 0 if total <= limit_gib else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="script:preset:ranks (e.g. sera:mistral-7b:8)")
    parser.add_argument(
        "--limit_gib",
        type=float,
        default=74.5,
        help="per-rank budget of tracked tensors: 80 GB (74.5 GiB) less nothing; the CUDA context and "
        "NCCL buffers (a few GiB) are not tracked",
    )
    parser.add_argument("--list", action="store_true", help="print the (script, preset, ranks) runs and exit")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also a line per phase: its peak by part, and the ops whose outputs held the most at the peak",
    )
    parser.add_argument("--child", nargs=3, metavar=("SCRIPT", "PRESET", "RANKS"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        return child(opts.child[0], opts.child[1], int(opts.child[2]), opts.limit_gib)
    runs = presets()
    if opts.only:
        wanted = [tuple(x.split(":")) for x in opts.only]
        runs = [r for r in runs if (r[0], r[1], str(r[2])) in wanted]
        if len(runs) != len(wanted):
            parser.error(
                f"--only: {opts.only} are not all 7B runs; they are {[':'.join(map(str, r)) for r in presets()]}"
            )
    if opts.list:
        for run in runs:
            print(":".join(map(str, run)))
        return 0
    import torch

    if torch.version.cuda is None:
        sys.exit(f"dryrun.py: needs the CUDA build of torch (this is {torch.__version__}); see the README")
    import platform

    import transformers

    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    print(
        f"# dry run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, fake CUDA, {os.cpu_count()} x {cpu}; GiB per rank of tracked tensors (context "
        "and NCCL buffers not included)",
        flush=True,
    )
    env, failed = fake_runtime_env(), 0
    for script_name, preset_name, ranks in runs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            script_name,
            preset_name,
            str(ranks),
            "--limit_gib",
            str(opts.limit_gib),
        ]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        label = f"{script_name} {preset_name} ranks={ranks}"
        lines = [line for line in res.stdout.splitlines() if line.startswith(label)]
        print(lines[-1] if lines else f"{label}: FAILED (exit {res.returncode}) without a result line", flush=True)
        if opts.phases:
            print("\n".join(line for line in res.stdout.splitlines() if line.startswith(f"    {label}")), flush=True)
        if res.returncode != 0:
            failed += 1
            sys.stderr.write(res.stderr[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
