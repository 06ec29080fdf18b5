"""Divergence and the model's limits, in all four scripts: a step whose loss or gradient norm is not finite is skipped
(logged, and --max_skipped_steps of them in a row stop the run naming the step); nothing non-finite is saved; the
lengths must fit the model's context; repeated rows are a counted quirk, and messages name rows as editors do."""

import dataclasses
import importlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from test_inputs import GOOD, model_with_config, rows_text, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOY_MODEL = ROOT / "assets" / "toy" / "model"
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
CPU = torch.device("cpu")


def one_step(mod, weight, grad: float, loss=1.0, optimizer=None, max_skipped_steps=3, where="step 7"):
    """optimizer_step on one 3-vector weight with this gradient and loss: (totals, optimizer, scheduler)."""
    weight.grad = torch.full((3,), grad)
    optimizer = optimizer or torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = mod.StepStats(("loss", "pairs"), CPU)
    stats.add(loss=loss, pairs=1)
    args = types.SimpleNamespace(lora_r=0, max_grad_norm=1.0, max_skipped_steps=max_skipped_steps)
    totals, _ = mod.optimizer_step([weight], optimizer, scheduler, stats, args, where)
    return totals, optimizer, scheduler


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("grad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_norm_skips_the_step(script, grad, capsys):
    """A finite loss with a NaN or inf gradient (the step was applied and the weights went NaN) changes nothing: no
    optimizer or scheduler update, the gradients zeroed, skipped_nonfinite 1 and a line naming the step; the next
    finite step is applied."""
    mod = importlib.import_module(script)
    weight = torch.nn.Parameter(torch.ones(3))
    totals, optimizer, scheduler = one_step(mod, weight, grad)
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    assert not optimizer.state and scheduler.last_epoch == 0  # AdamW never stepped, nor the schedule
    assert totals["skipped_nonfinite"] == 1
    line = r"^non-finite gradient norm \((nan|inf)\) at step 7: skipped the step \(1 of --max_skipped_steps 3\)$"
    assert re.search(line, capsys.readouterr().out, re.M)
    totals, _, _ = one_step(mod, weight, 1.0, optimizer=optimizer)
    assert totals["skipped_nonfinite"] == 0 and not torch.equal(weight.detach(), torch.ones(3))


@pytest.mark.parametrize("script", SCRIPTS)
def test_max_skipped_steps_in_a_row_stop_the_run_naming_the_step(script):
    """Skips in a row are counted (a finite step resets the count); the --max_skipped_steps-th stops the run before
    its update, in one line naming the step, the value and the option; a non-finite loss counts as one too."""
    mod = importlib.import_module(script)
    weight = torch.nn.Parameter(torch.ones(3))
    nan = float("nan")
    _, optimizer, _ = one_step(mod, weight, nan, max_skipped_steps=2, where="step 1")
    one_step(mod, weight, 1.0, optimizer=optimizer, max_skipped_steps=2, where="step 2")
    after = weight.detach().clone()
    one_step(mod, weight, nan, optimizer=optimizer, max_skipped_steps=2, where="step 3")  # one in a row again
    with pytest.raises(
        mod.InputError,
        match=r"^non-finite loss \(nan\) at step 4: stopping before the update \(2 in a row, --max_skipped_steps 2;",
    ):
        one_step(mod, weight, 1.0, loss=nan, optimizer=optimizer, max_skipped_steps=2, where="step 4")
    assert torch.equal(weight.detach(), after)


def toy(mod):
    """The toy model and tokenizer, and six of its pairs as every training loop's examples take them."""
    from transformers import AutoModelForCausalLM

    tokenizer = mod.load_tokenizer(str(TOY_MODEL), None)
    examples = []
    for row in GOOD[:6]:
        pair = mod.parse_pair(row, "row")
        prompt, chosen = mod.encode(tokenizer, pair["prompt"], pair["chosen"])
        rejected = mod.encode(tokenizer, pair["prompt"], pair["rejected"])[1]
        ids = dict(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, response_ids=chosen, kind="sft")
        refs = dict.fromkeys(("ref_chosen", "ref_rejected", "ref_aug_chosen", "ref_aug_rejected"), -30.0)
        examples.append(ids | refs | {f"aug_{k}": v for k, v in ids.items() if k.endswith("_ids")})
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL).train(), tokenizer, examples


WHERE = {"sera": "iteration 1 step", "opsr": "iteration 1 step", "srdpo": "step", "osp": "stage 0 step"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_training_loop_logs_a_skipped_step_and_stops_naming_it(script, capsys):
    """The scripts' own loops (osp: Stage 0, whose message named no step) on the toy model, a NaN gradient in every
    step: step 1 is logged with train/skipped_nonfinite 1 and a line, step 2 stops the run (--max_skipped_steps 2)
    in one line naming it; no weight moved."""
    mod = importlib.import_module(script)
    model, tokenizer, examples = toy(mod)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    a = dataclasses.replace(mod.resolve(mod.Args(device="cpu"))[0], max_skipped_steps=2)
    log, pad, steps = (logged := []).append, tokenizer.pad_token_id, dict(batch_size=2, global_batch=2)  # 3 steps
    with pytest.raises(mod.InputError, match=rf"gradient norm \(nan\) at {WHERE[script]} 2: stopping before the upd"):
        if script == "osp":  # Stage 0's examples are tokenized when trained on
            examples = [dict(e, tokens=lambda e=e: (e["prompt_ids"], e["response_ids"])) for e in examples]
            mod.augment(model, examples, dataclasses.replace(a, aug_batch_size=2, aug_epochs=1), CPU, pad, log)
        elif script == "srdpo":
            mod.train(model, examples, dataclasses.replace(a, lam=0.0, **steps), CPU, pad, log, lambda *_: None)
        else:
            mod.train_iteration(
                model, examples, 1, dataclasses.replace(a, **steps), 1e-4, CPU, pad, log, lambda *_: None
            )
    steps = [record for record in logged if "train/skipped_nonfinite" in record]
    assert [record["train/skipped_nonfinite"] for record in steps] == [1]
    assert f"non-finite gradient norm (nan) at {WHERE[script]} 1: skipped the step" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("script", SCRIPTS)
def test_nothing_non_finite_is_saved(script, tmp_path):
    """save_atomic (a model export) and save_checkpoint (weights and optimizer state) refuse a NaN or inf anywhere, in
    one line, before writing: the previous checkpoint stays as it was and no .tmp is left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mod = importlib.import_module(script)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(TOY_MODEL), AutoTokenizer.from_pretrained(TOY_MODEL)
    mod.save_atomic(model, tokenizer, tmp_path / "iter_1")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "iter_1").iterdir()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(mod.InputError, match=r"iter_1: not saved: 1 tensor\(s\) hold NaN or inf; the previous check"):
        mod.save_atomic(model, tokenizer, tmp_path / "iter_1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "iter_1").iterdir()} == saved

    small = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(small.parameters())
    small(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    mod.save_checkpoint(small, tmp_path / "partial", optimizer, scheduler, 1)
    for broken in (optimizer.state[small.bias]["exp_avg_sq"], small.weight.data):  # a moment, then a weight
        broken[0] = float("inf")
        with pytest.raises(mod.InputError, match=r"partial: not saved: 1 tensor\(s\) hold NaN or inf"):
            mod.save_checkpoint(small, tmp_path / "partial", optimizer, scheduler, 2)
        broken[0] = 0.0
    assert mod.trainer_state(tmp_path / "partial")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_1", "partial"]


GIVEN = dict(osp=dict(num_judge_eval=8, judge_max_length=512), srdpo=dict(eval_pairs=4))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("context", [80, 90])  # 80: under 64 + 24; 90: under --max_length 96 only
def test_lengths_over_the_model_context_stop_before_anything_is_written(script, context, tmp_path):
    """A model whose max_position_embeddings is under --max_prompt_length + --max_new_tokens or --max_length (the
    HF sampler ran past it without a word) ends in one line naming the numbers, before anything is written."""
    mod = importlib.import_module(script)
    model = model_with_config(tmp_path, max_position_embeddings=context)
    given = dict(model=model, dataset=write(tmp_path / "x.jsonl", rows_text(GOOD)), output_dir=str(tmp_path / "run"))
    given |= dict(max_prompt_length=64, max_new_tokens=24, max_length=96)  # a path gets a paper preset's otherwise
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(
        mod.InputError,
        match=rf"^--max_prompt_length 64 \+ --max_new_tokens 24 and --max_length 96 must fit the context of --model "
        rf"{re.escape(model)}: {context} tokens \(max_position_embeddings in its config.json\)$",
    ):
        mod.main(mod.Args(**given, **GIVEN.get(script, {})))
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_vllm_engine_never_reads_past_the_model_context(script, tmp_path, monkeypatch):
    """vLLM's max_model_len is at most the model's context (a longer one ended in vLLM's pydantic traceback), and a
    prompt that does not fit is refused in one line. vLLM itself is faked: its engine records what it was given."""
    mod = importlib.import_module(script)
    made = {}

    class LLM:
        def __init__(self, **kwargs):
            made.update(kwargs)

    platform = types.SimpleNamespace(is_sleep_mode_available=lambda: False, is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=platform))
    for name in ("llm", "path", "max_model_len"):
        monkeypatch.setattr(mod.VLLMEngine, name, None)
    a = mod.resolve(mod.Args(device="cpu"))[0]
    model = model_with_config(tmp_path, max_position_embeddings=100)  # the toy's 64 + 24 fit; a 90-token prompt not
    with pytest.raises(
        mod.InputError, match=r"a prompt of 90 tokens \+ --max_new_tokens 24 is over the vLLM engine's "
    ):
        mod.vllm_generate([[5] * 90], [0], 1, 1.0, 1.0, a, 0, model, "eval", [1])
    assert made["max_model_len"] == 100


@pytest.mark.parametrize("script", SCRIPTS)
def test_repeated_rows_are_a_counted_quirk_named_by_their_lines(script, tmp_path):
    """A row with the prompt, chosen and rejected of an earlier one is skipped and counted (skipped_duplicate) like
    the other quirks, within --max_bad_fraction; messages name a jsonl row by its line in the file (blank lines
    counted, from 1, as editors do) and other rows from 1."""
    mod = importlib.import_module(script)
    other = dict(GOOD[1], rejected=GOOD[1]["chosen"][:1] + [{"role": "assistant", "content": "x y z"}])
    rows = [GOOD[1], other, dict(GOOD[0], score_chosen=9.0)]  # a repeat, another pair, a repeat with other scores
    text = rows_text(GOOD[:3]) + "\n" + rows_text(rows)
    rows, source = mod.load_rows(write(tmp_path / "x.jsonl", text))
    at = f"dataset {re.escape(source)} line"
    counts: dict = {}
    pairs = mod.parse_rows(rows, source, mod.Args(max_bad_fraction=0.4), counts)
    assert counts == {"skipped_duplicate": 2} and [i for i, _ in pairs] == [0, 1, 2, 4]  # row 3 (line 5) is GOOD[1]
    with pytest.raises(
        mod.InputError,
        match=rf"2 of 6 rows are degenerate \(duplicate 2\), over --max_bad_fraction 0.05; first: {at} 5: the same "
        rf"prompt, chosen and rejected as {at} 2 \| {at} 7: the same prompt, chosen and rejected as {at} 1$",
    ):
        mod.parse_rows(rows, source, mod.Args(), {})
    with pytest.raises(mod.InputError, match=r"first: dataset fixture row 3: the same .* as dataset fixture row 1$"):
        mod.parse_rows([GOOD[0], GOOD[1], GOOD[0]], "fixture", mod.Args(), {})
    prompts = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": ""}\n')
    with pytest.raises(mod.InputError, match=r"^--eval_prompts .*p.jsonl line 3: 'prompt' is empty$"):
        mod.load_prompts(prompts, "--eval_prompts")
