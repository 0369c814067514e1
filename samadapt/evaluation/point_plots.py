"""Draw ProMISe's prompt points on image overlays (matplotlib, Agg canvas; no global backend change).

``plot_points`` draws given images/points; ``plot_method_points`` runs ``method.predict`` on a batch and draws the
points the method used (``method.last_points``), its prediction and the ground truth when the batch has one.
Conventions: images B x 3 x S x S in [0, 1], points B x N x 2 (x, y) in the S x S frame, labels B x N
(1 positive: green +, 0 negative: red x, -1 padding: not drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..io_utils import atomic_path


def _numpy(t: Tensor | np.ndarray | None) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().float().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def plot_points(images: Tensor | np.ndarray, points: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                path: str | Path, masks: Tensor | np.ndarray | None = None, truth: Tensor | np.ndarray | None = None,
                titles: Sequence[str] | None = None, columns: int = 4, user_from: int | None = None) -> Path:
    """Write a PNG grid: each image with its points, the predicted mask contour (red) and the truth (green).

    images: B x 3 x S x S (or B x S x S); points: B x N x 2; labels: B x N; masks, truth: B x S x S (> 0 =
    foreground). Points from index ``user_from`` on are user clicks (drawn as large dots). Returns ``path``
    (written atomically).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs, pts, lbs = _numpy(images), _numpy(points), _numpy(labels)
    masks_np, truth_np = _numpy(masks), _numpy(truth)
    b = imgs.shape[0]
    cols = max(1, min(columns, b))
    rows = (b + cols - 1) // cols
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    for i in range(b):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = imgs[i]
        if img.ndim == 3:
            img = img.transpose(1, 2, 0) if img.shape[0] in (1, 3) else img
            img = img[..., 0] if img.shape[-1] == 1 else img
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None)
        if truth_np is not None and (truth_np[i] > 0).any():
            ax.contour(truth_np[i] > 0, levels=[0.5], colors="lime", linewidths=0.8)
        if masks_np is not None and (masks_np[i] > 0).any():
            ax.contour(masks_np[i] > 0, levels=[0.5], colors="red", linewidths=0.8)
        is_user = np.arange(lbs.shape[1]) >= (user_from if user_from is not None else lbs.shape[1])
        for value, marker, color in ((1, "+", "lime"), (0, "x", "red")):
            # Pixel (x, y) indices; SAM's prompt encoder adds 0.5 to reach the pixel centre, as imshow does.
            sel = (lbs[i] == value) & ~is_user
            if sel.any():
                ax.scatter(pts[i][sel, 0], pts[i][sel, 1], marker=marker, c=color, s=40, linewidths=1.5)
            sel = (lbs[i] == value) & is_user
            if sel.any():
                ax.scatter(pts[i][sel, 0], pts[i][sel, 1], marker="o", c=color, s=70, edgecolors="white",
                           linewidths=1.2)
        ax.set_xlim(-0.5, img.shape[1] - 0.5)
        ax.set_ylim(img.shape[0] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.suptitle("points: + positive, x negative (dots: user clicks); red: prediction, green: ground truth", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_method_points(method, batch: dict, path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """Run ``method.predict(batch)`` (a ProMISe model) and draw the points it used over its prediction."""
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            probs = method.predict(batch)
    finally:
        method.train(was_training)
    pred = probs.argmax(dim=1)
    if titles is None:
        titles = [f"{method.last_point_source} points"] * pred.shape[0]
    user_from = method.config.num_points if str(method.last_point_source).endswith("+user") else None
    return plot_points(batch["image"], method.last_points, method.last_point_labels, path, masks=pred,
                       truth=batch.get("label"), titles=titles, user_from=user_from)
