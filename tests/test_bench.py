"""selfpo_kernels.bench: runs end to end on CPU, and never times a wrong implementation."""

import csv

import pytest
import torch

from selfpo_kernels import bench

TINY = bench.Shape(64, 16, 128, 2)


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "test-tiny", TINY)
    return "test-tiny"


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_cpu_writes_checked_rows(tmp_path, tiny_shape):
    out = tmp_path / "bench.csv"
    bench.main(
        bench.Args(
            shapes=(tiny_shape,),
            impls=("torch", "naive"),
            modes=("fwd_bwd_ref",),
            repeats=3,
            warmup=0,
            device="cpu",
            out=str(out),
        ),
        ["--test"],
    )
    header, rows = read_rows(out)
    assert header == bench.COLUMNS
    assert {(r["impl"], r["mode"]) for r in rows} == {("torch", "fwd_bwd_ref"), ("naive", "fwd_bwd_ref")}
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["N"], row["H"], row["V"], row["dtype"], row["device"]) == (
            "64",
            "16",
            "128",
            "fp32",
            bench.device_name("cpu"),
        )
        assert row["command"] == "python -m selfpo_kernels.bench --test"
        assert float(row["p10_ms"]) <= float(row["median_ms"]) <= float(row["p90_ms"])
        assert row["repeats"] == "3"
        assert float(row["peak_extra_mb"]) >= 0 and "subprocess" in row["memory_method"]
        assert float(row["rel_err"]) < 1e-4
    naive_fwd = next(r for r in rows if r["impl"] == "naive")
    assert float(naive_fwd["time_vs_naive"]) == 1.0
    # a second run appends under the same header
    bench.main(
        bench.Args(
            shapes=(tiny_shape,), impls=("naive",), modes=("fwd",), repeats=1, memory=False, device="cpu", out=str(out)
        )
    )
    assert len(read_rows(out)[1]) == len(rows) + 1


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_wrong_impl_is_failed_and_not_timed(tmp_path, tiny_shape, monkeypatch, mode):
    calls = {"off_by_one": 0, "wrong_grad": 0}

    def off_by_one(hidden, weight, labels, ref_hidden=None, ref_weight=None):
        calls["off_by_one"] += 1
        policy, ref = bench.IMPLS["torch"](hidden, weight, labels, ref_hidden, ref_weight)
        return policy + 1.0, ref

    def wrong_grad(hidden, weight, labels, ref_hidden=None, ref_weight=None):
        # right values, gradient w.r.t. hidden doubled
        calls["wrong_grad"] += 1
        policy, ref = bench.IMPLS["torch"](hidden, weight, labels, ref_hidden, ref_weight)
        doubled, _ = bench.IMPLS["torch"](hidden, weight.detach(), labels)
        return policy + doubled - doubled.detach(), ref

    monkeypatch.setitem(bench.IMPLS, "off_by_one", off_by_one)
    monkeypatch.setitem(bench.IMPLS, "wrong_grad", wrong_grad)
    rows = bench.main(
        bench.Args(
            shapes=(tiny_shape,),
            impls=("naive", "off_by_one", "wrong_grad"),
            modes=(mode,),
            repeats=5,
            warmup=2,
            memory=False,
            device="cpu",
            out=str(tmp_path / "b.csv"),
        )
    )
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["naive"]["status"] == "ok" and by_impl["naive"]["repeats"] == 5
    assert by_impl["off_by_one"]["status"].startswith("FAILED")
    assert by_impl["off_by_one"]["max_abs_err"] == pytest.approx(1.0, abs=1e-4)
    assert calls["off_by_one"] == 1  # the check run only: no warm-up, no timing
    assert by_impl["off_by_one"]["median_ms"] == ""
    if mode == "fwd":  # no gradient asked for: the wrong gradient is not seen, the values are right
        assert by_impl["wrong_grad"]["status"] == "ok"
    else:
        assert by_impl["wrong_grad"]["status"].startswith("FAILED")
        assert by_impl["wrong_grad"]["grad_rel_err"] > 0.1
        assert calls["wrong_grad"] == 1 and by_impl["wrong_grad"]["median_ms"] == ""
    _, written = read_rows(tmp_path / "b.csv")
    assert [(r["impl"], r["status"][:6], r["median_ms"]) for r in written if r["impl"] == "off_by_one"] == [
        ("off_by_one", "FAILED", "")
    ]


def test_oracle_matches_float64_naive():
    # the chunked fp32 oracle the bench checks against agrees with a one-shot float64 computation
    x = bench.make_inputs(TINY, torch.float32, "cpu", 0.25, seed=1)
    policy, ref, grad_hidden, grad_weight = bench.oracle(x, rows_per_chunk=5)
    hidden = x.hidden.detach().double().requires_grad_()
    weight = x.weight.detach().double().requires_grad_()
    scored = x.labels != bench.IGNORE
    logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, x.labels.clamp(min=0)[..., None])[..., 0]
    expected = (logps * scored).sum(1)
    (expected * x.upstream.double()).sum().backward()
    torch.testing.assert_close(policy.double(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_hidden.double(), hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), weight.grad, rtol=1e-4, atol=1e-6)
    ref_logps = torch.log_softmax(x.ref_hidden.double() @ x.ref_weight.double().T, -1)
    expected_ref = (ref_logps.gather(-1, x.labels.clamp(min=0)[..., None])[..., 0] * scored).sum(1)
    torch.testing.assert_close(ref.double(), expected_ref, rtol=1e-5, atol=1e-4)
