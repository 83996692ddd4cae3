import numpy as np
import pytest

from argse_cli.data.longtail import lt_class_counts, lt_class_counts_from_labels, lt_subsample
from argse_cli.errors import ArgseError


def test_cifar10_if100_counts_exact():
    counts = lt_class_counts(5000, 10, 100)
    assert counts.dtype == np.int64
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts.sum() == 12406


def test_cifar100_if100_total():
    counts = lt_class_counts(500, 100, 100)
    assert counts.sum() == 10847
    assert counts[0] == 500 and counts[-1] == 5  # n_max and n_max / IF
    assert (np.diff(counts) <= 0).all()


def test_floor_guard_against_float_error():
    # 1024 * 64^(-c/6) = 1024 * 2^(-c) exactly; in floats c=5 evaluates to 31.999999999999996.
    assert lt_class_counts(1024, 7, 64).tolist() == [1024, 512, 256, 128, 64, 32, 16]


def test_balanced_and_single_class():
    assert lt_class_counts(300, 4, 1).tolist() == [300] * 4
    assert lt_class_counts(7, 1, 50).tolist() == [7]


@pytest.mark.parametrize("bad", [0.5, 0.0, -3.0, float("nan")])
def test_imbalance_factor_below_one_refused(bad):
    with pytest.raises(ArgseError) as e:
        lt_class_counts(5000, 10, bad)
    assert e.value.field == "imbalance_factor"


def test_imbalance_factor_leaving_empty_class_refused():
    with pytest.raises(ArgseError) as e:
        lt_class_counts(10, 10, 100)  # last class: floor(10 / 100) = 0
    assert e.value.field == "imbalance_factor"


def test_counts_from_labels_uses_smallest_class():
    y = np.repeat(np.arange(3), [40, 50, 60])
    assert lt_class_counts_from_labels(y, 3, 4).tolist() == [40, 20, 10]


def test_lt_subsample_counts_sorted_deterministic():
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 500))
    counts = lt_class_counts(500, 10, 100)
    idx = lt_subsample(y, counts, np.random.default_rng(7))
    assert idx.dtype == np.int64
    assert (np.diff(idx) > 0).all()  # sorted, no duplicates
    assert np.bincount(y[idx], minlength=10).tolist() == counts.tolist()
    again = lt_subsample(y, counts, np.random.default_rng(7))
    other = lt_subsample(y, counts, np.random.default_rng(8))
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx, other)


def test_lt_subsample_too_few_images():
    y = np.repeat(np.arange(2), [5, 3])
    with pytest.raises(ArgseError):
        lt_subsample(y, np.array([5, 4]), np.random.default_rng(0))
