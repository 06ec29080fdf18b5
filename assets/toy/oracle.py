"""Toy letter task and its exact oracle reward (the default `--reward_fn` of the toy world).

Task. A user instruction asks to sort 3-7 distinct lowercase letters, written with single
spaces, into alphabetical order:

    "Sort these letters: q d m a"  ->  "a d m q"

Reward. `score(prompt, response)` finds the instruction in `prompt` (the last match, so any text
before it, e.g. an OPSR score prefix or the Sr-DPO refinement prompt, is ignored), computes the
perfect answer, splits `response` on whitespace and gives per-position credit:

    score = 10 * #{i : response_i == answer_i} / max(len(answer), len(response))

Comparisons are exact (case-sensitive), so a perfect answer scores 10, an empty answer 0, random
letters about 0.2, missing or extra letters cost credit, and the score is deterministic. A prompt
without the instruction raises ValueError.

Corruption model (used to build the toy data, and what the toy model imitates). A wrong letter
is always the alphabetic successor of the right one (z -> a, Z -> A); `corrupt(answer, level, rng)`
makes each position wrong independently with probability `level`, so the expected score is
exactly 10 * (1 - level). `base_error_rate(letter)` is the per-letter error rate of the shipped
toy model's plain (un-prefixed) answers: letters a-m are "easy" (20% wrong), n-z "hard" (70%
wrong), which makes both its sampled and its greedy answers mid-range.

This file imports nothing from the repository; copy it anywhere.
"""

import random
import re
import string

MIN_LETTERS, MAX_LETTERS = 3, 7
EASY_ERROR_RATE, HARD_ERROR_RATE = 0.2, 0.7

# The task as it appears in a user turn; `search` for the last match, so prefixes do not matter.
TASK_PATTERN = re.compile(r"\bSort these letters:((?: [a-z])+)")


def parse_letters(prompt: str) -> list[str]:
    """The letters of the last task instruction found in `prompt`."""
    matches = list(TASK_PATTERN.finditer(prompt))
    if not matches:
        raise ValueError(f"no toy task found in prompt {prompt[:80]!r}; expected e.g. 'Sort these letters: q d m a'")
    return matches[-1].group(1).split()


def perfect_answer(prompt: str) -> str:
    return " ".join(sorted(parse_letters(prompt)))


def score(prompt: str, response: str) -> float:
    """Oracle reward in [0, 10]: per-position exact-match credit against the perfect answer."""
    answer = sorted(parse_letters(prompt))
    produced = response.split()
    matches = sum(a == b for a, b in zip(answer, produced))
    return 10.0 * matches / max(len(answer), len(produced))


def make_prompt(rng: random.Random) -> str:
    """One random instruction with 3-7 distinct lowercase letters."""
    letters = rng.sample(string.ascii_lowercase, rng.randint(MIN_LETTERS, MAX_LETTERS))
    return f"Sort these letters: {' '.join(letters)}"


def wrong_letter(letter: str) -> str:
    """The one systematic mistake: the alphabetic successor (z -> a), case preserved."""
    alphabet = string.ascii_uppercase if letter.isupper() else string.ascii_lowercase
    return alphabet[(alphabet.index(letter) + 1) % 26]


def corrupt(answer: str, level: float, rng: random.Random) -> str:
    """Make each letter of `answer` wrong independently with probability `level` (0 = perfect)."""
    return " ".join(wrong_letter(c) if rng.random() < level else c for c in answer.split())


def base_error_rate(letter: str) -> float:
    """Per-letter error rate of the toy model's plain answers (letters a-m easy, n-z hard)."""
    return EASY_ERROR_RATE if letter.lower() <= "m" else HARD_ERROR_RATE


def base_answer(prompt: str, rng: random.Random) -> str:
    """A sample of the mediocre plain-prompt behaviour the toy model is trained to imitate."""
    return " ".join(wrong_letter(c) if rng.random() < base_error_rate(c) else c for c in perfect_answer(prompt).split())


def garbage(rng: random.Random) -> str:
    """Random letters of random length: the reference point for 'about 0'."""
    return " ".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
