"""--reward_model: scoring equals the classifier's own forward on each sequence alone (three architectures, padding
sides and pad-token rules), the win rate and its interval, agreement, bad inputs, the toy reward model's accuracy,
multi-rank scoring, and a script run that logs the new metrics."""

import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sera  # noqa: E402

TOY = ROOT / "assets" / "toy"
TOY_RM = TOY / "reward_model"
ARGS = types.SimpleNamespace(scoring_batch_size=3, dtype="float32")
PROMPTS = [
    "Sort these letters: q d m a",
    "Sort these letters: b a c",
    "Sort these letters: z y x w v u t",
    "Sort these letters: k j",
    "Sort these letters: e f g h i",
    "Sort these letters: o p",
    "hello",
]
RESPONSES = [
    "a d m q",
    "a b c d e f g h",
    "t u v w x y z",
    "",
    "e f g h i",
    "o",
    "a much longer reply with many words in it",
]


def tiny_classifier(folder: Path, arch: str, padding_side: str, pad: str) -> Path:
    """A random tiny sequence classifier with one output and the toy tokenizer. pad: "pad" (config and tokenizer
    pad = <pad>), "eos" (the config's pad id is EOS, which ends every rendered conversation), "none" (no pad id
    anywhere: the model reads the last token)."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    common = dict(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        num_labels=1,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id={"pad": 2, "eos": 1, "none": None}[pad],
    )
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForSequenceClassification),
        "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForSequenceClassification),
    }[arch]
    if arch != "gpt_neox":
        common["num_key_value_heads"] = 2
    torch.manual_seed(0)
    model = model_class(config_class(**common))
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the initialiser's: positions and tokens matter visibly
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    shutil.copy(TOY / "model" / "tokenizer.json", folder)
    config = json.loads((TOY / "model" / "tokenizer_config.json").read_text())
    config["padding_side"] = padding_side
    if pad == "none":
        del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("padding_side,pad", [("right", "pad"), ("left", "pad"), ("left", "eos"), ("right", "none")])
def test_scores_equal_the_classifier_on_each_sequence_alone(arch, padding_side, pad, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_classifier(tmp_path / "rm", arch, padding_side, pad)
    tokenizer = sera.load_reward_model(str(folder), None)
    got = sera.reward_model_scores(str(folder), tokenizer, PROMPTS, RESPONSES, ARGS, torch.device("cpu"))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    direct = AutoTokenizer.from_pretrained(folder)
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        text = direct.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        inputs = direct(text, add_special_tokens=False, return_tensors="pt")  # the template writes BOS
        with torch.no_grad():
            expected.append(model(**inputs).logits[0, 0].item())
    assert len({round(e, 4) for e in expected}) == len(expected)  # the sequences score differently
    assert got == pytest.approx(expected, abs=1e-5)


def test_win_rate_and_its_wilson_interval():
    # 8 of 10 wins: the textbook Wilson 95% interval (0.490, 0.943)
    rate, lo, hi = sera.win_rate([1.0] * 8 + [0.0] * 2, [0.5] * 10)
    assert rate == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    rate, lo, hi = sera.win_rate([1.0] * 10, [0.0] * 10)  # all wins: (0.722, 1)
    assert rate == 1.0 and lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    rate, lo, hi = sera.win_rate([2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0])  # a win, two ties, a loss
    assert rate == 0.5 and lo == pytest.approx(1 - hi) and lo < 0.5 < hi
    assert sera.win_rate([3.0] * 5, [3.0] * 5)[0] == 0.5  # identical samples: ties only


def test_pairwise_agreement():
    # gold prefers the sample on prompts 0-2 and ties on 3 (left out); the scores agree, disagree, tie
    assert sera.pairwise_agreement([2, 0, 1, 5], [1, 1, 1, 0], [9, 9, 9, 3], [1, 1, 1, 3]) == 0.5
    assert sera.pairwise_agreement([2, 0], [1, 1], [5, 0], [1, 1]) == 1.0
    assert math.isnan(sera.pairwise_agreement([1, 2], [1, 2], [3, 3], [3, 3]))  # gold ties everywhere


# ---- bad inputs: one line, before anything is written -------------------------------------------------------


def two_outputs(d: Path) -> str:
    folder = tiny_classifier(d / "rm2", "llama", "right", "pad")
    config = json.loads((folder / "config.json").read_text())
    config.update(id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def no_template(d: Path) -> str:
    folder = d / "rm_plain"
    shutil.copytree(TOY_RM, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


BAD = {
    "missing folder": (lambda d: dict(reward_model=str(d / "none")), r"--reward_model: folder .*none' not found"),
    "two outputs": (lambda d: dict(reward_model=two_outputs(d)), r"--reward_model: .* has 2 outputs \(num_labels\)"),
    "no chat template": (
        lambda d: dict(reward_model=no_template(d)),
        r"--reward_model: the tokenizer of .* has no chat template; pass --reward_chat_template",
    ),
    "missing reward chat template": (
        lambda d: dict(reward_model=no_template(d), reward_chat_template=str(d / "x.jinja")),
        r"--reward_chat_template: file .* not found",
    ),
}


@pytest.mark.parametrize("script", ("sera", "srdpo", "opsr", "osp"))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_reward_model_one_line_nothing_written(script, case, tmp_path):
    module = importlib.import_module(script)
    make, match = BAD[case]
    rows = [json.loads(line) for line in open(TOY / "data" / "prefs.jsonl")][:40]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    given = dict(dataset=str(small), output_dir=str(tmp_path / "run"), **make(tmp_path))
    given.update(dict(osp=dict(num_judge_eval=8), srdpo=dict(eval_pairs=4)).get(script, {}))
    before = {p: p.stat().st_size for p in tmp_path.rglob("*")}
    with pytest.raises(module.InputError, match=match):
        module.main(module.Args(**given))
    assert {p: p.stat().st_size for p in tmp_path.rglob("*")} == before


def test_reward_chat_template_supplies_a_missing_template(tmp_path):
    template = json.loads((TOY_RM / "tokenizer_config.json").read_text())["chat_template"]
    folder = no_template(tmp_path)
    tokenizer = sera.load_reward_model(folder, template)
    scores = sera.reward_model_scores(folder, tokenizer, PROMPTS[:2], RESPONSES[:2], ARGS, torch.device("cpu"))
    reference = sera.reward_model_scores(
        str(TOY_RM), sera.load_reward_model(str(TOY_RM), None), PROMPTS[:2], RESPONSES[:2], ARGS, torch.device("cpu")
    )
    assert scores == reference


# ---- the toy reward model ----------------------------------------------------------------------------------


def test_toy_reward_model_is_a_good_but_imperfect_proxy():
    """On pairs it never saw (the tail of judge_prefs.jsonl, labelled by the exact oracle's scores) it orders most,
    not all, as the oracle does; small, one output; the README states its held-out accuracy."""
    sys.path.insert(0, str(TOY))
    import oracle

    rows = [json.loads(line) for line in open(TOY / "data" / "judge_prefs.jsonl")][-200:]
    prompts = [r["prompt"] for r in rows]
    chosen = [r["chosen"][-1]["content"] for r in rows]
    rejected = [r["rejected"][-1]["content"] for r in rows]
    tokenizer = sera.load_reward_model(str(TOY_RM), None)
    args = types.SimpleNamespace(scoring_batch_size=64, dtype="float32")
    scores = sera.reward_model_scores(str(TOY_RM), tokenizer, prompts * 2, chosen + rejected, args, torch.device("cpu"))
    better = [oracle.score(p, c) > oracle.score(p, r) for p, c, r in zip(prompts, chosen, rejected)]
    accuracy = sum((a > b) == o for a, b, o in zip(scores[:200], scores[200:], better)) / 200
    assert 0.75 <= accuracy <= 0.9, accuracy
    stats = json.loads((TOY_RM / "STATS.json").read_text())
    assert 0.75 <= stats["held_out_accuracy"] <= 0.9
    assert f"**{stats['held_out_accuracy']:.3f}**" in (TOY / "README.md").read_text()
    assert (TOY_RM / "model.safetensors").stat().st_size < 1_000_000


# ---- ranks and runs -------------------------------------------------------------------------------------------


def _rank_worker(rank, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer = sera.load_reward_model(str(TOY_RM), None)
        results[rank] = sera.reward_model_scores(str(TOY_RM), tokenizer, PROMPTS, RESPONSES, ARGS, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_as_one_process():
    """Each rank scores its share (7 sequences: 4 and 3, the last padded) and every rank gets all scores."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(port, results), nprocs=2, join=True)
    alone = sera.reward_model_scores(
        str(TOY_RM), sera.load_reward_model(str(TOY_RM), None), PROMPTS, RESPONSES, ARGS, torch.device("cpu")
    )
    assert results[0] == results[1]
    assert results[0] == pytest.approx(alone, abs=1e-6)


TINY = ["--num_pairs", "32", "--eval_pairs", "16", "--num_eval", "16"]


@pytest.mark.slow
def test_srdpo_logs_reward_model_score_and_win_rate(tmp_path):
    """`srdpo.py --reward_model assets/toy/reward_model` logs eval/rm_score and eval/win_rate with its interval
    at the start and the end, keeps the start's samples in the run folder, and leaves the oracle's numbers as a
    run without the reward model has them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    outs = {}
    for name, extra in (("rm", ["--reward_model", "assets/toy/reward_model"]), ("plain", [])):
        outs[name] = tmp_path / name
        res = subprocess.run(
            [sys.executable, str(ROOT / "srdpo.py"), *TINY, *extra, "--output_dir", str(outs[name])],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    records = {
        name: {r["stage"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("stage")}
        for name, out in outs.items()
    }
    start, final = records["rm"]["start"], records["rm"]["final"]
    for record in (start, final):
        assert record["eval/win_rate_lo"] <= record["eval/win_rate"] <= record["eval/win_rate_hi"]
        assert {
            "eval/rm_score",
            "eval/reward",
            "eval/rm_oracle_agreement",
            "eval/reward_win_rate",
            "eval/response_words",
            "eval/start_response_words",
        } <= set(record)
    assert start["eval/win_rate"] == 0.5  # the start against its own samples: ties only
    kept = json.loads((outs["rm"] / "eval_start.json").read_text())
    assert len(kept["responses"]) == 16 and set(kept["scores"]) == {"reward", "rm_score"}
    assert sum(kept["scores"]["rm_score"]) / 16 == pytest.approx(start["eval/rm_score"])
    for stage in ("start", "final"):  # the oracle's numbers do not depend on --reward_model
        assert records["plain"][stage]["eval/reward"] == records["rm"][stage]["eval/reward"]
        assert "eval/rm_score" not in records["plain"][stage] and "eval/win_rate" in records["plain"][stage]


@pytest.mark.slow
def test_toy_reward_model_rebuilds_byte_identical(tmp_path):
    """`build_toy.py --reward_model_only` from the shipped data and tokenizer: the same files as MANIFEST.sha256 lists
    (weights bit-exact with the same torch build and CPU kind, one thread; on another CPU kind, the same behaviour)."""
    import hashlib

    shutil.copytree(TOY / "model", tmp_path / "model")
    shutil.copy(TOY / "STATS.json", tmp_path / "STATS.json")
    subprocess.run(
        [sys.executable, str(ROOT / "assets" / "build_toy.py"), "--reward_model_only", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    manifest = dict(reversed(line.split("  ", 1)) for line in (TOY / "MANIFEST.sha256").read_text().splitlines())
    shipped = {path for path in manifest if path.startswith("reward_model/")}
    assert shipped == {
        "reward_model/config.json",
        "reward_model/model.safetensors",
        "reward_model/tokenizer.json",
        "reward_model/tokenizer_config.json",
    }
    stats = json.loads((TOY / "STATS.json").read_text())
    import tokenizers
    import transformers

    if (torch.__version__, transformers.__version__, tokenizers.__version__) != (
        stats["torch"],
        stats["transformers"],
        stats["tokenizers"],
    ):
        pytest.skip("serialised weights depend on the library versions that wrote them")
    built = json.loads((tmp_path / "reward_model" / "STATS.json").read_text())
    shipped_stats = json.loads((TOY / "reward_model" / "STATS.json").read_text())
    if built["cpu"] != shipped_stats["cpu"]:
        # Another kind of CPU rounds the 600 training steps differently: the weights differ, the behaviour holds
        # (held-out accuracy 0.809 as shipped, Intel Xeon; 0.837 rebuilt on an AMD EPYC).
        shipped = {path for path in shipped if not path.endswith(".safetensors")}
        assert 0.75 <= built["held_out_accuracy"] <= 0.9, built
    readme = (tmp_path / "README.md").read_text()
    if built["cpu"] != shipped_stats["cpu"]:  # the README states the accuracy it measured
        readme = readme.replace(
            f"**{built['held_out_accuracy']:.3f}**", f"**{shipped_stats['held_out_accuracy']:.3f}**"
        )
    for path in shipped:
        assert hashlib.sha256((tmp_path / path).read_bytes()).hexdigest() == manifest[path], path
    assert readme == (TOY / "README.md").read_text()


@pytest.mark.slow
def test_resume_reuses_the_starting_samples(tmp_path):
    """The start's samples are drawn once: a run interrupted in iteration 2 and resumed compares iteration 2 with
    the file the first process wrote, as it is then. The file is edited before the resume (other responses, other
    scores; written as the run writes its files, else --resume refuses it), so a seeded redraw of the same samples
    would not pass: the resumed comparison uses the edited ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [
        sys.executable,
        str(ROOT / "sera.py"),
        "--iterations",
        "2",
        "--num_pairs",
        "32",
        "--num_eval",
        "8",
        "--reward_model",
        "assets/toy/reward_model",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    first = subprocess.run([*argv, "--stop_after_steps", "3"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode != 0 and "interrupted" in first.stderr, first.stderr[-2000:]
    start_file = tmp_path / "run" / "eval_start.json"
    drawn = json.loads(start_file.read_text())
    assert sorted(drawn["scores"]) == ["reward", "rm_score"] and len(drawn["responses"]) == 8
    # the edit: 3 words per response, and start scores every later sample beats (rm) or loses to (reward)
    edited = {"responses": ["x y z"] * 8, "scores": {"reward": [1e9] * 8, "rm_score": [-1e9] * 8}}
    sera.write_atomic(start_file, edited)  # as the run writes it: listed in the folder's manifest.json
    kept = start_file.read_bytes()
    second = subprocess.run([*argv, "--resume"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert start_file.read_bytes() == kept
    records = {
        r["iteration"]: r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "eval/rm_score" in r
    }
    assert sorted(records) == [0, 1, 2] and records[0]["eval/win_rate"] == 0.5
    # iterations 0 and 1 ran before the edit, against the drawn samples; iteration 2 after it, against the edited
    assert records[0]["eval/rm_score"] == pytest.approx(sum(drawn["scores"]["rm_score"]) / 8)
    assert records[1]["eval/start_response_words"] == sum(len(r.split()) for r in drawn["responses"]) / 8 != 3
    assert records[2]["eval/start_response_words"] == 3
    assert records[2]["eval/win_rate"] == 1.0 and records[2]["eval/reward_win_rate"] == 0.0
