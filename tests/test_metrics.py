"""Evaluation metrics against scikit-learn (where installed) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmap_fast.train.evaluate import classification_metrics, confusion_matrix, recall_at_k, roc_auc, roc_curve

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (via nilearn) is the reference here")


def _random_problem(seed: int, s: int = 60, k: int = 4, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, s)
    logits = rng.normal(size=(s, k)) + 1.5 * np.eye(k)[labels]
    if ties:
        logits = np.round(logits)  # many equal scores
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_matches_sklearn(seed, ties):
    probs, labels = _random_problem(seed, ties=ties)
    m = classification_metrics(probs, labels, ["a", "b", "c", "d"])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, pred))
    assert m["auc_macro"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, probs, multi_class="ovr"))
    assert m["f1_macro"] == pytest.approx(sklearn_metrics.f1_score(labels, pred, average="macro", zero_division=0))
    assert np.array_equal(m["confusion_matrix"], sklearn_metrics.confusion_matrix(labels, pred, labels=range(4)))
    recall = sklearn_metrics.recall_score(labels, pred, average=None, zero_division=0)
    for c, name in enumerate("abcd"):
        assert m["per_class"][name]["sensitivity"] == pytest.approx(recall[c])
        negatives = labels != c
        assert m["per_class"][name]["specificity"] == pytest.approx((pred[negatives] != c).mean())
        assert m["per_class"][name]["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels == c, probs[:, c]))
    assert m["chance_accuracy"] == pytest.approx(np.bincount(labels).max() / len(labels))
    assert m["auc_undefined"] == []


def test_roc_curve_area_equals_auc():
    probs, labels = _random_problem(3, ties=True)
    fpr, tpr = roc_curve(probs[:, 0], labels == 0)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(labels == 0, probs[:, 0], drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(probs[:, 0], labels == 0))


def test_perfect_and_reversed_scores():
    y = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    assert roc_auc([0.1, 0.2], [1, 1]) is None


def test_absent_class_is_left_out_of_macro_auc():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    labels = np.array([0, 1, 0, 1])  # class 2 never occurs
    m = classification_metrics(probs, labels, ["x", "y", "z"])
    assert m["auc_undefined"] == ["z"] and m["per_class"]["z"]["auc"] is None
    assert m["auc_macro"] == pytest.approx(1.0)
    assert m["per_class"]["z"]["f1"] == 0.0 and m["per_class"]["z"]["specificity"] == 1.0
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_binary_accepts_every_score_layout():
    y = torch.tensor([0, 1, 1, 0, 1])
    p = torch.tensor([0.2, 0.9, 0.4, 0.6, 0.7])
    ref = classification_metrics(p, y, task="binary")
    assert ref["class_names"] == ["absent", "present"]
    assert ref["auc_macro"] == pytest.approx(sklearn_metrics.roc_auc_score(y, p))
    assert ref["accuracy"] == pytest.approx(0.6)
    assert ref["per_class"]["present"]["sensitivity"] == pytest.approx(2 / 3)
    assert ref["per_class"]["present"]["specificity"] == pytest.approx(1 / 2)
    for layout in (p[:, None], torch.stack([1 - p, p], 1)):
        assert classification_metrics(layout, y, task="binary") == ref


def test_multilabel():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (40, 3))
    p = np.clip(0.35 * y + 0.6 * rng.random((40, 3)), 0, 1)
    m = classification_metrics(p, y, task="multilabel")
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert m["auc_macro"] == pytest.approx(sklearn_metrics.roc_auc_score(y, p, average="macro"))
    assert m["f1_macro"] == pytest.approx(sklearn_metrics.f1_score(y, pred, average="macro", zero_division=0))
    assert m["confusion_matrix"][1] == sklearn_metrics.confusion_matrix(y[:, 1], pred[:, 1]).tolist()


def test_confusion_matrix_rows_are_truth():
    assert confusion_matrix([1, 1, 0], [0, 1, 0], 2).tolist() == [[1, 1], [0, 1]]


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    relevant = np.eye(3, dtype=bool)  # query 0 hits at rank 1, query 1 at rank 3, query 2 at rank 2
    assert recall_at_k(sim, relevant, ks=(1, 2, 3, 10)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3),
                                                            3: 1.0, 10: 1.0}
    relevant[1, 2] = True  # a second relevant candidate (an identical report) counts as a hit
    assert recall_at_k(sim, relevant, ks=(1,))[1] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "probs, labels, task, match",
    [
        (np.ones((3, 2)) / 2, [0, 1], "multiclass", "probs/labels"),
        (np.ones((2, 2)) / 2, [0, 2], "multiclass", "labels"),
        (np.ones((2, 2)) / 2, [0, 1], "ordinal", "task"),
        (np.ones((0, 2)), [], "multiclass", "probs/labels"),
    ],
)
def test_invalid_inputs_name_the_argument(probs, labels, task, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels, task=task)
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics(np.ones((2, 2)) / 2, [0, 1], ["only one"])


@pytest.mark.parametrize("order", ["organ", "alphabetical"])
def test_organ_metrics_in_any_class_order(order: str) -> None:
    """A cache read outside the demo lists its classes alphabetically, interleaving the organs: each organ's metrics
    are still over its own studies and classes, identical to those in the demo's order."""
    from medmap_fast.train.demo import organ_metrics

    organs = {"brain": ["normal_brain", "brain_tumour"], "liver": ["normal_liver", "steatosis", "cirrhosis"]}
    demo_order = [c for names in organs.values() for c in names]
    names = sorted(demo_order) if order == "alphabetical" else demo_order
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 40)  # indices into demo_order
    scores = rng.random((40, 5)) + 2 * np.eye(5)[truth]
    perm = [demo_order.index(n) for n in names]
    out = organ_metrics(scores[:, perm], np.array([names.index(demo_order[t]) for t in truth]), organs, names)
    brain = truth < 2
    p = scores[brain][:, :2] / scores[brain][:, :2].sum(1, keepdims=True)
    assert out["brain"]["auc_macro"] == pytest.approx(classification_metrics(p, truth[brain], organs["brain"])["auc_macro"])
    assert out["liver"]["num_samples"] == int((~brain).sum()) and out["liver"]["auc_macro"] > 0.5


def test_organ_metrics_of_a_model_that_knows_one_organ() -> None:
    from medmap_fast.train.demo import organ_metrics

    organs = {"brain": ["normal_brain", "brain_tumour"], "liver": ["normal_liver", "steatosis"]}
    names = ["brain_tumour", "normal_brain"]  # a brain-only cache, alphabetical
    out = organ_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 0]), organs, names)
    assert list(out) == ["brain"] and out["brain"]["auc_macro"] == 1.0 and out["brain"]["num_samples"] == 3
