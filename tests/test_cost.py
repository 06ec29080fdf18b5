"""benchmarks/cost.py: the cost model's rows, its work counts against hand computations, and its inputs."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
cost = importlib.import_module("cost")

KEYS = {"script", "preset", "gpus", "sampler", "hours", "dominant", "phases", "fits"}


@pytest.fixture(scope="module")
def rows():
    return cost.rows()


def test_every_non_toy_preset_of_every_script_has_rows_on_1_and_8_gpus(rows):
    for script in cost.SCRIPTS:
        module = cost.load_script(script)
        expected = {name for name in module.MODELS if name != "toy"}
        assert expected, script
        for gpus in (1, 8):
            assert {r["preset"] for r in rows if r["script"] == script and r["gpus"] == gpus} == expected
    assert {r["sampler"] for r in rows if r["script"] == "sera"} == {"hf", "vllm"}
    assert {r["sampler"] for r in rows if r["script"] == "srdpo"} == {None}


def test_json_rows_have_the_keys_and_hours_add_up(capsys):
    assert cost.main(["--json", "--only", "sera:mistral-7b", "srdpo"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 2 * 2 + 2 * 2  # sera: 1 and 8 GPUs x hf, vllm; srdpo: two presets x 1 and 8 GPUs
    for row in found:
        assert KEYS <= set(row), row
        if row["hours"] is not None:
            assert row["hours"] == pytest.approx(sum(row["phases"].values()), abs=0.01)
            assert row["dominant"] == max(row["phases"], key=row["phases"].get)


def test_text_output_has_one_line_per_row(capsys):
    assert cost.main(["--only", "opsr"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("opsr ")]
    assert len(lines) == 2 * 2 * 2  # two presets x 1 and 8 GPUs x two samplers
    assert "[published]" in out and "[assumed]" in out


def test_markdown_has_one_line_per_preset(capsys):
    assert cost.main(["--markdown", "--only", "sera", "srdpo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3 + 2  # header, rule; sera's three presets; srdpo's two
    assert all(line.count("|") == 8 for line in lines)
    (mistral,) = [line for line in lines if line.startswith("| sera mistral-7b |")]
    assert "yes (dry run 31.7 GiB)" in mistral
    (zephyr,) = [line for line in lines if line.startswith("| srdpo zephyr-7b |")]
    assert zephyr.split(" | ")[1] == "does not fit" and zephyr.split(" | ")[2] == "-"


def test_sampling_work_follows_n_cand_by_hand():
    """sera, 32 pairs, 2 iterations, 1 GPU, HF: one bootstrap of 32 prompts x n_cand samples; the HF batch is
    64 // n_cand prompts, each call decodes max_new_tokens (512) steps."""
    data = cost.DATASETS["ultrafeedback"]
    new = min(data.sample_tokens, 512)
    for n_cand, calls in ((4, 2), (8, 4)):
        row = cost.estimate("sera", "mistral-7b", 1, "hf", {"num_pairs": 32, "iterations": 2, "n_cand": n_cand})
        work = row["work"]
        assert work["sample/generated_tokens"] == 32 * n_cand * new
        assert work["sample/decode_steps_per_rank"] == calls * 512
        # D under theta_0 and theta_1 (2 x 32 sequences each); the samples under theta_1 and theta_0 (eq. 5)
        offline, generated = data.prompt_tokens + data.response_tokens, data.prompt_tokens + new
        assert work["score/tokens"] == 2 * 64 * offline + 2 * 32 * n_cand * generated
    # training: iteration 1 on D (32 pairs), iteration 2 on k1 = 23 offline + k2 = 9 generated, 2 steps of 16 each
    assert work["train/sequences"] == 2 * 64


def test_sera_scores_samples_under_every_model_the_ensembled_reward_needs():
    """3 iterations: the samples of iteration 2 under theta_1 and theta_0, those of iteration 3 under theta_2,
    theta_1 and theta_0 (eq. 7 with gamma_e > 0), the older ones loaded; gamma_e = 0 drops theta_0 at iteration 3."""
    data = cost.DATASETS["ultrafeedback"]
    d_tokens = 3 * 2 * 32 * (data.prompt_tokens + data.response_tokens)
    sample_tokens = 32 * 4 * (data.prompt_tokens + min(data.sample_tokens, 512))
    for gamma_e, scorings, loads in ((0.3, 2 + 3, 1 + 1 + 2), (0.0, 2 + 2, 1 + 1 + 1)):
        work = cost.estimate("sera", "mistral-7b", 1, "hf", {"num_pairs": 32, "iterations": 3, "gamma_e": gamma_e})
        assert work["work"]["score/tokens"] == d_tokens + scorings * sample_tokens
        n_params = cost.params("alignment-handbook/zephyr-7b-sft-full")
        assert work["work"]["load/bytes_read"] == round(loads * 2 * n_params)


def test_training_time_is_the_tokens_of_one_rank_over_the_rate():
    """srdpo zephyr-7b on 8 GPUs: 61,135 pairs, global batch 64 (955 steps, 15 pairs dropped), 2 sequences per pair
    split over 8 ranks, full fine-tuning at the training rate."""
    data = cost.DATASETS["ultrafeedback"]
    row = cost.estimate("srdpo", "zephyr-7b", 8)
    per_rank = math.ceil(2 * (61_135 // 64 * 64) / 8) * (data.prompt_tokens + data.response_tokens)
    rate = (
        cost.THROUGHPUT["train_tokens_per_s"].value
        * cost.REFERENCE_PARAMS
        / cost.params("alignment-handbook/zephyr-7b-sft-full")
    )
    assert row["phases"]["train"] == pytest.approx(per_rank / rate / 3600, abs=0.001)


def test_osp_samples_and_sampler_sync_follow_k_and_steps_by_hand():
    data = cost.DATASETS["hh-rlhf"]
    new, n_params = min(data.sample_tokens, 256), cost.params("alignment-handbook/zephyr-7b-sft-full")
    one = cost.estimate("osp", "mistral-7b", 8, "vllm", {"steps": 3})["work"]
    two = cost.estimate("osp", "mistral-7b", 8, "vllm", {"steps": 3, "k": 14})["work"]
    assert one["sample/generated_tokens"] == 3 * 8 * 7 * new
    assert two["sample/generated_tokens"] == 2 * one["sample/generated_tokens"]
    # every step pushes the policy into the engine from memory: each fp32 master gathered from its shards, as HF's
    # unsharded copy is; nothing written or read
    assert one["sync/bytes_gathered"] == round(3 * 4 * n_params)
    assert "sync/bytes_written" not in one and "sync/bytes_read" not in one
    hf = cost.estimate("osp", "mistral-7b", 8, "hf", {"steps": 3})["work"]
    assert "sync/bytes_written" not in hf and hf["sync/bytes_gathered"] == round(3 * 4 * n_params)
    lora = cost.estimate("sera", "mistral-7b", 8, "vllm", {"num_pairs": 32, "iterations": 2, "lora_r": 8})["work"]
    assert lora["sync/bytes_read"] == round(2 * n_params) and "sync/bytes_gathered" not in lora  # its export


def test_osp_vllm_cost_counts_the_in_memory_push_the_code_does():
    """The model counts an in-memory push of the policy in every vLLM sampling step, no file, because osp.py's step
    samples with push=True and writes no sampler checkpoint, and the runtime pushes through reload_weights'
    weights_iterator. When that changes, this fails: change osp_work (and this test) with it."""
    import ast
    import inspect

    osp = cost.load_script("osp")
    step = ast.parse(inspect.getsource(osp.online_step))
    (call,) = [n for n in ast.walk(step) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "generate"]
    given = [ast.unparse(a) for a in call.args], {k.arg: ast.unparse(k.value) for k in call.keywords}
    passed = inspect.signature(osp.generate).bind(*given[0], **given[1]).arguments
    assert passed.get("push") == "True" and passed.get("model_path", "None") == "None", passed
    assert "save_atomic" not in ast.unparse(step), "osp.py's step writes the policy again"
    assert 'kwargs={"weights_iterator": ' in inspect.getsource(osp.vllm_generate)
    row = cost.estimate("osp", "mistral-7b", 8, "vllm")
    assert row["dominant"] != "sync" and row["phases"]["sync"] < 0.1 * row["hours"]


def test_sorted_scoring_pads_less_than_unsorted_training():
    """score and the judge batch sequences sorted by length (the sorted factor); training micro-batches and Sr-DPO's
    refinement forward do not (the unsorted one)."""
    phases = cost.estimate("srdpo", "zephyr-7b", 8)["phases"]
    sorted_pad, unsorted_pad = (cost.THROUGHPUT[k].value for k in ("sorted_padding_factor", "padding_factor"))
    assert 1 < sorted_pad < unsorted_pad
    expected = phases["score"] * (sorted_pad - 1) + (phases["refine"] + phases["train"]) * (unsorted_pad - 1)
    assert phases["padding"] == pytest.approx(expected, abs=0.003)


def test_boundaries_write_the_fp32_masters_of_a_full_fine_tune():
    """An export a later iteration or stage resumes from carries the fp32 masters (4 bytes a parameter) beside the
    bf16 weights (2) in a full fine-tune; a LoRA run's merged bf16 base is exact, the last export needs none."""
    n_params = cost.params("alignment-handbook/zephyr-7b-sft-full")
    opsr = cost.estimate("opsr", "mistral-7b", 8, "hf", {"iterations": 2})["work"]  # iter_0, iter_1, iter_2
    assert opsr["save/bytes_written"] == round(3 * 2 * n_params + 2 * 4 * n_params)
    sera = cost.estimate("sera", "mistral-7b", 8, "hf", {"iterations": 2})["work"]  # LoRA
    assert sera["save/bytes_written"] == round(2 * 2 * n_params)
    osp = cost.estimate("osp", "mistral-7b", 8, "hf", {"steps": 3})["work"]  # stage0 and final, no step checkpoint
    assert osp["save/bytes_written"] == round(2 * 2 * n_params + 4 * n_params)


def test_eight_gpus_are_faster_than_one_where_both_run(rows):
    both = 0
    for r in rows:
        if r["gpus"] != 1 or r["hours"] is None:
            continue
        (eight,) = [e for e in rows if (e["script"], e["preset"], e["sampler"], e["gpus"]) == (*_key(r), 8)]
        if eight["hours"] is not None:
            both += 1
            assert eight["hours"] < r["hours"], (r, eight)
    assert both >= 4


def _key(r):
    return r["script"], r["preset"], r["sampler"]


def test_presets_that_do_not_fit_one_gpu_have_no_hours(rows):
    one = {(r["script"], r["preset"]): r for r in rows if r["gpus"] == 1 and r["sampler"] in (None, "hf")}
    for key in (("opsr", "mistral-7b"), ("osp", "mistral-7b"), ("srdpo", "zephyr-7b")):  # full fine-tuning of 7B
        assert one[key]["fits"] == "no" and one[key]["hours"] is None and one[key]["dominant"] is None
    assert one[("sera", "mistral-7b")]["fits"] == "yes"  # LoRA: the dry run's 31.7 GiB
    assert "dry run" in one[("sera", "mistral-7b")]["memory"]


def test_dry_run_file_is_read_and_a_lower_bound_decides_elsewhere(tmp_path):
    peaks = cost.dry_run_peaks()
    assert peaks[("sera", "mistral-7b", 1)] == (31.7, True)
    assert peaks[("osp", "mistral-7b", 8)][1] is True
    fake = tmp_path / "dryrun.txt"
    fake.write_text("sera mistral-7b ranks=1: peak 80.2 GiB/rank in sample (x) | phases: load 1 | OVER 74 | 12s\n")
    assert cost.dry_run_peaks(fake) == {("sera", "mistral-7b", 1): (80.2, False)}
    row = cost.estimate("sera", "mistral-7b", 1, "hf", peaks=cost.dry_run_peaks(fake))
    assert row["fits"] == "no" and row["hours"] is None
    # no dry run: 7.24 B parameters x (4 + 4 + 8) bytes on one GPU is over 74.5 GiB; sharded over 8 it is not
    row = cost.estimate("opsr", "mistral-7b", 8, "hf", peaks={})
    assert row["fits"] == "unchecked" and row["hours"] > 0
    assert cost.estimate("opsr", "mistral-7b", 1, "hf", peaks={})["fits"] == "no"


def test_no_dominant_phase_is_a_load_or_padding(rows):
    for r in rows:
        assert r["dominant"] not in ("load", "padding"), r


def test_parameter_counts_match_the_published_sizes():
    assert cost.params("alignment-handbook/zephyr-7b-sft-full") == pytest.approx(7.24e9, rel=0.005)
    assert cost.params("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == pytest.approx(1.10e9, rel=0.01)
    assert cost.params("EleutherAI/pythia-2.8b") == pytest.approx(2.775e9, rel=0.01)


def test_every_figure_is_marked_and_sourced():
    for name, figure in {**cost.THROUGHPUT, **cost.SCALING}.items():
        assert figure.status in ("published", "measured", "assumed"), name
        assert len(figure.source) > 20, name
    for name, data in cost.DATASETS.items():
        assert data.rows > 0 and data.source, name
    assert math.isclose(cost.THROUGHPUT["padding_factor"].value, 1.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "n_kand=8"], "--set n_kand: not an option"),
        (["--set", "n_cand"], "--set expects KEY=VALUE"),
        (["--only", "dpo"], "the scripts are"),
        (["--only", "sera:mistral"], "sera's presets are"),
        (["--only", "sera", "--set", "n_cand=1"], "--n_cand must be >= 2"),
    ],
)
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as err:
        cost.main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)
