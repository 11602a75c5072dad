"""Selection: exact counts, class balance, the strategies' definitions, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.data import ScoreTable, class_quotas, kept_count, select
from prunekit.data.strategies.ccs import CCS
from prunekit.errors import PrunekitError


def table(values, labels=None, harder="higher") -> ScoreTable:
    values = np.asarray(values, dtype=np.float64)
    return ScoreTable({"s": values}, None if labels is None else np.asarray(labels),
                      None if labels is None else [str(v) for v in labels], {"scores": {"s": {"harder": harder}}})


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 400), ratio=st.floats(0.0, 0.999), strategy=st.sampled_from(["hardest", "easiest", "middle", "random", "ccs"]),
       balance=st.sampled_from(["none", "proportional", "equal"]), classes=st.integers(1, 7), seed=st.integers(0, 5))
def test_exact_counts_for_every_strategy_and_balance(total, ratio, strategy, balance, classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=total)
    values = rng.normal(size=total).round(1)  # ties on purpose
    selection = select(table(values, labels), "s", ratio=ratio, strategy=strategy, balance=balance, seed=seed)
    expected = max(1, int(np.floor((1 - ratio) * total + 0.5)))
    assert len(selection) == expected == kept_count(total, ratio)
    assert np.all(np.diff(selection.indices) > 0) and selection.indices.min() >= 0 and selection.indices.max() < total
    if balance == "proportional":
        quotas = class_quotas(labels, expected, "proportional")
        for label, quota in quotas.items():
            assert int((labels[selection.indices] == label).sum()) == quota
            share = expected * (labels == label).sum() / total
            assert abs(quota - share) < 1  # every class keeps its share, rounded
    again = select(table(values, labels), "s", ratio=ratio, strategy=strategy, balance=balance, seed=seed)
    assert np.array_equal(again.indices, selection.indices)


def test_equal_balance_gives_small_classes_everything_and_shares_the_rest():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 50)
    quotas = class_quotas(labels, 60, "equal")
    assert quotas == {0: 25, 1: 10, 2: 25}
    assert sum(class_quotas(labels, 160, "equal").values()) == 160


def test_proportional_quotas_use_largest_remainders():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert class_quotas(labels, 5, "proportional") == {0: 3, 1: 1, 2: 1}  # 2.5, 1.5, 1.0 -> the larger class rounds up


def test_hardest_easiest_and_middle_by_definition():
    values = np.arange(10, dtype=float)  # row i has score i
    assert select(table(values), ratio=0.7, strategy="hardest").indices.tolist() == [7, 8, 9]
    assert select(table(values), ratio=0.7, strategy="easiest").indices.tolist() == [0, 1, 2]
    assert select(table(values), ratio=0.6, strategy="middle").indices.tolist() == [3, 4, 5, 6]
    assert select(table(values), ratio=0.7, strategy="middle", start=0.2).indices.tolist() == [5, 6, 7]
    # a score where lower is harder (AUM) flips the ends
    assert select(table(values, harder="lower"), ratio=0.7, strategy="hardest").indices.tolist() == [0, 1, 2]


def test_ties_are_broken_at_random_not_by_row_order():
    values = np.zeros(1000)
    picks = [select(table(values), count=100, strategy="hardest", seed=s).indices for s in range(3)]
    assert all(p.mean() > 300 for p in picks)  # row order would give 0..99 (mean 49.5)
    assert not np.array_equal(picks[0], picks[1])


def test_class_balanced_hardest_keeps_the_hardest_of_each_class():
    labels = np.array([0] * 6 + [1] * 4)
    values = np.array([1, 2, 3, 4, 5, 6, 10, 20, 30, 40], dtype=float)
    kept = select(table(values, labels), ratio=0.5, strategy="hardest", balance="proportional").indices
    assert kept.tolist() == [3, 4, 5, 8, 9]
    unbalanced = select(table(values, labels), ratio=0.5, strategy="hardest").indices
    assert unbalanced.tolist() == [5, 6, 7, 8, 9]


def test_ccs_cuts_the_hardest_and_covers_every_stratum():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, 900), rng.uniform(1, 10, 100)])  # a long hard tail
    strategy = CCS(hard_cut=0.05, strata=10)
    kept = select(values, count=100, strategy=strategy, seed=1).indices
    hardest_50 = np.argsort(-values)[:50]
    assert not set(kept) & set(hardest_50)
    remaining = np.setdiff1d(np.arange(1000), hardest_50)
    low, high = values[remaining].min(), values[remaining].max()
    bins = np.minimum(((values[remaining] - low) / (high - low) * 10).astype(int), 9)
    kept_bins = np.minimum(((values[kept] - low) / (high - low) * 10).astype(int), 9)
    for b in np.unique(bins):
        size = int((bins == b).sum())
        # a stratum smaller than its share is kept whole
        if size <= 10:
            assert int((kept_bins == b).sum()) == size
        else:
            assert int((kept_bins == b).sum()) >= 1
    # versus hardest-first: CCS keeps many easy examples, hardest keeps none
    assert (values[kept] < 1).sum() > 30


def test_ccs_reduces_the_cut_when_the_budget_needs_the_examples():
    values = np.arange(100, dtype=float)
    selection = select(values, ratio=0.05, strategy="ccs", hard_cut=0.1)
    assert len(selection) == 95 and "hard_cut_reduced" in selection.meta["strategy_notes"]
    assert selection.meta["strategy_notes"]["hard_examples_cut"] == 5


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_fractions_outside_zero_one_are_refused(ratio):
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        select(table(np.arange(10.0)), ratio=ratio)


def test_the_kept_fraction_is_still_read_with_a_warning(capsys):
    assert select(table(np.arange(10.0)), keep=0.3).indices.tolist() == [7, 8, 9]
    assert "'keep' is deprecated" in capsys.readouterr().err


def test_other_bad_selections():
    scores = table(np.arange(10.0))
    with pytest.raises(PrunekitError, match="either"):
        select(scores)
    with pytest.raises(PrunekitError, match="either"):
        select(scores, ratio=0.5, count=3)
    with pytest.raises(PrunekitError, match="between 1 and the 10"):
        select(scores, count=11)
    with pytest.raises(PrunekitError, match="needs labels"):
        select(scores, ratio=0.5, balance="proportional")
    with pytest.raises(PrunekitError, match="unknown selection strategy"):
        select(scores, ratio=0.5, strategy="best")
    with pytest.raises(PrunekitError, match="missing or infinite"):
        select(np.array([1.0, np.nan, 2.0]), ratio=0.5)
    with pytest.raises(PrunekitError, match="no score 'el2n'"):
        select(scores, "el2n", ratio=0.5)
    with pytest.raises(PrunekitError, match="hard_cut"):
        select(scores, ratio=0.5, strategy="ccs", hard_cut=1.5)


def test_removing_nothing_returns_everything():
    assert select(table(np.arange(7.0)), ratio=0.0).indices.tolist() == list(range(7))


def test_strategy_settings_are_validated_in_one_line_when_built():
    from prunekit.data import STRATEGIES

    with pytest.raises(PrunekitError) as caught:
        select(np.arange(10.0), ratio=0.5, strategy={"ccs": {"hardcut": 0.2}})
    assert str(caught.value) == "selection strategy ccs has no setting 'hardcut'; its settings are: hard_cut, strata"
    with pytest.raises(PrunekitError, match="^selection strategy middle: start: Input should be less than or equal to 1$"):
        STRATEGIES.build("middle", start=1.5)
    with pytest.raises(PrunekitError, match="either in the object or as keywords"):
        select(np.arange(10.0), ratio=0.5, strategy=STRATEGIES.build("ccs"), hard_cut=0.2)
    chooser = STRATEGIES.build({"name": "middle", "start": 0.2})
    selection = select(np.arange(10.0), ratio=0.5, strategy=chooser)
    assert selection.meta["strategy"] == {"name": "middle", "start": 0.2}
    assert selection.meta["strategy_notes"] == {"skipped_hardest": 2}
