"""Settings for GPUs and many ranks, tested on CPU: fp32 master weights under bf16 compute (--dtype),
checkpoint dtypes, and (slow) gloo runs of every script on 2 and 3 ranks with work that does not divide."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sera  # noqa: E402
from selfpo_kernels import causal_lm_logps, causal_lm_pair_loss  # noqa: E402

TOY_MODEL = ROOT / "assets" / "toy" / "model"
CPU = torch.device("cpu")


def pair_batch(pairs):
    """chosen then rejected sequences of `pairs`, collated as the scripts do."""
    return sera.collate(
        [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs],
        0,
        CPU,
    )


def one_step(model, args, pairs, ref=None, gradient=None):
    """One DPO step of the script's pieces (collate, the fused pair op with daa_loss, optimizer_step) against the
    reference log-probs `ref` (by default the policy's own, shifted); returns the change of every trainable
    parameter, flattened. The gradient the step applies is appended to the list `gradient` (flattened, float64)."""
    from transformers import get_constant_schedule

    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    batch = pair_batch(pairs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ref is None:
        with torch.no_grad():
            logps, _ = causal_lm_logps(model, ids, mask, labels)
        ref = logps.float() - torch.linspace(-1, 1, len(logps))  # a reference that differs from the policy
    losses, _ = causal_lm_pair_loss(model, ids, mask, labels, sera.daa_loss(args), ref_logps=ref.float())
    losses.mean().backward()
    if gradient is not None:
        gradient.append(torch.cat([p.grad.double().flatten() for p in trainable]))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    stats = sera.StepStats(["loss"], CPU)
    stats.add(loss=losses)
    sera.optimizer_step(trainable, optimizer, get_constant_schedule(optimizer), stats, args, "test")
    return torch.cat([(p.detach().float() - s.float()).flatten() for p, s in zip(trainable, start)])


@pytest.fixture(scope="module")
def toy_pairs():
    from transformers import AutoTokenizer

    args = sera.resolve(sera.Args(num_pairs=8))[0]
    rows, source = sera.load_rows("toy")
    return sera.build_dataset(rows, source, AutoTokenizer.from_pretrained(TOY_MODEL), args)[0]


def dpo_gradient_float64(pairs, ref, beta):
    """The DPO loss (SeRA eq. 6: mean of -log sigmoid(beta h), h = (log pi(y_w) - ref_w) - (log pi(y_l) - ref_l),
    log pi summed over response tokens) written out on the toy model held in float64, and its gradient
    (flattened, in model.parameters() order): the oracle, without the fused pair op."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float64)
    batch = pair_batch(pairs)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logps = (token * (labels != -100)).sum(1)
    n = len(pairs)
    h = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    (-torch.nn.functional.logsigmoid(beta * h)).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_bf16_compute_moves_fp32_masters_like_fp32(toy_pairs):
    """Issue: bf16 weights updated by AdamW at lr ~1e-6 barely move (bf16 spacing near |w| = 0.02 is 1.2e-4).
    --dtype bfloat16 computes in bf16 (autocast, here on CPU) on fp32 masters: the gradient it puts on the masters
    is the float64 DPO gradient (SeRA eq. 6) to bf16's precision (1% here; a loss scaled by 10 or 0.1 is off by
    900% or 90%), and one step at lr 2e-6 moves the masters like the fp32 step does (direction and size), while
    weights held in bf16 stay put."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # the reference log-probs: the starting policy's in float64, shifted away from it
        model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float64)
        batch = pair_batch(toy_pairs)
        ref = causal_lm_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        ref = ref.double() - torch.linspace(-1, 1, len(ref), dtype=torch.float64)
    deltas, gradients = {}, {}
    for dtype in ("float32", "bfloat16"):
        args = sera.resolve(sera.Args(dtype=dtype, lr=2e-6))[0]
        model = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), CPU, args), args)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # masters
        assert args.loss == "dpo" and args.length_norm == "sum"  # the oracle's loss
        found = []
        deltas[dtype] = one_step(model, args, toy_pairs, ref=ref, gradient=found)
        gradients[dtype] = found[0]
    expected = dpo_gradient_float64(toy_pairs, ref, args.beta)
    error = {dtype: float((g - expected).norm() / expected.norm()) for dtype, g in gradients.items()}
    assert error["float32"] < 1e-4 and error["bfloat16"] < 0.05, error
    full, half = deltas["float32"], deltas["bfloat16"]
    cosine = float(torch.nn.functional.cosine_similarity(full, half, dim=0))
    ratio = float(half.norm() / full.norm())
    moved = [float((d != 0).double().mean()) for d in (full, half)]  # unused token embeddings get no gradient
    assert moved[1] > 0.95 * moved[0] and cosine > 0.9 and 0.8 < ratio < 1.25, (moved, cosine, ratio)
    # the failure the issue describes: the same step on bf16-held weights changes almost nothing
    args = sera.resolve(sera.Args(dtype="float32", lr=2e-6))[0]
    held_in_bf16 = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), CPU, args).to(torch.bfloat16), args)
    assert (one_step(held_in_bf16, args, toy_pairs) != 0).double().mean() < 0.1 * moved[0]


def test_checkpoint_keeps_the_loaded_dtype(tmp_path, toy_pairs):
    """fp32 masters are saved in the dtype of the loaded model's config: bf16 for a bf16 checkpoint, fp32 (toy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    args = sera.resolve(sera.Args(dtype="bfloat16", lr=1e-4))[0]
    for source, expected in ((tmp_path / "bf16", torch.bfloat16), (TOY_MODEL, torch.float32)):
        model = sera.prepare_for_training(sera.load_model(str(source), CPU, args), args)
        one_step(model, args, toy_pairs)
        live = model.config.dtype
        sera.save_atomic(
            model, tokenizer, tmp_path / "out"
        )  # (its file modes: test_checkpoint_files_get_the_umask_mode)
        saved = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert {v.dtype for v in saved.values()} == {expected}, source
        assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(expected).split(".")[1]
        assert (
            str(model.config.dtype).removeprefix("torch.") == str(live).removeprefix("torch.") == "float32"
        )  # the masters'


def test_lora_bf16_base_fp32_adapters(toy_pairs):
    """--dtype bfloat16 with LoRA: the frozen base is held in bf16, the trained adapters in fp32."""
    pytest.importorskip("peft")
    args = sera.resolve(sera.Args(dtype="bfloat16", lora_r=4, lr=1e-3))[0]
    model = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), CPU, args), args)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert (one_step(model, args, toy_pairs) != 0).any()


def test_final_hidden_state_from_a_hook():
    """causal_lm_logps takes the final hidden state from a forward hook on the decoder body (equal to
    hidden_states[-1]) without asking the model for every layer's output."""
    from transformers import AutoModelForCausalLM

    from selfpo_kernels.ops import decoder_hidden_states

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    ids = torch.randint(3, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = decoder_hidden_states(model, ids, torch.ones_like(ids))
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert not seen[0].get("output_hidden_states") and seen[0]["logits_to_keep"] == 1
    assert torch.equal(hidden, expected)


# ---- gloo runs on 2 and 3 CPU ranks (slow): pools that do not divide, a timeout turns a hang into a failure


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(script, ranks, *argv, cwd=ROOT, env=ENV, timeout=600):
    command = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        if ranks > 1
        else [sys.executable]
    )
    try:
        res = subprocess.run(
            [*command, str(ROOT / script), *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{script} on {ranks} ranks hung (no exit in {timeout} s):\n{(err.stderr or b'')[-3000:]}")
    return res


def metrics(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def skewed_clock_env(tmp_path):
    """Rank 1's clock runs 5 s ahead (a sitecustomize on its path): run folders named by each rank's time differ."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '1':\n"
        "    _time = time.time\n    time.time = lambda: _time() + 5\n"
    )
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT), ENV.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_sera_three_ranks_uneven_pool_bf16_one_folder_and_resume_world_check(tmp_path):
    """3 ranks, FSDP2, --dtype bfloat16: 14 pairs for a global batch of 24 in micro-batches of 2 (4 per rank per
    step). Before, ranks held 5, 5 and 4 pairs and ran 3, 3 and 4 micro-batches: FSDP hung. Now the remainder is
    dropped (counted), the run finishes with one process's number of steps. Without --output_dir and with rank 1's
    clock ahead, all ranks use rank 0's folder. The run, interrupted inside iteration 2, resumes on 1 rank."""
    argv = ["--iterations", "2", "--rho_1", "1", "--rho_2", "0", "--num_pairs", "14", "--num_eval", "0"]
    argv += ["--global_batch", "24", "--dtype", "bfloat16"]
    res = launch(
        "sera.py",
        3,
        *argv,
        "--batch_size",
        "2",
        "--stop_after_steps",
        "2",
        cwd=tmp_path,
        env=skewed_clock_env(tmp_path),
    )
    assert res.returncode != 0 and "interrupted" in res.stderr, res.stderr[-5000:]  # after iteration 2's one step
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    runs[0].rename(tmp_path / "three")
    config = json.loads((tmp_path / "three" / "resolved_config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["world_size"] == 3 and config["global_batch"] == 24
    train = next(m for m in metrics(tmp_path / "three") if "train/steps" in m)
    assert (train["train/steps"], train["train/grad_accum"], train["train/pairs_dropped_remainder"]) == (1, 4, 2)
    losses = [m["iteration"] for m in metrics(tmp_path / "three") if "loss" in m]
    assert losses == [1, 2]  # one process's 14 // 24 -> 1 step per iteration too
    assert json.loads((tmp_path / "three" / "state.json").read_text())["completed"] == 1
    assert not (tmp_path / "three" / "iter_2").exists()
    saved = load_file(str(tmp_path / "three" / "iter_1" / "model.safetensors"))
    start = load_file(str(TOY_MODEL / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values()) and any((saved[k] != start[k]).any() for k in start)
    res = launch("sera.py", 1, *argv, "--batch_size", "2", "--output_dir", str(tmp_path / "three"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]  # another number of ranks may resume
    assert f"resuming {tmp_path / 'three'}: completed 1" in res.stdout
    assert json.loads((tmp_path / "three" / "state.json").read_text())["completed"] == 2
    assert (tmp_path / "three" / "iter_2" / "model.safetensors").exists()
    resumed = [m for m in metrics(tmp_path / "three") if "train/steps" in m]
    assert [(m["iteration"], m["train/grad_accum"]) for m in resumed] == [(1, 4), (2, 12)]  # iteration 2 on 1 rank
    res = launch("sera.py", 1, *argv, "--batch_size", "5")  # 24 pairs per step do not split into micro-batches of 5
    assert res.returncode != 0 and "--global_batch 24 must be a positive multiple of --batch_size 5" in res.stderr


@pytest.mark.slow
def test_sera_two_ranks_lora_one_adapter(tmp_path):
    """2 ranks, LoRA, 33 pairs: both ranks start from rank 0's adapter (generate seeds each rank differently
    before it), so after iteration 1 every rank holds the saved theta_1: the offline log-probs that the ranks
    computed under theta_1 (each its share) equal theta_1's, recomputed here."""
    res = launch(
        "sera.py",
        2,
        "--iterations",
        "2",
        "--num_pairs",
        "33",
        "--num_eval",
        "8",
        "--lora_r",
        "4",
        "--lr",
        "1e-3",
        "--batch_size",
        "8",
        "--n_cand",
        "2",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "iter_2" / "model.safetensors").exists(), runs
    train = [m for m in metrics(runs[0]) if "train/steps" in m]
    assert train[0]["train/steps"] == 2 and train[0]["train/grad_accum"] == 1  # 33 // 16, as on one process
    from transformers import AutoModelForCausalLM

    pairs = [json.loads(line) for line in open(runs[0] / "pairs_iter_1.jsonl")]
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]
    model = AutoModelForCausalLM.from_pretrained(runs[0] / "iter_1", dtype=torch.float32)
    args = sera.resolve(sera.Args(scoring_batch_size=16))[0]
    logps = sera.score(model, sequences, args, 0, CPU, "test")[0]
    stored = torch.load(runs[0] / "offline_logps.pt")[1]
    torch.testing.assert_close(stored, logps, atol=1e-3, rtol=1e-5)


@pytest.mark.slow
def test_srdpo_three_ranks_uneven_pool(tmp_path):
    """3 ranks, FSDP2: 13 training pairs for a global batch of 24 in micro-batches of 2; the shared-prefix
    refinement pass decides its branch on all ranks together."""
    res = launch(
        "srdpo.py",
        3,
        "--num_pairs",
        "22",
        "--eval_pairs",
        "8",
        "--num_eval",
        "0",
        "--global_batch",
        "24",
        "--batch_size",
        "2",
        "--output_dir",
        str(tmp_path / "three"),
    )
    assert res.returncode == 0, res.stderr[-5000:]
    train = next(m for m in metrics(tmp_path / "three") if "train/steps" in m)
    assert train["train/pairs"] < 24 and train["train/pairs"] % 3  # uneven, fewer than a step
    assert (train["train/steps"], train["train/grad_accum"], train["train/pairs_dropped_remainder"]) == (
        1,
        4,
        train["train/pairs"] % 3,
    )
    assert json.loads((tmp_path / "three" / "state.json").read_text())["done"]


def test_step_checkpoint_rng_state_round_trip():
    """Step checkpoints carry every generator this rank draws from (CPU, and each CUDA device where present)."""
    state = sera.rng_state()
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert set(state) == {"cpu", *(f"cuda{i}" for i in range(devices))}
    assert all(isinstance(value, torch.Tensor) for value in state.values())  # saved as safetensors, not a pickle
    expected = torch.rand(4)
    torch.rand(7)
    sera.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected)


def dropout_net():
    """A small model whose training draws from the generators (dropout)."""
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))


def train_steps(model, optimizer, scheduler, steps):
    """Plain optimizer steps on data fixed by the step number."""
    for step in steps:
        x = torch.linspace(-1, 1, 64).view(8, 8) * (step + 1)
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def checkpointed_run(folder: Path):
    """4 AdamW steps of dropout_net under the cosine schedule with warmup, a step checkpoint after step 2 in
    `folder`; returns the model and its weights after step 2 and after step 4."""
    args = types.SimpleNamespace(warmup_ratio=0.25)
    torch.manual_seed(0)
    model = dropout_net()
    _, optimizer, scheduler = sera.make_optimizer(model, 1e-2, 4, args, "cosine")
    train_steps(model, optimizer, scheduler, range(2))
    sera.save_checkpoint(model, folder, optimizer, scheduler, 2)
    at_2 = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, optimizer, scheduler, range(2, 4))
    return model, optimizer, scheduler, at_2, {k: v.clone() for k, v in model.state_dict().items()}


def resumed_model(folder: Path):
    """A new process's model (other weights, other generator state) with the step checkpoint restored."""
    torch.manual_seed(1)
    model = dropout_net()
    state = sera.trainer_state(folder)
    _, optimizer, scheduler = sera.make_optimizer(
        model, 1e-2, 4, types.SimpleNamespace(warmup_ratio=0.25), "cosine", state
    )
    return model, optimizer, scheduler, state


def test_step_checkpoint_resumes_bit_identically(tmp_path):
    """A step checkpoint holds the training state exactly (README, resume): from it, steps 3-4 end where the
    uninterrupted run ends, every weight bit for bit. Each part of the state shows: the fp32 weights as they train
    (not a copy in a checkpoint dtype), AdamW's moments, the position on the cosine schedule (a restart moves the
    learning rate of step 4) and the generators (dropout masks)."""
    _, _, _, _, full = checkpointed_run(tmp_path / "checkpoint")
    model, optimizer, scheduler, state = resumed_model(tmp_path / "checkpoint")
    assert state["step"] == 2 and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))
    train_steps(model, optimizer, scheduler, range(2, 4))
    resumed = model.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full), {k: (full[k] - resumed[k]).abs().max() for k in full}


def test_step_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A step checkpoint is written in one renamed folder: a save that fails half-way (here after the weights and
    the optimizer state are written) leaves the previous checkpoint whole; the next save replaces it."""
    model, optimizer, scheduler, at_2, _ = checkpointed_run(tmp_path / "checkpoint")

    def crash():
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as patch:
        patch.setattr(sera, "rng_state", crash)
        with pytest.raises(RuntimeError, match="killed while saving"):
            sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 4)
    restored, _, _, state = resumed_model(tmp_path / "checkpoint")
    assert state["step"] == 2
    assert all(torch.equal(at_2[k], v) for k, v in restored.state_dict().items())
    sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 4)
    assert sera.trainer_state(tmp_path / "checkpoint")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_cut_between_its_renames_is_completed_on_resume(tmp_path, monkeypatch):
    """A kill between write_folder's two renames leaves no `checkpoint`, the previous one in checkpoint.old and the
    new one whole in checkpoint.tmp: --resume finishes the swap and continues from the new one (step 4), not from
    step 0; the next save does not delete it."""
    model, optimizer, scheduler, _, _ = checkpointed_run(tmp_path / "checkpoint")
    real_replace = os.replace

    def cut(src, dst):
        real_replace(src, dst)
        if str(src).endswith("checkpoint"):  # the first rename done: the process dies here
            raise KeyboardInterrupt("killed between the renames")

    with monkeypatch.context() as patch:
        patch.setattr(sera.os, "replace", cut)
        with pytest.raises(KeyboardInterrupt):
            sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.old", "checkpoint.tmp"]
    assert sera.trainer_state(tmp_path / "checkpoint")["step"] == 4
    sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 6)
    assert sera.trainer_state(tmp_path / "checkpoint")["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_generators_of_a_cpu_run_name_no_gpu():
    """A rank saves its own generators only (the CPU's; on a GPU run, its GPU's as "cuda"): a checkpoint then
    resumes on a node with another number of GPUs."""
    assert set(sera.rng_state()) == ({"cpu", "cuda"} if torch.cuda.is_initialized() else {"cpu"})


MODES = """
import json, os, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, sys.argv[1])
import sera
toy, out, modes = Path(sys.argv[1]) / "assets" / "toy" / "model", Path(sys.argv[2]), {}
model, tokenizer = AutoModelForCausalLM.from_pretrained(toy), AutoTokenizer.from_pretrained(toy)
small = torch.nn.Linear(2, 2)
optimizer = torch.optim.AdamW(small.parameters())
small(torch.ones(1, 2)).sum().backward()
optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
for umask in (0o077, 0o022):
    os.umask(umask)
    folder = out / f"{umask:o}"
    sera.save_atomic(model, tokenizer, folder / "iter_1")
    sera.save_checkpoint(small, folder / "partial", optimizer, scheduler, 1)
    modes[f"{umask:o}"] = {str(f.relative_to(out)): f.stat().st_mode & 0o777 for f in folder.rglob("*") if f.is_file()}
print(json.dumps(modes))
"""


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    """Model and step checkpoint files get the mode open() gives the run's other files, 0o666 less the process
    umask (README; save_pretrained and DCP write some through private files): 0o600 under umask 077, 0o644 under
    022. In a child process, whose umask the test may set."""
    res = subprocess.run(
        [sys.executable, "-c", MODES, str(ROOT), str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    modes = json.loads(res.stdout.strip().splitlines()[-1])
    for umask, expected in (("77", 0o600), ("22", 0o644)):
        files = modes[umask]
        assert any(f.endswith("model.safetensors") for f in files) and any(f.endswith(".distcp") for f in files)
        assert {f: oct(m) for f, m in files.items()} == {f: oct(expected) for f in files}, umask


def _lora_step_worker(rank, port, results):
    import types

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from transformers import get_constant_schedule

        params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
        params[0].grad = torch.full((3,), 1.0 + rank)
        if rank == 0:  # rank 1 holds no gradient for the second parameter (a micro-batch that did not reach it)
            params[1].grad = torch.full((3,), 4.0)
        optimizer = torch.optim.SGD(params, lr=1.0)
        args = types.SimpleNamespace(lora_r=4, max_grad_norm=1e9)
        sera.optimizer_step(
            params, optimizer, get_constant_schedule(optimizer), sera.StepStats(["loss"], CPU), args, "test"
        )
        nothing = [torch.nn.Parameter(torch.zeros(2))]  # no rank has a gradient: zeros, SGD changes nothing
        optimizer = torch.optim.SGD(nothing, lr=1.0)
        sera.optimizer_step(
            nothing, optimizer, get_constant_schedule(optimizer), sera.StepStats(["loss"], CPU), args, "test"
        )
        results[rank] = [p.detach().tolist() for p in params + nothing]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lora_gradient_average_with_a_missing_gradient():
    """LoRA under torchrun averages adapter gradients itself; a rank whose gradient is None contributes zeros
    (before: all_reduce(None) raised); all adapter gradients go through one flat all-reduce."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_lora_step_worker, args=(port, results), nprocs=2, join=True)
    expected = [[-1.5] * 3, [-2.0] * 3, [0.0] * 3, [0.0] * 2]  # SGD lr 1: -(mean gradient over ranks)
    assert results[0] == results[1] == expected


def test_7b_presets_checkpoint_activations_and_it_changes_nothing(toy_pairs):
    """The 7B presets turn gradient checkpointing on (README: memory at 7B); it is overridable, and a step
    with it equals a step without it (full fine-tuning and LoRA)."""
    import opsr
    import osp
    import srdpo

    for module, name in (
        (sera, "mistral-7b"),
        (opsr, "mistral-7b"),
        (opsr, "mistral-7b-instruct"),
        (srdpo, "zephyr-7b"),
        (osp, "mistral-7b"),
    ):
        gpu_less = dict(model=name, device="cpu")
        assert module.resolve(module.Args(**gpu_less))[0].gradient_checkpointing is True, (module.__name__, name)
        assert module.resolve(module.Args(**gpu_less, gradient_checkpointing=False))[0].gradient_checkpointing is False
        assert module.resolve(module.Args())[0].gradient_checkpointing is False
    for lora_r in (0, 4):
        deltas = []
        for checkpointing in (False, True):
            args = sera.resolve(sera.Args(lr=1e-3, lora_r=lora_r, gradient_checkpointing=checkpointing))[0]
            torch.manual_seed(0)
            model = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), CPU, args), args)
            assert model.is_gradient_checkpointing == checkpointing
            deltas.append(one_step(model, args, toy_pairs))
        torch.testing.assert_close(deltas[0], deltas[1], atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_opsr_two_ranks_uneven_pools(tmp_path):
    """2 ranks, FSDP2: SimPO initialisation on 27 pairs and one iteration on 21 prompts (sharded sampling and
    scoring, filtered pairs), global batch 16 in micro-batches of 4: one process's number of steps."""
    res = launch(
        "opsr.py",
        2,
        "--iterations",
        "1",
        "--num_pairs",
        "27",
        "--num_prompts",
        "21",
        "--num_eval",
        "0",
        "--global_batch",
        "16",
        "--batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "two"),
    )
    assert res.returncode == 0, res.stderr[-5000:]
    train = [m for m in metrics(tmp_path / "two") if "train/steps" in m]
    assert len(train) == 2 and all(m["train/grad_accum"] == 2 for m in train)
    assert all(m["train/steps"] == max(1, m["train/pairs"] // 16) for m in train)
    assert json.loads((tmp_path / "two" / "state.json").read_text())["completed"] == 1


@pytest.mark.slow
def test_osp_three_ranks_lora(tmp_path):
    """3 ranks, LoRA (replicated base, adapter gradients averaged by hand): Stage 0 on 64 SFT rows plus the judge
    instances, then 2 online steps of 8 prompts (sharded over 3 ranks); the merged checkpoints are plain models."""
    res = launch(
        "osp.py",
        3,
        "--lora_r",
        "4",
        "--aug_epochs",
        "1",
        "--num_sft",
        "64",
        "--offline_fraction",
        "0.05",
        "--steps",
        "2",
        "--num_eval",
        "7",
        "--num_judge_eval",
        "13",
        "--eval_every",
        "0",
        "--output_dir",
        str(tmp_path / "three"),
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert json.loads((tmp_path / "three" / "state.json").read_text())["done"]
    assert [m["step"] for m in metrics(tmp_path / "three") if m.get("stage") == 1 and "step" in m] == [1, 2]
    final, start = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "three" / "final", TOY_MODEL))
    assert sorted(final) == sorted(start) and any((final[k] != start[k]).any() for k in start)


@pytest.mark.parametrize("gpu", [True, False])
def test_vllm_sampler_lifecycle_with_a_stand_in(monkeypatch, gpu):
    """--sampler vllm's calls into vLLM, against a stand-in module (real vLLM on CPU: tests/test_vllm.py; the GPU
    side of this, sleep mode and placement, is run nowhere): one engine for the run, started on this rank's GPU
    alone (CUDA_VISIBLE_DEVICES for the engine only; torchrun's LOCAL_RANK 2 of GPUs 4-7 = GPU 6), the cache
    emptied before the engine starts or wakes, KV cache for --max_prompt_length + --max_new_tokens; with sleep
    mode (GPU) asleep at level 2 between calls and every wake-up reloading the checkpoint in place, without it
    (CPU) no sleep, chunked prefill off and a reload only when the checkpoint changes; the prefix cache reset after
    every reload; the prompts passed as the token ids HF generate gets; one seed per prompt, n apart; samples in
    prompt order. This is the engine in vLLM's own processes (VLLM_ENABLE_V1_MULTIPROCESSING=1); the default, in
    this process, is tests/test_vllm_sync.py's."""
    import types

    from transformers import AutoTokenizer

    events, seeds = [], []

    class LLM:
        def __init__(self, **kwargs):
            events.append(("engine", kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")))

        def generate(self, prompts, params, use_tqdm):
            events.append(("generate", [p["prompt_token_ids"] for p in prompts]))
            seeds.append([p.seed for p in params])
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(text=f" {i}.{k} ", finish_reason=["stop", "length"][k % 2])
                        for k in range(p.n)
                    ]
                )
                for i, p in enumerate(params)
            ]

        def sleep(self, level):
            events.append(("sleep", level))

        def wake_up(self, tags):
            events.append(("wake", tags[0]))

        def collective_rpc(self, method, kwargs):
            events.append((method, kwargs["weights_path"]))

        def reset_prefix_cache(self):
            events.append(("reset_prefix_cache",))

    platform = types.SimpleNamespace(is_sleep_mode_available=lambda: gpu, is_cpu=lambda: not gpu)
    stand_in = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **k: types.SimpleNamespace(**k))
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=platform))
    monkeypatch.setattr(sera.VLLMEngine, "llm", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache",)))
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL)
    args = sera.resolve(sera.Args(sampler="vllm"))[0]
    prompts = [
        [{"role": "user", "content": "Sort these letters: b a c"}],
        [{"role": "user", "content": "Sort these letters: z y"}],
    ]
    first = sera.generate(None, tokenizer, prompts, 2, 1.0, 1.0, args, CPU, seed=0, model_path=str(TOY_MODEL))
    again = sera.generate(None, tokenizer, prompts[:1], 2, 1.0, 1.0, args, CPU, seed=1, model_path=str(TOY_MODEL))
    sera.generate(None, tokenizer, prompts, 3, 1.0, 1.0, args, CPU, seed=2, model_path="/new/checkpoint")
    assert first == [[("0.0", True), ("0.1", False)], [("1.0", True), ("1.1", False)]] and again == [
        [("0.0", True), ("0.1", False)]
    ]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # the trainer's view, restored after the engine started
    engine, kwargs = events[1 if gpu else 0], events[1 if gpu else 0][1]
    assert kwargs["max_model_len"] == args.max_prompt_length + args.max_new_tokens
    assert kwargs["model"] == str(TOY_MODEL) and kwargs["dtype"] == (
        "bfloat16" if gpu else "float32"
    )  # the HF sampler's
    if gpu:
        assert engine[2] == "6" and kwargs["enable_sleep_mode"] is True and "enable_chunked_prefill" not in kwargs
        reload = lambda path: [  # noqa: E731
            ("empty_cache",),
            ("wake", "weights"),
            ("reload_weights", path),
            ("reset_prefix_cache",),
            ("wake", "kv_cache"),
        ]
        assert [e if e[0] != "engine" else ("engine",) for e in events if e[0] != "generate"] == [
            ("empty_cache",),
            ("engine",),
            ("sleep", 2),
            *reload(str(TOY_MODEL)),
            ("sleep", 2),
            *reload("/new/checkpoint"),
            ("sleep", 2),
        ]
    else:
        assert (
            engine[2] == "4,5,6,7" and "enable_sleep_mode" not in kwargs and kwargs["enable_chunked_prefill"] is False
        )
        assert [e[0] for e in events] == [
            "engine",
            "generate",
            "generate",
            "reload_weights",
            "reset_prefix_cache",
            "generate",
        ]
        assert events[3] == ("reload_weights", "/new/checkpoint")
    expected = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    expected = [e if isinstance(e, list) else e["input_ids"] for e in expected]
    assert next(e for e in events if e[0] == "generate")[1] == expected
    assert seeds == [[0, 2], [1_000_003], [2_000_006, 2_000_009]]  # n apart: vLLM seeds sample j with seed + j


def test_srdpo_shared_prefix_branch_is_decided_on_all_ranks(monkeypatch):
    """Sr-DPO's refinement pass runs two forwards (shared prefix, then the rest) when a micro-batch's prompts
    share >= 8 tokens and one otherwise; under FSDP every rank must take the same branch. Here this rank's
    prompts share a long prefix, another rank's (all_sum says so) do not: this rank runs one forward too."""
    from transformers import AutoModelForCausalLM

    import srdpo

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32).eval()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prefix = list(range(5, 17))
    sequences = [(prefix + [20, 21], [22, 23, 24]), (prefix + [25], [26, 27])]
    with torch.no_grad():
        alone = srdpo.shared_prefix_logps(model, sequences, 0, CPU)
        assert len(forwards) == 2
        forwards.clear()
        monkeypatch.setattr(srdpo, "world", lambda: 2)
        monkeypatch.setattr(srdpo, "all_sum", lambda values: [values[0] + 1.0])  # the other rank's prefix is short
        together = srdpo.shared_prefix_logps(model, sequences, 0, CPU)
    assert len(forwards) == 1
    torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-5)


def test_osp_vllm_sampler_refuses_lora():
    """OSP's vLLM sampler reloads full checkpoints each step; a LoRA policy would need its adapter merged into a
    copy every step, which osp does not do: refused up front, not silently sampled from the base model."""
    import osp

    with pytest.raises(osp.InputError, match="--sampler vllm is not supported with LoRA"):
        osp.resolve(osp.Args(sampler="vllm", lora_r=8))
    assert osp.resolve(osp.Args(sampler="vllm"))[0].sampler == "vllm"


# ---- the first run on GPUs: what only NCCL, a bf16 checkpoint or a real GPU shows, pinned on CPU


def test_frozen_copy_computes_as_the_policy():
    """A copy that never trains (reference, older model) has no gradients (autocast would cache a bf16 cast of
    every weight that requires grad) and, under bf16 autocast on one process, gives the fp32-master policy's
    log-probs exactly."""
    args = sera.resolve(sera.Args(dtype="bfloat16"))[0]
    policy = sera.load_model(str(TOY_MODEL), CPU, args)
    frozen = sera.load_model(str(TOY_MODEL), CPU, args, frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    ids = torch.randint(3, 30, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        expected = causal_lm_logps(policy.eval(), ids, torch.ones_like(ids), labels)[0]
        got = causal_lm_logps(frozen, ids, torch.ones_like(ids), labels)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_one_process_bf16_runs_the_head_in_bf16(monkeypatch):
    """One process, --dtype bfloat16, full fine-tuning of the real toy Llama: its residual stream stays fp32 under
    autocast (fp32 embeddings plus bf16 layer outputs), so its final hidden states come out fp32. The fused pair
    step must still run the head's products in bf16, as the model's own lm_head would under the autocast, on the
    fp32 master weight (whose gradient arrives fp32); before, they ran in fp32."""
    import selfpo_kernels.pair as pair_mod

    args = sera.resolve(sera.Args(dtype="bfloat16"))[0]
    model = sera.load_model(str(TOY_MODEL), CPU, args)
    seen = []
    real = pair_mod._logits_into
    monkeypatch.setattr(pair_mod, "_logits_into", lambda out, h, w: seen.append((h.dtype, w.dtype)) or real(out, h, w))
    ids = torch.randint(3, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    loss_fn = sera.daa_loss(args)
    losses, _ = causal_lm_pair_loss(model, ids, torch.ones_like(ids), labels, loss_fn, ref_logps=torch.zeros(4))
    losses.sum().backward()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.float32 and head.grad is not None and head.grad.dtype == torch.float32


def test_fused_head_scores_in_the_compute_dtype(monkeypatch):
    """One process, full fine-tuning, bf16: the final hidden states are bf16 and the head's master weight fp32;
    causal_lm_logps hands the fp32 master to the engine as it is, as causal_lm_pair_loss does (the same log-probs
    from both); the head runs in bf16 (as autocast runs every other matmul; before: in fp32, ~3x the cost),
    accumulates in fp32, its gradient reaches the fp32 weight, and the log-probs stay within bf16 rounding of fp32's."""
    import selfpo_kernels.ops as ops
    import selfpo_kernels.pair as pair_mod

    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 9, 64, generator=generator) * 0.5).to(torch.bfloat16).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(50, 64, generator=generator) * 0.1)
    labels = torch.randint(0, 50, (2, 9), generator=generator)
    seen = []
    original = ops.sequence_logps

    def spy(h, w, *a, **k):
        seen.append((h.dtype, w.dtype))
        return original(h, w, *a, **k)

    products = []
    real = pair_mod._logits_into
    monkeypatch.setattr(
        pair_mod, "_logits_into", lambda out, h, w: products.append((h.dtype, w.dtype)) or real(out, h, w)
    )
    model = stub_lm(hidden, weight)
    ops.sequence_logps, old = spy, ops.sequence_logps
    try:
        logps = ops.causal_lm_logps(
            model,
            torch.zeros(2, 10, dtype=torch.long),
            torch.ones(2, 10, dtype=torch.long),
            torch.cat([labels[:, :1], labels], 1),
        )[0]
    finally:
        ops.sequence_logps = old
    assert seen == [(torch.bfloat16, torch.float32)]
    logps.sum().backward()
    assert products and set(products) == {(torch.bfloat16, torch.bfloat16)}  # forward and the backward's recompute
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    exact = (
        torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, -1)
        .gather(-1, labels[..., None])
        .sum((1, 2))
    )
    # the rule of the kernels' bf16 tests: within twice the error of a plain bf16 product (plus 1e-3 of the largest
    # value). Measured: error 0.0015, bar 0.041; labels shifted by one position 1.74 (the old bar, 5% of max: 1.89)
    naive = torch.log_softmax((hidden.detach() @ weight.detach().bfloat16().T).double(), -1)
    naive = naive.gather(-1, labels[..., None]).sum((1, 2))
    error, bar = (logps.double() - exact).abs().max(), 2 * (naive - exact).abs().max() + 1e-3 * exact.abs().max()
    assert error <= bar, (error, bar)


def test_collectives_live_on_the_gpu_under_any_backend_but_gloo(monkeypatch):
    """comm_device: this rank's GPU under NCCL (and under the dry run's fake NCCL backend, which checks it), the CPU
    under gloo and on one process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert sera.comm_device() == CPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in (("fake", torch.device("cuda", 3)), ("gloo", CPU)):
        store = FakeStore() if backend == "fake" else dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1 if backend == "gloo" else 2)
        try:
            assert sera.comm_device() == expected, backend
        finally:
            dist.destroy_process_group()


def stub_lm(hidden, weight):
    """A stand-in causal LM whose decoder returns `hidden` (plus one position) and whose head is `weight`."""

    class Body(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return (torch.cat([hidden, hidden[:, -1:]], 1),)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = Body(), torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.lm_head.weight = weight
            self.config = types.SimpleNamespace()

        def get_decoder(self):
            return self.model

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return self.model(input_ids)

    return Model()


def test_fsdp_gradient_sync_on_the_last_micro_batch_only(monkeypatch):
    """FSDP2 reduce-scatters after every backward unless told otherwise: micro_batches turns the sync off for all
    but the last micro-batch of a step (empty micro-batches are skipped, so the last real one syncs)."""
    calls = []
    model = types.SimpleNamespace(set_requires_gradient_sync=calls.append)  # an FSDPModule's switch
    assert list(sera.micro_batches(model, [[1], [2], [3], []])) == [[1], [2], [3]]
    assert calls == [False, False, True]
    assert list(sera.micro_batches(torch.nn.Linear(1, 1), [[1], [2]])) == [[1], [2]]  # not sharded: nothing to switch


def test_process_group_timeout_and_device(monkeypatch):
    """--dist_timeout_minutes reaches the process group (the 10-minute default fires while ranks sample at
    different speeds); collectives' tensors live on comm_device (the CPU under gloo, this rank's GPU under NCCL)."""
    import datetime

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sera.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(sera.dist, "init_process_group", lambda backend, **k: seen.update(backend=backend, **k))
    assert sera.init_device(0, 240) == CPU
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(minutes=240)
    assert sera.resolve(sera.Args())[0].dist_timeout_minutes == 180 and sera.comm_device() == CPU
    with pytest.raises(sera.InputError, match="--dist_timeout_minutes must be >= 1, got 0"):
        sera.resolve(sera.Args(dist_timeout_minutes=0))


def test_step_statistics_stay_on_the_device_until_the_step(monkeypatch):
    """No host copy per micro-batch: a step's statistics are summed on the device by name, and the training loops
    read them once per optimizer step (a spy counts the host reads made from the scripts' own lines)."""
    stats = sera.StepStats(["loss", "pairs"], CPU)
    stats.add(loss=torch.tensor([1.0, 2.0]), pairs=2)
    stats.add(loss=torch.tensor(0.5), pairs=1)
    assert stats.sums.tolist() == [3.5, 3.0]
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(("sera.py", "opsr.py", "srdpo.py", "osp.py")):
                reads.append((_name, sys._getframe(1).f_code.co_name))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    source = "".join(open(ROOT / f"{s}.py").read() for s in ("sera", "srdpo", "osp"))
    assert ".item()\n" not in source and ".item(), " not in source  # and the loops below read once per step
    args = sera.resolve(sera.Args(num_pairs=16, global_batch=16, batch_size=4, lr=1e-5))[0]
    from transformers import AutoTokenizer

    rows, source_name = sera.load_rows("toy")
    pairs = sera.build_dataset(rows, source_name, AutoTokenizer.from_pretrained(TOY_MODEL), args)[0]
    pairs = [dict(p, ref_chosen=0.0, ref_rejected=0.0) for p in pairs]
    model = sera.prepare_for_training(sera.load_model(str(TOY_MODEL), CPU, args), args)
    sera.train_iteration(model, pairs, 1, args, args.lr, CPU, 0, lambda m: None, lambda *a: None)
    in_loop = [r for r in reads if r[1] in ("train_iteration", "add")]
    assert len(in_loop) <= 1, in_loop  # 4 micro-batches, one step: at most the permutation's tolist


@pytest.mark.slow
def test_sera_two_bf16_ranks_from_a_bf16_checkpoint(tmp_path):
    """Two FSDP2 ranks under bf16 autocast, from a bf16 checkpoint (as the paper models are saved):
    - the first step's margin is 0: the reference log-probs are scored by the prepared policy, as it trains
      (scored on the unsharded fp32 copy they differed from the training forward by 0.68 nats per pair);
    - no rank reloads the policy from iteration 1's bf16 checkpoint for iteration 2: the fp32 masters stay in
      memory (a reload drops every update under half a bf16 step). Every from_pretrained is logged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.bfloat16).save_pretrained(start)
    AutoTokenizer.from_pretrained(TOY_MODEL).save_pretrained(start)
    site, loads = tmp_path / "site", tmp_path / "loads.txt"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nimport transformers\n"
        "original = transformers.PreTrainedModel.from_pretrained.__func__\n"
        "def logged(cls, path, *a, **k):\n"
        "    with open(os.environ['LOADS'], 'a') as f:\n"
        "        f.write(f\"{os.environ.get('RANK', '0')} {path}\\n\")\n"
        "    return original(cls, path, *a, **k)\n"
        "transformers.PreTrainedModel.from_pretrained = classmethod(logged)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "LOADS": str(loads)}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    common = ["--model", str(start), "--dataset", "toy", "--iterations", "2", "--rho_1", "1", "--rho_2", "0"]
    common += ["--num_pairs", "64", "--num_eval", "0", "--lr", "1e-4", "--dtype", "bfloat16", "--beta", "0.1"]
    common += [
        "--max_length",
        "96",
        "--max_prompt_length",
        "64",
        "--max_new_tokens",
        "24",
        "--global_batch",
        "16",
        "--batch_size",
        "8",
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(ROOT / "sera.py"),
            *common,
            "--output_dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    records = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    # the first steps of iterations 1 and 2, where the policy is its reference: exactly 0 here (before: 4e-4, 8e-4)
    firsts = [m for m in records if m.get("step") == 1]
    assert len(firsts) == 2 and all(
        abs(m["rewards/margins"]) < 1e-5 and abs(m["loss"] - 0.6931472) < 1e-5 for m in firsts
    )
    loaded = loads.read_text().split("\n")[:-1]
    assert loaded == [f"0 {start}"], loaded  # the start, read once by rank 0 (rank 1 gets its shards); never iter_1
    assert (tmp_path / "two" / "iter_2" / "model.safetensors").exists()


@pytest.mark.slow
def test_sera_step_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    """A step checkpoint written by two FSDP2 ranks resumes on one process (torch.distributed.checkpoint reshards
    the optimizer state; the trainer state is JSON and safetensors, no pickle) and ends where the uninterrupted
    two-rank run ends, up to the numerics of one process against two."""
    argv = ["--iterations", "1", "--num_pairs", "96", "--num_eval", "0", "--lr", "1e-3", "--global_batch", "16"]
    argv += ["--save_every", "2"]
    full = launch("sera.py", 2, *argv, "--batch_size", "8", "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = launch(
        "sera.py", 2, *argv, "--batch_size", "8", "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "3"
    )
    assert cut.returncode != 0 and (tmp_path / "cut" / "iter_1_partial" / "optimizer").is_dir(), cut.stderr[-3000:]
    assert not list((tmp_path / "cut" / "iter_1_partial").glob("*.pt"))  # nothing read back through pickle
    assert (tmp_path / "cut" / "iter_1_partial" / "optimizer").stat().st_mode & 0o700 == 0o700  # still a usable folder
    resumed = launch("sera.py", 1, *argv, "--batch_size", "8", "--output_dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2 (saved on 2 ranks, resumed on 1)" in resumed.stdout
    start, a, b = (
        load_file(str(d / "model.safetensors"))
        for d in (TOY_MODEL, tmp_path / "full" / "iter_1", tmp_path / "cut" / "iter_1")
    )
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"moved {moved:.2e}, resumed on one process vs two ranks {diff:.2e}")
    assert moved > 1e-3 and diff < 1e-2 * moved, (moved, diff)
