"""Every benchmark script under benchmarks/, run end to end at tiny settings in a subprocess as a person runs it, so
that none can rot unseen: each test reads back what the script writes (its files, its table rows) and checks the
rows it must hold and that every number is finite. The numbers themselves say nothing at these sizes.

benchmarks/claims.py and benchmarks/dryrun.py have their own tests (tests/test_claims.py, tests/test_dryrun.py);
benchmarks/README.md lists which test exercises which script. The step against TRL's DPOTrainer needs TRL
(`pip install -e ".[bench]"`) and is skipped without it; the reward-model plot needs matplotlib (also in [bench]).
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.slow


def run(script: str, *argv) -> str:
    """`python benchmarks/<script> argv` from the repository root; its stdout (stderr shown on failure)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
    )
    assert res.returncode == 0, f"{script} {argv} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res.stdout


def table(text: str) -> list[dict]:
    """The first markdown table in `text`, as one dict per row keyed by the header's cells."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rule, *body = rows
    assert set("".join(rule)) <= {"-", ":"}, rule
    assert all(len(row) == len(header) for row in body), rows
    return [dict(zip(header, row)) for row in body]


def number(cell: str) -> float:
    """A table cell as a finite float ('1,234', '2.21x', '1.00' alike)."""
    value = float(cell.replace(",", "").removesuffix("x"))
    assert math.isfinite(value), cell
    return value


def test_generation_batched_and_one_at_a_time():
    out = run("generation.py", "--prompts", 4, "--batch", 8, "--threads", 1)
    assert "toy model, CPU, 1 threads, 4 prompts" in out
    rows = table(out)
    assert [r["sampler"] for r in rows] == ["one prompt at a time", "batched (8 sequences per call)"]
    for r in rows:
        assert number(r["seconds"]) > 0 and number(r["generated tokens/s"]) > 0
    # the speed-up is each rate over the first row's, as printed (rounded to one decimal)
    assert rows[0]["speed-up"] == "1.0x"
    rate = [number(r["generated tokens/s"]) for r in rows]
    assert number(rows[1]["speed-up"]) == pytest.approx(rate[1] / rate[0], abs=0.05 + 0.01 * rate[1] / rate[0])


def test_srdpo_overhead_lambda_zero_against_lambda_positive():
    out = run("srdpo_overhead.py", "--batch", 2, "--repeats", 1, "--threads", 1)
    assert "B = 2 pairs" in out
    rows = table(out)
    assert [r["configuration"] for r in rows] == [
        "lambda = 0 (plain DPO, no refinement pass)",
        "lambda = 0.5 (Sr-DPO)",
    ]
    base, sr = (number(r["median step (ms)"]) for r in rows)
    assert base > 0 and sr > 0 and rows[0]["ratio"] == "1.00"
    # the ratio is printed to 0.01 and the medians to 0.1 ms: their rounding bounds the ratio the table implies
    rounding = 0.005 + 0.05 / base * (1 + sr / base)
    assert number(rows[1]["ratio"]) == pytest.approx(sr / base, abs=rounding)
    refine = next(line for line in out.splitlines() if line.startswith("refinement pass alone: median "))
    assert number(refine.split("median ")[1].removesuffix(" ms")) > 0


def test_sera_vs_trl_one_step_side_by_side(tmp_path):
    trl = pytest.importorskip("trl", reason="the side-by-side step needs TRL: pip install -e '.[bench]'")
    report = tmp_path / "sera_vs_trl.md"
    # exit status 0 = its sanity checks passed: first loss log 2 in all three, TRL's first-step log-probs and token
    # ids equal to sera's, the replicated step equal to a sera.train_iteration call
    run("sera_vs_trl.py", "--batch_size", 2, "--rounds", 1, "--steps", 1, "--threads", 1, "--out", report)
    text = report.read_text()
    assert f"trl {trl.__version__}" in text and "B = 2 pairs = 4 sequences" in text
    rows = table(text)
    assert [r["configuration"] for r in rows] == ["ours", "ours (call)", "TRL", "TRL precomp"]
    for r in rows:
        assert r["timed steps"] == "1"
        for key in ("step median (ms)", "best (ms)", "step to step (ms)", "tokens/s", "vs TRL"):
            assert number(r[key]) > 0, (r["configuration"], key)
    assert rows[2]["vs TRL"] == "1.00x"
    lines = text.splitlines()
    assert "- sanity checks: all passed" in lines
    losses = next(line for line in lines if line.startswith("- first-step loss"))
    assert losses.endswith("ours 0.6931, TRL 0.6931, TRL precomp 0.6931")  # log 2 with policy = reference
    assert "max |weight difference| after one step 0.00e+00" in text


def test_learning_sweep_runs_checks_and_reuses(tmp_path):
    argv = ("--budget", "tiny", "--configs", "sera", "--seeds", 0, "--threads", 1, "--out", tmp_path)
    out = run("learning_sweep.py", *argv)
    folder = tmp_path / "sera__seed0__threads1__tiny"
    assert (folder / "sweep_done").exists() and "sera seed 0 threads 1:" in out
    rows = list(csv.DictReader(open(tmp_path / "learning_sweep.csv")))
    assert [(r["config"], r["seed"], r["threads"], r["check"], r["bar"], r["budget"]) for r in rows] == [
        ("sera", "0", "1", "eval gain (iter 2 - SFT)", "1.2", "tiny"),
        ("sera", "0", "1", "clean kept - flipped kept", "0.2", "tiny"),
    ]
    # the values read back from the run's own files
    state = json.loads((folder / "state.json").read_text())
    kept = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    kept = next(m for m in kept if m.get("iteration") == 2 and "data/flipped_kept_fraction" in m)
    expected = [
        state["eval"]["2"] - state["eval"]["0"],
        kept["data/clean_kept_fraction"] - kept["data/flipped_kept_fraction"],
    ]
    assert [number(r["value"]) for r in rows] == pytest.approx(expected, abs=1e-4)
    summary = table(out[out.index("| config |") :])
    assert [(r["config"], r["check"]) for r in summary] == [("sera", r["check"]) for r in rows]
    below = sum(e <= float(r["bar"]) for e, r in zip(expected, rows))
    assert f"{below} run(s) below a bar" in out
    # a finished run is reused, not run again
    assert "(reused)" in run("learning_sweep.py", *argv)


def test_rm_vs_oracle_table_plot_and_length_probe(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -e '.[bench]'")
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ("--budget", "tiny", "--scripts", "srdpo", "--threads", 1, "--probe_prompts", 8)
    out = run("rm_vs_oracle.py", *argv, "--out", runs, "--results", results)
    png = (results / "rm_vs_oracle_tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    text = (results / "rm_vs_oracle_tiny.md").read_text()
    rows = table(text)
    # one row per evaluation the run logged with a reward-model score, read back from its metrics.jsonl
    records = [json.loads(line) for line in open(runs / "srdpo__tiny" / "metrics.jsonl")]
    evaluations = [r for r in records if "eval/rm_score" in r]
    assert len(evaluations) >= 2 and [r["script"] for r in rows] == ["srdpo"] * len(evaluations)
    assert rows[0]["evaluation"] == "start"
    for r, record in zip(rows, evaluations):
        assert number(r["oracle score"]) == pytest.approx(record["eval/reward"], abs=0.005)
        assert number(r["RM score"]) == pytest.approx(record["eval/rm_score"], abs=0.005)
        assert 0 <= number(r["oracle win rate"]) <= 1 and number(r["words"]) > 0
        agreement = float(r["RM-oracle agreement"])  # of the run's samples against the start's: none at the start
        assert math.isnan(agreement) if r["evaluation"] == "start" else 0 <= agreement <= 1
        lo, hi = r["RM win rate [95% Wilson]"].split(" [")[1].rstrip("]").split(", ")
        assert 0 <= number(lo) <= number(r["RM win rate [95% Wilson]"].split(" [")[0]) <= number(hi) <= 1
    assert table(out) == rows  # the table is also printed
    probe = next(line for line in text.splitlines() if line.startswith("Length probe"))
    assert probe.startswith("Length probe (8 eval prompts,")
    numbers = [w.rstrip(";,.") for w in probe.split(":", 1)[1].split() if w[0].isdigit() or w[0] == "-"]
    assert len(numbers) == 5 and all(math.isfinite(float(x)) for x in numbers)
