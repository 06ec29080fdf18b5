"""The code the four scripts share, checked (the idea of transformers' modular files and `utils/check_copies.py`).

Each script stands alone, so the code they share is in each of them:
- the runtime: everything from the line RUNTIME_FENCE to the end of the file, written in sera.py and pasted
  unchanged into the other three;
- the options all four share, closing each `Args` (from the line ARGS_TAIL to the end of the class);
- a few method-level copies, each a top-level definition directly under a marker naming its original:
      # Copied from sera.train_iteration
      # Copied from opsr.load_prompt_pool
A top-level definition that stands, to the letter and under the same name, in two scripts outside the runtime
without a marker is an error too: every repeat between the scripts is checked.

    python tests/check_copies.py          # report drift (exit 1) and each script's line figures
    python tests/check_copies.py --fix    # rewrite every copy (the runtime block included) from its original
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = ("sera", "srdpo", "opsr", "osp")
RUNTIME_FENCE = "# RUNTIME: written in sera.py, pasted unchanged into srdpo.py, opsr.py and osp.py"
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)\s*$")
ARGS_TAIL = "    # Options all four scripts share (checked copies of sera.Args's; tests/check_copies.py)\n"


@dataclass
class Copy:
    script: str
    name: str
    start: int  # 0-based first line of the copy in `script`
    end: int  # exclusive
    home: str
    expected: str

    def actual(self, sources) -> str:
        return "".join(sources[self.script][self.start : self.end])


def runtime_start(lines: list[str]) -> int | None:
    """The 0-based line where the runtime block starts: the rule line above the fence's first line."""
    fence = next((i for i, line in enumerate(lines) if line.startswith(RUNTIME_FENCE)), None)
    return None if fence is None else fence - 1


def definitions(lines: list[str], stop: int) -> dict[str, tuple[int, int]]:
    """Top-level functions, classes and constants (NAME = ...) above line `stop`: name -> (first line, end)."""
    out = {}
    for node in ast.parse("".join(lines)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        if node.end_lineno <= stop:
            out[name] = (start, node.end_lineno)
    return out


def find_copies(root: Path, scripts=SCRIPTS) -> tuple[list[Copy], dict[str, list[str]], dict[str, int], list[str]]:
    sources = {s: (root / f"{s}.py").read_text().splitlines(keepends=True) for s in scripts}
    errors, starts = [], {}
    for script, lines in sources.items():
        start = runtime_start(lines)
        if start is None:
            errors.append(f"{script}.py: no runtime block (a line starting {RUNTIME_FENCE!r})")
        starts[script] = len(lines) if start is None else start
    defs = {s: definitions(lines, starts[s]) for s, lines in sources.items()}
    copies = []
    if "sera" in starts and starts["sera"] < len(sources["sera"]):
        block = "".join(sources["sera"][starts["sera"] :])
        for script in scripts:
            if script != "sera" and starts[script] < len(sources[script]):
                copies.append(Copy(script, "the runtime block", starts[script], len(sources[script]), "sera", block))
    for script, lines in sources.items():
        by_start = {start: (name, end) for name, (start, end) in defs[script].items()}
        for i, line in enumerate(lines[: starts[script]]):
            match = MARKER.match(line)
            if not match:
                continue
            home, name = match.groups()
            where = f"{script}.py:{i + 1}"
            found = by_start.get(i + 1)
            if found is None or found[0] != name:
                errors.append(f"{where}: '# Copied from {home}.{name}' is not directly above a top-level {name}")
            elif home not in defs or name not in defs[home]:
                errors.append(f"{where}: {home}.py has no top-level {name} above its runtime block")
            else:
                original = "".join(sources[home][slice(*defs[home][name])])
                copies.append(Copy(script, name, i + 1, found[1], home, original))
    tails = {}  # script -> (first line, end) of the shared options in its Args
    for script, lines in sources.items():
        args = defs[script].get("Args")
        anchor = next((i for i in range(*args) if lines[i] == ARGS_TAIL), None) if args else None
        if anchor is None:
            errors.append(f"{script}.py: Args has no line {ARGS_TAIL.strip()!r} (the options all four scripts share)")
        else:
            tails[script] = (anchor, args[1])
    if "sera" in tails:
        for script in tails.keys() - {"sera"}:
            expected = "".join(sources["sera"][slice(*tails["sera"])])
            copies.append(Copy(script, "Args's shared options", *tails[script], "sera", expected))
    marked = {(c.script, c.name) for c in copies}
    for i, a in enumerate(scripts):
        for b in scripts[i + 1 :]:
            for name in defs[a].keys() & defs[b].keys():
                text = ["".join(sources[s][slice(*defs[s][name])]) for s in (a, b)]
                if text[0] == text[1] and text[0].count("\n") > 1 and not marked & {(a, name), (b, name)}:
                    copy = b if a == "sera" else a
                    errors.append(
                        f"{copy}.py:{defs[copy][name][0] + 1}: {name} is the same as in "
                        f"{b if copy == a else a}.py but has no '# Copied from' marker"
                    )
                    marked.add((copy, name))
    return copies, sources, starts, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their originals")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parents[1], help="folder with the scripts"
    )
    args = parser.parse_args(argv)
    copies, sources, starts, errors = find_copies(args.root)
    drifted = [c for c in copies if c.actual(sources) != c.expected]
    if args.fix and drifted:
        for script in {c.script for c in drifted}:
            lines = sources[script]
            for c in sorted((c for c in drifted if c.script == script), key=lambda c: -c.start):
                lines[c.start : c.end] = c.expected.splitlines(keepends=True)
            (args.root / f"{script}.py").write_text("".join(lines))
            print(f"{script}.py: rewrote {', '.join(c.name for c in drifted if c.script == script)}")
        copies, sources, starts, errors = find_copies(args.root)
        drifted = [c for c in copies if c.actual(sources) != c.expected]
    for c in drifted:
        diff = difflib.unified_diff(
            c.expected.splitlines(keepends=True),
            c.actual(sources).splitlines(keepends=True),
            f"{c.home}.py",
            f"{c.script}.py:{c.start + 1}",
        )
        errors.append(
            f"{c.script}.py:{c.start + 1}: {c.name} differs from {c.home}.py's "
            f"(run python tests/check_copies.py --fix)\n" + "".join(diff)
        )
    print(f"{len(copies)} checked copies")
    for script, lines in sources.items():
        main_lines = definitions(lines, starts[script]).get("main", (0, 0))
        print(
            f"{script}.py: {len(lines)} lines, {starts[script]} before the runtime block "
            f"(main() {main_lines[1] - main_lines[0]}), {len(lines) - starts[script]} in it"
        )
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
