"""The in-memory case (one image volume, its optional label and its geometry) and the label writers.

Array conventions (NumPy order, as ``SimpleITK.GetArrayFromImage`` returns):

- ``Case.image``: float32, ``C x Z x Y x X`` (2D images: ``Z = 1``).
- ``Case.label``: integer class map ``Z x Y x X`` (0 = background) or ``None``.
- ``Case.spacing``: ``(z, y, x)`` in mm, matching the array axes (2D images: ``(1.0, 1.0, 1.0)``).
- ``Case.origin`` and ``Case.direction``: kept in SimpleITK's own order (origin ``(x, y, z)`` in LPS mm,
  direction the 9 row-major entries of the 3 x 3 matrix) so a prediction is written back with exactly the
  input's geometry by :func:`write_label_like`.

Every writer here is atomic: it writes to a temporary name in the destination folder, then renames.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io_utils import atomic_path
from ..errors import InputError

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

#: File endings handled by SimpleITK as volumes (the output keeps the input's ending).
VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File endings handled as 2D pictures (PIL).
IMAGE_2D_ENDINGS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def file_ending(path: str | os.PathLike) -> str:
    """The file's ending, with double endings (``.nii.gz``) kept whole; lower case."""
    name = Path(path).name.lower()
    for ending in VOLUME_ENDINGS + IMAGE_2D_ENDINGS + (".npz",):
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def strip_ending(path: str | os.PathLike) -> str:
    """File name without its (possibly double) ending: ``a/b_0000.nii.gz`` -> ``b_0000``."""
    name = Path(path).name
    ending = file_ending(name)
    return name[: len(name) - len(ending)] if ending else name


@dataclass
class Case:
    """One image (volume or 2D picture) with its optional label and geometry.

    ``image``: float32 ``C x Z x Y x X``; ``label``: int ``Z x Y x X`` or None; ``spacing`` (z, y, x) mm;
    ``origin`` (x, y, z) and ``direction`` (9 floats, row-major) in SimpleITK's conventions; ``source`` is the
    path used in error messages; ``modality`` one of ``"CT"``, ``"MR"``, ``"natural"``, ``"other"``.
    ``file_ending`` is the ending predictions are written with (the input's format); ``meta`` holds
    reader-specific facts (``mask_scale``: 255 when binary masks were stored as {0, 255}). ``nonfinite``: what
    to do with NaN/Inf image values: ``"error"`` (default) raises ``InputError`` naming the file, the case and the
    count; ``"zero"`` replaces them with 0 and records the count in ``meta["nonfinite_replaced"]``.
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    source: str = ""
    modality: str = "other"
    is_2d: bool = False
    file_ending: str = ".nii.gz"
    channel_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    nonfinite: str = "error"

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise ValueError(f"Case {self.id}: image must be C x Z x Y x X, got shape {self.image.shape}")
        if self.image.dtype != np.float32:
            self.image = self.image.astype(np.float32)
        if not self.image.size:
            raise InputError(self.source or self.id, f"case {self.id!r}: image is empty (shape "
                                                     f"{tuple(self.image.shape[1:])})")
        self._check_finite()
        if self.label is not None and tuple(self.label.shape) != tuple(self.image.shape[1:]):
            raise InputError(
                self.meta.get("label_source", self.source),
                f"mask size {tuple(self.label.shape)} differs from image size {tuple(self.image.shape[1:])}",
            )
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        if not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise InputError(self.source or self.id, f"case {self.id!r}: voxel spacing {self.spacing} (z, y, x); "
                                                     "every spacing must be a finite number > 0")
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)

    def _check_finite(self) -> None:
        bad = ~np.isfinite(self.image)
        count = int(bad.sum())
        if not count:
            return
        if self.nonfinite != "zero":
            nan = int(np.isnan(self.image).sum())
            raise InputError(self.source or self.id, f"case {self.id!r}: image holds {count} non-finite value(s) "
                                                     f"({nan} NaN, {count - nan} Inf); fix the file or set "
                                                     "data.nonfinite=zero to replace them with 0")
        self.image = np.where(bad, np.float32(0), self.image)
        self.meta["nonfinite_replaced"] = count

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(Z, Y, X)``."""
        return tuple(self.image.shape[1:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return int(self.image.shape[0])

    def geometry(self) -> dict:
        """JSON-able geometry (for manifests and checks)."""
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


def channel_mix(cases: list[tuple[str, int, bool]]) -> tuple[str | None, str | None]:
    """Whether cases with these channel counts train together: ``cases`` holds ``(file, channels, is_2d)``.

    Returns ``(error, note)``, at most one of them set. Equal counts: ``(None, None)``. 2D pictures mixing gray (1)
    and RGB (3) channels do train together: a gray picture becomes three equal channels, as every SAM input is
    made (:func:`samadapt.data.preprocessing.to_three_channels`), so the note says so and names a file of each.
    Any other mix (volumes with different channel sets, 2-channel pictures) is an error naming a file of each count.
    """
    by_count: dict[int, list[str]] = {}
    for file, channels, _ in cases:
        by_count.setdefault(channels, []).append(str(file))
    if len(by_count) < 2:
        return None, None
    listed = "; ".join(f"{len(files)} with {c} (e.g. {files[0]})" for c, files in sorted(by_count.items()))
    if set(by_count) == {1, 3} and all(is_2d for _, _, is_2d in cases):
        return None, f"pictures mix gray and RGB: {listed}; gray ones are read as three equal channels"
    return f"cases differ in channel count: {listed}", None


# --- SimpleITK conversions -----------------------------------------------------------------------------------------
def label_to_sitk(label: np.ndarray, case: Case):
    """A SimpleITK image of ``label`` (Z x Y x X) carrying the case's spacing, origin and direction."""
    import SimpleITK as sitk

    arr = _label_storage(label)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(tuple(reversed(case.spacing)))
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    return image


def _label_storage(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.size and (label.min() < 0):
        raise ValueError("labels must be non-negative class ids")
    top = int(label.max()) if label.size else 0
    return label.astype(np.uint8 if top < 256 else np.uint16)


def write_label_like(label: np.ndarray, case: Case, path: str | os.PathLike) -> Path:
    """Write ``label`` (``Z x Y x X``, or ``Y x X`` for 2D cases) with exactly ``case``'s geometry, atomically.

    The format follows ``path``'s ending: NIfTI/NRRD/MHA through SimpleITK (spacing, origin and direction copied
    from the case), PNG/TIF/BMP as a 2D picture (2D cases only). Returns the path written.
    """
    path = Path(path)
    label = np.asarray(label)
    if case.is_2d and label.ndim == 2:
        label = label[None]
    if tuple(label.shape) != case.shape:
        raise ValueError(f"label shape {tuple(label.shape)} does not match case {case.id} shape {case.shape}")
    ending = file_ending(path)
    if ending in IMAGE_2D_ENDINGS:
        if case.shape[0] != 1:
            raise ValueError(f"cannot write a {case.shape[0]}-slice volume as {ending}; use .nii.gz")
        return write_label_png(label[0], path, scale=int(case.meta.get("mask_scale", 1)))
    reference = case.meta.get("geometry_source")
    if ending in (".nii", ".nii.gz") and reference and file_ending(reference) in (".nii", ".nii.gz"):
        return _write_nifti_with_header_of(label, reference, path)
    import SimpleITK as sitk

    image = label_to_sitk(label, case)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def _write_nifti_with_header_of(label: np.ndarray, reference: str, path: Path) -> Path:
    """NIfTI input -> NIfTI output: copy the input's header (qform, sform, codes, pixdim) byte for byte.

    SimpleITK's writer re-derives the quaternion from the direction matrix, which moves a rotated geometry by
    ~1e-8 on each read/write; copying the header keeps the output's geometry identical to the input's.
    """
    import nibabel as nib

    ref = nib.load(reference)
    arr = _label_storage(label).transpose(2, 1, 0)  # Z x Y x X -> the NIfTI i, j, k order
    spatial = ref.shape[:3] if len(ref.shape) >= 3 else ref.shape + (1,) * (3 - len(ref.shape))
    if tuple(arr.shape) != tuple(spatial):
        raise ValueError(f"label shape {arr.shape[::-1]} does not match the NIfTI {reference} ({spatial[::-1]})")
    header = ref.header.copy()
    header.set_data_shape(arr.shape)
    header.set_data_dtype(arr.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    image = type(ref)(arr, ref.affine, header)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def write_label_png(label: np.ndarray, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write a ``Y x X`` class map as a lossless picture (PNG/TIF/BMP by ending), atomically.

    ``scale=255`` writes a binary map as {0, 255} (the 2D-folder convention); otherwise ids are written as they are
    (uint8, or 16-bit when an id exceeds 255).
    """
    from PIL import Image

    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a 2D label must be Y x X, got {label.shape}")
    if file_ending(path) in (".jpg", ".jpeg"):
        raise ValueError("labels cannot be written as JPEG (lossy); use .png")
    arr = _label_storage(label)
    if scale != 1:
        if arr.max() > 1:
            scale = 1  # multi-class maps keep their ids
        arr = (arr * scale).astype(np.uint8)
    picture = Image.fromarray(arr)  # uint8 -> "L", uint16 -> "I;16"
    with atomic_path(path) as tmp:
        picture.save(tmp, format=_pil_format(path))
    return Path(path)


def _pil_format(path: str | os.PathLike) -> str:
    return {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}.get(file_ending(path), "PNG")


def write_image_like(image: np.ndarray, case: Case, path: str | os.PathLike) -> Path:
    """Write one channel ``Z x Y x X`` of image data with ``case``'s geometry (used by the demo builders), atomically."""
    import SimpleITK as sitk

    sitk_image = sitk.GetImageFromArray(np.asarray(image))
    sitk_image.SetSpacing(tuple(reversed(case.spacing)))
    sitk_image.SetOrigin(case.origin)
    sitk_image.SetDirection(case.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk_image, str(tmp), useCompression=True)
    return Path(path)
