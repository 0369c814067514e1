"""Report plots: the training curves line runs up by optimizer step and join validations across unvalidated epochs."""

from __future__ import annotations

import math

import numpy as np

from samadapt.evaluation import report


def test_training_curves_use_steps_and_join_the_validations(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    two_steps = [{"epoch": e, "steps": 2 * e, "train_loss": 1 / e,
                  **({"val_dice": 0.1 * e} if e % 2 == 0 else {"val_dice": math.nan})} for e in range(1, 7)]
    one_step = [{"epoch": e, "steps": e, "train_loss": 1 / e, "val_dice": 0.5} for e in range(1, 4)]
    report.plot_training_curves({"a": two_steps, "b": one_step}, tmp_path / "c.png")
    loss, dice = figures[0].axes
    assert [list(line.get_xdata()) for line in loss.lines] == [[2, 4, 6, 8, 10, 12], [1, 2, 3]]
    a, b = dice.lines
    assert list(a.get_xdata()) == [4, 8, 12] and np.allclose(a.get_ydata(), [0.2, 0.4, 0.6])  # no NaN gaps
    assert a.get_color() == loss.lines[0].get_color() and loss.get_xlabel() == "optimizer step"

    report.plot_training_curves({"old": [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]},
                                tmp_path / "d.png")
    assert figures[1].axes[0].get_xlabel() == "epoch" and not figures[1].axes[1].lines  # no validation: no line
