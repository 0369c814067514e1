"""One opened image and the mask being built on it: slices, automatic prediction, prompts, brush, undo, download.

Arrays follow ``Case`` (``image`` C x Z x Y x X, mask Z x Y x X). A slice is addressed by ``(axis, index)``,
``axis`` indexing Z, Y, X; its pixels are ``H x W`` (the two other axes in order), with x = column and y = row.
``done`` marks the voxels a prediction or an edit has set: the automatic prediction of a slice only fills voxels
not yet done, so viewing a slice along another axis never overwrites a correction.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np

from ..data.cases import Case, write_label_like
from ..data.preprocessing import restore
from ..data.slices import SliceDataset, volume_slices
from ..engine.predict import Predictor
from ..errors import InputError
from .model import Prompts, ServedModel


def slice_view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A writable view of slice ``index`` along spatial ``axis`` of a Z x Y x X array (H x W)."""
    return volume[(slice(None),) * axis + (index,)]


def prompts_from_mask(region: np.ndarray, kinds: tuple[str, ...]) -> Prompts:
    """The prompt that asks for ``region`` (H x W bool, not empty) again: its box grown by 2 pixels when the method
    takes boxes, else one positive click on the region's pixel nearest its centroid."""
    ys, xs = np.nonzero(region)
    h, w = region.shape
    if "boxes" in kinds:
        return Prompts(box=(max(0, xs.min() - 2), max(0, ys.min() - 2), min(w - 1, xs.max() + 2),
                            min(h - 1, ys.max() + 2)))
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return Prompts(points=[(float(xs[k]), float(ys[k]), True)])


class Session:
    """An opened case in its own folder ``folder`` (removed by :meth:`close`), with the mask being edited."""

    def __init__(self, sid: str, case: Case, folder: Path, model: ServedModel, name: str):
        self.id = sid
        self.case = case
        self.folder = folder
        self.model = model
        self.name = name
        k = model.method.num_classes
        self.mask = np.zeros(case.shape, dtype=np.uint8 if k < 256 else np.uint16)
        self.done = np.zeros(case.shape, dtype=bool)
        self.prompts: dict[tuple[int, int, int], Prompts] = {}  # (axis, index, class) -> prompts
        self.undo_stack: list[tuple[int, int, np.ndarray, np.ndarray, tuple | None]] = []
        self._slices: dict[int, SliceDataset] = {}
        self.lock = threading.RLock()
        self.progress = {"running": False, "done": 0, "total": 0, "axis": 0, "error": None}

    # --- what the page needs ---------------------------------------------------------------------------------------
    def describe(self) -> dict:
        c = self.case
        first = c.image[0]
        sample = first.reshape(-1)[:: max(1, first.size // 2_000_000)]
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        return {"id": self.id, "name": self.name, "shape": list(c.shape), "spacing": list(c.spacing),
                "channels": c.num_channels, "is_2d": c.is_2d, "modality": c.modality,
                "range": [float(first.min()), float(first.max())], "window": [lo, hi],
                "download": f"{c.id}_mask{self.mask_ending}"}

    @property
    def mask_ending(self) -> str:
        return ".png" if self.case.is_2d else ".nii.gz"

    def check_slice(self, axis: int, index: int) -> None:
        if axis not in (0, 1, 2) or (self.case.is_2d and axis != 0):
            raise InputError(self.name, f"no slice axis {axis} (use 0{'' if self.case.is_2d else ', 1 or 2'})")
        n = self.case.shape[axis]
        if not 0 <= index < n:
            raise InputError(self.name, f"slice {index} is outside 0..{n - 1} along axis {axis}")

    def image_slice(self, axis: int, index: int) -> np.ndarray:
        """Raw intensities C x H x W (float32) of one slice."""
        self.check_slice(axis, index)
        return np.ascontiguousarray(np.take(self.case.image, index, axis=axis + 1), dtype=np.float32)

    def _dataset(self, axis: int) -> SliceDataset:
        if axis not in self._slices:
            p = self.model.predictor
            self._slices[axis] = volume_slices(self.case, axis, p.input_size, p.intensity, p.geometry)
        return self._slices[axis]

    # --- prediction and edits -------------------------------------------------------------------------------------
    def mask_slice(self, axis: int, index: int, auto: bool = True) -> np.ndarray:
        """The mask of one slice (H x W); with ``auto``, voxels not yet done get the automatic prediction first."""
        self.check_slice(axis, index)
        with self.lock:
            done = slice_view(self.done, axis, index)
            if auto and not done.all():
                probs = self.model.predict_slice(self._dataset(axis)[index])
                self._fill(axis, index, probs.argmax(0).numpy())
            return slice_view(self.mask, axis, index).copy()

    def _fill(self, axis: int, index: int, label: np.ndarray) -> None:
        mask, done = slice_view(self.mask, axis, index), slice_view(self.done, axis, index)
        mask[~done] = label[~done]
        done[:] = True

    def _remember(self, axis: int, index: int, key: tuple | None = None) -> None:
        old = self.prompts.get(key).copy() if key in self.prompts else None
        self.undo_stack.append((axis, index, slice_view(self.mask, axis, index).copy(),
                                slice_view(self.done, axis, index).copy(), (key, old)))
        del self.undo_stack[:-50]

    def prompt(self, axis: int, index: int, cls: int, point: tuple[float, float, bool] | None = None,
               box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """Add a click or set the box for class ``cls`` on a slice; that class's mask there is replaced by the
        method's answer to every prompt given on the slice so far. Returns the slice's new mask."""
        self.check_slice(axis, index)
        kinds = self.model.prompt_kinds
        if point is not None and "points" not in kinds or box is not None and "boxes" not in kinds:
            raise InputError(self.model.method.name, f"this method takes {' and '.join(kinds) or 'no prompts'}")
        if not 1 <= cls <= self.model.method.num_classes:
            raise InputError(self.name, f"class {cls} is not one of 1..{self.model.method.num_classes}")
        h, w = slice_view(self.mask, axis, index).shape
        for x, y in ([point[:2]] if point else []) + ([box[:2], box[2:]] if box else []):
            if not (0 <= x < w and 0 <= y < h):
                raise InputError(self.name, f"prompt ({x}, {y}) is outside the {w} x {h} slice")
        with self.lock:
            key = (axis, index, cls)
            self.mask_slice(axis, index)
            self._remember(axis, index, key)
            prompts = self.prompts.setdefault(key, Prompts())
            if point is not None:
                prompts.points.append(point)
            if box is not None:
                x0, y0, x1, y1 = box
                prompts.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            probs = self.model.predict_slice(self._dataset(axis)[index], prompts, cls)
            fg = probs[1].numpy() > 0.5
            mask = slice_view(self.mask, axis, index)
            mask[(mask == cls) & ~fg] = 0
            mask[fg] = cls
            return mask.copy()

    def paint(self, axis: int, index: int, cls: int, points: list[tuple[float, float]], radius: float) -> np.ndarray:
        """Brush (``cls`` >= 1) or eraser (``cls`` = 0): disks of ``radius`` pixels along ``points`` (x, y)."""
        self.check_slice(axis, index)
        if not 0 <= cls <= self.model.method.num_classes:
            raise InputError(self.name, f"class {cls} is not one of 0..{self.model.method.num_classes}")
        with self.lock:
            self.mask_slice(axis, index)
            self._remember(axis, index)
            mask = slice_view(self.mask, axis, index)
            rows, cols = np.ogrid[:mask.shape[0], :mask.shape[1]]
            r2 = max(float(radius), 0.5) ** 2
            for x, y in points:
                mask[(cols - x) ** 2 + (rows - y) ** 2 <= r2] = cls
            return mask.copy()

    def undo(self) -> dict | None:
        """Take back the last click, box, stroke or propagation; returns the slice it changed (or None when nothing to undo)."""
        with self.lock:
            if not self.undo_stack:
                return None
            axis, index, mask, done, (key, prompts) = self.undo_stack.pop()
            target = (self.mask, self.done) if mask.ndim == 3 else \
                (slice_view(self.mask, axis, index), slice_view(self.done, axis, index))  # a volume or one slice
            target[0][:] = mask
            target[1][:] = done
            if key is not None:
                if prompts is None:
                    self.prompts.pop(key, None)
                else:
                    self.prompts[key] = prompts
            return {"axis": axis, "index": index}

    def slice_prompts(self, axis: int, index: int, cls: int) -> dict:
        p = self.prompts.get((axis, index, cls))
        return p.to_dict() if p is not None else Prompts().to_dict()

    def predict_volume(self, axis: int) -> None:
        """Automatic prediction of every slice along ``axis`` (voxels already done are kept); updates
        ``progress``. Meant to run in a background thread."""
        self.check_slice(axis, 0)
        ds = self._dataset(axis)
        n = len(ds)
        self.progress.update(running=True, done=0, total=n, axis=axis, error=None)
        try:
            batch = self.model.predictor.batch_size
            predictor: Predictor = self.model.volume_predictor([ds[i] for i in range(min(n, batch))])
            for start in range(0, n, predictor.batch_size):
                items = [ds[i] for i in range(start, min(n, start + predictor.batch_size))]
                with self.model.lock:
                    probs = predictor.predict_probabilities(items)
                for item, p in zip(items, probs):
                    i = item["slice"]
                    label = restore(p, item["pad"]).argmax(0).numpy()
                    with self.lock:
                        self._fill(axis, i, label)
                    self.progress["done"] = i + 1
        except Exception as exc:  # reported in the page; the session stays usable
            self.progress["error"] = str(exc)
        finally:
            self.progress["running"] = False

    def propagate(self, axis: int, index: int, cls: int) -> None:
        """Carry class ``cls`` of slice ``index`` to its neighbours along ``axis``, both ways: each next slice is
        prompted with the previous slice's result (its box grown by 2 pixels, or, for methods without boxes, a
        click on its pixel nearest the centroid) until the result is empty. One undo step takes it all back.
        Updates ``progress``; meant to run in a background thread."""
        self.check_slice(axis, index)
        kinds = self.model.prompt_kinds
        try:
            start = slice_view(self.mask, axis, index) == cls
            if not kinds or not start.any():
                raise InputError(self.name, "nothing to propagate: " + ("this method takes no prompts" if not kinds
                                                                        else f"class {cls} is empty on this slice"))
            n, ds = self.case.shape[axis], self._dataset(axis)
            self.progress.update(running=True, done=0, total=n - 1, axis=axis, error=None)
            with self.lock:
                self.undo_stack.append((axis, index, self.mask.copy(), self.done.copy(), (None, None)))
                del self.undo_stack[:-50]
            for step in (1, -1):
                prev, i = start, index + step
                while 0 <= i < n and prev.any():
                    probs = self.model.predict_slice(ds[i], prompts_from_mask(prev, kinds), cls)
                    prev = probs[1].numpy() > 0.5
                    with self.lock:
                        mask = slice_view(self.mask, axis, i)
                        mask[(mask == cls) & ~prev] = 0
                        mask[prev] = cls
                        slice_view(self.done, axis, i)[:] = True
                    self.progress["done"] += 1
                    i += step
        except Exception as exc:  # reported in the page; the session stays usable
            self.progress["error"] = str(exc)
        finally:
            self.progress["running"] = False

    def write_mask(self) -> Path:
        """The mask written with the input's geometry (NIfTI for volumes, PNG for pictures) in the session folder."""
        with self.lock:
            return write_label_like(self.mask.copy(), self.case, self.folder / f"{self.case.id}_mask{self.mask_ending}")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
