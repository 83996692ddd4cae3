import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from argse_cli.data.groups import get_class_to_group
from argse_cli.data.longtail import lt_class_counts
from argse_cli.data.splits import (
    HELDOUT,
    SPLITS,
    LeakError,
    check_disjoint,
    largest_remainder,
    make_splits,
    split_table,
    stratified_partition,
)
from argse_cli.errors import ArgseError

PAPER = {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6}


def official_like_labels(per_train=5000, per_test=1000, C=10, seed=0):
    """Labels shaped like official CIFAR: balanced classes, shuffled order."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(C), per_train))
    y_test = rng.permutation(np.repeat(np.arange(C), per_test))
    return y_train, y_test


@pytest.fixture(scope="module")
def c10():
    y_train, y_test = official_like_labels()
    counts = lt_class_counts(5000, 10, 100)
    c2g = get_class_to_group(counts, "quantile:0.5")
    return y_train, y_test, counts, c2g


@pytest.fixture(scope="module")
def paper(c10):
    y_train, y_test, counts, c2g = c10
    return make_splits(y_train, y_test, counts, "paper", None, c2g, seed=3)


# ---------------------------------------------------------------- largest remainder
def test_largest_remainder_hand_cases():
    f = [0.2, 0.1, 0.1, 0.6]
    assert largest_remainder(10, f).tolist() == [2, 1, 1, 6]
    # 7*f = 1.4, .7, .7, 4.2 -> floors 1,0,0,4; two left go to the .7 remainders
    assert largest_remainder(7, f).tolist() == [1, 1, 1, 4]
    # 2*f = .4, .2, .2, 1.2 -> floors 0,0,0,1; one left goes to .4
    assert largest_remainder(2, f).tolist() == [1, 0, 0, 1]
    assert largest_remainder(5, [0.5, 0.0, 0.5]).tolist() == [3, 0, 2]  # tie -> earlier
    assert largest_remainder(0, f).tolist() == [0, 0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 10_000),
    w=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=6).filter(
        lambda w: sum(w) > 1e-3
    ),
)
def test_largest_remainder_sums_and_is_within_one(n, w):
    f = np.array(w) / sum(w)
    counts = largest_remainder(n, f)
    assert counts.sum() == n
    assert (counts >= 0).all()
    assert (np.abs(counts - n * f) < 1 + 1e-9).all()
    assert (counts[f == 0] == 0).all()


# ---------------------------------------------------------------- stratification
def test_stratified_partition_keeps_class_proportions_within_one():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(6), [500, 137, 64, 23, 11, 5]))
    fr = {"a": 0.5, "b": 0.25, "c": 0.15, "d": 0.1}
    parts = stratified_partition(labels, fr, np.random.default_rng(1), np.zeros(6, np.int64))
    allpos = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(allpos), np.arange(len(labels)))  # a partition
    for c in range(6):
        n_c = (labels == c).sum()
        for s, f in fr.items():
            n_sc = (labels[parts[s]] == c).sum()
            assert abs(n_sc - f * n_c) < 1, (c, s, n_sc, f * n_c)


def test_group_fallback_keeps_small_class_group_represented():
    # group 0: two big classes; group 1: five classes with 2 images each.
    labels = np.repeat(np.arange(7), [100, 100, 2, 2, 2, 2, 2])
    c2g = np.array([0, 0, 1, 1, 1, 1, 1])
    parts = stratified_partition(labels, PAPER, np.random.default_rng(0), c2g)
    tail = {s: int((c2g[labels[p]] == 1).sum()) for s, p in parts.items()}
    # the 10 pooled tail images are allocated as a whole: largest_remainder(10) = 2/1/1/6
    assert tail == {"tuneV": 2, "val_small": 1, "calib": 1, "test": 6}
    # per-class allocation would have given each 2-image class to tuneV and test only
    assert all(v >= 1 for v in tail.values())


def test_group_fallback_single_two_image_class():
    labels = np.repeat(np.arange(3), [50, 50, 2])
    c2g = np.array([0, 0, 1])
    parts = stratified_partition(labels, PAPER, np.random.default_rng(0), c2g)
    got = {s: int((labels[p] == 2).sum()) for s, p in parts.items()}
    assert sum(got.values()) == 2 and got["test"] == 1 and got["tuneV"] == 1


# ---------------------------------------------------------------- make_splits, paper protocol
def test_paper_protocol_sizes_sources_labels(paper, c10):
    y_train, y_test, counts, c2g = c10
    tr = paper["train"]
    assert tr.source == "train" and len(tr) == 12406
    assert np.bincount(tr.labels, minlength=10).tolist() == counts.tolist()
    sizes = {"tuneV": 200, "val_small": 100, "calib": 100, "test": 600}
    for s in HELDOUT:
        part = paper[s]
        assert part.source == "test"
        assert np.bincount(part.labels, minlength=10).tolist() == [sizes[s]] * 10
    n_test = sum(len(paper[s]) for s in HELDOUT)
    assert n_test == len(y_test)
    for s in SPLITS:
        part = paper[s]
        y = y_train if part.source == "train" else y_test
        assert part.indices.dtype == np.int64 and (np.diff(part.indices) > 0).all()
        assert np.array_equal(part.labels, y[part.indices])
        assert np.array_equal(part.group, c2g[part.labels])
    assert np.array_equal(paper.class_counts, counts)
    assert np.array_equal(paper.class_to_group, c2g)
    check_disjoint(paper)  # passes on real splits


def test_paper_train_weights_are_one_and_heldout_weights(paper, c10):
    counts = c10[2]
    pi_train = counts / counts.sum()
    assert np.allclose(paper["train"].w_lt, 1.0)
    for s in HELDOUT:
        part = paper[s]
        # balanced split: pi_split = 1/10, so w_lt = 10 * pi_train(y) and w_bal = 1
        assert np.allclose(part.w_lt, 10 * pi_train[part.labels])
        assert np.allclose(part.w_bal, 1.0)


def _weighted_class_mass(part, w, C):
    return np.bincount(part.labels, weights=w, minlength=C)


@pytest.mark.parametrize("protocol", ["paper", "fractions"])
def test_weights_reproduce_target_distributions(c10, protocol):
    y_train, y_test, counts, c2g = c10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = make_splits(y_train, y_test, counts, protocol, None, c2g, seed=0)
    pi_train = counts / counts.sum()
    for s in SPLITS:
        part = res[s]
        present = np.bincount(part.labels, minlength=10) > 0
        m_lt = _weighted_class_mass(part, part.w_lt, 10)
        m_bal = _weighted_class_mass(part, part.w_bal, 10)
        # sum_i w_lt(i) 1{y_i = c} = n_split * pi_train(c) for every class present in the split
        assert np.allclose(m_lt[present], len(part) * pi_train[present])
        assert np.allclose(m_bal[present], len(part) / 10)
        assert np.isfinite(part.w_lt).all() and np.isfinite(part.w_bal).all()


def test_weights_with_absent_class():
    # a split missing a class: no rows for it, no division by zero
    y_train, y_test = official_like_labels(per_train=20, per_test=3, C=3)
    counts = np.array([20, 10, 2])
    res = make_splits(y_train, y_test, counts, "paper", PAPER, np.array([0, 0, 1]), seed=0)
    for s in SPLITS:
        assert np.isfinite(res[s].w_lt).all()


def test_deterministic_and_seed_dependent(c10):
    y_train, y_test, counts, c2g = c10
    a = make_splits(y_train, y_test, counts, "paper", None, c2g, seed=5)
    b = make_splits(y_train, y_test, counts, "paper", None, c2g, seed=5)
    c = make_splits(y_train, y_test, counts, "paper", None, c2g, seed=6)
    for s in SPLITS:
        assert np.array_equal(a[s].indices, b[s].indices)
    assert not np.array_equal(a["train"].indices, c["train"].indices)
    assert not np.array_equal(a["tuneV"].indices, c["tuneV"].indices)


# ---------------------------------------------------------------- fractions protocol
def test_fractions_protocol_carves_lt_subset_and_warns(c10):
    y_train, y_test, counts, _ = c10
    c2g = get_class_to_group(counts, "quantile:0.9")  # tail = class 9 alone, 50 LT images
    with pytest.warns(UserWarning, match="only") as rec:
        res = make_splits(y_train, y_test, counts, "fractions", None, c2g, seed=1)
    assert all(res[s].source == "train" for s in SPLITS)
    total = np.concatenate([res[s].indices for s in SPLITS])
    assert len(total) == 12406 == len(np.unique(total))
    assert np.bincount(y_train[total], minlength=10).tolist() == counts.tolist()
    small = [(s, g) for s, g, n in split_table(res) if n < 10]
    # tail = 50 images: 0.08*50 = 4, 0.06*50 = 3, 0.03*50 = 1.5 -> every held-out split < 10
    assert sorted(small) == sorted((s, 1) for s in HELDOUT)
    assert len(res.warnings) == len(small)
    assert len([w for w in rec if "only" in str(w.message)]) == len(small)
    check_disjoint(res)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "fr",
    [
        {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.5},  # sums to 0.9
        {"tuneV": 0.5, "val_small": -0.1, "calib": 0.1, "test": 0.5},  # negative
        {"tuneV": 0.2, "val_small": 0.1, "test": 0.7},  # missing split
    ],
)
def test_bad_fractions_refused(c10, fr):
    y_train, y_test, counts, c2g = c10
    with pytest.raises(ArgseError) as e:
        make_splits(y_train, y_test, counts, "paper", fr, c2g, seed=0)
    assert e.value.field == "fractions"


def test_unknown_protocol_refused(c10):
    y_train, y_test, counts, c2g = c10
    with pytest.raises(ArgseError) as e:
        make_splits(y_train, y_test, counts, "random", None, c2g)
    assert e.value.field == "protocol"


# ---------------------------------------------------------------- leak detection
def _with(res, name, **changes):
    splits = dict(res.splits)
    splits[name] = dataclasses.replace(res.splits[name], **changes)
    return dataclasses.replace(res, splits=splits)


def test_leak_test_index_moved_into_tuneV(paper):
    leaked = np.sort(np.append(paper["tuneV"].indices, paper["test"].indices[0]))
    with pytest.raises(LeakError, match="share"):
        check_disjoint(_with(paper, "tuneV", indices=leaked))
    assert issubclass(LeakError, AssertionError)


def test_leak_train_index_in_calib_paper(paper):
    bad = _with(paper, "calib", source="train", indices=paper["train"].indices[:1])
    with pytest.raises(LeakError, match="experts train on"):
        check_disjoint(bad)


def test_leak_train_index_in_calib_fractions(c10):
    y_train, y_test, counts, c2g = c10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = make_splits(y_train, y_test, counts, "fractions", None, c2g, seed=1)
    leaked = np.sort(np.append(res["calib"].indices, res["train"].indices[5]))
    with pytest.raises(LeakError, match="calib"):
        check_disjoint(_with(res, "calib", indices=leaked))


def test_leak_duplicate_inside_split(paper):
    dup = np.sort(np.append(paper["val_small"].indices, paper["val_small"].indices[0]))
    with pytest.raises(LeakError, match="repeats"):
        check_disjoint(_with(paper, "val_small", indices=dup))


def test_split_table(paper):
    rows = split_table(paper)
    assert len(rows) == len(SPLITS) * 2
    for s in SPLITS:
        assert sum(n for name, _, n in rows if name == s) == len(paper[s])
    assert ("tuneV", 0, 1000) in rows and ("tuneV", 1, 1000) in rows
    assert ("train", 1, 387 + 232 + 139 + 83 + 50) in rows
