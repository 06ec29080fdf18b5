"""`python -m selfpo_kernels.compile_check` on a fast subset: the Triton kernels compile ahead of time for
sm_90 and sm_80 (no GPU needed; Triton's wheel ships ptxas) with the engine's exact arguments (fp16 and fp32, soft-cap
off and on, a long-context shape; tests/test_kernels_pair.py compiles bf16 and fp32 at two vocabulary sizes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from selfpo_kernels.compile_check import check_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _compiler_missing() -> str:
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path, knobs.nvidia.ptxas_blackwell.path  # noqa: B018 - resolves the bundled binaries
    except Exception as err:  # triton absent (non-Linux) or shipped without its CUDA tools
        return f"triton with its bundled ptxas is not available: {err!r}"
    return ""


@pytest.fixture(scope="module")
def table():
    reason = _compiler_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the interpreter
    cmd = [
        sys.executable,
        "-m",
        "selfpo_kernels.compile_check",
        "--archs",
        "90",
        "80",
        "--dtypes",
        "fp16",
        "fp32",
        "--softcaps",
        "False",
        "True",
        "--shapes",
        "nh>2^31",
        "--no-estimate",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    header, rows = None, []
    for line in res.stdout.splitlines():
        if line.startswith("| kernel"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and header and line.count("|") == len(header) + 1:
            rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return res, rows


def test_compile_check_passes(table):
    res, rows = table
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(rows) == 2 * 2 * 2 * 2, res.stdout  # archs x kinds x dtypes x soft-cap
    for row in rows:
        assert row["status"] == "ok" and row["spill"] == "0", row
        assert row["i32_offs"] == "0", row  # int64 offset*stride everywhere


def test_check_rejects_bad_rows():
    """The gate fails a spill, int32 offsets, a compile failure."""
    good = dict(arch=90, dtype="bf16", spill=0, i32_offs=0)
    assert check_row(good) == ""
    assert "spill" in check_row(dict(good, spill=8))
    assert "int32" in check_row(dict(good, i32_offs=2))
    assert check_row(dict(good, error="boom")) == "compile failed"
