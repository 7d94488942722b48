"""pipeline.judge.pairs: one pair per prompt from hand-made rewards, or the reason there is none."""

from __future__ import annotations

import pytest

from pipeline.judge.pairs import DROP_REASONS, Drop, Pair, draw_seed, make_pairs


def pair(completions, strategy="best_worst", min_margin=0.0, seed=0, prompt_id="p0"):
    return make_pairs(completions, strategy, min_margin, seed, prompt_id)


def test_best_worst_picks_the_highest_and_the_lowest():
    out = pair([(0, 0.2, "a"), (1, 0.9, "b"), (2, -0.5, "c"), (3, 0.4, "d")])
    assert isinstance(out, Pair)
    assert (out.chosen.sample, out.rejected.sample) == (1, 2)
    assert out.margin == pytest.approx(1.4)
    assert (out.chosen.text, out.rejected.text) == ("b", "c")


def test_best_worst_breaks_ties_by_the_lowest_sample():
    out = pair([(3, 1.0, "x"), (1, 1.0, "y"), (2, 0.0, "z"), (0, 0.0, "w")])
    assert (out.chosen.sample, out.rejected.sample) == (1, 0)


def test_ties_are_dropped():
    out = pair([(0, 0.5, "a"), (1, 0.5, "b"), (2, 0.5, "c")])
    assert isinstance(out, Drop) and out.reason == "tie"
    assert "0.5" in out.detail


def test_min_margin():
    rows = [(0, 0.30, "a"), (1, 0.25, "b")]
    assert isinstance(pair(rows, min_margin=0.01), Pair)
    out = pair(rows, min_margin=0.1)
    assert isinstance(out, Drop) and out.reason == "below_min_margin"
    assert isinstance(pair([(0, 1.0, "a"), (1, 0.0, "b")], min_margin=1.0), Pair)  # equal to it: kept


def test_single_sample_and_empty_completions():
    for rows in ([(0, 1.0, "only")], [(0, 1.0, "text"), (1, 0.0, ""), (2, -1.0, "  \n")], []):
        out = pair(rows)
        assert isinstance(out, Drop) and out.reason == "single_sample"
    out = pair([(0, 1.0, "text"), (1, 0.0, ""), (2, -1.0, "other")])  # the empty one takes no part
    assert (out.chosen.sample, out.rejected.sample) == (0, 2)


def test_identical_completions():
    out = pair([(0, 1.0, "same"), (1, 0.0, "same")])
    assert isinstance(out, Drop) and out.reason == "identical_completions"


def test_best_random_is_seeded_and_never_picks_the_chosen():
    rows = [(i, float(i == 3), f"t{i}") for i in range(8)]
    draws = {}
    for seed in range(20):
        out = pair(rows, "best_random", seed=seed)
        assert out.chosen.sample == 3 and out.rejected.sample != 3
        assert pair(rows, "best_random", seed=seed) == out  # the same draw every time
        draws[seed] = out.rejected.sample
    assert len(set(draws.values())) > 2  # the seed matters
    assert pair(rows, "best_random", seed=1, prompt_id="p1") == pair(rows, "best_random", seed=1, prompt_id="p1")
    assert draw_seed(0, "p0") != draw_seed(0, "p1") != draw_seed(1, "p1")


def test_best_random_tie_with_the_drawn_one_is_dropped():
    out = pair([(0, 1.0, "a"), (1, 1.0, "b")], "best_random")
    assert isinstance(out, Drop) and out.reason == "tie"


def test_every_reason_is_documented():
    assert set(DROP_REASONS) == {"single_sample", "tie", "below_min_margin", "identical_completions"}
    assert all(isinstance(v, str) and v for v in DROP_REASONS.values())
    with pytest.raises(ValueError):
        pair([(0, 1.0, "a"), (1, 0.0, "b")], "best_of_n")
