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
    Mutant(
        "opsr_chosen_prefix_reworded",
        "OPSR",
        "The chosen prefix is the paper's text verbatim: a top-notch response meriting 10 out of 10",
        "OPSR §3.3",
        "opsr.py",
        'CHOSEN_PREFIX = "Please produce a top-notch response that merits a perfect score of 10 out of 10."',
        'CHOSEN_PREFIX = "Please produce an excellent response that merits a perfect score of 10 out of 10."',
        'tests/test_opsr.py -k "templates_verbatim or online_pairs_take"',
    ),
    Mutant(
        "opsr_rejected_prefix_reworded",
        "OPSR",
        "The rejected prefix is the paper's text verbatim, odd wording kept: a good response meriting s out of 10",
        "OPSR §3.3",
        "opsr.py",
        'REJECTED_PREFIX = "Please produce a good response that merits',
        'REJECTED_PREFIX = "Please produce a bad response that merits',
        'tests/test_opsr.py -k "templates_verbatim or online_pairs_take"',
    ),
    Mutant(
        "opsr_prefix_separator",
        "OPSR",
        "The prefix and the instruction are joined by one space inside the last user turn",
        "OPSR §3.3; ALGORITHMS §2.2 [ours]",
        "opsr.py",
        'return f"{prefix} {instruction}"',
        'return f"{prefix}\\n{instruction}"',
        'tests/test_opsr.py -k "templates_verbatim or online_pairs_take"',
    ),
    Mutant(
        "opsr_online_sides_swapped",
        "OPSR",
        "The sample under the 10/10 prefix is the chosen answer, the one under the s/10 prefix the rejected",
        "OPSR §3.3, Fig. 2",
        "opsr.py",
        "build_pairs(prompts, [c[0] for c in chosen], [r[0] for r in rejected], dropped)",
        "build_pairs(prompts, [r[0] for r in rejected], [c[0] for c in chosen], dropped)",
        "tests/test_opsr.py::test_online_pairs_take_chosen_from_the_10_prefix_and_rejected_from_s_m",
    ),
    Mutant(
        "opsr_pair_sides_swapped",
        "OPSR",
        "A kept pair stores y_c as chosen and y_r as rejected",
        "OPSR §3.3, Fig. 2",
        "opsr.py",
        '"chosen": y_c, "rejected": y_r',
        '"chosen": y_r, "rejected": y_c',
        'tests/test_opsr.py -k "pairs_are_dropped_whole or online_pairs_take"',
    ),
    Mutant(
        "opsr_trained_on_prefixed_prompt",
        "OPSR",
        "Pairs are stored and trained under the plain prompt x, never the prefixed one",
        "OPSR Fig. 2 ({x_i, y_c, y_r})",
        "opsr.py",
        "build_pairs(prompts, [c[0]",
        "build_pairs([prefixed(p, CHOSEN_PREFIX) for p in prompts], [c[0]",
        "tests/test_opsr.py::test_online_pairs_take_chosen_from_the_10_prefix_and_rejected_from_s_m",
    ),
    Mutant(
        "opsr_rejected_score_frozen",
        "OPSR",
        "Iteration m asks the rejected answer for s_m of the schedule (3, 5, 7), not a fixed score",
        "OPSR §3.4, Table 2",
        "opsr.py",
        "s_m = args.rejected_scores[m - 1]",
        "s_m = args.rejected_scores[0]",
        'tests/test_opsr.py -k "online_pairs_take or iterations_use"',
    ),
    Mutant(
        "opsr_default_schedule_3_5_9",
        "OPSR",
        "The default rejected-score schedule is 3, 5, 7 (the experiments' captions, not §3.4's example 3, 5, 9)",
        "OPSR Table 2, Fig. 4 captions",
        "opsr.py",
        "field(default_factory=lambda: [3, 5, 7])",
        "field(default_factory=lambda: [3, 5, 9])",
        "tests/test_opsr.py::test_schedule_and_learning_rates",
    ),
    Mutant(
        "opsr_three_iterations",
        "OPSR",
        "M = 3 online iterations by default",
        "OPSR §4.1",
        "opsr.py",
        "iterations: int = 3",
        "iterations: int = 2",
        "tests/test_opsr.py::test_schedule_and_learning_rates",
    ),
    Mutant(
        "opsr_preset_lrs_not_decaying",
        "OPSR",
        "Mistral-Base learning rates are SimPO's 3e-7, then 1e-7 and 1e-8 for iterations 2 and 3",
        "OPSR §4.1",
        "opsr.py",
        "lrs=(3e-7, 1e-7, 1e-8),",
        "lrs=(3e-7, 3e-7, 3e-7),",
        "tests/test_opsr.py::test_schedule_and_learning_rates",
    ),
    Mutant(
        "opsr_lr_of_iteration_1_everywhere",
        "OPSR",
        "Iteration m trains at lr_m (the initialisation at the first)",
        "OPSR §4.1",
        "opsr.py",
        "args.lrs[max(m - 1, 0)]",
        "args.lrs[0]",
        "tests/test_opsr.py::test_iterations_use_their_lr_rejected_score_and_reference",
    ),
    Mutant(
        "opsr_init_follows_loss_option",
        "OPSR",
        "The initialisation phase is SimPO on the offline pairs whatever --loss says",
        "OPSR §3.2, §4.1",
        "opsr.py",
        'dataclasses.replace(args, loss="simpo") if m == 0 else args',
        "args",
        "tests/test_opsr.py::test_iterations_use_their_lr_rejected_score_and_reference",
    ),
    Mutant(
        "opsr_dpo_reference_zero",
        "OPSR",
        "With --loss dpo the reference of iteration m is pi_{m-1} (its log-probs of the pair)",
        "OPSR Fig. 2, eq. 2",
        "opsr.py",
        "p.update(ref_chosen=float(ref[i]), ref_rejected=float(ref[len(pairs) + i]))",
        "p.update(ref_chosen=0.0, ref_rejected=0.0)",
        "tests/test_opsr.py::test_iterations_use_their_lr_rejected_score_and_reference",
    ),
    Mutant(
        "opsr_leak_filter_inverted",
        "OPSR",
        "Generations that talk about the requested score are recognised, ordinary text is not",
        "OPSR §4.3 (inference on chosen prompt); ALGORITHMS §2.3",
        "opsr.py",
        "return any(pattern.search(text) for pattern in LEAK_PATTERNS)",
        "return not any(pattern.search(text) for pattern in LEAK_PATTERNS)",
        'tests/test_opsr.py -k "filter"',
    ),
    Mutant(
        "opsr_leak_pattern_missing",
        "OPSR",
        "Each leak pattern (here 'merits ... score') drops a generation that uses it",
        "OPSR §4.3; ALGORITHMS §2.3 [ours]",
        "opsr.py",
        r'r"\bmerits?\b[^.\n]{0,40}\bscore\b",',
        "",
        'tests/test_opsr.py -k "filter"',
    ),
    Mutant(
        "opsr_leak_checked_on_chosen_only",
        "OPSR",
        "A pair is dropped whole when either side leaks the score",
        "OPSR §4.3; ALGORITHMS §2.5.6",
        "opsr.py",
        "if leaks_score(y_c) or leaks_score(y_r)",
        "if leaks_score(y_c)",
        "tests/test_opsr.py::test_pairs_are_dropped_whole_and_counted",
    ),
    Mutant(
        "opsr_identical_pairs_kept",
        "OPSR",
        "Pairs with identical chosen and rejected texts are dropped",
        "ALGORITHMS §2.5.6 [ours]",
        "opsr.py",
        "if y_c.strip() == y_r.strip()",
        "if False",
        "tests/test_opsr.py::test_pairs_are_dropped_whole_and_counted",
    ),
    Mutant(
        "opsr_simpo_gamma_sign",
        "OPSR",
        "SimPO subtracts the target margin gamma: softplus(-(beta*(A_w - A_l) - gamma))",
        "OPSR §4.1 (SimPO eq. 6)",
        "opsr.py",
        "beta=args.beta, gamma=args.gamma, length_norm",
        "beta=args.beta, gamma=-args.gamma, length_norm",
        "tests/test_opsr.py::test_simpo_step_is_the_length_normalised_reference_free_formula",
    ),
    Mutant(
        "opsr_simpo_gamma_as_ratio",
        "OPSR",
        "gamma is the margin itself, not SimPO's gamma/beta ratio",
        "OPSR §4.1 (SimPO eq. 6, official configs)",
        "opsr.py",
        "beta=args.beta, gamma=args.gamma, length_norm",
        "beta=args.beta, gamma=args.gamma / args.beta, length_norm",
        "tests/test_opsr.py::test_simpo_step_is_the_length_normalised_reference_free_formula",
    ),
    Mutant(
        "opsr_preset_gamma",
        "OPSR",
        "Mistral-Base SimPO settings: beta 2.0, gamma 1.6 (gamma/beta 0.8)",
        "OPSR §4.1 (SimPO's settings)",
        "opsr.py",
        "gamma=1.6,",
        "gamma=0.8,",
        "tests/test_opsr.py::test_schedule_and_learning_rates",
    ),
    Mutant(
        "opsr_simpo_summed_logps",
        "OPSR",
        "SimPO's reward is length-normalised: A = S / |y|",
        "OPSR §4.1 (length-normalised reward; SimPO eq. 4)",
        "selfpo_kernels/pair.py",
        'if kind == "simpo" or length_norm:',
        "if length_norm:",
        "tests/test_opsr.py::test_simpo_step_is_the_length_normalised_reference_free_formula",
    ),
    Mutant(
        "opsr_simpo_uses_reference",
        "OPSR",
        "SimPO is reference-free: the pairs' reference log-probs do not enter the loss",
        "OPSR Table 1 caption, §4.1 (SimPO eq. 6)",
        "opsr.py",
        'return daa_loss_fn(args.loss, beta=args.beta, gamma=args.gamma, length_norm=args.length_norm == "avg")',
        "fn = daa_loss_fn(args.loss, beta=args.beta, gamma=args.gamma)\n"
        "    return lambda **k: fn(**dict(k, policy_chosen=k['policy_chosen'] - k['ref_chosen'],"
        " policy_rejected=k['policy_rejected'] - k['ref_rejected']))",
        "tests/test_opsr.py::test_simpo_step_is_the_length_normalised_reference_free_formula",
    ),
    # (end of the OPSR rows)
    # ---- OSP (osp.py) ----
    Mutant(
        "osp_k_default",
        "OSP",
        "K = 7 samples per prompt by default (3 pairs)",
        "OSP §4 (K = 7, K//2 pairs, as summarised); ALGORITHMS §4.4",
        "osp.py",
        "k: int = 7",
        "k: int = 8",
        "tests/test_osp.py::test_defaults_are_the_papers",
    ),
    Mutant(
        "osp_k_not_sampled",
        "OSP",
        "Each step samples K (--k) responses per prompt from the current policy",
        "OSP §3.1 (sample K responses per prompt)",
        "osp.py",
        "args.k,",
        "7,",
        "tests/test_osp.py::test_online_step_samples_k_and_trains_on_the_ranked_pairs",
    ),
    Mutant(
        "osp_beta_default",
        "OSP",
        "SPCE's beta is 0.1 by default",
        "ALGORITHMS §4.4 [ours]",
        "osp.py",
        "beta: float = 0.1",
        "beta: float = 0.5",
        "tests/test_osp.py::test_defaults_are_the_papers",
    ),
    Mutant(
        "osp_strength_one_order",
        "OSP",
        "The judged strength averages both presentation orders: q(a>b) = (J(a,b) + 1 - J(b,a)) / 2",
        "OSP §3.1-3.2; ALGORITHMS §4.1b",
        "osp.py",
        "return 0.5 * (j_ab + 1.0 - j_ba)",
        "return j_ab",
        'tests/test_osp.py -k "mean_of_both_presentation_orders or strength_is_antisymmetric"',
    ),
    Mutant(
        "osp_strength_flipped",
        "OSP",
        "q(a > b) is the strength of a (the reply shown first as A) over b",
        "OSP §3.1; ALGORITHMS §4.1b",
        "osp.py",
        "return 0.5 * (j_ab + 1.0 - j_ba)",
        "return 0.5 * (j_ba + 1.0 - j_ab)",
        'tests/test_osp.py -k "mean_of_both_presentation_orders or written_out"',
    ),
    Mutant(
        "osp_judge_verdict_sign",
        "OSP",
        "J(a, b) = sigma(logit[A] - logit[B]) of the policy's next token after the judge prompt",
        "OSP §3.1; ALGORITHMS §4.1b",
        "osp.py",
        "(logits[:, 0] - logits[:, 1])",
        "(logits[:, 1] - logits[:, 0])",
        "tests/test_osp.py::test_verdict_logits_equal_full_logits_and_strength_is_antisymmetric",
    ),
    Mutant(
        "osp_pairing_q_one_order",
        "OSP",
        "A formed pair's strength uses the judge in both orders, so a position-biased judge is corrected",
        "OSP §3.1; ALGORITHMS §4.1b-c",
        "osp.py",
        "strength(J[(p, a, b)], J[(p, b, a)])",
        "J[(p, a, b)]",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_baseline_score_not_half",
        "OSP",
        "Ranking is against the baseline (the first sample), whose own score is 0.5",
        "OSP §3.1 (ranked pairing against a baseline, as cited); ALGORITHMS §4.1c",
        "osp.py",
        "scores = [0.5] + [q(p, ys[i], ys[0])",
        "scores = [1.0] + [q(p, ys[i], ys[0])",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_baseline_comparison_reversed",
        "OSP",
        "s_i = q(y_i > y_b): a sample that beats the baseline ranks higher",
        "OSP §3.1; ALGORITHMS §4.1c",
        "osp.py",
        "[q(p, ys[i], ys[0]) for i in range(1, k)]",
        "[q(p, ys[0], ys[i]) for i in range(1, k)]",
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_rank_tie_break",
        "OSP",
        "Ties in the ranking score go to the earlier sample (order by (-s_i, i))",
        "ALGORITHMS §4.1c [ours]",
        "osp.py",
        "key=lambda i: (-scores[i], i)",
        "key=lambda i: (-scores[i], -i)",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_pairing_reversed",
        "OSP",
        "Ranked pairing: rank r is the chosen side against rank K+1-r (best with worst, ...)",
        "OSP §3.1 (K//2 ranked pairs); ALGORITHMS §4.1c",
        "osp.py",
        "[(order[r], order[k - 1 - r]) for r in range(k // 2)]",
        "[(order[k - 1 - r], order[r]) for r in range(k // 2)]",
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_pairing_adjacent",
        "OSP",
        "Pairs are ranks (1, K), (2, K-1), ..., not neighbours in the ranking",
        "OSP §3.1; ALGORITHMS §4.1c",
        "osp.py",
        "[(order[r], order[k - 1 - r]) for r in range(k // 2)]",
        "[(order[2 * r], order[2 * r + 1]) for r in range(k // 2)]",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_pair_strength_from_ranking",
        "OSP",
        "Each formed pair gets the judge's own strength q of that pair, not its ranking score",
        "OSP §3.1 (the LLM judges the formed pairs); ALGORITHMS §4.1c",
        "osp.py",
        '"q": q(p, samples[p][i], samples[p][j]),',
        '"q": scores[i],',
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_online_sides_swapped",
        "OSP",
        "In a training tuple the higher-ranked sample is y_h (chosen), the lower y_l",
        "OSP §3.1; ALGORITHMS §4.3 step 9",
        "osp.py",
        'samples[p][pair["chosen"]], samples[p][pair["rejected"]]',
        'samples[p][pair["rejected"]], samples[p][pair["chosen"]]',
        "tests/test_osp.py::test_online_step_samples_k_and_trains_on_the_ranked_pairs",
    ),
    Mutant(
        "osp_spce_soft_label_swapped",
        "OSP",
        "SPCE's soft label is q on log sigma(z) and 1-q on log sigma(-z)",
        "OSP §3.1 (SPCE); ALGORITHMS §1.7",
        "osp.py",
        "return q * F.softplus(-z) + (1 - q) * F.softplus(z)",
        "return (1 - q) * F.softplus(-z) + q * F.softplus(z)",
        'tests/test_osp.py -k "soft_label_formula or sigma_minus_q"',
    ),
    Mutant(
        "osp_spce_hard_label",
        "OSP",
        "The step trains on each tuple's judged strength q (SPCE), not on a hard label 1",
        "OSP §3.1 (SPCE); ALGORITHMS §4.1d",
        "osp.py",
        'q = q if args.loss == "spce" else torch.ones_like(q)',
        "q = torch.ones_like(q)",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_without_beta",
        "OSP",
        "z = beta * h (beta scales the log-ratio margin)",
        "OSP §3.1; ALGORITHMS §1.7, §4.1d",
        "osp.py",
        "chosen, rejected = args.beta * (policy_chosen - ref_chosen), args.beta * (policy_rejected - ref_rejected)",
        "chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_averaged_logps",
        "OSP",
        "z uses summed sequence log-probs, not length-averaged ones",
        "ALGORITHMS §0 convention 2, §4.1d",
        "osp.py",
        "args.beta * (policy_chosen - ref_chosen), args.beta * (policy_rejected - ref_rejected)",
        "args.beta * (policy_chosen - ref_chosen) / chosen_tokens, "
        "args.beta * (policy_rejected - ref_rejected) / rejected_tokens",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_rejected_not_differentiated",
        "OSP",
        "The gradient flows through both responses' policy log-probs (and not through q or the reference)",
        "OSP §3.1 (SPCE gradient); ALGORITHMS §1.7",
        "osp.py",
        "spce_loss(chosen - rejected, q)",
        "spce_loss(chosen - rejected.detach(), q)",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_sum_not_mean",
        "OSP",
        "The step's loss is the mean over its tuples",
        "ALGORITHMS §0 convention 3",
        "osp.py",
        "(losses.sum() * world() / len(tuples)).backward()",
        "(losses.sum() * world()).backward()",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_reference_is_the_policy",
        "OSP",
        "z is measured against the frozen reference, not the current policy",
        "OSP §3.1 (pi_SFT as reference); ALGORITHMS §4.1d",
        "osp.py",
        "ref_model=ref_model if ref_model is not None else model,",
        "ref_model=model,",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_reference_before_augmentation",
        "OSP",
        "Stage 1's reference is pi_0, the model after Stage 0's augmentation",
        "OSP §3.1-3.2; ALGORITHMS §4.3 step 3",
        "osp.py",
        'start = str(stage0) if (stage0 / "config.json").exists() else model_path',
        "start = model_path",
        "tests/test_osp.py::test_stage1_starts_from_and_is_referenced_to_the_augmented_model",
    ),
    Mutant(
        "osp_reference_not_frozen",
        "OSP",
        "The reference is frozen (no parameter of it requires a gradient)",
        "ALGORITHMS §0 convention 5, §4.3 step 3",
        "osp.py",
        "load_model(start, device, args, frozen=True)",
        "load_model(start, device, args)",
        "tests/test_osp.py::test_stage1_starts_from_and_is_referenced_to_the_augmented_model",
    ),
    Mutant(
        "osp_augmentation_no_position_swap",
        "OSP",
        "Preference augmentation: each offline pair gives (y_w, y_l) -> A and the swapped (y_l, y_w) -> B",
        "OSP §3.2 (preference augmentation); ALGORITHMS §4.3 step 1",
        "osp.py",
        '(pair["rejected"], pair["chosen"], verdict[1])',
        '(pair["chosen"], pair["rejected"], verdict[1])',
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
    Mutant(
        "osp_augmentation_targets_swapped",
        "OSP",
        "The judge instance's target names the human-preferred reply's position",
        "OSP §3.2; ALGORITHMS §4.3 step 1",
        "osp.py",
        '(pair["chosen"], pair["rejected"], verdict[0]), (pair["rejected"], pair["chosen"], verdict[1])',
        '(pair["chosen"], pair["rejected"], verdict[1]), (pair["rejected"], pair["chosen"], verdict[0])',
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
    Mutant(
        "osp_augmentation_scores_more_than_verdict",
        "OSP",
        "A judge instance scores its single verdict token only",
        "ALGORITHMS §4.3 step 2, §7.9.6",
        "osp.py",
        '"response_ids": [target], "kind": "judge"',
        '"response_ids": [target, tokenizer.eos_token_id], "kind": "judge"',
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
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
