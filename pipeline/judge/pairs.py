"""One preference pair per prompt from its judged completions, or the reason there is none.

    outcome = make_pairs([(0, 0.9, "Blue."), (1, 0.1, "Red."), (2, 0.4, "")],
                         strategy="best_worst", min_margin=0.0, seed=0, prompt_id="p0")
    if isinstance(outcome, Pair): outcome.chosen.sample, outcome.rejected.sample, outcome.margin  # 0, 1, 0.8
    else: outcome.reason, outcome.detail                     # a key of DROP_REASONS, and why

A pure function of its arguments. Completions whose text is empty (or only whitespace) take no
part (the stage counts them as ``empty_completion``). Then:

- best_worst: chosen is the highest reward, rejected the lowest; ties are broken by the lowest
  sample number (the first sample with the best reward, and the first with the worst).
- best_random: chosen as above; rejected drawn uniformly among the other completions (never the
  chosen one), with ``random.Random`` seeded by the fingerprint of (seed, prompt_id): the same
  draw on every run and machine, independent of the other prompts.

The pair is then dropped when its rewards are equal (``tie``), when its margin is below a positive
``min_margin`` (``below_min_margin``), or when both texts are the same (``identical_completions``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from pipeline.store import fingerprint

DROP_REASONS: dict[str, str] = {
    # fewer than two completions with text: nothing to compare (K=1, or the others were empty)
    "single_sample": "fewer than 2 completions with non-empty text",
    # the pair's two rewards are equal: no preference to learn
    "tie": "the chosen and rejected completions have the same reward",
    # pairs.min_margin > 0 and the reward gap is smaller: too close to trust the judge's order
    "below_min_margin": "the reward margin is below pairs.min_margin",
    # different samples, same text (and different rewards): DPO would push the same response up and down
    "identical_completions": "the chosen and rejected completions have the same text",
}
STRATEGIES = ("best_worst", "best_random")


@dataclass(frozen=True)
class Completion:
    sample: int
    reward: float
    text: str


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    chosen: Completion
    rejected: Completion

    @property
    def margin(self) -> float:
        return self.chosen.reward - self.rejected.reward


@dataclass(frozen=True)
class Drop:
    prompt_id: str
    reason: str  # a key of DROP_REASONS
    detail: str


def draw_seed(seed: int, prompt_id: str) -> int:
    """best_random's seed for one prompt: from the pair seed and the prompt alone."""
    return int(fingerprint({"pairs_seed": seed, "prompt_id": prompt_id})[:16], 16)


def make_pairs(completions: Sequence[tuple[int, float, str]], strategy: str, min_margin: float, seed: int,
               prompt_id: str) -> Pair | Drop:
    """The pair of one prompt's completions ``(sample, reward, text)``, or why there is none."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairs strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    found = [Completion(int(s), float(r), t) for s, r, t in completions]
    usable = sorted((c for c in found if c.text.strip()), key=lambda c: c.sample)
    if len(usable) < 2:
        empty = len(found) - len(usable)
        return Drop(prompt_id, "single_sample", f"{len(usable)} completion(s) with text of {len(found)} "
                    f"({empty} empty)")
    chosen = min(usable, key=lambda c: (-c.reward, c.sample))
    if strategy == "best_worst":
        rejected = min(usable, key=lambda c: (c.reward, c.sample))
    else:
        others = [c for c in usable if c.sample != chosen.sample]
        rejected = random.Random(draw_seed(seed, prompt_id)).choice(others)
    pair = Pair(prompt_id, chosen, rejected)
    samples = f"samples {chosen.sample} and {rejected.sample}"
    if chosen.reward == rejected.reward:
        return Drop(prompt_id, "tie", f"{samples} both rewarded {chosen.reward!r}")
    if min_margin > 0 and pair.margin < min_margin:
        return Drop(prompt_id, "below_min_margin", f"margin {pair.margin:.6g} < pairs.min_margin {min_margin:g} "
                    f"({samples})")
    if chosen.text == rejected.text:
        return Drop(prompt_id, "identical_completions", f"{samples} have the same text")
    return pair
