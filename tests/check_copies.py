"""Checked copies between the four scripts (the idea of transformers' `utils/check_copies.py`).

Each script stands alone, so the code they share is copied into each of them. A copy is a
top-level function, class, constant (`NAME = ...`) or `if __name__ == "__main__":` block directly under a marker

    # Copied from sera.load_rows
    # Copied from sera.__main__ with sera->osp          (renames: plain text, applied in order)

and must equal its original in sera.py (or the module the marker names) after the renames. The options
all four scripts share close each script's Args: from the line ARGS_TAIL to the end of the class, they must
equal sera.Args's. A top-level definition that stands, to the letter and under the same name, in two
scripts without a marker is an error too: every repeat between the scripts is a checked copy.

    python tests/check_copies.py          # report drift (exit 1) and each script's line figures
    python tests/check_copies.py --fix    # rewrite every drifted copy from its original
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
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)(?: with (.+))?\s*$")
ARGS_TAIL = "    # Options all four scripts share (checked copies of sera.Args's; tests/check_copies.py)\n"


@dataclass
class Block:
    name: str
    start: int  # 0-based index of the first line (decorators included)
    end: int  # exclusive


def blocks(lines: list[str]) -> dict[str, Block]:
    """Top-level definitions by name; `if __name__ == "__main__":` is called __main__."""
    out = {}
    for node in ast.parse("".join(lines)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            name = "__main__"
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        out[name] = Block(name, start, node.end_lineno)
    return out


def renamed(text: str, renames: str | None) -> str:
    for rule in (renames or "").split(","):
        if rule.strip():
            old, new = (part.strip() for part in rule.split("->"))
            text = text.replace(old, new)
    return text


@dataclass
class Copy:
    script: str
    marker: int  # 0-based line of the marker
    block: Block
    home: str
    name: str
    expected: str
    actual: str
    original: tuple[int, int]  # the original's lines in its home script


def find_copies(root: Path, scripts=SCRIPTS) -> tuple[list[Copy], dict[str, list[str]], list[str]]:
    sources = {s: (root / f"{s}.py").read_text().splitlines(keepends=True) for s in scripts}
    defs = {s: blocks(lines) for s, lines in sources.items()}
    copies, errors = [], []
    for script, lines in sources.items():
        by_start = {b.start: b for b in defs[script].values()}
        for i, line in enumerate(lines):
            match = MARKER.match(line)
            if not match:
                continue
            home, name, renames = match.groups()
            where = f"{script}.py:{i + 1}"
            block = by_start.get(i + 1)
            if block is None or block.name != name:
                errors.append(f"{where}: '# Copied from {home}.{name}' is not directly above a top-level {name}")
                continue
            if home not in defs:
                errors.append(f"{where}: unknown module {home!r} (one of {', '.join(scripts)})")
                continue
            original = defs[home].get(name)
            if original is None:
                errors.append(f"{where}: {home}.py has no top-level {name}")
                continue
            expected = renamed("".join(sources[home][original.start : original.end]), renames)
            actual = "".join(lines[block.start : block.end])
            copies.append(Copy(script, i, block, home, name, expected, actual, (original.start, original.end)))
    tails = {}  # script -> (first line, end) of the shared options in its Args
    for script, lines in sources.items():
        args = defs[script].get("Args")
        anchor = next((i for i in range(args.start, args.end) if lines[i] == ARGS_TAIL), None) if args else None
        if anchor is not None:
            tails[script] = (anchor, args.end)
    if "sera" in tails:
        home = sources["sera"][slice(*tails["sera"])]
        for script in scripts:
            if script == "sera":
                continue
            if script not in tails:
                errors.append(
                    f"{script}.py: Args has no line {ARGS_TAIL.strip()!r} "
                    "(the options all four scripts share, copied from sera.Args)"
                )
                continue
            start, end = tails[script]
            copies.append(
                Copy(
                    script,
                    start,
                    Block("Args", start, end),
                    "sera",
                    "Args's shared options",
                    "".join(home),
                    "".join(sources[script][start:end]),
                    tails["sera"],
                )
            )
    marked = {(c.script, c.name) for c in copies}  # one-line constants (HERE, TOY) are not worth a marker
    for i, a in enumerate(scripts):
        for b in scripts[i + 1 :]:
            for name in defs[a].keys() & defs[b].keys():
                text = ["".join(sources[s][defs[s][name].start : defs[s][name].end]) for s in (a, b)]
                if text[0] == text[1] and text[0].count("\n") > 1 and not marked & {(a, name), (b, name)}:
                    copy = b if a == "sera" else a
                    errors.append(
                        f"{copy}.py:{defs[copy][name].start + 1}: {name} is the same as in "
                        f"{b if copy == a else a}.py but has no '# Copied from' marker"
                    )
                    marked.add((copy, name))
    return copies, sources, errors


def line_figures(copies: list[Copy], sources: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """(total lines, method-specific lines): method-specific = total minus the lines of marked copies
    (marker, body and the blank lines after it) and of the originals those copies are taken from."""
    shared = {s: set() for s in sources}

    def add(script, start, end):
        lines = sources[script]
        while end < len(lines) and not lines[end].strip():
            end += 1
        shared[script].update(range(start, end))

    for c in copies:
        add(c.script, c.marker, c.block.end)
        add(c.home, *c.original)
    return {s: (len(lines), len(lines) - len(shared[s])) for s, lines in sources.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their originals")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parents[1], help="folder with the scripts"
    )
    args = parser.parse_args(argv)
    copies, sources, errors = find_copies(args.root)
    drifted = [c for c in copies if c.actual != c.expected]
    if args.fix and drifted:
        for script in {c.script for c in drifted}:
            lines = sources[script]
            for c in sorted((c for c in drifted if c.script == script), key=lambda c: -c.block.start):
                lines[c.block.start : c.block.end] = c.expected.splitlines(keepends=True)
            (args.root / f"{script}.py").write_text("".join(lines))
            print(f"{script}.py: rewrote {', '.join(c.name for c in drifted if c.script == script)}")
        copies, sources, errors = find_copies(args.root)
        drifted = [c for c in copies if c.actual != c.expected]
    for c in drifted:
        diff = difflib.unified_diff(
            c.expected.splitlines(keepends=True),
            c.actual.splitlines(keepends=True),
            f"{c.home}.{c.name}",
            f"{c.script}.py:{c.block.start + 1}",
        )
        errors.append(
            f"{c.script}.py:{c.marker + 1}: {c.name} differs from {c.home}.{c.name} "
            f"(run python tests/check_copies.py --fix)\n" + "".join(diff)
        )
    print(f"{len(copies)} checked copies")
    for script, (total, own) in line_figures(copies, sources).items():
        print(f"{script}.py: {total} lines, {own} method-specific, {total - own} copied")
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
