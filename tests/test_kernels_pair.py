"""pair_loss_from_hidden (torch and Triton paths) against a float64 oracle: naive logits -> log_softmax ->
gather -> masked sums -> the pair loss, with autograd. The Triton path runs in Triton's interpreter on CPU
(TRITON_INTERPRET=1, set in conftest.py), fp32 only there (the interpreter's bf16 is not trusted).

Tolerance rule (as in Cut Cross-Entropy's tests): the error against float64 is at most twice that of naive
torch at the same dtype, plus a small floor.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import selfpo_kernels.pair as pair_mod
from selfpo_kernels import daa_loss_fn, pair_loss, pair_loss_from_hidden
from selfpo_kernels.torch_ref import transform_logits

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch"] + (["triton"] if pair_mod.HAVE_TRITON and (CUDA or INTERPRET) else [])
ROOT = Path(__file__).resolve().parents[1]
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


# Losses written here, straight from their papers, as loss_fn (the chunked op calls them on slices of pairs).
def spce_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, soft_label, beta=0.5, **_):
    """Soft-label preference cross-entropy: -[q log sigma(z) + (1-q) log sigma(-z)], z = beta * margin."""
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(soft_label * F.logsigmoid(z) + (1 - soft_label) * F.logsigmoid(-z))


def offset_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, offset, beta=0.5, **_):
    """DPO with a constant (stop-gradient) margin offset, as Sr-DPO's -log sigma(beta h - offset)."""
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(z - offset)


LOSSES = {
    "dpo": daa_loss_fn("dpo", beta=0.5),
    "ipo": daa_loss_fn("ipo", beta=0.5),
    "hinge": daa_loss_fn("hinge", beta=0.5),
    "simpo": daa_loss_fn("simpo", beta=2.0, gamma=0.3),
    "cdpo-avg": daa_loss_fn("dpo", beta=0.5, label_smoothing=0.2, length_norm=True),
    "spce-test": spce_loss,
    "offset-test": offset_dpo_loss,
}


def make_case(
    pairs=4,
    length=9,
    hidden=24,
    vocab=53,
    dtype=torch.float32,
    seed=0,
    ignore_frac=0.2,
    bias=False,
    ref="hidden",
    empty_last=True,
):
    """Pairs of unequal lengths (right padding), a prompt of ignored labels, scattered ignored tokens, one
    all-ignored rejected sequence (not for length-normalised losses: 0/0), and a reference from another weight."""
    gen = torch.Generator().manual_seed(seed)
    seqs = 2 * pairs
    labels = torch.randint(0, vocab, (seqs, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (seqs,), generator=gen)
    labels[torch.arange(length)[None, :] >= lengths[:, None]] = -100
    labels[:, :2] = -100
    labels[torch.rand(seqs, length, generator=gen) < ignore_frac] = -100
    if empty_last:
        labels[-1] = -100
    else:  # every sequence scores at least one token
        labels[:, 2] = torch.randint(0, vocab, (seqs,), generator=gen)
    case = dict(
        hidden=torch.randn(seqs, length, hidden, generator=gen),
        weight=torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5,
        labels=labels,
        bias=torch.randn(vocab, generator=gen) if bias else None,
    )
    if ref == "hidden":
        case.update(
            ref_hidden=torch.randn(seqs, length, hidden, generator=gen),
            ref_weight=torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5,
            ref_bias=torch.randn(vocab, generator=gen) if bias else None,
        )
    elif ref == "logps":
        case["ref_logps"] = -10 * torch.rand(seqs, generator=gen)
    case["extras"] = dict(soft_label=torch.rand(pairs, generator=gen), offset=torch.rand(pairs, generator=gen))
    for key in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"):
        if case.get(key) is not None:
            case[key] = case[key].to(DEVICE, dtype)
    case["labels"] = case["labels"].to(DEVICE)
    case["extras"] = {k: v.to(DEVICE) for k, v in case["extras"].items()}
    if "ref_logps" in case:
        case["ref_logps"] = case["ref_logps"].to(DEVICE)
    return case


def _extras_for(loss_name, extras):
    if loss_name == "spce-test":
        return {"soft_label": extras["soft_label"]}
    if loss_name == "offset-test":
        return {"offset": extras["offset"]}
    return {}


def naive(
    case, loss_fn, extras, dtype, trainable=("hidden", "weight", "bias"), temperature=1.0, softcap=None, upstream=1.0
):
    """(losses, policy seq logps, grads by name) of the naive computation at `dtype` (float64: the oracle)."""
    leaves = {
        k: case[k].detach().to(dtype).requires_grad_(k in trainable)
        for k in ("hidden", "weight", "bias")
        if case.get(k) is not None
    }
    labels = case["labels"]
    mask = labels != -100

    def seq_logps(h, w, b):
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        logits = transform_logits(logits, temperature, softcap)
        logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (logp * mask).sum(dim=1)

    policy = seq_logps(leaves["hidden"], leaves["weight"], leaves.get("bias"))
    ref = None
    if case.get("ref_hidden") is not None:
        with torch.no_grad():
            ref = seq_logps(
                *(
                    case[k].to(dtype) if case.get(k) is not None else None
                    for k in ("ref_hidden", "ref_weight", "ref_bias")
                )
            )
    elif case.get("ref_logps") is not None:
        ref = case["ref_logps"].to(dtype)
    n = policy.shape[0] // 2
    tokens = mask.sum(dim=1).to(dtype)
    out = loss_fn(
        policy_chosen=policy[:n],
        policy_rejected=policy[n:],
        ref_chosen=None if ref is None else ref[:n],
        ref_rejected=None if ref is None else ref[n:],
        chosen_tokens=tokens[:n],
        rejected_tokens=tokens[n:],
        **extras,
    )
    losses = out if isinstance(out, torch.Tensor) else out[0]
    wanted = [leaves[k] for k in leaves if leaves[k].requires_grad]
    grads = torch.autograd.grad(losses.sum() * upstream, wanted) if wanted else ()
    return losses.detach(), policy.detach(), dict(zip([k for k in leaves if leaves[k].requires_grad], grads))


def ours(case, loss_fn, extras, impl, trainable=("hidden", "weight", "bias"), upstream=1.0, **kwargs):
    leaves = {
        k: case[k].detach().clone().requires_grad_(k in trainable)
        for k in ("hidden", "weight", "bias")
        if case.get(k) is not None
    }
    losses, metrics = pair_loss_from_hidden(
        leaves["hidden"],
        leaves["weight"],
        case["labels"],
        loss_fn,
        bias=leaves.get("bias"),
        ref_hidden=case.get("ref_hidden"),
        ref_weight=case.get("ref_weight"),
        ref_bias=case.get("ref_bias"),
        ref_logps=case.get("ref_logps"),
        extras=extras,
        impl=impl,
        **kwargs,
    )
    wanted = [k for k in leaves if leaves[k].requires_grad]
    grads = torch.autograd.grad(losses.sum() * upstream, [leaves[k] for k in wanted]) if wanted else ()
    return losses.detach(), metrics, dict(zip(wanted, grads))


def assert_close_by_rule(got, budget, oracle, dtype, what):
    err = (got.double() - oracle).abs().max().item()
    allowed = 2 * (budget.double() - oracle).abs().max().item() + FLOOR[dtype] * max(1.0, oracle.abs().max().item())
    assert err <= allowed, f"{what}: error {err:.3g} vs float64, allowed {allowed:.3g}"


def check_against_oracle(
    case, loss_name, impl, dtype=torch.float32, trainable=("hidden", "weight", "bias"), upstream=1.0, **kwargs
):
    loss_fn, extras = LOSSES[loss_name], _extras_for(loss_name, case["extras"])
    transform = {k: kwargs[k] for k in ("temperature", "softcap") if k in kwargs}
    oracle = naive(case, loss_fn, extras, torch.float64, trainable, upstream=upstream, **transform)
    budget = naive(case, loss_fn, extras, dtype, trainable, upstream=upstream, **transform)
    losses, metrics, grads = ours(case, loss_fn, extras, impl, trainable, upstream=upstream, **kwargs)
    assert losses.shape == oracle[0].shape and losses.dtype == torch.float32
    assert_close_by_rule(losses, budget[0], oracle[0], dtype, "losses")
    n = losses.shape[0]
    assert_close_by_rule(metrics["logps/chosen"], budget[1][:n], oracle[1][:n], dtype, "logps/chosen")
    assert_close_by_rule(metrics["logps/rejected"], budget[1][n:], oracle[1][n:], dtype, "logps/rejected")
    assert sorted(grads) == sorted(oracle[2]), (sorted(grads), sorted(oracle[2]))
    for name, grad in grads.items():
        assert grad.dtype == case[name].dtype and grad.shape == case[name].shape
        assert_close_by_rule(grad, budget[2][name], oracle[2][name], dtype, f"grad {name}")
    return losses, metrics, grads


# Workspace sizes in rows at V=53 fp32: None = everything in one chunk; 12 rows = a few pairs per chunk (chunk
# boundaries between pairs); 5 rows = less than a pair (boundaries inside pairs: those pairs are recomputed).
WORKSPACES = {"one-chunk": None, "between-pairs": 12, "inside-pairs": 5}


def _workspace(rows, vocab=53, dtype=torch.float32, impl="torch"):
    if rows is None:
        return None
    itemsize = 4 if impl == "torch" else dtype.itemsize
    return rows * vocab * itemsize


@pytest.mark.smoke  # also in the newest-releases environment (.ci/run)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("workspace", list(WORKSPACES))
def test_losses_and_grads_match_oracle(impl, loss_name, workspace):
    case = make_case(
        seed=list(LOSSES).index(loss_name),
        ref="none" if loss_name == "simpo" else "hidden",
        empty_last=loss_name not in ("simpo", "cdpo-avg"),
    )
    check_against_oracle(case, loss_name, impl, workspace_bytes=_workspace(WORKSPACES[workspace]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature,softcap", [(0.7, None), (1.0, 4.0), (1.3, 2.5)])
@pytest.mark.parametrize("workspace", ["between-pairs", "inside-pairs"])
def test_bias_softcap_temperature(impl, temperature, softcap, workspace):
    case = make_case(bias=True, seed=3)
    _, _, grads = check_against_oracle(
        case, "dpo", impl, temperature=temperature, softcap=softcap, workspace_bytes=_workspace(WORKSPACES[workspace])
    )
    assert set(grads) == {"hidden", "weight", "bias"}


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head(impl):
    """requires_grad=False on the head (LoRA): no dW, dH still exact; and hidden alone frozen: dW only."""
    case = make_case(bias=True, seed=5)
    _, _, grads = check_against_oracle(case, "dpo", impl, trainable=("hidden",), workspace_bytes=_workspace(12))
    assert set(grads) == {"hidden"}
    _, _, grads = check_against_oracle(case, "dpo", impl, trainable=("weight", "bias"), workspace_bytes=_workspace(12))
    assert set(grads) == {"weight", "bias"}


def test_frozen_head_skips_the_weight_gemm(monkeypatch):
    """Under a frozen head the op runs two GEMMs per chunk (logits, dH) plus the reference's: no dW product."""
    case = make_case(seed=6)
    calls = []
    real = pair_mod._add_matmul_
    monkeypatch.setattr(pair_mod, "_add_matmul_", lambda *a: calls.append(1) or real(*a))
    ours(case, LOSSES["dpo"], {}, "torch", trainable=("hidden",), workspace_bytes=_workspace(12))
    assert calls == []
    ours(case, LOSSES["dpo"], {}, "torch", workspace_bytes=_workspace(12))
    assert calls


def test_logits_computed_once_per_chunk(monkeypatch):
    """Chunks of whole pairs: one policy GEMM and one reference GEMM per chunk (no recompute), except for a pair
    larger than the workspace (its sub-chunks are recomputed once)."""
    case = make_case(pairs=4, seed=7)
    tokens = (case["labels"] != -100).sum(dim=1)
    pair_tokens = (tokens[:4] + tokens[4:]).tolist()
    calls = []
    real = pair_mod._logits_into
    monkeypatch.setattr(pair_mod, "_logits_into", lambda out, h, w: calls.append(h.shape[0]) or real(out, h, w))
    budget = max(pair_tokens)  # every pair fits
    ours(case, LOSSES["dpo"], {}, "torch", workspace_bytes=_workspace(budget))
    groups = pair_mod._plan_chunks(pair_tokens, budget)
    assert len(calls) == 2 * len(groups) and sum(calls) == 2 * sum(pair_tokens)
    calls.clear()
    ours(case, LOSSES["dpo"], {}, "torch", workspace_bytes=_workspace(1))  # one row: every pair split
    assert sum(calls) == 3 * sum(pair_tokens)  # reference, policy forward, policy recompute


def test_plan_chunks_holds_whole_pairs():
    assert pair_mod._plan_chunks([3, 4, 2, 5, 9, 1], 7) == [(0, 2, 0, 7), (2, 4, 7, 14), (4, 5, 14, 23), (5, 6, 23, 24)]
    assert pair_mod._plan_chunks([0, 0], 4) == [(0, 2, 0, 0)]


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_precomputed_and_absent(impl):
    """ref_logps given as numbers (a frozen reference scored beforehand) and no reference at all (SimPO)."""
    case = make_case(seed=8, ref="logps")
    check_against_oracle(case, "dpo", impl, workspace_bytes=_workspace(12))
    case = make_case(seed=9, ref="none", empty_last=False)
    _, metrics, _ = check_against_oracle(case, "simpo", impl, workspace_bytes=_workspace(5))
    assert "ref_logps/chosen" not in metrics


@pytest.mark.parametrize("impl", IMPLS)
def test_metrics(impl):
    """The metrics the training scripts log, against the oracle's sequence log-probs."""
    case = make_case(seed=10)
    loss_fn = LOSSES["dpo"]
    oracle_losses, oracle_policy, _ = naive(case, loss_fn, {}, torch.float64)
    _, metrics, _ = ours(case, loss_fn, {}, impl, workspace_bytes=_workspace(12))
    n = oracle_losses.shape[0]
    mask = case["labels"] != -100
    logp = torch.log_softmax(case["ref_hidden"].double() @ case["ref_weight"].double().T, dim=-1)
    ref = (logp.gather(-1, case["labels"].clamp(min=0)[..., None])[..., 0] * mask).sum(dim=1)
    tokens = mask.sum(1).float()
    expected = {
        "loss": oracle_losses,
        "logps/chosen": oracle_policy[:n],
        "logps/rejected": oracle_policy[n:],
        "ref_logps/chosen": ref[:n],
        "ref_logps/rejected": ref[n:],
        "tokens/chosen": tokens[:n],
        "tokens/rejected": tokens[n:],
        "rewards/chosen": 0.5 * (oracle_policy[:n] - ref[:n]),
        "rewards/rejected": 0.5 * (oracle_policy[n:] - ref[n:]),
    }
    expected["rewards/margins"] = expected["rewards/chosen"] - expected["rewards/rejected"]
    expected["rewards/accuracies"] = (expected["rewards/margins"] > 0).float()
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].shape == (n,), key
        torch.testing.assert_close(metrics[key].double(), value.double(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_upstream_scaling(impl):
    """The eager gradients are scaled by the upstream gradient (losses.mean(), a loss scale)."""
    case = make_case(seed=11)
    check_against_oracle(case, "ipo", impl, upstream=0.125, workspace_bytes=_workspace(12))


def test_non_uniform_upstream_raises():
    case = make_case(seed=12)
    hidden = case["hidden"].clone().requires_grad_()
    losses, _ = pair_loss_from_hidden(
        hidden,
        case["weight"],
        case["labels"],
        LOSSES["dpo"],
        ref_hidden=case["ref_hidden"],
        ref_weight=case["ref_weight"],
        impl="torch",
    )
    with pytest.raises(RuntimeError, match="same for every pair"):
        (losses * torch.arange(losses.shape[0], dtype=torch.float32)).sum().backward()


def test_backward_twice_raises():
    case = make_case(seed=12)
    hidden = case["hidden"].clone().requires_grad_()
    losses, _ = pair_loss_from_hidden(
        hidden,
        case["weight"],
        case["labels"],
        LOSSES["dpo"],
        ref_hidden=case["ref_hidden"],
        ref_weight=case["ref_weight"],
        impl="torch",
    )
    losses.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        losses.sum().backward()


def test_loss_fn_mixing_pairs_is_caught():
    """A loss_fn that normalises by a batch statistic gives other losses per chunk: the op refuses it."""
    case = make_case(seed=13)

    def batch_normalised(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **_):
        margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        return F.softplus(-(margin - margin.mean()))

    with pytest.raises(ValueError, match="that pair's inputs only"):
        ours(case, batch_normalised, {}, "torch", workspace_bytes=_workspace(12))


def test_no_grad_forward_matches():
    case = make_case(seed=14)
    with torch.no_grad():
        losses, _ = pair_loss_from_hidden(
            case["hidden"],
            case["weight"],
            case["labels"],
            LOSSES["dpo"],
            ref_hidden=case["ref_hidden"],
            ref_weight=case["ref_weight"],
            impl="torch",
            workspace_bytes=_workspace(5),
        )
    oracle = naive(case, LOSSES["dpo"], {}, torch.float64, trainable=())
    torch.testing.assert_close(losses.double(), oracle[0].double(), rtol=1e-5, atol=1e-5)
    assert not losses.requires_grad


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if CUDA else []))
def test_bf16(impl):
    """bf16 hidden states and head (torch path: fp32 workspace; Triton path on CUDA: bf16 logits from cuBLAS,
    fp32 reductions): within the rule of naive bf16. Not run in the interpreter (its bf16 is not trusted)."""
    case = make_case(dtype=torch.bfloat16, seed=15, bias=True)
    check_against_oracle(
        case, "dpo", impl, dtype=torch.bfloat16, workspace_bytes=_workspace(12, dtype=torch.bfloat16, impl=impl)
    )


def test_bad_inputs_named():
    case = make_case(seed=16)
    args = (case["hidden"], case["weight"], case["labels"], LOSSES["dpo"])
    with pytest.raises(ValueError, match=r"'hidden' must be \[2B, T, H\]"):
        pair_loss_from_hidden(case["hidden"][:3], case["weight"], case["labels"][:3], LOSSES["dpo"])
    with pytest.raises(ValueError, match="label 999 is outside"):
        labels = case["labels"].clone()
        labels[0, -1] = 999
        pair_loss_from_hidden(case["hidden"], case["weight"], labels, LOSSES["dpo"], ref_logps=torch.zeros(8))
    with pytest.raises(ValueError, match=r"extras\['offset'\]"):
        pair_loss_from_hidden(*args, ref_logps=torch.zeros(8), extras={"offset": torch.zeros(3)})
    with pytest.raises(ValueError, match="'accum_dtype' must be None, torch.float32 or the weight's dtype"):
        pair_loss_from_hidden(*args, ref_logps=torch.zeros(8), accum_dtype=torch.float64)
    with pytest.raises(ValueError, match="loss_fn must return per-pair losses"):
        pair_loss_from_hidden(*args[:3], lambda **_: torch.zeros(()), ref_logps=torch.zeros(8))


def test_pair_loss_kinds_reused_not_reimplemented():
    """daa_loss_fn is selfpo_kernels.pair_loss on the op's inputs (same numbers as calling it directly)."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=gen) for _ in range(4))
    tok = torch.full((5,), 3.0)
    losses, chosen_reward, _ = daa_loss_fn("ipo", beta=0.3)(pc, pr, rc, rr, tok, tok)
    torch.testing.assert_close(losses, pair_loss(pc, pr, rc, rr, kind="ipo", beta=0.3, reduction="none"))
    torch.testing.assert_close(chosen_reward, 0.3 * (pc - rc))


def _compiler_missing() -> str:
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018 - resolves the bundled binary
    except Exception as err:
        return f"triton with its bundled ptxas is not available: {err!r}"
    return ""


def test_pair_kernels_compile_for_sm90_sm80():
    """`python -m selfpo_kernels.compile_check --kinds pair_stats pair_grad`: both kernels compile ahead of time for
    sm_90 and sm_80, bf16 and fp32, bias and soft-cap on, with no spills and int64 offsets."""
    pytest.importorskip("triton")
    if reason := _compiler_missing():
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
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
        "pair_stats",
        "pair_grad",
        "--softcaps",
        "True",
        "--shapes",
        "llama3-8b",
        "vh>2^31",
        "--no-estimate",
    ]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    header, rows = None, []
    for line in res.stdout.splitlines():
        if line.startswith("| kernel"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and header and line.count("|") == len(header) + 1:
            rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    assert len(rows) == 2 * 2 * 2 * 2, res.stdout  # archs x dtypes x kinds x shapes
    for row in rows:
        assert row["status"] == "ok" and row["spill"] == "0" and row["i32_offs"] == "0", row


def test_bench_pair_mode(tmp_path, monkeypatch):
    """`selfpo_kernels.bench --modes pair` on a tiny shape: ours (fused and unfused) and naive are checked against the
    fp32 oracle and timed, rows have mode=pair; a pair implementation with a wrong gradient is FAILED, untimed."""
    from selfpo_kernels import bench

    monkeypatch.setitem(bench.SHAPES, "test-pair", bench.Shape(4 * bench.PAIR_SEQ_LEN // 16, 16, 128, 2))
    monkeypatch.setattr(bench, "PAIR_SEQ_LEN", bench.PAIR_SEQ_LEN // 16)  # 4 sequences of 32 positions: 2 pairs

    def wrong_grad(hidden, weight, labels, ref_hidden=None, ref_weight=None):
        policy, ref = bench.IMPLS["torch"](hidden, weight, labels, ref_hidden, ref_weight)
        return policy * 1.5 - policy.detach() * 0.5, ref  # right values, gradients scaled by 1.5

    monkeypatch.setitem(bench.IMPLS, "wrong_grad", wrong_grad)
    rows = bench.main(
        bench.Args(
            shapes=("test-pair",),
            impls=("torch", "naive", "wrong_grad"),
            modes=("pair",),
            repeats=2,
            warmup=0,
            memory=False,
            device="cpu",
            out=str(tmp_path / "b.csv"),
        )
    )
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"naive", "torch", "torch_logps", "wrong_grad"}
    for name in ("naive", "torch", "torch_logps"):
        row = by_impl[name]
        assert row["status"] == "ok" and row["mode"] == "pair" and row["seqs"] == 4 and row["repeats"] == 2, row
        assert row["rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-5, row
    assert by_impl["wrong_grad"]["status"].startswith("FAILED") and by_impl["wrong_grad"]["median_ms"] == ""


@pytest.mark.parametrize("impl", IMPLS)
def test_sliced_hidden_states(impl):
    """hidden[:, :-1] as a causal LM's scorer passes it (not contiguous): same results, gradient in its shape."""
    case = make_case(seed=17, length=10)
    full = case["hidden"].clone().requires_grad_()
    labels = case["labels"][:, 1:]
    sliced = dict(case, hidden=full.detach()[:, :-1], labels=labels, ref_hidden=case["ref_hidden"][:, :-1])
    oracle = naive(sliced, LOSSES["dpo"], {}, torch.float64)
    losses, _ = pair_loss_from_hidden(
        full[:, :-1],
        case["weight"],
        labels,
        LOSSES["dpo"],
        ref_hidden=case["ref_hidden"][:, :-1],
        ref_weight=case["ref_weight"],
        impl=impl,
        workspace_bytes=_workspace(12),
    )
    losses.sum().backward()
    torch.testing.assert_close(losses.double(), oracle[0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.grad[:, :-1].double(), oracle[2]["hidden"], rtol=1e-4, atol=1e-5)
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.skipif("triton" not in IMPLS, reason="no Triton path here (no CUDA, no interpreter)")
def test_self_check(monkeypatch):
    """The one-time check of the Triton path on its device passes, and catches a wrong dZ."""
    device = torch.device(DEVICE)
    monkeypatch.setattr(pair_mod, "_SELF_CHECKED", set())
    pair_mod.self_check(device, torch.float32)
    assert (str(device), torch.float32) in pair_mod._SELF_CHECKED

    real = pair_mod._TritonBackend.grad
    monkeypatch.setattr(pair_mod._TritonBackend, "grad", lambda self, *a: real(self, *a).mul_(1.01))
    monkeypatch.setattr(pair_mod, "_SELF_CHECKED", set())
    with pytest.raises(RuntimeError, match="self-check failed.*grad hidden"):
        pair_mod.self_check(device, torch.float32)
    assert not pair_mod._SELF_CHECKED


def _mixed_case(seed):
    """bf16 hidden states (as autocast gives them) with an fp32 master head and reference head."""
    case = make_case(seed=seed, bias=True)
    for key in ("hidden", "ref_hidden"):
        case[key] = case[key].to(torch.bfloat16)
    return case


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if CUDA else []))
def test_fp32_master_head_with_bf16_hidden(impl):
    """An fp32 weight beside bf16 hidden states: the products run in bf16 (the weight cast once inside the call)
    and dW sums straight into the fp32 gradient. Budget: the same step with the weight cast to bf16 outside (as
    autocast does), dW rounded to bf16 by the cast's backward; both against float64."""
    case = _mixed_case(seed=21)
    loss_fn = LOSSES["dpo"]
    oracle = naive(case, loss_fn, {}, torch.float64)
    leaves = {k: case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    cast = {k: v.to(torch.bfloat16) for k, v in leaves.items()}
    budget_case = dict(case, **cast, ref_weight=case["ref_weight"].to(torch.bfloat16))
    budget_case["ref_bias"] = case["ref_bias"].to(torch.bfloat16)
    budget_losses = pair_loss_from_hidden(
        cast["hidden"],
        cast["weight"],
        case["labels"],
        loss_fn,
        bias=cast["bias"],
        ref_hidden=budget_case["ref_hidden"],
        ref_weight=budget_case["ref_weight"],
        ref_bias=budget_case["ref_bias"],
        impl=impl,
    )[0]
    budget = torch.autograd.grad(budget_losses.sum(), [leaves[k] for k in ("hidden", "weight", "bias")])
    losses, _, grads = ours(case, loss_fn, {}, impl, workspace_bytes=_workspace(12, dtype=torch.bfloat16, impl=impl))
    assert grads["weight"].dtype == torch.float32 and grads["bias"].dtype == torch.float32
    assert grads["hidden"].dtype == torch.bfloat16
    assert_close_by_rule(losses, budget_losses, oracle[0], torch.bfloat16, "losses")
    for name, b in zip(("hidden", "weight", "bias"), budget):
        assert_close_by_rule(grads[name], b, oracle[2][name], torch.bfloat16, f"grad {name}")
    # no bf16 rounding of dW: the fp32 gradient is closer to float64 than the bf16-cast one
    err = (grads["weight"].double() - oracle[2]["weight"]).abs().max()
    assert err < (budget[1].double() - oracle[2]["weight"]).abs().max()


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if CUDA else []))
def test_accum_dtype_of_the_weight(impl):
    """accum_dtype=bf16 for a bf16 head: dW summed straight into the bf16 gradient over several chunks (boundaries
    between and inside pairs), within the rule of naive bf16 against float64."""
    for rows in (12, 5):
        case = make_case(dtype=torch.bfloat16, seed=22 + rows, bias=True)
        check_against_oracle(
            case,
            "dpo",
            impl,
            dtype=torch.bfloat16,
            workspace_bytes=_workspace(rows, dtype=torch.bfloat16, impl=impl),
            accum_dtype=torch.bfloat16,
        )


class _VocabByHiddenTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, per dtype, the distinct [V, H] tensors that ops create (in-place ops create none)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.endswith("_") or "out" in (kwargs or {}):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and t.data_ptr():
                self.seen.setdefault(t.dtype, set()).add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize(
    "weight_dtype, accum_dtype, expected",
    [
        # a bf16 head: the fp32 accumulator, then the bf16 gradient cast from it
        (torch.bfloat16, None, {torch.float32: 1, torch.bfloat16: 1}),
        # a bf16 head summed in its dtype: the gradient only
        (torch.bfloat16, torch.bfloat16, {torch.bfloat16: 1}),
        # an fp32 master head: its bf16 copy for the products, and the fp32 gradient (its own accumulator)
        (torch.float32, None, {torch.float32: 1, torch.bfloat16: 1}),
    ],
)
def test_weight_sized_buffers(weight_dtype, accum_dtype, expected):
    """What the pass allocates at the head's size [V, H], forward and backward, over several chunks."""
    case = make_case(dtype=torch.bfloat16, seed=30, ref="logps")
    weight = case["weight"].to(weight_dtype).requires_grad_()
    hidden = case["hidden"].detach().requires_grad_()
    with _VocabByHiddenTensors(weight.shape) as mode:
        losses, _ = pair_loss_from_hidden(
            hidden,
            weight,
            case["labels"],
            LOSSES["dpo"],
            ref_logps=case["ref_logps"],
            impl="torch",
            workspace_bytes=_workspace(12),
            accum_dtype=accum_dtype,
        )
        (grad,) = torch.autograd.grad(losses.sum(), [weight])
    assert grad.dtype == weight_dtype
    assert {dtype: len(ptrs) for dtype, ptrs in mode.seen.items()} == expected
