"""How far can a reward model's verdict be trusted while a policy trains? Proxy (the toy reward model) against
gold (the toy oracle) at every evaluation of each script's default toy run.

None of the four methods trains on an external reward (they reward themselves), so a reward model is only
their evaluator, and an evaluator drifts as the policy moves off the data it was trained on. The toy world
has the exact reward, so the drift can be measured: each default run (`python <script>.py`) with
`--reward_model assets/toy/reward_model` added logs, at every evaluation, the oracle's mean (`eval/reward`),
the reward model's (`eval/rm_score`), both win rates against the starting model (`eval/win_rate` by the
reward model with its 95% interval, `eval/reward_win_rate` by the oracle) and the reward model's pairwise
agreement with the oracle on the run's own samples against the start's (`eval/rm_oracle_agreement`).

    python benchmarks/rm_vs_oracle.py                      # the four default runs (~10 min, 2 cores), the plot
    python benchmarks/rm_vs_oracle.py --scripts srdpo      # one of them
    python benchmarks/rm_vs_oracle.py --plot_only          # re-plot the runs kept under --out
    python benchmarks/rm_vs_oracle.py --budget tiny --scripts srdpo --results /tmp/r   # the plumbing only

Finished runs are reused (their folders are kept under --out). Writes benchmarks/results/rm_vs_oracle.png and
rm_vs_oracle.md (the numbers). `--budget tiny` (tests/test_benchmarks.py) adds benchmarks/claims.py's tiny
arguments to each run, keeps its runs in their own folders and writes rm_vs_oracle_tiny.png / .md: it checks that
the runs, the table, the plot and the length probe still work together; its numbers say nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
POSITION = ("iteration", "stage")


@dataclass
class Config:
    scripts: tuple[str, ...] = SCRIPTS
    out: Path = ROOT / "runs" / "rm_vs_oracle"
    """where the runs are kept (reused when finished)"""
    results: Path = ROOT / "benchmarks" / "results"
    threads: int = 2
    plot_only: bool = False
    budget: Literal["full", "tiny"] = "full"
    """full: each script's default toy run; tiny: claims.py's tiny budget (the plumbing only)"""
    probe_prompts: int = 200
    """eval prompts of the length probe (all 200 by default)"""


def run_dir(cfg: Config, script: str) -> Path:
    return cfg.out / (script if cfg.budget == "full" else f"{script}__{cfg.budget}")


def budget_argv(script: str, budget: str) -> list[str]:
    if budget == "full":
        return []
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from claims import BUDGETS

    return BUDGETS[budget][f"{script}.py"]


def run(script: str, out: Path, threads: int, extra: list[str] = ()):
    if (out / "metrics.jsonl").exists() and evaluations(out) and (out / "state.json").exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    argv = [
        sys.executable,
        str(ROOT / f"{script}.py"),
        "--reward_model",
        str(ROOT / "assets" / "toy" / "reward_model"),
        *extra,
        "--output_dir",
        str(out),
    ]
    print(" ".join(argv[1:]), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def evaluations(out: Path) -> list[dict]:
    """The run's evaluation records in the order they were logged, each with a label (its iteration or stage)."""
    records = [json.loads(line) for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    rows = []
    for record in records:
        if "eval/rm_score" in record:
            label = next((record[k] for k in POSITION if k in record), len(rows))
            rows.append({"label": "start" if len(rows) == 0 else str(label), **record})
    return rows


def plot(runs: dict[str, list[dict]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(SCRIPTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for script, rows in runs.items():
        x = list(range(len(rows)))
        c = colors[script]
        oracle = [r["eval/reward"] for r in rows]
        rm = [r["eval/rm_score"] for r in rows]
        # scores as the change from the start, each in its own unit (oracle points out of 10, RM logits)
        axes[0].plot(x, [v - oracle[0] for v in oracle], "-o", color=c, label=f"{script} oracle")
        axes[0].plot(x, [v - rm[0] for v in rm], "--s", color=c, alpha=0.7, label=f"{script} RM")
        axes[1].plot(x, [r["eval/reward_win_rate"] for r in rows], "-o", color=c, label=f"{script} oracle")
        axes[1].plot(x, [r["eval/win_rate"] for r in rows], "--s", color=c, alpha=0.7, label=f"{script} RM")
        axes[1].fill_between(
            x, [r["eval/win_rate_lo"] for r in rows], [r["eval/win_rate_hi"] for r in rows], color=c, alpha=0.1
        )
        agreement = [
            (i, r["eval/rm_oracle_agreement"])
            for i, r in enumerate(rows)
            if not math.isnan(r["eval/rm_oracle_agreement"])
        ]
        axes[2].plot([i for i, _ in agreement], [a for _, a in agreement], "-o", color=c, label=script)
    axes[0].set(
        title="held-out score, change from the start",
        xlabel="evaluation (0 = starting model)",
        ylabel="oracle (solid, /10) and RM (dashed, logit)",
    )
    axes[1].set(
        title="win rate vs the starting model (RM: 95% Wilson band)",
        xlabel="evaluation (0 = starting model)",
        ylabel="win rate (ties 1/2)",
    )
    axes[1].axhline(0.5, color="gray", lw=0.8)
    axes[2].set(
        title="RM agrees with the oracle (sample vs start's)",
        xlabel="evaluation (0 = starting model)",
        ylabel="pairwise agreement",
        ylim=(0.4, 1.0),
    )
    accuracy = json.loads((ROOT / "assets" / "toy" / "reward_model" / "STATS.json").read_text())["held_out_accuracy"]
    axes[2].axhline(accuracy, color="gray", lw=0.8, ls=":")
    axes[2].text(
        0.02,
        accuracy + 0.006,
        "RM's held-out accuracy on its own kind of pairs",
        fontsize=7,
        color="gray",
        transform=axes[2].get_yaxis_transform(),
    )
    longest = max(len(rows) for rows in runs.values())
    for ax in axes:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        ax.grid(alpha=0.3)
        ax.set_xticks(range(longest))
        ax.set_xlim(-0.3, longest - 0.7)
    fig.suptitle("Toy reward model (proxy) against the toy oracle (gold), default toy runs with --reward_model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(runs: dict[str, list[dict]]) -> str:
    lines = [
        "| script | evaluation | oracle score | RM score | oracle win rate | RM win rate [95% Wilson] "
        "| RM-oracle agreement | words |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for script, rows in runs.items():
        for r in rows:
            lines.append(
                f"| {script} | {r['label']} | {r['eval/reward']:.2f} | {r['eval/rm_score']:.2f} | "
                f"{r['eval/reward_win_rate']:.3f} | {r['eval/win_rate']:.3f} [{r['eval/win_rate_lo']:.3f}, "
                f"{r['eval/win_rate_hi']:.3f}] | {r['eval/rm_oracle_agreement']:.3f} | {r['eval/response_words']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def length_probe(limit: int = 200) -> str:
    """The reward model on the first `limit` eval prompts' perfect answers (all 200 by default) against the same
    answers without their last letter: the oracle takes credit off for a missing letter; pairs of equal length are
    all the RM was trained on."""
    import types

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "assets" / "toy"))
    import oracle

    import sera

    prompts = [json.loads(line)["prompt"] for line in open(ROOT / "assets" / "toy" / "data" / "eval.jsonl")][:limit]
    full = [oracle.perfect_answer(p) for p in prompts]
    short = [" ".join(a.split()[:-1]) for a in full]
    path = str(ROOT / "assets" / "toy" / "reward_model")
    tokenizer = sera.load_reward_model(path, None)
    args = types.SimpleNamespace(scoring_batch_size=64, dtype="float32")
    rm_full, rm_short = (
        sera.reward_model_scores(path, tokenizer, prompts, answers, args, torch.device("cpu"))
        for answers in (full, short)
    )
    n = len(prompts)
    return (
        f"Length probe ({n} eval prompts, perfect answer vs the same without its last letter): oracle "
        f"{sum(oracle.score(p, a) for p, a in zip(prompts, full)) / n:.2f} vs "
        f"{sum(oracle.score(p, a) for p, a in zip(prompts, short)) / n:.2f}; RM {sum(rm_full) / n:.2f} vs "
        f"{sum(rm_short) / n:.2f}, full answer preferred by the RM on "
        f"{sum(a > b for a, b in zip(rm_full, rm_short)) / n:.3f} "
        "of the prompts.\n"
    )


def main(cfg: Config):
    runs = {}
    for script in cfg.scripts:
        out = run_dir(cfg, script)
        if not cfg.plot_only:
            run(script, out, cfg.threads, budget_argv(script, cfg.budget))
        runs[script] = evaluations(out)
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise SystemExit(f"rm_vs_oracle.py: no finished run under {cfg.out} for {list(cfg.scripts)}")
    cfg.results.mkdir(parents=True, exist_ok=True)
    name = "rm_vs_oracle" if cfg.budget == "full" else f"rm_vs_oracle_{cfg.budget}"
    plot(runs, cfg.results / f"{name}.png")
    text = table(runs)
    command = "python benchmarks/rm_vs_oracle.py" + ("" if cfg.budget == "full" else f" --budget {cfg.budget}")
    (cfg.results / f"{name}.md").write_text(
        f"# Toy reward model vs the toy oracle (`{command}`)\n\n" + text + "\n" + length_probe(cfg.probe_prompts)
    )
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Config))
