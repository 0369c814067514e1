"""Low-level file reading shared by the readers: every failure becomes an ``InputError`` naming the file.

Volumes go through SimpleITK (NIfTI, NRRD, MHA, DICOM); 2D pictures (PNG, JPG, TIF, BMP) through PIL.
Arrays come back in NumPy order (``Z x Y x X``); geometry in SimpleITK order (see ``cases.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .cases import IDENTITY_DIRECTION


@dataclass
class Volume:
    """Pixel data ``C x Z x Y x X`` (C = vector components, 1 for scalar images) and its geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float]  # z, y, x
    origin: tuple[float, float, float]  # x, y, z (SimpleITK)
    direction: tuple[float, ...]  # 9 floats, row-major (SimpleITK)
    dimension: int  # 2 or 3 as stored


def read_sitk(path: str | os.PathLike):
    """Read a SimpleITK image; unreadable, truncated or unknown files raise ``InputError``."""
    import SimpleITK as sitk

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)  # ITK reads truncated NIfTI data silently
    try:
        return sitk.ReadImage(path)
    except RuntimeError as err:  # ITK reports truncated/corrupt data as RuntimeError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "ERROR" in line or "expected" in line), lines[-1] if lines else "")
        raise InputError(path, f"cannot read image (unreadable or truncated file): {detail[:300]}") from None


def check_nifti_complete(path: str) -> None:
    """Raise ``InputError`` when a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) holds less data than its header declares.

    For gzip files the stream is decompressed once (in chunks) to count its bytes; a cut stream raises.
    """
    import gzip
    import struct
    import zlib

    def fail(problem: str) -> None:
        raise InputError(path, f"truncated or corrupt NIfTI file: {problem}")

    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
            if len(header) < 348:
                fail(f"header is {len(header)} bytes, NIfTI needs at least 348")
            for endian in "<>":
                size = struct.unpack(endian + "i", header[:4])[0]
                if size in (348, 540):
                    break
            else:
                fail("not a NIfTI header (sizeof_hdr is neither 348 nor 540)")
            if size == 348:
                dims = struct.unpack(endian + "8h", header[40:56])
                bitpix = struct.unpack(endian + "h", header[72:74])[0]
                offset = int(struct.unpack(endian + "f", header[108:112])[0])
            else:
                if len(header) < 540:
                    fail("NIfTI-2 header is incomplete")
                bitpix = struct.unpack(endian + "h", header[14:16])[0]
                dims = struct.unpack(endian + "8q", header[16:80])
                offset = int(struct.unpack(endian + "q", header[168:176])[0])
            ndim = max(0, min(int(dims[0]), 7))
            if any(int(d) <= 0 for d in dims[1:1 + ndim]):
                fail(f"the header declares size {tuple(int(d) for d in dims[1:1 + ndim])}; every axis needs >= 1")
            count = 1
            for d in dims[1:1 + ndim]:
                count *= max(int(d), 1)
            expected = max(offset, size + 4 if size == 348 else size) + count * max(int(bitpix), 8) // 8
            if opener is open:
                actual = os.path.getsize(path)
            else:
                actual = len(header)
                while chunk := handle.read(1 << 22):
                    actual += len(chunk)
    except InputError:
        raise
    except (EOFError, OSError, zlib.error) as err:
        fail(str(err) or type(err).__name__)
    if actual < expected:
        fail(f"{actual} bytes of data where the header declares {expected}")


def sitk_to_volume(image, where: str) -> Volume:
    """Convert a SimpleITK image (2D or 3D, scalar or vector) to a :class:`Volume`."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(where, f"{dim}D images are not supported (store each channel as its own _000i file)")
    arr = sitk.GetArrayFromImage(image)
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)  # components first
    else:
        arr = arr[None]
    spacing = tuple(float(s) for s in image.GetSpacing())
    origin = tuple(float(o) for o in image.GetOrigin())
    direction = tuple(float(d) for d in image.GetDirection())
    if dim == 2:
        arr = arr[:, None]  # C x 1 x Y x X
        spacing3 = (1.0, spacing[1], spacing[0])
        origin3 = (origin[0], origin[1], 0.0)
        d = direction
        direction3 = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
    else:
        spacing3 = (spacing[2], spacing[1], spacing[0])
        origin3 = origin
        direction3 = direction
    return Volume(arr, spacing3, origin3, direction3, dim)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI/NRRD/MHA file (or anything SimpleITK reads) as a :class:`Volume`; NaN/Inf values stay as
    stored (the reader's ``nonfinite`` policy decides what becomes of them)."""
    volume = sitk_to_volume(read_sitk(path), str(path))
    if str(path).lower().endswith((".nii", ".nii.gz")):
        restore_nifti_nonfinite(str(path), volume.array)
    return volume


def restore_nifti_nonfinite(path: str, array: np.ndarray) -> None:
    """Put back (in place, into ``array`` C x Z x Y x X) the NaN/Inf values of a float NIfTI file, which ITK's
    NIfTI reader turns into 0 without a word."""
    import nibabel as nib

    image = nib.load(path)
    if image.get_data_dtype().kind != "f":
        return
    raw = np.asanyarray(image.dataobj)
    bad = ~np.isfinite(raw)
    if not bad.any():
        return
    if array.shape[0] != 1 or raw.size != array[0].size:
        raise InputError(path, f"image holds {int(bad.sum())} non-finite value(s) (NaN/Inf)")
    raw_zyx, bad_zyx = raw.T.reshape(array.shape[1:]), bad.T.reshape(array.shape[1:])
    array[0][bad_zyx] = raw_zyx[bad_zyx]


def read_picture(path: str | os.PathLike, mask: bool = False, facts: dict | None = None) -> np.ndarray:
    """Read a 2D picture with PIL: ``Y x X`` (gray, 16-bit) or ``Y x X x 3`` (RGB; alpha dropped).

    Palette pictures give their colours (``mask=False``) or their palette indices (``mask=True``: class ids, as in
    Pascal-VOC-style masks). ``facts``, when given, gets ``"alpha_dropped"``: whether the picture had an alpha
    channel that was dropped.
    """
    from PIL import Image, UnidentifiedImageError

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        with Image.open(path) as picture:
            picture.load()
            if getattr(picture, "n_frames", 1) > 1:
                raise InputError(path, f"multi-page picture ({picture.n_frames} frames); expected one 2D image")
            mode = picture.mode
            if facts is not None:
                facts["alpha_dropped"] = mode in ("RGBA", "LA", "PA")
            if mode in ("RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                picture = picture.convert("RGB" if mode != "LA" else "L")
            elif mode == "1":
                picture = picture.convert("L")
            elif mode in ("P", "PA") and not mask:
                picture = picture.convert("RGB")
            arr = np.asarray(picture)
        if path.lower().endswith(".png"):  # PIL decodes a PNG cut after its pixel data without a word
            with Image.open(path) as again:
                again.verify()  # checksums and the end chunk
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(path, f"cannot read picture (unreadable or truncated file): {err}") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(path, f"unexpected picture shape {arr.shape}")
    return arr


def picture_to_volume(arr: np.ndarray) -> Volume:
    """A 2D picture ``Y x X`` or ``Y x X x C`` as a ``C x 1 x Y x X`` volume with unit spacing."""
    chw = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return Volume(chw[:, None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY_DIRECTION, 2)


def _rounded(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def same_geometry(a: Volume, b: Volume, tol: float = 1e-3) -> str | None:
    """None when ``a`` and ``b`` share shape, spacing, origin and direction (within ``tol``); else the difference."""
    if a.array.shape[1:] != b.array.shape[1:]:
        return f"size {tuple(b.array.shape[1:])} differs from image size {tuple(a.array.shape[1:])}"
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if not np.allclose(va, vb, atol=tol, rtol=tol):
            return f"{name} {_rounded(vb)} differs from image {name} {_rounded(va)}"
    return None
