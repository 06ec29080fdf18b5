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
import signal
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
        "Sr-DPO §3.2 (p (+) x); separator ours",
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
    Mutant(
        "sera_irm_zero",
        "SeRA",
        "The implicit reward is beta times theta_j's log-ratio to its reference (never identically zero)",
        "SeRA §3.1, eq. 5",
        "sera.py",
        'return args.beta * (ratio / counts if args.length_norm == "avg" else ratio)',
        'return 0 * args.beta * (ratio / counts if args.length_norm == "avg" else ratio)',
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_irm_sign_flipped",
        "SeRA",
        "The implicit reward is S(theta_j) - S(reference), not the reverse",
        "SeRA §3.1, eq. 5",
        "sera.py",
        "ratio = logps[j] - logps[ref]",
        "ratio = logps[ref] - logps[j]",
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_irm_reference_itself",
        "SeRA",
        "theta_j's implicit reward is taken against its own training reference theta_{j-1}, not against itself",
        "SeRA §3.1, eq. 5",
        "sera.py",
        'ref = j - 1 if args.irm_reference == "previous" else 0',
        'ref = j if args.irm_reference == "previous" else 0',
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_irm_reference_sft",
        "SeRA",
        "By default (--irm_reference previous) theta_j's reference in the IRM is theta_{j-1}, not the SFT model",
        "SeRA §3.1, §3.4",
        "sera.py",
        'ref = j - 1 if args.irm_reference == "previous" else 0',
        'ref = 0 if args.irm_reference == "previous" else 0',
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_irm_length_norm_ignored",
        "SeRA",
        "With --length_norm avg the IRM's log-ratio is divided by the response length",
        "README: SeRA, what is ours",
        "sera.py",
        '(ratio / counts if args.length_norm == "avg" else ratio)',
        "(ratio)",
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_simpo_reward_unnormalised",
        "SeRA",
        "With SimPO the implicit reward is beta times the length-averaged log-prob, without reference",
        "SeRA App. C.3, eq. 17",
        "sera.py",
        "return args.beta * logps[j] / counts",
        "return args.beta * logps[j]",
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_ensemble_weight_swapped",
        "SeRA",
        "The ensemble puts 1 - gamma_e on the newer model's reward and gamma_e on the older one's",
        "SeRA §3.4, eq. 7",
        "sera.py",
        "reward = (1 - args.gamma_e) * reward + args.gamma_e * implicit_reward(j - 1, logps, counts, args)",
        "reward = args.gamma_e * reward + (1 - args.gamma_e) * implicit_reward(j - 1, logps, counts, args)",
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_ensemble_older_model_missing",
        "SeRA",
        "The ensemble's second term is the previous model's reward r_{j-1}",
        "SeRA §3.4, eq. 7",
        "sera.py",
        "args.gamma_e * implicit_reward(j - 1,",
        "args.gamma_e * implicit_reward(j,",
        'tests/test_sera.py -k "implicit_reward_and or offline_selection"',
    ),
    Mutant(
        "sera_irm_margin_reversed",
        "SeRA",
        "The offline IRM is r~(y_w) - r~(y_l): chosen minus rejected",
        "SeRA §3.1-3.2, eq. 5",
        "sera.py",
        "irm = rewards[:n] - rewards[n:]",
        "irm = rewards[n:] - rewards[:n]",
        'tests/test_sera.py -k "offline_selection or iterations_train"',
    ),
    Mutant(
        "sera_selection_smallest_margins",
        "SeRA",
        "Selection keeps the pairs of largest margin (ties to the lower index)",
        "SeRA §3.2-3.3",
        "sera.py",
        "key=lambda i: (-float(margins[i]), i)",
        "key=lambda i: (float(margins[i]), i)",
        'tests/test_sera.py -k "selection_sizes or offline_selection"',
    ),
    Mutant(
        "sera_k1_floor",
        "SeRA",
        "k1 = ceil(rho_1 N) offline pairs are kept",
        "SeRA §3.2, Table 4",
        "sera.py",
        "k1 = math.ceil(rho_1 * n_pairs)",
        "k1 = math.floor(rho_1 * n_pairs)",
        'tests/test_sera.py -k "selection_sizes or iterations_train"',
    ),
    Mutant(
        "sera_k2_not_the_rest",
        "SeRA",
        "By default k2 = N - k1 generated pairs (k1 + k2 = N)",
        "SeRA §4.1",
        "sera.py",
        "n_pairs - k1 if rho_2 is None",
        "n_pairs - k1 - 1 if rho_2 is None",
        'tests/test_sera.py -k "selection_sizes or iterations_train"',
    ),
    Mutant(
        "sera_offline_reference_sft",
        "SeRA",
        "A selected offline pair of iteration t carries theta_{t-1}'s log-probs as its reference",
        "SeRA §3.4 (reference refreshed every iteration)",
        "sera.py",
        "offline_pair(pairs, i, logps[t - 1], float(irm[i]))",
        "offline_pair(pairs, i, logps[0], float(irm[i]))",
        'tests/test_sera.py -k "offline_selection or iterations_train"',
    ),
    Mutant(
        "sera_reference_not_refreshed",
        "SeRA",
        "Iteration t's reference log-probs of D are computed with theta_{t-1}, not the SFT model",
        "SeRA §3.4 (reference refreshed every iteration)",
        "sera.py",
        "offline_logps[t - 1] = score(model, sequences",
        "offline_logps[t - 1] = score(load_model(model_paths[0], device, args), sequences",
        'tests/test_sera.py -k "iterations_train"',
    ),
    Mutant(
        "sera_bootstrap_rewards_negated",
        "SeRA",
        "Bootstrapping labels the highest implicit reward chosen and the lowest rejected",
        "SeRA §3.3",
        "sera.py",
        "rewards = ensemble_reward(prev, logps, lengths, args)",
        "rewards = -ensemble_reward(prev, logps, lengths, args)",
        'tests/test_sera.py -k "bootstrap_pairs_the or iterations_train"',
    ),
    Mutant(
        "sera_bootstrap_argmin_chosen",
        "SeRA",
        "Per prompt, chosen = argmax and rejected = argmin of the implicit reward",
        "SeRA §3.3",
        "sera.py",
        "best, worst = int(torch.argmax(reward)), int(torch.argmin(reward))",
        "best, worst = int(torch.argmin(reward)), int(torch.argmax(reward))",
        'tests/test_sera.py -k "bootstrap_pairs_the or bootstrapping_argmax"',
    ),
    Mutant(
        "sera_bootstrap_n_cand",
        "SeRA",
        "Bootstrapping draws n_cand (4) samples per prompt",
        "SeRA §3.3, App. B.2",
        "sera.py",
        "            args.n_cand,",
        "            args.n_cand - 1,",
        'tests/test_sera.py -k "bootstrap_pairs_the"',
    ),
    Mutant(
        "sera_bootstrap_each_occurrence",
        "SeRA",
        "Bootstrapping samples every distinct prompt of D once",
        "README: SeRA, what is ours",
        "sera.py",
        'prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values())',
        'prompts = [p["prompt"] for p in pairs]',
        'tests/test_sera.py -k "bootstrap_pairs_the"',
    ),
    Mutant(
        "sera_bootstrap_samples_of_sft",
        "SeRA",
        "The bootstrap samples come from theta_{t-1} (the saved checkpoint the vLLM sampler loads)",
        "SeRA §3.3, Algorithm 1",
        "sera.py",
        "            model_paths[prev],",
        "            model_paths[0],",
        'tests/test_sera.py -k "bootstrap_pairs_the"',
    ),
    Mutant(
        "sera_bootstrap_scored_by_one_model",
        "SeRA",
        "Each model in r~_{t-1} scores the samples in its own place (theta_{t-1}, its reference, the older ones)",
        "SeRA §3.3-3.4, eq. 5, 7",
        "sera.py",
        "load_model(model_paths[j], device, args, frozen=True)",
        "load_model(model_paths[prev], device, args, frozen=True)",
        'tests/test_sera.py -k "bootstrap_pairs_the"',
    ),
    Mutant(
        "sera_bootstrap_smallest_margins",
        "SeRA",
        "The k2 bootstrapped pairs of largest IRM are kept",
        "SeRA §3.3-3.4",
        "sera.py",
        'top_k(torch.tensor([b["margin"] for b in boot]), min(k2, len(boot)))',
        'top_k(-torch.tensor([b["margin"] for b in boot]), min(k2, len(boot)))',
        'tests/test_sera.py -k "bootstrap_pairs_the"',
    ),
    Mutant(
        "sera_bootstrap_k2_off_by_one",
        "SeRA",
        "min(k2, #pairs) bootstrapped pairs are added",
        "SeRA §3.4",
        "sera.py",
        "min(k2, len(boot))",
        "min(k2 - 1, len(boot))",
        'tests/test_sera.py -k "bootstrap_pairs_the or iterations_train"',
    ),
    Mutant(
        "sera_bootstrap_reference_sft",
        "SeRA",
        "A bootstrapped pair of iteration t carries theta_{t-1}'s log-probs as its reference",
        "SeRA §3.4 (reference refreshed every iteration)",
        "sera.py",
        "ref_chosen=float(logps[prev][c])",
        "ref_chosen=float(logps[0][c])",
        'tests/test_sera.py -k "bootstrap_pairs_the or iterations_train"',
    ),
    Mutant(
        "sera_iteration1_not_all_of_d",
        "SeRA",
        "Iteration 1 is a plain DAA epoch on all of D with the SFT reference",
        "SeRA §3.4",
        "sera.py",
        "for i in range(len(pairs))]",
        "for i in range(k1)]",
        'tests/test_sera.py -k "iterations_train"',
    ),
    Mutant(
        "sera_dt_without_bootstrap",
        "SeRA",
        "From iteration 2, D_t is the selected offline pairs plus the bootstrapped ones",
        "SeRA §3.4, Algorithm 1",
        "sera.py",
        "d_t = d_off + d_gen",
        "d_t = d_off",
        'tests/test_sera.py -k "iterations_train"',
    ),
    Mutant(
        "sera_loss_reference_swapped",
        "SeRA",
        "The DAA loss takes each side's own stored reference log-prob (chosen with chosen)",
        "SeRA §3.4, eq. 6",
        "sera.py",
        'ref = [p["ref_chosen"] for p in batch_pairs] + [p["ref_rejected"] for p in batch_pairs]',
        'ref = [p["ref_rejected"] for p in batch_pairs] + [p["ref_chosen"] for p in batch_pairs]',
        'tests/test_sera.py -k "epoch_loss"',
    ),
    Mutant(
        "sera_loss_always_dpo",
        "SeRA",
        "--loss picks the DAA: DPO, IPO, SLiC-HF hinge or SimPO",
        "SeRA eq. 6, 8, 9; App. C.3 eq. 18",
        "sera.py",
        "daa_loss_fn(args.loss, beta=args.beta",
        'daa_loss_fn("dpo", beta=args.beta',
        'tests/test_sera.py -k "epoch_loss or daa_loss"',
    ),
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
        "OPSR §3.3; ours (README)",
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
        '            m_args = dataclasses.replace(args, loss="simpo")',
        "            m_args = args",
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
        "OPSR §4.3 (inference on chosen prompt)",
        "opsr.py",
        "return any(pattern.search(text) for pattern in LEAK_PATTERNS)",
        "return not any(pattern.search(text) for pattern in LEAK_PATTERNS)",
        'tests/test_opsr.py -k "filter"',
    ),
    Mutant(
        "opsr_leak_pattern_missing",
        "OPSR",
        "Each leak pattern (here 'merits ... score') drops a generation that uses it",
        "OPSR §4.3; ours (README)",
        "opsr.py",
        r'r"\bmerits?\b[^.\n]{0,40}\bscore\b",',
        "",
        'tests/test_opsr.py -k "filter"',
    ),
    Mutant(
        "opsr_leak_checked_on_chosen_only",
        "OPSR",
        "A pair is dropped whole when either side leaks the score",
        "OPSR §4.3",
        "opsr.py",
        "if leaks_score(y_c) or leaks_score(y_r)",
        "if leaks_score(y_c)",
        "tests/test_opsr.py::test_pairs_are_dropped_whole_and_counted",
    ),
    Mutant(
        "opsr_identical_pairs_kept",
        "OPSR",
        "Pairs with identical chosen and rejected texts are dropped",
        "README: OPSR, what is ours",
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
    Mutant(
        "opsr_dpo_iterations_simpo_beta",
        "OPSR",
        "--loss dpo iterations train with beta 0.01 (Zephyr recipe); the SimPO initialisation keeps SimPO's beta",
        "README: OPSR, what is ours",
        "opsr.py",
        "            m_args = dataclasses.replace(args, beta=args.dpo_beta)",
        "            m_args = args",
        "tests/test_opsr.py::test_iterations_use_their_lr_rejected_score_and_reference",
    ),
    # (end of the OPSR rows)
    # ---- OSP (osp.py) ----
    Mutant(
        "osp_k_default",
        "OSP",
        "K = 7 samples per prompt by default (3 pairs)",
        "OSP §4 (K = 7, K//2 pairs, as summarised)",
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
        "README: OSP, what is ours",
        "osp.py",
        "beta: float = 0.1",
        "beta: float = 0.5",
        "tests/test_osp.py::test_defaults_are_the_papers",
    ),
    Mutant(
        "osp_strength_one_order",
        "OSP",
        "The judged strength averages both presentation orders: q(a>b) = (J(a,b) + 1 - J(b,a)) / 2",
        "OSP §3.1-3.2",
        "osp.py",
        "return 0.5 * (j_ab + 1.0 - j_ba)",
        "return j_ab",
        'tests/test_osp.py -k "mean_of_both_presentation_orders or strength_is_antisymmetric"',
    ),
    Mutant(
        "osp_strength_flipped",
        "OSP",
        "q(a > b) is the strength of a (the reply shown first as A) over b",
        "OSP §3.1",
        "osp.py",
        "return 0.5 * (j_ab + 1.0 - j_ba)",
        "return 0.5 * (j_ba + 1.0 - j_ab)",
        'tests/test_osp.py -k "mean_of_both_presentation_orders or written_out"',
    ),
    Mutant(
        "osp_judge_verdict_sign",
        "OSP",
        "J(a, b) = sigma(logit[A] - logit[B]) of the policy's next token after the judge prompt",
        "OSP §3.1",
        "osp.py",
        "(logits[:, 0] - logits[:, 1])",
        "(logits[:, 1] - logits[:, 0])",
        "tests/test_osp.py::test_verdict_logits_equal_full_logits_and_strength_is_antisymmetric",
    ),
    Mutant(
        "osp_pairing_q_one_order",
        "OSP",
        "A formed pair's strength uses the judge in both orders, so a position-biased judge is corrected",
        "OSP §3.1",
        "osp.py",
        "strength(J[(p, a, b)], J[(p, b, a)])",
        "J[(p, a, b)]",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_baseline_score_not_half",
        "OSP",
        "Ranking is against the baseline (the first sample), whose own score is 0.5",
        "OSP §3.1 (ranked pairing against a baseline, as cited)",
        "osp.py",
        "scores = [0.5] + [q(p, ys[i], ys[0])",
        "scores = [1.0] + [q(p, ys[i], ys[0])",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_baseline_comparison_reversed",
        "OSP",
        "s_i = q(y_i > y_b): a sample that beats the baseline ranks higher",
        "OSP §3.1",
        "osp.py",
        "[q(p, ys[i], ys[0]) for i in range(1, k)]",
        "[q(p, ys[0], ys[i]) for i in range(1, k)]",
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_rank_tie_break",
        "OSP",
        "Ties in the ranking score go to the earlier sample (order by (-s_i, i))",
        "README: OSP, what is ours",
        "osp.py",
        "key=lambda i: (-scores[i], i)",
        "key=lambda i: (-scores[i], -i)",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_pairing_reversed",
        "OSP",
        "Ranked pairing: rank r is the chosen side against rank K+1-r (best with worst, ...)",
        "OSP §3.1 (K//2 ranked pairs)",
        "osp.py",
        "[(order[r], order[k - 1 - r]) for r in range(k // 2)]",
        "[(order[k - 1 - r], order[r]) for r in range(k // 2)]",
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_pairing_adjacent",
        "OSP",
        "Pairs are ranks (1, K), (2, K-1), ..., not neighbours in the ranking",
        "OSP §3.1",
        "osp.py",
        "[(order[r], order[k - 1 - r]) for r in range(k // 2)]",
        "[(order[2 * r], order[2 * r + 1]) for r in range(k // 2)]",
        "tests/test_osp.py -k written_out",
    ),
    Mutant(
        "osp_pair_strength_from_ranking",
        "OSP",
        "Each formed pair gets the judge's own strength q of that pair, not its ranking score",
        "OSP §3.1 (the LLM judges the formed pairs)",
        "osp.py",
        '"q": q(p, samples[p][i], samples[p][j]),',
        '"q": scores[i],',
        'tests/test_osp.py -k "written_out or best_with_worst"',
    ),
    Mutant(
        "osp_online_sides_swapped",
        "OSP",
        "In a training tuple the higher-ranked sample is y_h (chosen), the lower y_l",
        "OSP §3.1",
        "osp.py",
        'samples[p][pair["chosen"]], samples[p][pair["rejected"]]',
        'samples[p][pair["rejected"]], samples[p][pair["chosen"]]',
        "tests/test_osp.py::test_online_step_samples_k_and_trains_on_the_ranked_pairs",
    ),
    Mutant(
        "osp_spce_soft_label_swapped",
        "OSP",
        "SPCE's soft label is q on log sigma(z) and 1-q on log sigma(-z)",
        "OSP §3.1 (SPCE)",
        "osp.py",
        "return q * F.softplus(-z) + (1 - q) * F.softplus(z)",
        "return (1 - q) * F.softplus(-z) + q * F.softplus(z)",
        'tests/test_osp.py -k "soft_label_formula or sigma_minus_q"',
    ),
    Mutant(
        "osp_spce_hard_label",
        "OSP",
        "The step trains on each tuple's judged strength q (SPCE), not on a hard label 1",
        "OSP §3.1 (SPCE)",
        "osp.py",
        'q = q if args.loss == "spce" else torch.ones_like(q)',
        "q = torch.ones_like(q)",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_without_beta",
        "OSP",
        "z = beta * h (beta scales the log-ratio margin)",
        "OSP §3.1",
        "osp.py",
        "chosen, rejected = args.beta * (policy_chosen - ref_chosen), args.beta * (policy_rejected - ref_rejected)",
        "chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_averaged_logps",
        "OSP",
        "z uses summed sequence log-probs, not length-averaged ones",
        "README: OSP, what is ours",
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
        "OSP §3.1 (SPCE gradient)",
        "osp.py",
        "spce_loss(chosen - rejected, q)",
        "spce_loss(chosen - rejected.detach(), q)",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_spce_sum_not_mean",
        "OSP",
        "The step's loss is the mean over its tuples",
        "README: OSP, what is ours",
        "osp.py",
        "(losses.sum() * world() / len(tuples)).backward()",
        "(losses.sum() * world()).backward()",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_reference_is_the_policy",
        "OSP",
        "z is measured against the frozen reference, not the current policy",
        "OSP §3.1 (pi_SFT as reference)",
        "osp.py",
        "ref_model=ref_model if ref_model is not None else model,",
        "ref_model=model,",
        "tests/test_osp.py::test_spce_step_is_the_soft_label_formula_in_float64",
    ),
    Mutant(
        "osp_reference_before_augmentation",
        "OSP",
        "Stage 1's reference is pi_0, the model after Stage 0's augmentation",
        "OSP §3.1-3.2",
        "osp.py",
        'start = str(stage0) if (stage0 / "config.json").exists() else model_path',
        "start = model_path",
        "tests/test_osp.py::test_stage1_starts_from_and_is_referenced_to_the_augmented_model",
    ),
    Mutant(
        "osp_reference_not_frozen",
        "OSP",
        "The reference is frozen (no parameter of it requires a gradient)",
        "README: OSP, what is ours",
        "osp.py",
        "load_model(start, device, args, frozen=True)",
        "load_model(start, device, args)",
        "tests/test_osp.py::test_stage1_starts_from_and_is_referenced_to_the_augmented_model",
    ),
    Mutant(
        "osp_augmentation_no_position_swap",
        "OSP",
        "Preference augmentation: each offline pair gives (y_w, y_l) -> A and the swapped (y_l, y_w) -> B",
        "OSP §3.2 (preference augmentation)",
        "osp.py",
        '(pair["rejected"], pair["chosen"]) if swapped',
        '(pair["chosen"], pair["rejected"]) if swapped',
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
    Mutant(
        "osp_augmentation_targets_swapped",
        "OSP",
        "The judge instance's target names the human-preferred reply's position",
        "OSP §3.2",
        "osp.py",
        "[verdict[swapped]]",
        "[verdict[not swapped]]",
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
    Mutant(
        "osp_augmentation_scores_more_than_verdict",
        "OSP",
        "A judge instance scores its single verdict token only",
        "README: OSP, what is ours",
        "osp.py",
        "a, b), [verdict[swapped]]",
        "a, b), [verdict[swapped], tokenizer.eos_token_id]",
        "tests/test_osp.py::test_augmentation_builds_two_balanced_instances_scoring_only_the_verdict",
    ),
    Mutant(
        "osp_stage0_examples_hold_ids",
        "OSP",
        "Stage 0's examples are tokenized when a rank trains on them: no rank holds the whole set's token ids",
        "README: OSP, what is ours",
        "osp.py",
        '        out += [Example(kind="judge", tokens=tokens) for tokens in encoded]',
        '        out += [Example(kind="judge", tokens=tokens, ids=tokens()) for tokens in encoded]',
        "tests/test_paper_scale.py::test_stage0_examples_hold_no_token_ids",
    ),
    # (end of the OSP rows)
    # ---- shared losses and kernels (selfpo_kernels) ----
    Mutant(
        "losses_avg_reference_unnormalised",
        "losses",
        "Under --length_norm avg every sequence log-prob, the reference's too, is divided by its token count",
        "README: the selfpo_kernels package",
        "selfpo_kernels/pair.py",
        "ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens",
        "ref_chosen, ref_rejected = ref_chosen, ref_rejected",
        'tests/test_kernels_daa.py -k "avg"',
    ),
    Mutant(
        "losses_simpo_wrong_length",
        "losses",
        "SimPO's reward is beta * S / |y| with each response's own length",
        "SimPO (Meng et al. 2024), eq. 4",
        "selfpo_kernels/pair.py",
        "policy_chosen / chosen_tokens, policy_rejected / rejected_tokens",
        "policy_chosen / chosen_tokens, policy_rejected / chosen_tokens",
        "tests/test_kernels_losses.py::test_simpo_length_normalisation",
    ),
    Mutant(
        "losses_simpo_margin_sign",
        "losses",
        "SimPO subtracts the target margin gamma: softplus(-(beta (A_w - A_l) - gamma))",
        "SimPO (Meng et al. 2024), eq. 6",
        "selfpo_kernels/losses.py",
        "losses = F.softplus(-(beta * (pol_w - pol_l) - gamma))",
        "losses = F.softplus(-(beta * (pol_w - pol_l) + gamma))",
        'tests/test_kernels_daa.py -k "simpo"',
    ),
    Mutant(
        "losses_dpo_sign_flipped",
        "losses",
        "DPO is -log sigma(beta h) = softplus(-beta h) (cDPO adds eps softplus(beta h))",
        "DPO (Rafailov et al. 2023), eq. 7",
        "selfpo_kernels/losses.py",
        "losses = (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)",
        "losses = (1.0 - eps) * F.softplus(z) + eps * F.softplus(-z)",
        'tests/test_kernels_daa.py -k "dpo and not cdpo"',
    ),
    Mutant(
        "losses_cdpo_smoothing_halved",
        "losses",
        "cDPO weighs the flipped label by eps: (1 - eps) softplus(-z) + eps softplus(z)",
        "cDPO (Mitchell 2023)",
        "selfpo_kernels/losses.py",
        "eps = float(label_smoothing)",
        "eps = float(label_smoothing) / 2",
        'tests/test_kernels_daa.py -k "cdpo"',
    ),
    Mutant(
        "losses_ipo_constant",
        "losses",
        "IPO's target margin is 1 / (2 tau): (h - 1/(2 tau))^2",
        "IPO (Azar et al. 2024), eq. 17; SeRA eq. 9",
        "selfpo_kernels/losses.py",
        "losses = (h - 1.0 / (2.0 * beta)) ** 2",
        "losses = (h - 1.0 / beta) ** 2",
        'tests/test_kernels_daa.py -k "ipo"',
    ),
    Mutant(
        "losses_hinge_margin",
        "losses",
        "SLiC's hinge has margin delta = 1: max(0, 1 - beta h)",
        "SeRA eq. 8 (SLiC-HF; TRL's hinge)",
        "selfpo_kernels/losses.py",
        "losses = torch.relu(1.0 - z)",
        "losses = torch.relu(0.5 - z)",
        'tests/test_kernels_daa.py -k "hinge"',
    ),
    Mutant(
        "kernels_dw_16bit_products",
        "kernels",
        "The head's gradient sums 16-bit chunk products in fp32 (no 16-bit rounding of a product)",
        "README: the selfpo_kernels package",
        "selfpo_kernels/torch_ref.py",
        "acc.addmm_(a.float(), b.float())",
        "acc += (a @ b).float()",
        "tests/test_kernels_launch.py::test_weight_grad_accumulates_in_fp32",
    ),
    Mutant(
        "kernels_logps_hidden_shifted",
        "kernels",
        "Hidden state t scores the label at t+1 (bf16 autocast: within twice naive bf16's error of float64)",
        "README: the selfpo_kernels package",
        "selfpo_kernels/ops.py",
        "decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)[:, :-1]",
        "decoder_hidden_states(model, input_ids, attention_mask, **forward_kwargs)[:, 1:]",
        'tests/test_kernels_hf.py -k "bf16_autocast and causal_lm_logps"',
    ),
    Mutant(
        "kernels_pair_hidden_shifted",
        "kernels",
        "The pair op's hidden state t scores the label at t+1 (bf16 autocast: within twice naive bf16's error)",
        "README: the selfpo_kernels package",
        "selfpo_kernels/ops.py",
        "        labels[:, 1:],\n        loss_fn,",
        "        labels[:, :-1],\n        loss_fn,",
        'tests/test_kernels_hf.py -k "bf16_autocast and causal_lm_pair_loss"',
    ),
    Mutant(
        "toy_oracle_order_by_hash",
        "toy world",
        "The toy reward is per-position credit against the sorted letters, the same in every process",
        "assets/toy/oracle.py (the toy world's reward)",
        "assets/toy/oracle.py",
        "answer = sorted(parse_letters(prompt))",
        "answer = sorted(parse_letters(prompt), key=hash)",
        "tests/test_toy.py::test_oracle_is_deterministic_and_ignores_prefixes",
    ),
    Mutant(
        "kernels_logps_sums_in_fp32",
        "kernels",
        "A reference scored by the policy's own weights gives a margin of exactly 0 at the first step (bf16 autocast)",
        "README: the selfpo_kernels package",
        "selfpo_kernels/ops.py",
        '"sum": lambda t: sequence_sums(t).float(),',
        '"sum": lambda t: t.sum(dim=1),',
        'tests/test_kernels_hf.py -k "margin_is_zero and torch"',
    ),
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
        'dcp.save({"model": weights}, checkpoint_id=str(folder / "model"))',
        'dcp.save({"model": {k: v.bfloat16() for k, v in weights.items()}}, checkpoint_id=str(folder / "model"))',
        "tests/test_scale.py::test_step_checkpoint_resumes_bit_identically",
    ),
    Mutant(
        "runtime_resume_weights_not_restored",
        "runtime",
        "resuming from a step checkpoint restores the weights it holds",
        "README",
        "sera.py",
        "    dcp.load(weights, checkpoint_id=str(folder))\n",
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
        "            shutil.rmtree(tmp, ignore_errors=True)\n            tmp.mkdir(parents=True)\n",
        "            shutil.rmtree(directory, ignore_errors=True)\n"
        "            shutil.rmtree(tmp, ignore_errors=True)\n            tmp.mkdir(parents=True)\n",
        "tests/test_scale.py::test_step_checkpoint_is_replaced_whole_or_not_at_all",
    ),
    Mutant(
        "runtime_swap_not_recovered",
        "runtime",
        "--resume completes a checkpoint swap that a kill cut between its two renames",
        "README",
        "sera.py",
        "    recover_folder(directory)\n    file, generators = ",
        "    file, generators = ",
        "tests/test_scale.py::test_a_swap_cut_between_its_renames_is_completed_on_resume",
    ),
    Mutant(
        "runtime_generators_of_every_gpu",
        "runtime",
        "a rank saves its own generators only, so a run resumes on a node with another number of GPUs",
        "README",
        "sera.py",
        '    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}',
        '    return {"cpu": torch.get_rng_state(), "cuda0": torch.get_rng_state()}',
        "tests/test_scale.py::test_generators_of_a_cpu_run_name_no_gpu",
    ),
    Mutant(
        "runtime_collectives_on_cpu_under_nccl",
        "runtime",
        "every tensor handed to a collective lives on this rank's GPU unless the backend is gloo (NCCL has no CPU)",
        "README",
        "sera.py",
        "    gpu = dist.is_initialized() and dist.get_backend() != dist.Backend.GLOO",
        '    gpu = dist.is_initialized() and dist.get_backend() == "nccl"',
        "tests/test_scale.py::test_collectives_live_on_the_gpu_under_any_backend_but_gloo",
    ),
    Mutant(
        "runtime_resumed_steps_renumbered",
        "runtime",
        "a step redone after --resume keeps its global step in metrics.jsonl and TensorBoard",
        "README",
        "sera.py",
        "self.global_step = self.steps.setdefault(self.key(metrics), max(self.steps.values(), default=0) + 1)",
        "self.global_step = self.steps[self.key(metrics)] = max(self.steps.values(), default=0) + 1",
        "tests/test_logs.py::test_a_resumed_run_numbers_its_steps_as_the_uninterrupted_one",
    ),
    Mutant(
        "runtime_silent_phases_in_a_log",
        "runtime",
        "in a non-TTY log every long phase (scoring, sampling, evaluation) prints timestamped progress lines",
        "README",
        "sera.py",
        "leave=not inner or not tty, disable=rank() != 0,",
        "leave=not inner or not tty, disable=rank() != 0 or inner and not tty,",
        "tests/test_logs.py::test_every_long_phase_logs_timestamped_lines_with_elapsed_time_and_eta",
    ),
    Mutant(
        "runtime_vllm_weights_through_files",
        "runtime",
        "--sampler vllm: the policy's new weights go into the engine (in the trainer's process) from memory, one "
        "gathered tensor at a time; no file, no tmpfs copy, nothing in the run folder",
        "README",
        "sera.py",
        "        if plain and VLLMEngine.in_process:",
        "        if False:",
        "tests/test_vllm_sync.py -k 'push_sends or iteration_boundaries or osp_steps'",
    ),
    Mutant(
        "runtime_vllm_engine_in_its_own_processes",
        "runtime",
        "--sampler vllm: the engine runs in the trainer's process unless VLLM_ENABLE_V1_MULTIPROCESSING=1 says not to",
        "README",
        "sera.py",
        'os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")',
        'os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")',
        "tests/test_vllm_sync.py -k 'push_sends and sera'",
    ),
    Mutant(
        "runtime_vllm_start_reseeds_the_trainer",
        "runtime",
        "starting the vLLM engine in the trainer's process leaves the trainer's random numbers as they were (vLLM "
        "seeds torch): a resumed run samples and drops out as the uninterrupted one",
        "README",
        "sera.py",
        "            with torch.random.fork_rng(devices=gpu):",
        "            with torch.random.fork_rng(devices=gpu, enabled=False):",
        "tests/test_vllm_sync.py -k 'push_sends and sera'",
    ),
    Mutant(
        "runtime_vllm_prefix_cache_kept",
        "runtime",
        "--sampler vllm: the engine's prefix cache is reset after every weight change (no keys and values of the old "
        "weights reused)",
        "README",
        "sera.py",
        "        llm.reset_prefix_cache()  #",
        "        pass  #",
        "tests/test_vllm_sync.py -k 'push_sends and sera'",
    ),
    Mutant(
        "runtime_vllm_torchrun_engine_pinned",
        "runtime",
        "under torchrun each rank's in-process vLLM engine joins torchrun's process group on its LOCAL_RANK GPU "
        "(vLLM's external launcher)",
        "README",
        "sera.py",
        "        if VLLMEngine.in_process and world() > 1:",
        "        if False:",
        "tests/test_vllm_sync.py::test_torchrun_ranks_start_their_engine_in_process_on_their_own_gpu",
    ),
    Mutant(
        "runtime_every_rank_reads_the_weights",
        "runtime",
        "under FSDP2 only rank 0 reads the weights; every other rank builds the model on the meta device and "
        "receives its shards (no rank but 0 holds the whole model)",
        "README",
        "sera.py",
        "    if rank() == 0:\n        try:\n            full = read_model(path, dtype)\n",
        "    if True:\n        try:\n            full = read_model(path, dtype)\n",
        "tests/test_model_load.py -k sera",
    ),
    Mutant(
        "runtime_sharded_buffers_not_sent",
        "runtime",
        "a model loaded for FSDP2 gets rank 0's non-persistent buffers (rotary frequencies) on every rank",
        "README",
        "sera.py",
        "        dist.broadcast(buffer.copy_(full.get_buffer(name)) if rank() == 0 else buffer, 0)\n",
        "        buffer.copy_(full.get_buffer(name)) if rank() == 0 else buffer\n",
        "tests/test_model_load.py -k sera",
    ),
    Mutant(
        "runtime_sharded_weights_not_sent",
        "runtime",
        "a model loaded for FSDP2 holds rank 0's weights on every rank, exactly",
        "README",
        "sera.py",
        "    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)\n",
        "    options = StateDictOptions(full_state_dict=True)\n",
        "tests/test_model_load.py -k sera",
    ),
    Mutant(
        "runtime_sharded_masters_in_bf16",
        "runtime",
        "the FSDP2 policy's masters are fp32 under --dtype bfloat16 (only a frozen sharded copy is held in bf16)",
        "README",
        "sera.py",
        "    held_in_bf16 = bf16 and (args.lora_r > 0 or (frozen and sharded))",
        "    held_in_bf16 = bf16 and (args.lora_r > 0 or sharded)",
        "tests/test_model_load.py -k sera",
    ),
    Mutant(
        "runtime_signal_ends_the_step_at_once",
        "runtime",
        "a SIGTERM, SIGUSR1 or SIGINT inside a training step lets the step finish and writes its step checkpoint",
        "README",
        "sera.py",
        "        if not Stop.defer:\n            raise KeyboardInterrupt(",
        "        if True:\n            raise KeyboardInterrupt(",
        "tests/test_signals.py -k '(sera and mid_training) or real_sigterm'",
    ),
    Mutant(
        "runtime_signal_writes_no_step_checkpoint",
        "runtime",
        "the step a signal stopped is saved as a step checkpoint, from which --resume ends bit-identical",
        "README",
        "sera.py",
        "step < n_steps or Stop.where and not args.lora_r:\n                save_checkpoint(model, partial,",
        "step < n_steps:\n                save_checkpoint(model, partial,",
        "tests/test_signals.py -k 'sera and mid_training'",
    ),
    Mutant(
        "runtime_signal_ranks_disagree",
        "runtime",
        "under torchrun every rank stops after the same step, whichever rank the signal reached first",
        "README",
        "sera.py",
        "        dist.all_reduce(sums)\n",
        "        dist.all_reduce(stats.sums)\n",
        "tests/test_signals.py::test_ranks_stop_after_the_same_step",
    ),
    Mutant(
        "runtime_second_signal_ignored",
        "runtime",
        "a second signal ends the process at once",
        "README",
        "sera.py",
        "    elif time.monotonic() - Stop.at > 1:\n",
        "    elif False:\n",
        "tests/test_signals.py::test_a_second_signal_exits_at_once",
    ),
    Mutant(
        "runtime_forwarded_signal_is_a_second",
        "runtime",
        "the copy of a signal that torchrun forwards within a second is not a second signal",
        "README",
        "sera.py",
        "    elif time.monotonic() - Stop.at > 1:\n",
        "    elif time.monotonic() - Stop.at >= 0:\n",
        "tests/test_signals.py::test_a_second_signal_exits_at_once",
    ),
    Mutant(
        "runtime_signal_after_the_last_step_lost",
        "runtime",
        "a signal after a training loop's last step still ends the run when the loop ends",
        "README",
        "sera.py",
        "        Stop.defer = False\n    if Stop.signum is not None:\n",
        "        Stop.defer = False\n    if False:\n",
        "tests/test_signals.py::test_a_signal_outside_a_training_step_ends_the_phase_at_once",
    ),
    Mutant(
        "runtime_signal_exit_code",
        "runtime",
        "a run a signal stopped exits 128 + the signal's number (SIGTERM 143)",
        "README",
        "sera.py",
        "        sys.exit(128 + (Stop.signum or signal.SIGINT))",
        "        sys.exit(130)",
        "tests/test_signals.py::test_a_real_sigterm_from_outside_stops_after_the_step_it_came_in",
    ),
    Mutant(
        "runtime_resume_hint_says_python",
        "runtime",
        "the resume hint names this interpreter and the script as invoked",
        "README",
        "sera.py",
        "    launcher = [sys.executable]\n",
        '    launcher = ["python"]\n',
        "tests/test_signals.py -k 'sera and resume_hint'",
    ),
    Mutant(
        "runtime_run_folder_not_locked",
        "runtime",
        "a second job on a run folder is refused, naming the pid and host holding it",
        "README",
        "sera.py",
        "                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
        "                fcntl.flock(lock, fcntl.LOCK_UN)\n",
        "tests/test_signals.py -k 'sera and second_job'",
    ),
    Mutant(
        "runtime_fresh_run_over_a_run",
        "runtime",
        "a run without --resume into a folder that holds a run is refused (--overwrite starts over)",
        "README",
        "sera.py",
        "        if error is None and held and not args.resume and not args.overwrite:\n",
        "        if error is None and held and not args.resume and not args.overwrite and False:\n",
        "tests/test_signals.py -k 'sera and fresh_run'",
    ),
    Mutant(
        "runtime_overwrite_keeps_the_old_run",
        "runtime",
        "--overwrite deletes what the run folder held before the new run writes",
        "README",
        "sera.py",
        "                    shutil.rmtree(path)\n",
        "                    pass\n",
        "tests/test_signals.py -k 'sera and fresh_run'",
    ),
    Mutant(
        "runtime_redone_record_renumbered",
        "runtime",
        "a record a resumed run redoes keeps its global step (metrics.jsonl equals the uninterrupted run's)",
        "README",
        "sera.py",
        "            step = self.steps.get(self.key(metrics), self.global_step)\n",
        "            step = self.global_step\n",
        "tests/test_signals.py -k 'mid_training and sera'",
    ),
    Mutant(
        "runtime_nonfinite_gradient_applied",
        "runtime",
        "a step whose gradient norm is NaN or inf is skipped (no optimizer or scheduler update), and logged",
        "README",
        "sera.py",
        '    checks = (("loss", values[0]), ("gradient norm", grad_norm))\n',
        '    checks = (("loss", values[0]),)\n',
        'tests/test_divergence.py -k "test_a_non_finite_gradient_norm_skips_the_step and sera"',
    ),
    Mutant(
        "runtime_nonfinite_skips_not_in_a_row",
        "runtime",
        "--max_skipped_steps non-finite steps in a row (a finite step resets the count) stop the run, naming the step",
        "README",
        "sera.py",
        'getattr(optimizer, "skipped_in_a_row", 0) + 1 if bad else 0',
        'getattr(optimizer, "skipped_in_a_row", 0) + bool(bad)',
        'tests/test_divergence.py -k "test_max_skipped_steps_in_a_row_stop_the_run_naming_the_step and sera"',
    ),
    Mutant(
        "runtime_nonfinite_saved",
        "runtime",
        "nothing non-finite is saved: a NaN or inf in an export or step checkpoint refuses it, the previous one intact",
        "README",
        "sera.py",
        "    if count := int(all_sum(",
        "    if count := 0 * int(all_sum(",
        'tests/test_divergence.py -k "test_nothing_non_finite_is_saved and sera"',
    ),
    Mutant(
        "runtime_context_unchecked",
        "runtime",
        "--max_prompt_length + --max_new_tokens and --max_length fit the model's context, checked before any write",
        "README",
        "sera.py",
        "max(args.max_prompt_length + args.max_new_tokens, args.max_length) > context",
        "args.max_prompt_length > context",
        'tests/test_divergence.py -k "test_lengths_over_the_model_context_stop_before_anything_is_written and sera"',
    ),
    Mutant(
        "runtime_vllm_past_context",
        "runtime",
        "the vLLM engine's max_model_len is never above the model's context",
        "README",
        "sera.py",
        "        VLLMEngine.max_model_len = min(max(args.max_prompt_length, longest) + args.max_new_tokens, context)\n",
        "        VLLMEngine.max_model_len = max(args.max_prompt_length, longest) + args.max_new_tokens\n",
        'tests/test_divergence.py -k "test_the_vllm_engine_never_reads_past_the_model_context and sera"',
    ),
    Mutant(
        "runtime_duplicates_not_counted",
        "runtime",
        "a row repeating an earlier one's prompt, chosen and rejected is a quirk: skipped and counted",
        "README",
        "sera.py",
        "            if first != where:\n",
        "            if False:\n",
        'tests/test_divergence.py -k "test_repeated_rows_are_a_counted_quirk_named_by_their_lines and sera"',
    ),
    Mutant(
        "runtime_rows_counted_from_zero",
        "runtime",
        "messages name a jsonl row by its line in the file (from 1, blank lines counted), other rows from 1",
        "README",
        "sera.py",
        '    return f"{source} line {lines[index]}" if lines else f"{source} row {index + 1}"\n',
        '    return f"{source} row {index}"\n',
        'tests/test_divergence.py -k "test_repeated_rows_are_a_counted_quirk_named_by_their_lines and sera"',
    ),
    Mutant(
        "runtime_score_in_input_order",
        "runtime",
        "scoring batches each rank's share sorted by length, the shares dealt by length: little padding",
        "README",
        "sera.py",
        "    mine, real = shard_by_length([len(prompt) + len(response) for prompt, response in sequences])",
        "    mine, real = shard_by_length([0 for prompt, response in sequences])",
        'tests/test_paper_scale.py -k "scoring and sera"',
    ),
    Mutant(
        "runtime_sorted_results_not_reordered",
        "runtime",
        "work sorted by length comes back in input order on every rank",
        "README",
        "sera.py",
        "    return [merged[i] for i in range(n)]",
        "    return list(merged.values())[:n]",
        'tests/test_paper_scale.py -k "scoring and sera"',
    ),
    Mutant(
        "runtime_boundary_masters_not_loaded",
        "runtime",
        "a resume at an iteration or stage boundary continues from the fp32 masters, not the export's rounding",
        "README",
        "sera.py",
        '    if not frozen and (Path(path) / "masters").is_dir():',
        "    if False:",
        'tests/test_paper_scale.py -k "boundary and sera"',
    ),
    Mutant(
        "runtime_boundary_masters_kept",
        "runtime",
        "a boundary's fp32 masters are deleted once a later boundary or the end is reached",
        "README",
        "sera.py",
        '        shutil.rmtree(out_dir / f"iter_{t - 1}" / "masters", ignore_errors=True)',
        "        pass",
        'tests/test_paper_scale.py -k "boundary and sera"',
    ),
    Mutant(
        "runtime_swap_whole_tmp_not_completed",
        "runtime",
        "a kill in any window of the checkpoint swap leaves one whole checkpoint: a whole .tmp (its manifest written "
        "last) replaces a missing folder, also where there was none before",
        "README",
        "sera.py",
        '    if rank() == 0 and not directory.exists() and ((tmp / "manifest.json").exists() or old.exists()):\n'
        '        os.replace(tmp if (tmp / "manifest.json").exists() else old, directory)\n',
        "    if rank() == 0 and not directory.exists() and old.exists():\n"
        "        os.replace(tmp if tmp.exists() else old, directory)\n",
        'tests/test_run_files.py -k "window and sera"',
    ),
    Mutant(
        "runtime_swap_partial_tmp_taken",
        "runtime",
        "a .tmp cut before its manifest was written never replaces a checkpoint",
        "README",
        "sera.py",
        '    if rank() == 0 and not directory.exists() and ((tmp / "manifest.json").exists() or old.exists()):\n'
        '        os.replace(tmp if (tmp / "manifest.json").exists() else old, directory)\n',
        "    if rank() == 0 and not directory.exists() and (tmp.exists() or old.exists()):\n"
        "        os.replace(tmp if tmp.exists() else old, directory)\n",
        'tests/test_run_files.py -k "window and sera and files"',
    ),
    Mutant(
        "runtime_checkpoint_files_not_verified",
        "runtime",
        "--resume refuses, in one line naming it, a checkpoint or model file whose size or sha256 differs from its "
        "folder's manifest",
        "README",
        "sera.py",
        "        if found.get(name) != listed.get(name):\n",
        "        if name not in found:\n",
        'tests/test_run_files.py -k "damaged_step_checkpoint and sera"',
    ),
    Mutant(
        "runtime_run_files_not_verified",
        "runtime",
        "--resume refuses, in one line naming it, a run file (state, config, cached log-probs, pairs) that is not "
        "as the run wrote it",
        "README",
        "sera.py",
        '        if f"{len(data)} {hashlib.sha256(data).hexdigest()}" not in listed.get(path.name, []):\n',
        "        if path.name not in listed:\n",
        "tests/test_run_files.py::test_a_kill_between_a_run_file_and_its_manifest_resumes",
    ),
    Mutant(
        "runtime_run_file_previous_version_dropped",
        "runtime",
        "a kill between a run file's manifest entry and its rename resumes: the previous version stays listed",
        "README",
        "sera.py",
        "+ listed.get(path.name, [])[:1]",
        "+ []",
        "tests/test_run_files.py::test_a_kill_between_a_run_file_and_its_manifest_resumes",
    ),
    Mutant(
        "runtime_changed_inputs_accepted",
        "runtime",
        "--resume refuses a --dataset or --model whose contents changed since the run started, unless "
        "--allow_changed_inputs",
        "README",
        "sera.py",
        "    if started != digest and not RunFiles.allow_changed:\n",
        "    if False:\n",
        "tests/test_run_files.py::test_a_changed_model_is_refused_on_resume",
    ),
    Mutant(
        "runtime_write_fault_without_errno_kept",
        "runtime",
        "a write the file system refuses ends in one line naming the path and the errno's words, also where the "
        "writer drops the errno (torch.save's, inside DCP)",
        "README",
        "sera.py",
        '    probe = folder / f".write_probe_{os.getpid()}"\n',
        '    return None\n    probe = folder / f".write_probe_{os.getpid()}"\n',
        "tests/test_run_files.py::test_an_error_that_is_no_write_fault_stays_itself",
    ),
    Mutant(
        "runtime_resolved_config_rewritten",
        "runtime",
        "resolved_config.json is written when the run starts, not again on every --resume",
        "README",
        "sera.py",
        "            if config != RunFiles.saved:\n",
        "            if True:\n",
        'tests/test_run_files.py -k "config_once and sera"',
    ),
    Mutant(
        "runtime_tensorboard_thread_traceback",
        "runtime",
        "a write TensorBoard's writer thread cannot make ends in the one line of the main thread, no thread traceback",
        "README",
        "sera.py",
        '            threading.excepthook = lambda a: None if type(a.thread).__name__ == "_AsyncWriterThread"',
        "            threading.excepthook = lambda a: hook(a) if True",
        'tests/test_run_files.py -k "config_once and sera"',
    ),
    Mutant(
        "runtime_silent_checkpoint_write",
        "runtime",
        "a long checkpoint write prints what it has written every interval in a log, then its size and time",
        "README",
        "sera.py",
        "        while not done.wait(every):\n",
        "        while False:\n",
        'tests/test_logs.py -k "checkpoint_write_gives"',
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


def preload():
    """Import the heavy libraries once, here: each mutant's tests run in a fork of this process (a second or two
    each instead of a fresh interpreter's import of torch and transformers). The project's own modules are never
    imported here, so every fork imports them from the mutated copy."""
    os.environ.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py, before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (what torch.library's custom ops pull in)
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    import tyro  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401


def run_tests(copy: Path, tests: str, timeout: int) -> tuple[int, str, float]:
    """pytest on `tests` in a fork whose working folder and first import path are the copy; (exit code, output's
    end, seconds). Scripts the tests start as subprocesses find the copy through PYTHONPATH."""
    log, start = copy / ".mutant.log", time.time()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy)
            sys.path.insert(0, str(copy))
            os.environ["PYTHONPATH"] = str(copy)
            import pytest

            code = int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *shlex.split(tests)]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1, f"timed out after {timeout} s", time.time() - start
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    return os.waitstatus_to_exitcode(status), tail, time.time() - start


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
    preload()
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
