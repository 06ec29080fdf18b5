"""Mutation check: each paper rule and runtime guarantee has a fast test that a wrong implementation fails.

Every row of MUTANTS is one rule (what the paper, or our README, says must hold) and one deliberate bug that breaks
it: `old` is replaced by `new` in `file` (the text must stand there exactly once), in a temporary copy of the
project, and `tests` (pytest node ids or files, with an optional `-k` expression) are run there. The mutant is
killed when they fail; one that survives means the rule is not pinned. The rule table in tests/README.md is this
list (`--table` prints it; a test keeps the two equal).

    python tests/mutants.py                 # every mutant; exit 1 naming the survivors
    python tests/mutants.py --only sr_dpo_delta_plain_context --keep   # one, and keep its copy to look at
    python tests/mutants.py --table         # the rule table (markdown)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str  # a short id
    method: str  # SeRA, OPSR, OSP, Sr-DPO, losses, kernels, runtime
    rule: str  # what must hold
    source: str  # the paper's section / equation, or the README's guarantee
    file: str
    old: str
    new: str
    tests: str  # pytest arguments: node ids / files, optionally -k "..."


MUTANTS: list[Mutant] = [
    # ---- Sr-DPO / Sr-IPO (srdpo.py) ----
    Mutant(
        "sr_dpo_delta_plain_context",
        "Sr-DPO",
        "Delta is the margin on the augmented context p (+) x, for the policy and the reference terms",
        "Sr-DPO §3.2, eq. 12; Alg. 1 lines 4-5",
        "srdpo.py",
        '[(p["aug_prompt_ids"], p["aug_chosen_ids"]) for p in batch_pairs]\n'
        '                + [(p["aug_prompt_ids"], p["aug_rejected_ids"]) for p in batch_pairs],\n'
        "                pad_id,\n"
        "                device,\n"
        "            )\n"
        "            aug_ref = torch.tensor(\n"
        '                [p["ref_aug_chosen"] for p in batch_pairs] + [p["ref_aug_rejected"] for p in batch_pairs],',
        '[(p["prompt_ids"], p["chosen_ids"]) for p in batch_pairs]\n'
        '                + [(p["prompt_ids"], p["rejected_ids"]) for p in batch_pairs],\n'
        "                pad_id,\n"
        "                device,\n"
        "            )\n"
        "            aug_ref = torch.tensor(\n"
        '                [p["ref_chosen"] for p in batch_pairs] + [p["ref_rejected"] for p in batch_pairs],',
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context "
        'tests/test_srdpo.py -k "eq13_and_eq15 or no_gradient_through_delta"',
    ),
    Mutant(
        "sr_dpo_delta_policy_plain_context",
        "Sr-DPO",
        "Delta's policy log-probs are scored on p (+) x, with the current weights",
        "Sr-DPO §3.2, eq. 12; Alg. 1 line 4",
        "srdpo.py",
        '[(p["aug_prompt_ids"], p["aug_chosen_ids"]) for p in batch_pairs]\n'
        '                + [(p["aug_prompt_ids"], p["aug_rejected_ids"]) for p in batch_pairs],',
        '[(p["prompt_ids"], p["chosen_ids"]) for p in batch_pairs]\n'
        '                + [(p["prompt_ids"], p["rejected_ids"]) for p in batch_pairs],',
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context",
    ),
    Mutant(
        "sr_dpo_delta_plain_reference",
        "Sr-DPO",
        "Delta's reference term is the frozen reference on p (+) x, not on x",
        "Sr-DPO §3.2, eq. 12; Alg. 1 line 5",
        "srdpo.py",
        '[p["ref_aug_chosen"] for p in batch_pairs] + [p["ref_aug_rejected"] for p in batch_pairs],',
        '[p["ref_chosen"] for p in batch_pairs] + [p["ref_rejected"] for p in batch_pairs],',
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context",
    ),
    Mutant(
        "sr_dpo_delta_no_reference",
        "Sr-DPO",
        "Delta is a log-ratio margin: the reference's log-probs on p (+) x are subtracted",
        "Sr-DPO §3.2, eq. 12; Alg. 1 line 5",
        "srdpo.py",
        "aug_h = (aug[:n] - aug_ref[:n]) - (aug[n:] - aug_ref[n:])",
        "aug_h = aug[:n] - aug[n:]",
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context",
    ),
    Mutant(
        "sr_dpo_delta_sign",
        "Sr-DPO",
        "Delta is chosen minus rejected",
        "Sr-DPO §3.2, eq. 12",
        "srdpo.py",
        "aug_h = (aug[:n] - aug_ref[:n]) - (aug[n:] - aug_ref[n:])",
        "aug_h = (aug[n:] - aug_ref[n:]) - (aug[:n] - aug_ref[:n])",
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context",
    ),
    Mutant(
        "sr_dpo_delta_no_beta",
        "Sr-DPO",
        "Delta carries the factor beta: Delta = beta * sg[h(p (+) x)]",
        "Sr-DPO §3.2, eq. 12",
        "srdpo.py",
        "delta = args.beta * aug_h",
        "delta = aug_h",
        "tests/test_srdpo.py::test_delta_is_the_margin_on_the_augmented_context",
    ),
    Mutant(
        "sr_dpo_delta_not_detached",
        "Sr-DPO",
        "Delta is a stop-gradient: no gradient flows through it, dL/dh is the paper's",
        "Sr-DPO §3.2, eq. 12-13 (stop-gradient); Alg. 1 line 7",
        "srdpo.py",
        "offset = args.lam * delta.detach()",
        "offset = args.lam * delta",
        "tests/test_srdpo.py::test_sr_loss_passes_no_gradient_to_delta",
    ),
    Mutant(
        "sr_dpo_lambda_sign",
        "Sr-DPO",
        "the refinement term enters as beta h - lambda Delta (Sr-DPO) and h - lambda Delta (Sr-IPO)",
        "Sr-DPO §3.2, eq. 13, 15",
        "srdpo.py",
        "offset = args.lam * delta.detach()",
        "offset = -args.lam * delta.detach()",
        'tests/test_srdpo.py -k "eq13_and_eq15"',
    ),
    Mutant(
        "sr_dpo_beta_dropped",
        "Sr-DPO",
        "Sr-DPO is -log sigma(beta h - lambda Delta); lambda = 0 gives DPO",
        "Sr-DPO §3.2, eq. 13",
        "srdpo.py",
        "F.softplus(-(args.beta * h - offset))",
        "F.softplus(-(h - offset))",
        "tests/test_srdpo.py::test_lambda_zero_gives_dpo_and_ipo_by_their_formulas",
    ),
    Mutant(
        "sr_ipo_target",
        "Sr-DPO",
        "Sr-IPO's target is 1/(2 beta): L = (h - lambda Delta - 1/(2 beta))^2",
        "Sr-IPO eq. 15; Alg. 2",
        "srdpo.py",
        "1.0 / (2.0 * args.beta)",
        "1.0 / args.beta",
        "tests/test_srdpo.py::test_lambda_zero_gives_dpo_and_ipo_by_their_formulas",
    ),
    Mutant(
        "sr_ipo_beta_on_h",
        "Sr-DPO",
        "Sr-IPO squares h itself (no beta on h); lambda = 0 gives IPO on summed log-probs",
        "Sr-IPO eq. 15; IPO (Azar et al. eq. 17)",
        "srdpo.py",
        "(h - offset - 1.0 / (2.0 * args.beta)) ** 2",
        "(args.beta * h - offset - 1.0 / (2.0 * args.beta)) ** 2",
        "tests/test_srdpo.py::test_lambda_zero_gives_dpo_and_ipo_by_their_formulas",
    ),
    Mutant(
        "sr_ipo_beta_twice",
        "Sr-DPO",
        "beta enters Sr-IPO's offset once, through Delta: lambda * beta * h(p (+) x)",
        "Sr-IPO eq. 15",
        "srdpo.py",
        "(h - offset - 1.0 / (2.0 * args.beta)) ** 2",
        "(h - args.beta * offset - 1.0 / (2.0 * args.beta)) ** 2",
        'tests/test_srdpo.py -k "eq13_and_eq15"',
    ),
    Mutant(
        "sr_dpo_reference_plain_only",
        "Sr-DPO",
        "the frozen reference is scored once on both contexts, x for h and p (+) x for Delta",
        "Sr-DPO §3.2, eq. 12; Alg. 1 lines 1-2",
        "srdpo.py",
        'sides += [("aug_prompt_ids", "aug_chosen_ids"), ("aug_prompt_ids", "aug_rejected_ids")]',
        "sides += sides",
        "tests/test_srdpo.py::test_reference_is_the_starting_model_on_both_contexts",
    ),
    Mutant(
        "sr_dpo_reference_sides_swapped",
        "Sr-DPO",
        "each pair's reference log-probs on p (+) x stand on their side (chosen, rejected)",
        "Sr-DPO §3.2, eq. 12; Alg. 1 line 2",
        "srdpo.py",
        "ref_aug_chosen=float(ref[2 * n + i]),\n            ref_aug_rejected=float(ref[3 * n + i]),",
        "ref_aug_chosen=float(ref[3 * n + i]),\n            ref_aug_rejected=float(ref[2 * n + i]),",
        "tests/test_srdpo.py::test_reference_is_the_starting_model_on_both_contexts",
    ),
    Mutant(
        "sr_refine_prompt_text",
        "Sr-DPO",
        "the refinement prompt p is the paper's text verbatim",
        "Sr-DPO §3.2.2",
        "srdpo.py",
        '"Note that the response should be harmless. ',
        '"Note that the response should be helpful. ',
        "tests/test_srdpo.py::test_refinement_prompt_and_augmented_query",
    ),
    Mutant(
        "sr_refine_separator",
        "Sr-DPO",
        "p (+) x is p, one space, then the query, in the last user turn",
        "Sr-DPO §3.2 (p (+) x); separator ours (ALGORITHMS.md §5.1)",
        "srdpo.py",
        "f\"{refine_prompt} {last['content']}\"",
        "f\"{refine_prompt}\\n{last['content']}\"",
        "tests/test_srdpo.py::test_refinement_prompt_and_augmented_query",
    ),
    Mutant(
        "sr_refine_not_in_ids",
        "Sr-DPO",
        "each pair's augmented token ids are those of the conversation with p prepended",
        "Sr-DPO §3.2, eq. 12",
        "srdpo.py",
        'augment(pair["prompt"], args.refine_prompt)',
        'pair["prompt"]',
        "tests/test_srdpo.py::test_refinement_prompt_and_augmented_query",
    ),
    # (end of the Sr-DPO rows)
    # ---- SeRA (sera.py) ----
    # (end of the SeRA rows)
    # ---- OPSR (opsr.py) ----
    # (end of the OPSR rows)
    # ---- OSP (osp.py) ----
    # (end of the OSP rows)
    # ---- shared losses and kernels (selfpo_kernels) ----
    # (end of the losses and kernels rows)
    # ---- runtime (the same in all four scripts: sera.py holds the originals) ----
    # (end of the runtime rows)
]


def table() -> str:
    rows = ["| method | rule | source | test | mutant |", "|---|---|---|---|---|"]
    for m in MUTANTS:
        tests = " ".join(f"`{t}`" for t in shlex.split(m.tests) if t.startswith("tests/"))
        rows.append(f"| {m.method} | {m.rule} | {m.source} | {tests} | `{m.name}` |")
    return "\n".join(rows) + "\n"


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches and venvs
        skip = {".git", "runs", "__pycache__", ".pytest_cache"}
        return [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not any(part in skip or part.startswith(".venv") for part in p.relative_to(ROOT).parts)
        ]


def copy_project(dest: Path):
    for name in tracked_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def run_tests(copy: Path, tests: str, timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *shlex.split(tests)]
    start = time.time()
    try:
        res = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return res.returncode, res.stdout[-2000:] + res.stderr[-2000:], time.time() - start
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s", time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these mutants (by name)")
    parser.add_argument("--table", action="store_true", help="print the rule table and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant's tests")
    opts = parser.parse_args(argv)
    if opts.table:
        print(table(), end="")
        return 0
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("tests/mutants.py: two mutants share a name")
    chosen = [m for m in MUTANTS if not opts.only or m.name in opts.only]
    if opts.only and len(chosen) != len(opts.only):
        sys.exit(f"tests/mutants.py: unknown mutant(s): {sorted(set(opts.only) - set(names))}")
    for m in chosen:  # a row whose code moved away must be rewritten, not skipped
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            sys.exit(f"tests/mutants.py: {m.name}: its `old` text stands {count} times in {m.file}, expected once")
    tmp = Path(tempfile.mkdtemp(prefix="selfpo-mutants-"))
    copy_project(tmp)
    survivors, errors, start = [], [], time.time()
    try:
        # the selections pass on the project as it is: a mutant is killed by its bug, not by a broken test
        selections = list(dict.fromkeys(m.tests for m in chosen))
        for tests in selections:
            rc, tail, seconds = run_tests(tmp, tests, opts.timeout)
            if rc != 0:
                print(f"baseline: `pytest {tests}` fails on the unmutated project (exit {rc}):\n{tail}")
                return 1
        print(f"baseline: {len(selections)} test selections pass ({time.time() - start:.0f} s)")
        for i, m in enumerate(chosen, 1):
            path = tmp / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, tail, seconds = run_tests(tmp, m.tests, opts.timeout)
            finally:
                path.write_text(original)
            verdict = {0: "SURVIVED", 1: "killed"}.get(rc, f"error (pytest exit {rc})")
            print(f"[{i}/{len(chosen)}] {m.name}: {verdict} ({seconds:.0f} s)", flush=True)
            if rc == 0:
                survivors.append(m.name)
            elif rc != 1:
                errors.append(m.name)
                print(tail)
    finally:
        if opts.keep:
            print(f"copy kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{len(chosen) - len(survivors) - len(errors)} killed, {len(survivors)} survived, {len(errors)} errors "
        f"in {time.time() - start:.0f} s"
    )
    if survivors or errors:
        print(f"survived: {', '.join(survivors) or '-'}; errors: {', '.join(errors) or '-'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
