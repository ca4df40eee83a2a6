"""k-NN and metrics checked against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

from reddino.eval.knn import knn_predict
from reddino.eval.metrics import classification_metrics, confusion_matrix
from reddino.eval.protocols import grouped_kfold


@pytest.mark.parametrize("k", [1, 5, 20])
def test_euclidean_uniform_knn_matches_sklearn(k):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    test = rng.normal(size=(120, 16)).astype(np.float32)
    expected = KNeighborsClassifier(n_neighbors=k).fit(train, labels).predict(test)
    got = knn_predict(
        torch.from_numpy(train),
        torch.from_numpy(labels),
        torch.from_numpy(test),
        k,
        4,
        "euclidean",
        None,
        chunk_size=50,
    )
    assert (got.numpy() == expected).mean() > 0.99  # only exact distance ties may differ


def test_cosine_weighted_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # k=3: class 1 has two votes but class 0's single vote is much closer; with T small it wins
    assert knn_predict(train, labels, query, 3, 2, "cosine", 0.01, 8).item() == 0
    assert knn_predict(train, labels, query, 3, 2, "euclidean", None, 8).item() == 1
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, query, 3, 2, "cosine", None, 8)


def test_metrics_match_sklearn_with_absent_classes():
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 1, 2, 4], size=200, p=[0.5, 0.2, 0.2, 0.1])  # class 3 absent, 5 absent
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 6, 200))
    got = classification_metrics(torch.from_numpy(y_true), torch.from_numpy(y_pred), 6)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert got["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_metrics_hand_checked_tiny_case():
    y_true = torch.tensor([0, 0, 0, 1])
    y_pred = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(y_true, y_pred, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    # F1 class0 = 0.8, class1 = 2/3; weighted by support 3:1
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    assert confusion_matrix(y_true, y_pred, 2).tolist() == [[2, 1], [0, 1]]


def test_grouped_kfold_never_splits_a_group():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), 20)
    labels = rng.integers(0, 3, groups.size)
    folds = list(grouped_kfold(labels, groups, 5, seed=0))
    assert len(folds) == 5
    tested = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tested), np.arange(groups.size))
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(ValueError, match="at least 5 groups"):
        next(grouped_kfold(labels[:40], groups[:40], 5, seed=0))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_one_search_for_every_k_equals_one_search_per_k(metric):
    """knn_predict_many finds the max(ks) neighbours once; each k must vote as its own search would,
    and the uniform-vote rule must equal scikit-learn's KNeighborsClassifier for every k."""
    from reddino.eval.knn import knn_predict_many

    rng = np.random.default_rng(7)
    train = torch.from_numpy(rng.normal(size=(400, 12)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 5, 400))
    test = torch.from_numpy(rng.normal(size=(150, 12)).astype(np.float32))
    ks = [1, 5, 20]
    many = knn_predict_many(train, labels, test, ks, 5, metric, 0.07, chunk_size=64)
    for k in ks:
        single = knn_predict(train, labels, test, k, 5, metric, 0.07, chunk_size=150)
        assert torch.equal(many[k], single), k
        if metric == "euclidean":
            expected = (
                KNeighborsClassifier(n_neighbors=k).fit(train.numpy(), labels.numpy()).predict(test.numpy())
            )
            assert (many[k].numpy() == expected).mean() > 0.99  # distance ties aside


def test_degenerate_features_and_one_class_probes_are_flagged():
    """A constant CLS (a random ViT with LayerScale 1e-5) or a probe stuck on one class gets a flag in
    results.json and in the table instead of passing as a row of numbers."""
    from reddino.eval.protocols import make_splits
    from reddino.eval.session import degeneracy_warnings, results_table, score_feature_set

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.r_[np.zeros(70), np.ones(30)].astype(np.int64)[rng.permutation(100)])
    groups = np.arange(100) % 10
    splits = make_splits("grouped_kfold", labels.numpy(), groups, None, None, 5, 0)
    probes = {
        "linear": {"enabled": False},
        "knn": {
            "enabled": True,
            "ks": [1, 20],
            "metric": "euclidean",
            "temperature": 0.07,
            "chunk_size": 64,
            "device": "auto",
        },
    }
    informative = torch.from_numpy(rng.normal(size=(100, 8)).astype(np.float32)) + 3 * labels[:, None]
    constant = torch.full((100, 8), 5.0) + 1e-5 * torch.randn(100, 8)
    results = {
        "good": score_feature_set(informative, labels, splits, ["a", "b"], probes, False),
        "flat": score_feature_set(constant, labels, splits, ["a", "b"], probes, False),
    }
    assert results["good"]["knn1"]["flags"] == []
    assert results["flat"]["knn1"]["flags"][0].startswith("constant_features")
    assert any(f.startswith("predicts_one_class") for f in results["flat"]["knn20"]["flags"])
    warnings = degeneracy_warnings(results)
    assert warnings and all(w.startswith("flat / ") for w in warnings)
    table = results_table(results)
    assert "| flags |" in table.splitlines()[0] and "constant_features" in table


def test_probe_device_auto_is_the_gpu_when_there_is_one():
    from reddino.eval.linear import probe_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert probe_device("auto").type == expected and probe_device("cpu").type == "cpu"
