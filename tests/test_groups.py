import numpy as np
import pytest

from argse_cli.data.groups import (
    default_group_rule,
    get_class_to_group,
    group_names,
    parse_group_rule,
)
from argse_cli.data.longtail import lt_class_counts
from argse_cli.errors import ArgseError

C10 = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])


def test_quantile_half_cifar10_five_head_five_tail():
    g = get_class_to_group(C10, "quantile:0.5")
    assert g.dtype == np.int64
    assert g.tolist() == [0] * 5 + [1] * 5


def test_threshold20_refuses_cifar10_if100():
    with pytest.raises(ArgseError) as e:
        get_class_to_group(C10, "threshold:20")
    assert e.value.field == "groups"
    assert "threshold:20 leaves group 1 (tail) empty" in e.value.problem
    assert "quantile:0.5" in e.value.fix


def test_threshold20_cifar100_if100():
    counts = lt_class_counts(500, 100, 100)
    g = get_class_to_group(counts, "threshold:20")
    # n_c <= 20  <=>  500 * 100^(-c/99) < 21  <=>  c > 99 * ln(500/21) / ln(100) = 68.15
    assert g.tolist() == [0] * 69 + [1] * 31
    assert np.array_equal(g == 1, counts <= 20)


def test_threshold_empty_head_refused():
    with pytest.raises(ArgseError) as e:
        get_class_to_group(C10, "threshold:5000")
    assert "group 0 (head) empty" in e.value.problem


def test_quantile_unsorted_counts_and_ties():
    assert get_class_to_group(np.array([1, 100, 50, 2]), "quantile:0.5").tolist() == [1, 0, 0, 1]
    # ties broken by class index: lower index ranks first
    assert get_class_to_group(np.array([5, 5, 5, 5]), "quantile:0.5").tolist() == [0, 0, 1, 1]
    # ceil(q*C): 0.5 of 5 classes -> 3 head
    assert get_class_to_group(np.array([9, 8, 7, 6, 5]), "quantile:0.5").tolist() == [
        0, 0, 0, 1, 1,
    ]  # fmt: skip


def test_three_groups():
    # 0.3*10 is 3.0000000000000004 in floats; the head must still be exactly 3 classes.
    g = get_class_to_group(C10, "quantile:0.3,0.7")
    assert g.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert group_names(3) == ["head", "medium", "tail"]


def test_quantile_empty_group_refused():
    with pytest.raises(ArgseError) as e:
        get_class_to_group(np.array([10, 5]), "quantile:0.3,0.7")
    assert e.value.field == "groups" and "empty" in e.value.problem


@pytest.mark.parametrize(
    "rule",
    ["foo", "quantile:", "quantile:1.5", "quantile:0", "quantile:0.7,0.3", "quantile:0.5,0.5",
     "threshold:-1", "threshold:2.5", "threshold:1,2", "median:0.5", "quantile:nan", ""],
)  # fmt: skip
def test_bad_rule_syntax(rule):
    with pytest.raises(ArgseError) as e:
        parse_group_rule(rule)
    assert e.value.field == "groups"


def test_parse_good_rules():
    r = parse_group_rule("threshold:20")
    assert (r.kind, r.values, r.num_groups) == ("threshold", (20.0,), 2)
    r = parse_group_rule("quantile:0.3,0.7")
    assert (r.kind, r.values, r.num_groups) == ("quantile", (0.3, 0.7), 3)


def test_default_rules():
    assert default_group_rule("cifar10") == "quantile:0.5"
    assert default_group_rule("cifar100") == "threshold:20"
    with pytest.raises(ArgseError):
        default_group_rule("imagenet")
