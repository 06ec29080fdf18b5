"""benchmarks/claims.py: the interval/verdict arithmetic on known inputs, and the CSV/plot plumbing on a tiny budget."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import claims  # noqa: E402


def test_mean_ci_known_values():
    mean, half = claims.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # sd = sqrt(2.5), t(0.975, 4) = 2.776
    assert mean == 3.0 and half == pytest.approx(2.776 * 2.5**0.5 / 5**0.5, rel=1e-9)
    assert claims.mean_ci([0.5, 0.5])[1] == 0.0 and claims.mean_ci([2.0])[1] != claims.mean_ci([2.0])[1]  # nan


def test_verdicts_and_pairing():
    assert claims.verdict(1.0, 0.5, True) == "reproduced"
    assert claims.verdict(-1.0, 0.5, True) == "not reproduced"
    assert claims.verdict(0.2, 0.5, True) == "inconclusive"
    assert claims.verdict(-1.0, 0.5, False) == "reproduced" and claims.verdict(1.0, 0.5, False) == "not reproduced"
    assert claims.verdict(1.0, float("nan"), True) == "inconclusive"
    # seed 2 exists only for arm x: it must not enter the paired comparison
    values = {
        ("x", 0, "score"): 5.0,
        ("x", 1, "score"): 6.0,
        ("x", 2, "score"): 100.0,
        ("y", 0, "score"): 4.0,
        ("y", 1, "score"): 4.0,
    }
    comp = claims.Comparison("c", "x beats y", ("x", "score"), ("y", "score"))
    (row,) = claims.summarise([comp], values)
    assert row["seeds"] == 2 and row["mean_a"] == 5.5 and row["mean_b"] == 4.0 and row["diff"] == 1.5
    assert row["ci95"] == pytest.approx(12.706 * 0.5**0.5 / 2**0.5) and row["verdict"] == "inconclusive"
    lower = claims.Comparison("c", "x lower", ("x", "score"), ("y", "score"), higher_is_better=False)
    assert (
        claims.summarise([lower], {**values, ("x", 0, "score"): 1.0, ("x", 1, "score"): 1.1})[0]["verdict"]
        == "reproduced"
    )


@pytest.mark.slow
def test_tiny_benchmark_writes_csv_plot_and_reuses_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = claims.Args(
        claims=["srdpo"],
        seeds=[0, 1],
        srdpo_lams=[0.5],
        budget="tiny",
        out=tmp_path / "runs",
        results=tmp_path / "results",
    )
    summary = claims.main(args)
    rows = list(csv.DictReader(open(tmp_path / "results" / "claims.csv")))
    assert {"claim", "arm", "seed", "metric", "value", "command", "commit", "torch", "machine", "date"} <= set(rows[0])
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in ("srdpo-lam0", "srdpo-lam0.5") for s in ("0", "1")}
    assert all(r["claim"] == "srdpo" and r["budget"] == "tiny" for r in rows)
    assert {"score", "sft_score", "margin_score_corr"} <= {r["metric"] for r in rows}
    assert all(
        "--lam 0.5" in r["command"] and "--seed " + r["seed"] in r["command"]
        for r in rows
        if r["arm"] == "srdpo-lam0.5"
    )
    assert [r["what"] for r in summary] == [
        "lam 0.5 beats plain DPO (held-out score)",
        "lam 0.5: margin tracks the oracle gap better (corr., Table 4)",
        "beats its SFT start (held-out score)",
    ]
    assert all(r["seeds"] == 2 and r["verdict"] in ("reproduced", "not reproduced", "inconclusive") for r in summary)
    score = {(r["arm"], r["seed"]): float(r["value"]) for r in rows if r["metric"] == "score"}
    assert summary[0]["diff"] == pytest.approx(
        sum(score[("srdpo-lam0.5", s)] - score[("srdpo-lam0", s)] for s in "01") / 2, abs=1e-4
    )
    png = (tmp_path / "results" / "claims.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "results" / "claims.md").read_text().count("| srdpo |") == 3
    # a second call reuses every finished run
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("sweep_done")}
    capsys.readouterr()
    claims.main(args)
    assert len(stamps) == 4 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert capsys.readouterr().out.count("(reused)") == 4
