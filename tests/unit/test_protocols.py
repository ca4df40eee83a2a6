"""Split protocols: grouped folds never leak an image, LOSO holds each source out once, errors are clear."""

from __future__ import annotations

import numpy as np
import pytest

from reddino.eval.protocols import (
    Split,
    check_no_group_leakage,
    fixed_split,
    grouped_kfold,
    leave_one_group_out,
    make_splits,
    stratified_kfold,
)


@pytest.fixture()
def table() -> dict[str, np.ndarray]:
    """60 images of 10 cells; 3 sources of 20 images; 4 classes with proportions 40/30/20/10%."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 10)
    labels = rng.choice(4, size=600, p=[0.4, 0.3, 0.2, 0.1])
    sources = np.array(["chula", "elsafty", "dse"])[groups // 20]
    splits = np.where(groups % 5 == 0, "test", "train")
    return {"labels": labels, "groups": groups, "sources": sources, "splits": splits}


def test_grouped_kfold_has_no_group_on_both_sides_and_covers_every_row(table):
    folds = make_splits("grouped_kfold", table["labels"], table["groups"], None, None, 5, seed=0)
    assert [s.name for s in folds] == [f"fold{i}" for i in range(5)]
    for split in folds:
        assert not set(table["groups"][split.train_idx]) & set(table["groups"][split.test_idx])
        assert len(split.train_idx) + len(split.test_idx) == 600
    assert sorted(np.concatenate([s.test_idx for s in folds]).tolist()) == list(range(600))


def test_ungrouped_reference_folds_leak_images_and_keep_class_proportions(table):
    labels = table["labels"]
    folds = list(stratified_kfold(labels, 5, seed=None))
    overall = np.bincount(labels, minlength=4) / len(labels)
    for _, test_idx in folds:
        assert len(test_idx) == 120
        np.testing.assert_allclose(np.bincount(labels[test_idx], minlength=4) / 120, overall, atol=0.01)
    # ungrouped folds put cells of one image on both sides: the leakage grouped folds avoid. Unshuffled
    # (the reference) on image-ordered rows only the images straddling fold boundaries leak; shuffled, most.
    groups = table["groups"]
    train, test = folds[0]
    assert 1 <= len(set(groups[train]) & set(groups[test])) <= 15
    train, test = next(stratified_kfold(labels, 5, seed=0))
    assert len(set(groups[train]) & set(groups[test])) > 30


def test_unshuffled_reference_folds_are_order_based():
    labels = np.array([0, 1] * 10)
    first_test = next(stratified_kfold(labels, 5, seed=None))[1]
    assert first_test.tolist() == [0, 1, 2, 3]


def test_loso_holds_out_each_source_exactly_once(table):
    splits = make_splits("loso", table["labels"], table["groups"], table["sources"], None, 5, seed=0)
    assert [s.name for s in splits] == ["loso:chula", "loso:dse", "loso:elsafty"]
    for split in splits:
        held = split.name.removeprefix("loso:")
        assert set(table["sources"][split.test_idx]) == {held}
        assert held not in set(table["sources"][split.train_idx])
        assert len(split.train_idx) + len(split.test_idx) == 600


def test_leave_one_group_out_yields_names():
    out = list(leave_one_group_out(np.array(["b", "a", "b"])))
    assert [(tr.tolist(), te.tolist(), name) for tr, te, name in out] == [
        ([0, 2], [1], "a"),
        ([1], [0, 2], "b"),
    ]


def test_fixed_split_uses_the_tags_and_ignores_others():
    train, test = fixed_split(np.array(["train", "test", "val", "train"]))
    assert train.tolist() == [0, 3]
    assert test.tolist() == [1]


def test_fixed_protocol_checks_groups(table):
    (split,) = make_splits("fixed", table["labels"], table["groups"], None, table["splits"], 5, seed=0)
    assert (split.name, len(split.test_idx)) == ("fixed", 120)
    leaky = np.where(np.arange(600) % 2 == 0, "train", "test")  # alternate cells: every image split
    with pytest.raises(ValueError, match="60 groups on both sides"):
        make_splits("fixed", table["labels"], table["groups"], None, leaky, 5, seed=0)


@pytest.mark.parametrize(
    ("protocol", "kwargs", "message"),
    [
        ("grouped_kfold", {"groups": np.repeat(np.arange(3), 200)}, "at least 5 groups, got 3"),
        ("grouped_kfold", {"groups": None}, "needs groups"),
        ("loso", {"sources": np.array(["chula"] * 600)}, "at least 2 sources"),
        ("loso", {"sources": None}, "needs a source"),
        ("fixed", {"splits": np.array(["train"] * 600)}, r"no rows tagged \['test'\]"),
        ("fixed", {"splits": None}, "needs a split tag"),
        ("bootstrap", {}, "unknown protocol"),
        ("loso", {"sources": np.array(["a", "b"])}, "sources has 2 rows but labels has 600"),
    ],
)
def test_protocols_that_cannot_be_formed_say_why(table, protocol, kwargs, message):
    args = {"groups": None, "sources": None, "splits": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_splits(protocol, table["labels"], args["groups"], args["sources"], args["splits"], 5, seed=0)


def test_loso_refuses_an_image_spanning_two_sources(table):
    sources = table["sources"].copy()
    sources[0] = "elsafty"  # one cell of image 0 (a chula image) relabelled: image 0 now spans sources
    with pytest.raises(ValueError, match="groups on both sides"):
        make_splits("loso", table["labels"], table["groups"], sources, None, 5, seed=0)


def test_check_no_group_leakage_accepts_disjoint_sides():
    check_no_group_leakage(Split("ok", np.array([0, 1]), np.array([2])), np.array([7, 7, 8]))


def test_grouped_kfold_is_seeded(table):
    a = [te.tolist() for _, te in grouped_kfold(table["labels"], table["groups"], 5, seed=3)]
    b = [te.tolist() for _, te in grouped_kfold(table["labels"], table["groups"], 5, seed=3)]
    c = [te.tolist() for _, te in grouped_kfold(table["labels"], table["groups"], 5, seed=4)]
    assert a == b
    assert a != c
