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
    Mutant(
        "runtime_umask_expression",
        "runtime",
        "checkpoint files get 0o666 less the process umask (0o600 under umask 077, 0o644 under 022)",
        "README",
        "sera.py",
        "        mode = 0o666 & ~process_umask()\n",
        "        mode = 0o666 & ~os.umask(os.umask(0))\n",
        "tests/test_scale.py::test_checkpoint_files_get_the_umask_mode",
    ),
    Mutant(
        "runtime_resume_generators_not_restored",
        "runtime",
        "resuming from a step checkpoint restores each rank's random number generators",
        "README",
        "sera.py",
        '            set_rng_state(state["rng"])\n',
        "            pass\n",
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_masters_saved_in_bf16",
        "runtime",
        "a step checkpoint holds the fp32 master weights as they train, not a copy in a 16-bit dtype",
        "README",
        "sera.py",
        'dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder / "model"))',
        'dcp.save({"model": {k: v.bfloat16() for k, v in get_model_state_dict(model).items()}}, '
        'checkpoint_id=str(folder / "model"))',
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_resume_weights_not_restored",
        "runtime",
        "resuming from a step checkpoint restores the weights it holds",
        "README",
        "sera.py",
        '        dcp.load(weights, checkpoint_id=state["model"])\n',
        "",
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_resume_optimizer_not_restored",
        "runtime",
        "resuming from a step checkpoint restores the optimizer state (AdamW's moments and step)",
        "README",
        "sera.py",
        '        dcp.load(saved, checkpoint_id=state["optimizer"])\n',
        "",
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_resume_scheduler_not_restored",
        "runtime",
        "resuming from a step checkpoint restores the scheduler's step (the learning rate goes on where it was)",
        "README",
        "sera.py",
        '        scheduler.load_state_dict(state["scheduler"])\n',
        "",
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_checkpoint_not_atomic",
        "runtime",
        "a checkpoint folder is replaced in one rename: a save that fails half-way leaves the previous one whole",
        "README",
        "sera.py",
        "        shutil.rmtree(tmp, ignore_errors=True)\n        tmp.mkdir(parents=True)\n",
        "        shutil.rmtree(directory, ignore_errors=True)\n"
        "        shutil.rmtree(tmp, ignore_errors=True)\n        tmp.mkdir(parents=True)\n",
        "tests/test_scale.py::test_step_checkpoint_is_replaced_whole_or_not_at_all",
    ),
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
