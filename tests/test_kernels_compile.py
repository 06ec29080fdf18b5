"""`python -m selfpo_kernels.compile_check` on a fast subset: the Triton kernels compile ahead of time for
sm_90 and sm_80 (no GPU needed; Triton's wheel ships ptxas) with the launcher's exact arguments."""

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
        "bf16",
        "fp32",
        "--kinds",
        "fwd_ref",
        "bwd",
        "--softcaps",
        "True",
        "--shapes",
        "bias-fold",
        "unpadded-4097",
        "vh>2^31",
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
    assert len(rows) == 2 * 2 * 2 * 3, res.stdout  # archs x dtypes x kinds x shapes
    for row in rows:
        assert row["status"] == "ok", row
        if row["default"] == "1":
            assert row["spill"] == "0", row
        assert row["i32_offs"] == "0", row  # int64 offset*stride everywhere
        if row["dtype"] == "bf16":
            assert ("wgmma" if row["arch"] == "90" else "mma.m16n8k16") in row["mma"], row


def test_bias_fold_keeps_rows_aligned(table):
    """The folded bias column is padded to a multiple of 64: the kernels keep their 16-byte copies,
    which H=4097 (the unpadded fold) loses."""
    _, rows = table
    by_key = {(r["kernel"], r["arch"], r["dtype"], r["shape"]): r for r in rows}
    for kernel in ("fwd_ref", "bwd"):
        for arch in ("90", "80"):
            padded = by_key[(kernel, arch, "bf16", "bias-fold")]
            unpadded = by_key[(kernel, arch, "bf16", "unpadded-4097")]
            assert int(padded["cp16"]) > int(unpadded["cp16"]), (padded, unpadded)


def test_check_rejects_bad_rows():
    """The gate fails a spill at a default tile, a 16-bit sm_90 kernel without wgmma, int32 offsets."""
    good = dict(arch=90, dtype="bf16", spill=0, mma="wgmma.m64n128k16", i32_offs=0)
    assert check_row(good, default=True) == ""
    assert "spill" in check_row(dict(good, spill=8), default=True)
    assert check_row(dict(good, spill=8), default=False) == ""
    assert "wgmma" in check_row(dict(good, mma="mma.m16n8k16"), default=True)
    assert check_row(dict(good, dtype="fp32", mma="FMA"), default=True) == ""
    assert "int32" in check_row(dict(good, i32_offs=2), default=True)
    assert check_row(dict(good, error="boom"), default=True) == "compile failed"
