"""Every learning test's exact configuration over seeds and torch thread counts: does each bar hold?

A learning test that passes for one seed on one machine proves nothing. This runs the configuration of
each script's learning test (the argument lists are imported from the tests, so they cannot drift) for
every seed and thread count, computes the quantities the test asserts, and prints per-seed numbers next
to the test's bar, with the margin of the worst run. `--config osp-default` is `python osp.py` itself.

    python benchmarks/learning_sweep.py                                   # all configs, seeds 0-4, 1 and 2 threads
    python benchmarks/learning_sweep.py --configs osp --seeds 0 1 --threads 2
    python benchmarks/learning_sweep.py --jobs 2 --threads 1              # two 1-thread runs side by side
    python benchmarks/learning_sweep.py --budget tiny --configs srdpo --seeds 0 --threads 1   # plumbing only

Finished runs are reused (their folders are kept under --out); CSV rows go to --out/learning_sweep.csv.
`--budget tiny` runs benchmarks/claims.py's tiny argument lists instead of the tests' (tests/test_benchmarks.py):
it checks that the runs, the checks and the table still work together; its numbers say nothing about the bars.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _test_argv(budget: str = "test") -> dict[str, tuple[str, list[str]]]:
    if budget == "tiny":  # the plumbing only: each script on claims.py's tiny budget
        from claims import BUDGETS

        tiny = BUDGETS["tiny"]
        scripts = {"sera": "sera.py", "srdpo": "srdpo.py", "opsr": "opsr.py", "osp": "osp.py", "osp-default": "osp.py"}
        return {config: (script, tiny[script]) for config, script in scripts.items()}
    import test_opsr
    import test_osp
    import test_runs

    return {
        "sera": ("sera.py", test_runs.SERA),
        "srdpo": ("srdpo.py", test_runs.SRDPO),
        "opsr": ("opsr.py", test_opsr.RUN),
        "osp": ("osp.py", test_osp.SMALL),
        "osp-default": ("osp.py", []),
    }


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


# What each learning test asserts, as (name, value, bar): the test passes when value > bar.
def sera_checks(out: Path) -> list[tuple[str, float, float]]:
    state = json.loads((out / "state.json").read_text())
    kept = next(m for m in _metrics(out) if m.get("iteration") == 2 and "data/flipped_kept_fraction" in m)
    return [
        ("eval gain (iter 2 - SFT)", state["eval"]["2"] - state["eval"]["0"], 1.2),
        ("clean kept - flipped kept", kept["data/clean_kept_fraction"] - kept["data/flipped_kept_fraction"], 0.2),
    ]


def srdpo_checks(out: Path) -> list[tuple[str, float, float]]:
    state = json.loads((out / "state.json").read_text())
    return [("eval gain (final - start)", state["eval"]["final"] - state["eval"]["start"], 1.5)]


def opsr_checks(out: Path) -> list[tuple[str, float, float]]:
    state = json.loads((out / "state.json").read_text())
    per_iteration = [m for m in _metrics(out) if "opsr/rejected_score" in m]
    return [
        ("eval gain (iter 2 - SFT)", state["eval"]["2"] - state["eval"]["sft"], 0.6),
        (
            "min chosen - rejected reward",
            min(m["opsr/chosen_reward"] - m["opsr/rejected_reward"] for m in per_iteration),
            2.0,
        ),
    ]


def osp_checks(out: Path, default_run: bool = False) -> list[tuple[str, float, float]]:
    state = json.loads((out / "state.json").read_text())
    judge, reward = state["judge"], state["eval"]
    sft, aug = judge["sft"], judge["augmented"]
    checks = [
        ("judge oracle accuracy after augmentation", aug["judge/oracle_accuracy"], 0.65),
        ("judge accuracy gain over SFT judge", aug["judge/oracle_accuracy"] - sft["judge/oracle_accuracy"], 0.0),
        ("eval gain (final - SFT)", reward["final"] - reward["sft"], 0.3),
    ]
    if not default_run:
        checks.insert(
            2, ("position consistency gain", aug["judge/position_consistency"] - sft["judge/position_consistency"], 0.2)
        )
    checks.append(("(info) SFT judge oracle accuracy", sft["judge/oracle_accuracy"], float("nan")))
    checks.append(("(info) SFT judge position consistency", sft["judge/position_consistency"], float("nan")))
    return checks


CHECKS = {
    "sera": sera_checks,
    "srdpo": srdpo_checks,
    "opsr": opsr_checks,
    "osp": osp_checks,
    "osp-default": lambda out: osp_checks(out, default_run=True),
}


@dataclass
class Args:
    configs: list[str] = field(default_factory=lambda: ["sera", "srdpo", "opsr", "osp", "osp-default"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    threads: list[int] = field(default_factory=lambda: [1, 2])
    """torch threads per run (OMP_NUM_THREADS); osp-default always runs with 2"""
    jobs: int = 1
    out: Path = ROOT / "runs" / "learning_sweep"
    extra_env: list[str] = field(default_factory=list)
    """KEY=VALUE pairs for every run, e.g. ATEN_CPU_CAPABILITY=avx2 to take the AVX2 kernels on an AVX-512 CPU"""
    budget: Literal["test", "tiny"] = "test"
    """test: each learning test's configuration; tiny: claims.py's tiny budget (the plumbing only, own folders)"""


def run_script(script: str, argv: list[str], seed: int, out: Path, threads: int, extra_env: list[str] = ()) -> float:
    """Run `script argv --seed --output_dir out` unless out holds a finished run; its seconds (0.0 when reused)."""
    if (out / "sweep_done").exists():
        return 0.0
    if out.exists():
        shutil.rmtree(out)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        **dict(kv.split("=", 1) for kv in extra_env),
    }
    start = time.time()
    res = subprocess.run(
        [sys.executable, str(ROOT / script), *argv, "--seed", str(seed), "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(argv)} --seed {seed} (threads {threads}) failed:\n{res.stderr[-3000:]}")
    (out / "sweep_done").write_text(f"{time.time() - start:.1f}\n")
    return time.time() - start


def run_one(config: str, seed: int, threads: int, args: Args) -> tuple[str, int, int, Path, float]:
    script, argv = _test_argv(args.budget)[config]
    out = args.out / f"{config}__seed{seed}__threads{threads}{'__tiny' if args.budget == 'tiny' else ''}"
    return config, seed, threads, out, run_script(script, argv, seed, out, threads, args.extra_env)


def main(args: Args) -> None:
    unknown = set(args.configs) - set(CHECKS)
    if unknown:
        raise SystemExit(f"learning_sweep: error: unknown --configs {sorted(unknown)}; expected some of {list(CHECKS)}")
    jobs = sorted(
        {(c, s, 2 if c == "osp-default" else t) for c in args.configs for s in args.seeds for t in args.threads}
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for config, seed, threads, out, seconds in pool.map(lambda j: run_one(*j, args), jobs):
            for name, value, bar in CHECKS[config](out):
                rows.append(
                    dict(
                        config=config,
                        seed=seed,
                        threads=threads,
                        check=name,
                        value=round(value, 4),
                        bar=bar,
                        budget=args.budget,
                    )
                )
            print(
                f"{config} seed {seed} threads {threads}: "
                + ", ".join(
                    f"{r['check']} {r['value']:.3f}"
                    for r in rows
                    if (r["config"], r["seed"], r["threads"]) == (config, seed, threads)
                )
                + (f" ({seconds:.0f}s)" if seconds else " (reused)"),
                flush=True,
            )
    with open(args.out / "learning_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| config | check | bar | worst | per run (seed/threads: value) |\n|---|---|---|---|---|")
    failed = 0
    for config in args.configs:
        for name in dict.fromkeys(r["check"] for r in rows if r["config"] == config):
            mine = [r for r in rows if r["config"] == config and r["check"] == name]
            worst = min(r["value"] for r in mine)
            bar = mine[0]["bar"]
            failed += sum(r["value"] <= bar for r in mine)
            cells = " ".join(f"{r['seed']}/{r['threads']}: {r['value']:.3f}" for r in mine)
            print(f"| {config} | {name} | {bar} | {worst:.3f} | {cells} |")
    print(f"\n{failed} run(s) below a bar")


if __name__ == "__main__":
    main(tyro.cli(Args))
