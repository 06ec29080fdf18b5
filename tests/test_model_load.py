"""Loading a model for FSDP2 (full fine-tuning under torchrun), on 2 gloo ranks in one spawn for all four scripts:
every rank builds the model on the meta device and only rank 0 reads the weights, which are sharded into place
(torch's set_model_state_dict, broadcast from rank 0). The result equals the single-process load: weights,
dtypes, rotary buffers (not in the state dict), tied embeddings, log-probs, and a short training run equals
today's path (each rank reading the whole fp32 model, then sharding it) bit for bit."""

import importlib
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "assets" / "toy" / "model"
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
CPU = torch.device("cpu")


def batch(seed: int):
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, torch.ones_like(ids), labels


def logps(model, seed: int = 0):
    from selfpo_kernels import causal_lm_logps

    with torch.no_grad():
        out = causal_lm_logps(model, *batch(seed))[0]
    model.reshard() if hasattr(model, "reshard") else None  # FSDP2 keeps the root gathered after a no-grad forward
    return out


def full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def trained(S, model, args, rank: int) -> dict:
    """Three steps of the script's optimizer on this rank's own batches; the full weights after."""
    from selfpo_kernels import causal_lm_logps

    trainable, optimizer, scheduler = S.make_optimizer(model, 1e-2, 3, args)
    for step in range(3):
        out, _ = causal_lm_logps(model, *batch(10 * step + rank))
        (-out.mean()).backward()
        stats = S.StepStats(["loss"], CPU)
        stats.add(loss=-out.mean())
        S.optimizer_step(trainable, optimizer, scheduler, stats, args, "test")
    return full_state(model)


def today(S, path, args):
    """Today's path: every rank loads the whole model as one process would, then prepare_for_training shards it."""
    world, S.world = S.world, lambda: 1
    try:
        model = S.load_model(path, CPU, args)
    finally:
        S.world = world
    return S.prepare_for_training(model, args)


def checks(S, folders: dict, rank: int, reads: list) -> dict:
    from transformers import AutoModelForCausalLM

    seen, shard_model = [], S.shard_model

    def spy(model, args):  # bytes of parameters that hold values (not on the meta device) when sharding starts
        seen.append(sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta))
        return shard_model(model, args)

    out = {}
    for label, path in folders.items():
        for dtype in ("float32", "bfloat16"):
            args = S.resolve(S.Args(dtype=dtype, gradient_checkpointing=True))[0]
            reads.clear()
            S.shard_model = spy
            try:
                policy = S.prepare_for_training(S.load_model(path, CPU, args), args)
                frozen = S.load_model(path, CPU, args, frozen=True)
            finally:
                S.shard_model = shard_model
            key, read, shard_bytes = (label, dtype), list(reads), list(seen)
            seen.clear()
            plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # one process, as it loads
            plain_frozen = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))  # bf16 shards
            weights = {
                "the tied checkpoint is tied": (plain.lm_head.weight is plain.model.embed_tokens.weight)
                == (label == "tied bf16")
            }
            for role, model, reference in (("policy", policy, plain), ("frozen", frozen, plain_frozen)):
                state, expected = full_state(model), reference.state_dict()
                weights[role] = sorted(state) == sorted(expected) and all(
                    state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in state
                )
                buffers = dict(model.named_buffers())
                weights[role + " buffers"] = sorted(buffers) == sorted(dict(reference.named_buffers())) and all(
                    torch.equal(b, reference.get_buffer(n)) for n, b in buffers.items()
                )
                tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
                weights[role + " tied"] = tied == (reference.lm_head.weight is reference.model.embed_tokens.weight)
            weights["frozen needs no grad, eval"] = not any(p.requires_grad for p in frozen.parameters()) and not (
                frozen.training
            )
            old = today(S, path, args)
            scores = dict(policy=logps(policy), frozen=logps(frozen), today=logps(old))
            if dtype == "float32":
                scores["one process"] = logps(plain.eval())
            new_run, old_run = trained(S, policy, args, rank), trained(S, old, args, rank)
            weights["trained as today"] = sorted(new_run) == sorted(old_run) and all(
                torch.equal(new_run[k], old_run[k]) for k in old_run
            )
            weights["trained, still tied"] = weights["policy tied"] and (
                policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
            ) == (plain.lm_head.weight is plain.model.embed_tokens.weight)
            out[key] = dict(weights=weights, scores=scores, reads=read, shard_bytes=shard_bytes)
    reads.clear()
    try:  # a folder that does not load: rank 0's one-line error on every rank, no rank left waiting
        S.load_model(str(ROOT / "no-such-model"), CPU, S.resolve(S.Args())[0])
        out["bad folder"] = "loaded"
    except S.InputError as err:
        out["bad folder"] = str(err)
    out["bad folder reads"] = list(reads)
    return out


def _worker(rank, port, scripts, folders, results):
    import torch.distributed as dist
    import transformers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    reads, original = [], transformers.AutoModelForCausalLM.from_pretrained.__func__

    def logged(cls, *a, **k):
        reads.append(rank)
        return original(cls, *a, **k)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(logged)
    try:
        for name in scripts:
            results[(name, rank)] = checks(importlib.import_module(name), folders, rank, reads)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """Per (script, rank), for the scripts this session tests: the checks above on the toy (fp32, untied) and on a
    bf16 checkpoint with tied embeddings; one spawn of 2 gloo ranks for all."""
    import torch.multiprocessing as mp
    from transformers import AutoConfig, AutoModelForCausalLM

    mine = [item for item in request.session.items if item.path == request.path and hasattr(item, "callspec")]
    wanted = {item.callspec.params.get("script") for item in mine}
    scripts = [name for name in SCRIPTS if name in wanted]
    tied = tmp_path_factory.mktemp("tied") / "model"
    config = AutoConfig.from_pretrained(TOY_MODEL)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tied)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    folders = {"toy": str(TOY_MODEL), "tied bf16": str(tied)}
    mp.spawn(_worker, args=(port, scripts, folders, results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("script", SCRIPTS)
def test_fsdp_load_reads_on_rank_0_only_and_equals_one_process(two_ranks, script):
    """Full fine-tuning on 2 ranks, the policy (prepare_for_training) and the frozen copy (load_model(frozen=True)):
    - rank 1 never holds the whole model: it reads nothing (no from_pretrained) and no parameter has values before
      sharding (built on the meta device); before, each rank read the whole fp32 model (27 GiB per GPU for a 7B);
    - a folder that does not load fails on every rank with rank 0's one-line error (no rank left waiting);
    - on both ranks the gathered weights equal the single-process load exactly, in its dtypes (fp32 masters; the
      frozen copy in bf16 under --dtype bfloat16, as it was sharded before); the rotary buffers (not in the state
      dict, uninitialised after a meta-device build) equal; tied embeddings stay one tensor, through training; the
      frozen copy has no gradients and is in eval mode;
    - the log-probs of a batch equal today's sharded policy's exactly (and one process's under fp32), the frozen
      copy's equal the policy's; three AdamW steps with gradient checkpointing end on today's weights bit for bit."""
    for rank in (0, 1):
        results = two_ranks[(script, rank)]
        assert results["bad folder"].startswith("--model: ") and "no-such-model" in results["bad folder"], results
        assert results["bad folder"] == two_ranks[(script, 0)]["bad folder"]
        assert results["bad folder reads"] == [0] * (rank == 0)
        for key, loads in [(k, v) for k, v in results.items() if isinstance(k, tuple)]:
            assert loads["reads"] == [0, 0] * (rank == 0), (rank, key, loads["reads"])  # the policy, the frozen copy
            assert loads["shard_bytes"] == [0, 0], (rank, key, loads["shard_bytes"])
            assert not [name for name, ok in loads["weights"].items() if not ok], (rank, key, loads["weights"])
            scores = loads["scores"]
            for name in [name for name in ("frozen", "today", "one process") if name in scores]:
                assert torch.equal(scores[name], scores["policy"]), (rank, key, name, scores)
