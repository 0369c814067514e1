"""The one Dice (samadapt.overlap): per-class counts on torch and numpy, pooling, the empty conventions, and agreement
with the evaluation metric and the training validation."""

import numpy as np
import pytest
import torch

from samadapt.evaluation.metrics import dice as metric_dice
from samadapt.overlap import class_counts, dice, dice_from_counts, mask_counts


def _labels():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 1:5, 1:5] = 1
    labels[0, 5:7, 5:7] = 2
    pred = labels.clone()
    pred[0, 1:5, 1:3] = 0  # class 1 half-found in sample 0
    return pred, labels


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_class_counts_and_dice_per_sample_and_pooled(kind):
    pred, labels = _labels()
    if kind == "numpy":
        pred, labels = pred.numpy(), labels.numpy()
    per_sample = [dice_from_counts(class_counts(pred[b], labels[b], [1, 2])) for b in range(2)]
    # sample 0: class 1 -> 2*8/(8+16) = 2/3, class 2 -> 1; sample 1: both classes empty in both -> 1, 1
    np.testing.assert_allclose(np.asarray(per_sample, dtype=float), [[2 / 3, 1], [1, 1]])
    counts = class_counts(pred, labels, [1, 2])
    assert type(counts) is type(pred) and tuple(counts.shape) == (2, 3)
    np.testing.assert_allclose(np.asarray(counts, dtype=float), [[8, 8, 16], [4, 4, 4]])
    # pooling: counts summed over samples equal the counts of the whole batch
    pooled = sum(class_counts(pred[b], labels[b], [1, 2]) for b in range(2))
    np.testing.assert_allclose(np.asarray(dice_from_counts(pooled), dtype=float), [2 / 3, 1])


def test_empty_conventions_and_binary_dice_agree_with_the_metric():
    empty = np.zeros((4, 4), np.uint8)
    one = empty.copy()
    one[0, 0] = 1
    assert dice(empty, empty) == 1.0 and dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert dice(torch.from_numpy(one), torch.from_numpy(one)) == 1.0
    assert float(dice_from_counts(mask_counts(torch.tensor([False]), torch.tensor([True])))) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((16, 16)) > 0.5, rng.random((16, 16)) > 0.6
        assert dice(a, b) == pytest.approx(metric_dice(a, b))
        assert dice(a, b) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
