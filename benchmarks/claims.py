"""Each paper's central claim, measured over seeds on the toy world: method arm vs baseline arm.

Every arm is a plain run of one script (same data, same budget for both arms, only the method's
switch differs); a claim is a paired comparison over seeds of one metric read from the runs'
state.json / metrics.jsonl. Per comparison: both means, the mean of the per-seed differences with
its 95% t-interval, and a verdict: "reproduced" when the interval lies on the claimed side of 0,
"not reproduced" when it lies on the other side, "inconclusive" when it contains 0.

    python benchmarks/claims.py                                   # all claims, seeds 0-4 (~1 h on 2 cores)
    python benchmarks/claims.py --claims srdpo osp --seeds 0 1 2
    python benchmarks/claims.py --jobs 2 --threads 1              # two 1-thread runs side by side

Finished runs are reused (their folders are kept under --out). Writes --results/claims.csv (one
row per run and metric, with the run's command, commit and machine), claims.png and claims.md.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_sweep import ROOT, _metrics, run_script  # noqa: E402

CLAIMS = ("sera", "srdpo", "opsr", "osp")

# Per-run budgets, identical for a claim's two arms. "full" is each script's default toy run (the whole
# benchmark is ~55 min on 2 idle cores); "tiny" only exercises the plumbing (tests/test_claims.py).
BUDGETS = {
    "full": {"sera.py": [], "srdpo.py": [], "opsr.py": [], "osp.py": []},
    "tiny": {
        "sera.py": ["--iterations", "2", "--num_pairs", "32", "--num_eval", "8"],
        "srdpo.py": ["--num_pairs", "32", "--eval_pairs", "16", "--num_eval", "8"],
        "opsr.py": ["--iterations", "2", "--num_prompts", "16", "--num_pairs", "32", "--num_eval", "8"],
        "osp.py": [
            "--num_prompts",
            "16",
            "--num_sft",
            "32",
            "--aug_epochs",
            "1",
            "--num_judge_eval",
            "16",
            "--num_eval",
            "8",
            "--eval_every",
            "0",
        ],
    },
}


@dataclass
class Args:
    claims: list[str] = field(default_factory=lambda: list(CLAIMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    jobs: int = 1
    """runs side by side"""
    threads: int = 2
    """torch threads per run (OMP_NUM_THREADS)"""
    srdpo_lams: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 1.0])
    """Sr-DPO's lambda grid (the paper's), each compared with --lam 0"""
    budget: Literal["full", "tiny"] = "full"
    run: bool = True
    """--no-run: only summarise the runs already finished under --out (missing ones are listed, not run)"""
    out: Path = ROOT / "runs" / "claims"
    """run folders (reused when finished)"""
    results: Path = ROOT / "benchmarks" / "results"
    """where claims.csv, claims.png and claims.md go"""


def arms(args: Args) -> dict[str, tuple[str, str, list[str]]]:
    """arm name -> (claim, script, argv without --seed/--output_dir)."""
    b = BUDGETS[args.budget]
    out = {
        "sera": ("sera", "sera.py", b["sera.py"]),
        # iterative DPO: every offline pair kept, nothing generated, no ensemble
        "sera-iterative-dpo": ("sera", "sera.py", b["sera.py"] + ["--rho_1", "1", "--rho_2", "0", "--gamma_e", "0"]),
    }
    # plain offline DPO: one iteration (all of D, SFT reference) for as many epochs as SeRA has iterations
    iterations = int(dict(zip(b["sera.py"], b["sera.py"][1:])).get("--iterations", 3))
    plain = [a for a, prev in zip(b["sera.py"], [None, *b["sera.py"]]) if "--iterations" not in (a, prev)]
    out["sera-plain-dpo"] = ("sera", "sera.py", plain + ["--iterations", "1", "--epochs", str(iterations)])
    for lam in [0.0, *args.srdpo_lams]:
        out[f"srdpo-lam{lam:g}"] = ("srdpo", "srdpo.py", b["srdpo.py"] + ["--lam", f"{lam:g}"])
    out["opsr"] = ("opsr", "opsr.py", b["opsr.py"])
    out["opsr-fixed3"] = ("opsr", "opsr.py", b["opsr.py"] + ["--rejected_scores", "3", "3", "3"])
    out["osp"] = ("osp", "osp.py", b["osp.py"])
    out["osp-dpo"] = ("osp", "osp.py", b["osp.py"] + ["--loss", "dpo"])
    return {k: v for k, v in out.items() if v[0] in args.claims}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def read_metrics(script: str, out: Path) -> dict[str, float]:
    """The metrics the claims compare, from one finished run folder."""
    state = json.loads((out / "state.json").read_text())
    ev = state["eval"]
    if script in ("sera.py", "opsr.py"):
        iters = sorted(int(k) for k in ev if k.isdigit() and (script == "opsr.py" or k != "0"))
        m = {
            "score": ev[str(iters[-1])],
            "sft_score": ev["0" if script == "sera.py" else "sft"],
            **{f"score_iter{i}": ev[str(i)] for i in iters if i > 0},
        }
        logged = [r for r in _metrics(out) if "data/flipped_kept_fraction" in r or "opsr/chosen_reward" in r]
        if script == "sera.py" and logged:  # over the iterations with IRM selection
            m["clean_kept"] = _mean([r["data/clean_kept_fraction"] for r in logged])
            m["flipped_kept"] = _mean([r["data/flipped_kept_fraction"] for r in logged])
        if script == "opsr.py" and logged:  # oracle score of the self-prompted answers, over the iterations
            m["chosen_oracle"] = _mean([r["opsr/chosen_reward"] for r in logged])
            m["rejected_oracle"] = _mean([r["opsr/rejected_reward"] for r in logged])
        return m
    if script == "srdpo.py":
        return {
            "score": ev["final"],
            "sft_score": ev["start"],
            "held_out_accuracy": ev["held_out_accuracy"],
            "margin_score_corr": ev["margin_score_corr"],
        }
    steps = [r["osp/abs_sigma_z_minus_q"] for r in _metrics(out) if "osp/abs_sigma_z_minus_q" in r]
    return {
        "score": ev["final"],
        "sft_score": ev["sft"],
        "abs_sigma_z_minus_q": _mean(steps),
        **{f"judge_accuracy_{k}": v["judge/oracle_accuracy"] for k, v in state["judge"].items()},
    }


@dataclass(frozen=True)
class Comparison:
    claim: str
    what: str
    a: tuple[str, str]  # (arm, metric) on the claimed-better side
    b: tuple[str, str]
    higher_is_better: bool = True


def comparisons(args: Args, iterations: dict[str, list[int]]) -> list[Comparison]:
    c = []
    if "sera" in args.claims:
        c += [
            Comparison(
                "sera",
                "IRM selection + bootstrapping beats iterative DPO (held-out score)",
                ("sera", "score"),
                ("sera-iterative-dpo", "score"),
            ),
            Comparison(
                "sera",
                "SeRA beats plain offline DPO, same number of epochs (held-out score)",
                ("sera", "score"),
                ("sera-plain-dpo", "score"),
            ),
            Comparison(
                "sera",
                "IRM selection keeps clean pairs over flipped ones (kept fraction)",
                ("sera", "clean_kept"),
                ("sera", "flipped_kept"),
            ),
        ]
    for lam in args.srdpo_lams if "srdpo" in args.claims else []:
        c += [
            Comparison(
                "srdpo",
                f"lam {lam:g} beats plain DPO (held-out score)",
                (f"srdpo-lam{lam:g}", "score"),
                ("srdpo-lam0", "score"),
            ),
            Comparison(
                "srdpo",
                f"lam {lam:g}: margin tracks the oracle gap better (corr., Table 4)",
                (f"srdpo-lam{lam:g}", "margin_score_corr"),
                ("srdpo-lam0", "margin_score_corr"),
            ),
        ]
    if "opsr" in args.claims:
        c += [
            Comparison(
                "opsr",
                f"3-5-7 beats fixed 3 after iteration {i} (held-out score)",
                ("opsr", f"score_iter{i}"),
                ("opsr-fixed3", f"score_iter{i}"),
            )
            for i in iterations.get("opsr", [])[1:]
        ]
        c += [
            Comparison(
                "opsr",
                "chosen answers beat rejected ones (oracle score)",
                ("opsr", "chosen_oracle"),
                ("opsr", "rejected_oracle"),
            )
        ]
    if "osp" in args.claims:
        c += [Comparison("osp", "SPCE beats hard-label DPO (held-out score)", ("osp", "score"), ("osp-dpo", "score"))]
        c += [
            Comparison(
                "osp",
                f"SPCE keeps the judge better (judge accuracy, {k.replace('_', ' ')})",
                ("osp", f"judge_accuracy_{k}"),
                ("osp-dpo", f"judge_accuracy_{k}"),
            )
            for k in iterations.get("osp", [])
        ]
        c += [
            Comparison(
                "osp",
                "SPCE over-fits less: mean abs(sigma(z) - q) lower",
                ("osp", "abs_sigma_z_minus_q"),
                ("osp-dpo", "abs_sigma_z_minus_q"),
                higher_is_better=False,
            )
        ]
    method_arm = {
        "sera": "sera",
        "srdpo": "srdpo-lam0.5" if 0.5 in args.srdpo_lams else None,
        "opsr": "opsr",
        "osp": "osp",
    }
    c += [
        Comparison(k, "beats its SFT start (held-out score)", (arm, "score"), (arm, "sft_score"))
        for k, arm in method_arm.items()
        if k in args.claims and arm
    ]
    return c


# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (then the normal's).
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for fewer than 2 values)."""
    n, mean = len(xs), _mean(xs)
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, (T975[n - 2] if n <= 31 else 1.96) * sd / math.sqrt(n)


def verdict(diff: float, half: float, higher_is_better: bool) -> str:
    """On the per-seed differences a - b: which side of 0 their 95% interval lies on."""
    lo, hi = (diff - half, diff + half) if higher_is_better else (-diff - half, -diff + half)
    return "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive"


def summarise(comps: list[Comparison], values: dict[tuple[str, int, str], float]) -> list[dict]:
    """values[(arm, seed, metric)] -> one summary per comparison, paired over the seeds both sides have."""
    rows = []
    for c in comps:
        seeds = sorted(s for (arm, s, m) in values if (arm, m) == c.a and (c.b[0], s, c.b[1]) in values)
        if not seeds:
            continue
        a, b = ([values[(arm, s, m)] for s in seeds] for arm, m in (c.a, c.b))
        diff, half = mean_ci([x - y for x, y in zip(a, b)])
        rows.append(
            dict(
                claim=c.claim,
                what=c.what,
                a=f"{c.a[0]}:{c.a[1]}",
                b=f"{c.b[0]}:{c.b[1]}",
                seeds=len(seeds),
                mean_a=_mean(a),
                mean_b=_mean(b),
                diff=diff,
                ci95=half,
                verdict=verdict(diff, half, c.higher_is_better),
                a_values=a,
                b_values=b,
            )
        )
    return rows


def markdown(summary: list[dict]) -> str:
    lines = ["| claim | comparison | A | B | mean A | mean B | A - B [95% CI] | seeds | verdict |", "|---" * 9 + "|"]
    for r in summary:
        ci = f"[{r['diff'] - r['ci95']:+.3f}, {r['diff'] + r['ci95']:+.3f}]"
        lines.append(
            f"| {r['claim']} | {r['what']} | {r['a']} | {r['b']} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | "
            f"{r['diff']:+.3f} {ci} | {r['seeds']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(summary) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = {"reproduced": "tab:green", "not reproduced": "tab:red", "inconclusive": "tab:gray"}
    for ax, r in zip(axes.flat, summary):
        for x, vals in ((0, r["a_values"]), (1, r["b_values"])):
            mean, half = mean_ci(vals)
            ax.scatter([x + 0.06 * (i - (len(vals) - 1) / 2) for i in range(len(vals))], vals, s=18, alpha=0.7)
            ax.errorbar([x + 0.3], [mean], yerr=[0 if math.isnan(half) else half], fmt="o", color="k", capsize=4)
        for a, b in zip(r["a_values"], r["b_values"]):
            ax.plot([0, 1], [a, b], color="0.8", lw=0.8, zorder=0)
        ax.set_xticks([0, 1], [r["a"].replace(":", "\n"), r["b"].replace(":", "\n")], fontsize=7)
        ax.set_xlim(-0.4, 1.6)
        ax.set_title(
            f"{r['claim']}: {r['what']}\nA - B = {r['diff']:+.3f} ± {r['ci95']:.3f} (95% CI, {r['seeds']} seeds): "
            f"{r['verdict']}",
            fontsize=7,
            color=colors[r["verdict"]],
        )
    for ax in list(axes.flat)[len(summary) :]:
        ax.axis("off")
    fig.suptitle(
        "Paper claims on the toy world: per-seed values (points, paired by lines), mean and 95% CI (black)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provenance() -> dict[str, str]:
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "commit": commit + ("+dirty" if dirty.strip() else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": cpu,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(args: Args) -> list[dict]:
    unknown = set(args.claims) - set(CLAIMS)
    if unknown:
        raise SystemExit(f"claims: error: unknown --claims {sorted(unknown)}; expected some of {list(CLAIMS)}")
    if not args.seeds:
        raise SystemExit("claims: error: --seeds is empty; expected at least one seed")
    todo, here = arms(args), provenance()
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, int]) -> tuple[str, int, float | None]:
        arm, seed = job
        _, script, argv = todo[arm]
        out = args.out / args.budget / f"{arm}__seed{seed}"
        if not args.run and not (out / "sweep_done").exists():
            return arm, seed, None
        seconds = run_script(script, argv, seed, out, args.threads)
        if seconds or not (out / "claims_run.json").exists():  # the run's own provenance, kept when reused
            command = f"OMP_NUM_THREADS={args.threads} python {script} {' '.join(argv)} --seed {seed}".replace(
                "  ", " "
            )
            (out / "claims_run.json").write_text(json.dumps({**here, "command": command, "seconds": round(seconds, 1)}))
        return arm, seed, seconds

    values, csv_rows, missing = {}, [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        for arm, seed, seconds in pool.map(one, [(a, s) for s in args.seeds for a in todo]):
            if seconds is None:
                missing.append(f"{arm} seed {seed}")
                continue
            out = args.out / args.budget / f"{arm}__seed{seed}"
            info = json.loads((out / "claims_run.json").read_text())
            metrics = read_metrics(todo[arm][1], out)
            print(
                f"{arm} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                + (f" ({seconds:.0f}s)" if seconds else " (reused)"),
                flush=True,
            )
            for metric, value in metrics.items():
                values[(arm, seed, metric)] = value
                csv_rows.append(
                    dict(
                        claim=todo[arm][0],
                        arm=arm,
                        seed=seed,
                        metric=metric,
                        value=round(value, 5),
                        budget=args.budget,
                        **info,
                    )
                )
    if not csv_rows:
        raise SystemExit(
            f"claims: error: no finished runs under {args.out / args.budget} for these --claims and --seeds"
        )
    with open(args.results / "claims.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    iterations = {
        "opsr": sorted(
            {int(m[len("score_iter") :]) for (arm, _, m) in values if arm == "opsr" and m.startswith("score_iter")}
        ),
        "osp": sorted(
            {
                m[len("judge_accuracy_") :]
                for (arm, _, m) in values
                if arm == "osp" and m.startswith("judge_accuracy_step")
            },
            key=lambda k: int(k[5:]),
        )
        + ["final"],
    }
    summary = summarise(comparisons(args, iterations), values)
    table = markdown(summary)
    (args.results / "claims.md").write_text(table)
    plot(summary, args.results / "claims.png")
    print("\n" + table + (f"\nnot run yet ({len(missing)}): {', '.join(missing)}\n" if missing else ""))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
