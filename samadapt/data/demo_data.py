"""Builders of the small real demo datasets that install offline, written in nnU-Net v2 raw format.

Every builder writes into a temporary folder beside ``out_dir`` and renames it into place, so ``out_dir`` is
either absent or a complete dataset. Calling a builder again on a complete dataset of the same kind returns it
unchanged (``overwrite=True`` rebuilds). ``DEMO_DATASETS`` maps names to builders: ``build_demo(name, out_dir)``.

- ``mni152-brain`` / ``mni152-tissue`` (nilearn's MNI152 2009 T1 template, 1 mm, no download). The single volume
  is cut into three non-overlapping axial slabs of the slices that contain brain, ordered inferior to superior:
  ``mni152_train`` (lowest 60 %), ``mni152_val`` (next 10 %), ``mni152_test`` (top 30 %); each keeps its true
  position (origin), and ``splits.json`` assigns them, so train, val and test never share a slice.
  Brain task: 1 = brain (nilearn's brain mask). Tissue task, inside the brain mask only: each voxel takes the
  largest of (1 - p_grey - p_white, p_grey, p_white) from nilearn's grey/white-matter probability maps, giving
  1 = CSF/other brain, 2 = grey matter, 3 = white matter (ties go to the lower class).
- ``mni152-{brain,tissue}-{shift}``: the same slabs with the T1 volume under a simulated scanner shift of
  ``samadapt.data.shifts`` (bias field, gamma, Gibbs ringing, blur, lower resolution, Rician noise; fixed seed),
  labels unchanged: domain-generalisation targets (``samadapt evaluate dg``) whose test slab is the source's.
- ``nuclei`` (stardist's ``img2d.tif``/``mask2d.tif``, 512 x 512 fluorescence, 125 nuclei): cut into 128 x 128
  tiles ``nuclei_r{row}_c{col}``; 1 = nucleus (any instance id). The 16-bit image is scaled to 8 bits by its
  99.9th percentile. ``splits.json``: rows 0-1 and row 2 columns 0-1 train, row 2 columns 2-3 val, row 3 test.
  Written as nnU-Net 2D PNG (default) or as a 2D folder (``images/`` + ``masks/`` with {0, 255} masks).
- ``invesalius-ct`` (the head CT of the Debian package ``invesalius-examples``, 108 x 256 x 256 int16 HU,
  0.957 x 0.957 x 1.5 mm): one case ``cranium`` with HU-threshold labels 1 = soft tissue [-300, 226) HU,
  2 = bone >= 226 HU (InVesalius's own bone preset). For CT windowing and 3D pipeline tests only.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, InputError
from .cases import Case, write_image_like, write_label_like, write_label_png
from .shifts import SHIFTS, apply_shift

INVESALIUS_CANDIDATES = (
    "/usr/share/doc/invesalius-examples/examples/Cranium.inv3",
    "/usr/share/invesalius/samples/Cranium.inv3",
)


# --- shared helpers --------------------------------------------------------------------------------------------
@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".building", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            if not overwrite:
                raise InputError(out_dir, "already exists")
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _existing(out_dir: Path, kind: str, overwrite: bool) -> bool:
    """True when ``out_dir`` already holds a complete dataset of ``kind`` (and we may reuse it)."""
    if overwrite or not out_dir.exists():
        return False
    meta_path = out_dir / "dataset.json"
    if not meta_path.is_file():
        raise InputError(out_dir, "exists but holds no dataset.json; choose another folder or pass overwrite=True")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise InputError(meta_path, "invalid JSON; pass overwrite=True to rebuild") from None
    found = meta.get("samadapt_demo")
    if found != kind:
        raise InputError(out_dir, f"holds another dataset ({found or 'not a samadapt demo'}, wanted {kind}); "
                                  "choose another folder or pass overwrite=True")
    return True


def write_dataset_json(folder: Path, channel_names: dict[str, str], labels: dict[str, int], num_training: int,
                       file_ending: str, **extra) -> Path:
    """Write ``dataset.json`` the way nnU-Net v2 does (channel_names, labels, numTraining, file_ending)."""
    content = {"channel_names": channel_names, "labels": labels, "numTraining": num_training,
               "file_ending": file_ending, **extra}
    path = folder / "dataset.json"
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def _write_splits(folder: Path, train: list[str], val: list[str], test: list[str]) -> None:
    (folder / "splits.json").write_text(json.dumps({"train": train, "val": val, "test": test}, indent=2) + "\n")


def _nib_to_zyx(img) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, ...], tuple[float, ...]]:
    """A nibabel image (RAS affine, array x, y, z) -> (array Z x Y x X, spacing zyx, LPS origin, LPS direction)."""
    affine = np.asarray(img.affine, dtype=float)
    m = affine[:3, :3]
    spacing_xyz = np.linalg.norm(m, axis=0)
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (m / spacing_xyz)
    origin = flip @ affine[:3, 3]
    arr = np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0)
    return arr, (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])), tuple(origin.tolist()), \
        tuple(direction.ravel().tolist())


# --- MNI152 ------------------------------------------------------------------------------------------------------
def mni152_volumes(task: str = "brain") -> tuple[np.ndarray, np.ndarray, Case]:
    """The MNI152 T1 template (Z x Y x X float32), its label volume for ``task`` and a label-less geometry Case."""
    if task not in ("brain", "tissue"):
        raise ConfigError(f"MNI152 task must be 'brain' or 'tissue', got {task!r}")
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    t1, spacing, origin, direction = _nib_to_zyx(template)
    mask = _nib_to_zyx(mask_img)[0] > 0.5
    if mask.shape != t1.shape:
        raise RuntimeError("nilearn's MNI152 brain mask and template differ in shape")
    if task == "brain":
        label = mask.astype(np.uint8)
    else:
        gm = _nib_to_zyx(datasets.load_mni152_gm_template(resolution=1))[0]
        wm = _nib_to_zyx(datasets.load_mni152_wm_template(resolution=1))[0]
        if gm.shape != t1.shape or wm.shape != t1.shape:
            raise RuntimeError("nilearn's MNI152 tissue maps and template differ in shape")
        other = np.clip(1.0 - gm - wm, 0.0, 1.0)
        label = (np.argmax(np.stack([other, gm, wm]), axis=0) + 1).astype(np.uint8)
        label[~mask] = 0
    geometry = Case(id="mni152", image=t1[None], spacing=spacing, origin=origin, direction=direction,
                    modality="MR")
    return t1, label, geometry


def mni152_slabs(mask: np.ndarray, fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)) -> dict[str, tuple[int, int]]:
    """Axial (array axis 0) slice ranges ``[start, stop)`` of the train/val/test slabs of the brain slices."""
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    first, last = int(rows[0]), int(rows[-1]) + 1
    n = last - first
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {"train": (first, first + n_train), "val": (first + n_train, first + n_train + n_val),
            "test": (first + n_train + n_val, last)}


def write_mni152_slabs(out_dir: Path, t1: np.ndarray, label: np.ndarray, slabs: dict[str, tuple[int, int]],
                       geometry: Case, labels: dict[str, int], overwrite: bool, **dataset_json) -> None:
    """Write the axial ``slabs`` of ``t1`` / ``label`` (Z x Y x X, ``geometry``'s spacing, origin and direction) as
    cases ``mni152_{train,val,test}`` of an nnU-Net raw dataset with ``splits.json``; each case's origin is moved to
    its first slice."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    spacing_xyz = np.asarray(tuple(reversed(geometry.spacing)))
    with _atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        names = {}
        for part, (start, stop) in slabs.items():
            cid = f"mni152_{part}"
            names[part] = cid
            origin = np.asarray(geometry.origin) + direction @ (spacing_xyz * np.array([0.0, 0.0, float(start)]))
            case = Case(id=cid, image=t1[None, start:stop], spacing=geometry.spacing, origin=tuple(origin.tolist()),
                        direction=geometry.direction, modality="MR")
            write_image_like(t1[start:stop].astype(np.float32), case, tmp / "imagesTr" / f"{cid}_0000.nii.gz")
            write_label_like(label[start:stop].astype(np.uint8), case, tmp / "labelsTr" / f"{cid}.nii.gz")
        write_dataset_json(tmp, {"0": "T1"}, labels, 3, ".nii.gz",
                           slabs={names[k]: list(v) for k, v in slabs.items()}, **dataset_json)
        _write_splits(tmp, [names["train"]], [names["val"]], [names["test"]])


def build_mni152(out_dir: str | os.PathLike, task: str = "brain", overwrite: bool = False,
                 shift: str | None = None, seed: int = 0) -> Path:
    """Write the MNI152 ``task`` ("brain" or "tissue") dataset (three axial slabs + splits.json) to ``out_dir``.

    ``shift``: a name of ``samadapt.data.shifts.SHIFTS``; the T1 volume is shifted (with ``seed``) before it is cut
    into the same slabs, labels unchanged: a domain-generalisation target whose test slab is the source's under a
    simulated scanner change."""
    out_dir = Path(out_dir)
    kind = f"mni152-{task}" + (f"-{shift}" if shift else "")
    if _existing(out_dir, kind, overwrite):
        return out_dir
    t1, label, geo = mni152_volumes(task)
    slabs = mni152_slabs(label > 0)
    if shift is not None:
        t1 = apply_shift(t1, shift, seed)
    labels = {"background": 0, "brain": 1} if task == "brain" else \
        {"background": 0, "csf_other": 1, "grey_matter": 2, "white_matter": 3}
    shifted = f", under a simulated shift: {SHIFTS[shift].description} (seed {seed})" if shift else ""
    write_mni152_slabs(
        out_dir, t1, label, slabs, geo, labels, overwrite, name=f"MNI152_{task}" + (f"_{shift}" if shift else ""),
        samadapt_demo=kind,
        description=f"MNI152 2009 T1 template (nilearn), {task} labels, cut into three axial slabs "
                    f"(train 60 %, val 10 %, test 30 % of the brain slices, inferior to superior){shifted}",
        reference="Fonov et al. 2009/2011, ICBM 2009 nonlinear asymmetric template, via nilearn",
    )
    return out_dir


def build_mni152_resolution(out_dir: str | os.PathLike, resolution: int = 2, overwrite: bool = False) -> Path:
    """MNI152 brain extraction at ``resolution`` mm (nilearn's resampled template and brain mask), nnU-Net raw.

    Three axial slabs ``mni152_{train,val,test}`` covering the same physical z-ranges as the 1 mm demo dataset's
    slabs (:func:`build_mni152`), plus ``splits.json``; only the test slab is normally used
    as a DG target.
    """
    from nilearn import datasets

    if resolution not in (1, 2, 3):
        raise ConfigError(f"MNI152 resolution must be 1, 2 or 3 mm, got {resolution}")
    out_dir = Path(out_dir)
    kind = f"mni152-brain-{resolution}mm"
    if _existing(out_dir, kind, overwrite):
        return out_dir
    ref_mask = datasets.load_mni152_brain_mask(resolution=1)
    ref = mni152_slabs(_nib_to_zyx(ref_mask)[0] > 0.5)
    template = datasets.load_mni152_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    t1, spacing, origin, direction = _nib_to_zyx(template)
    mask = _nib_to_zyx(mask_img)[0] > 0.5
    # Map the 1 mm slab bounds (array axis 0 = the NIfTI k axis) to world z, then to this resolution's indices.
    a1, a2 = np.asarray(ref_mask.affine), np.asarray(template.affine)
    k = np.arange(t1.shape[0])
    z_world = a2[2, 3] + a2[2, 2] * k
    slabs = {}
    for part, (start, stop) in ref.items():
        lo, hi = sorted((a1[2, 3] + a1[2, 2] * (start - 0.5), a1[2, 3] + a1[2, 2] * (stop - 0.5)))
        inside = np.flatnonzero((z_world >= lo) & (z_world < hi))
        if inside.size == 0:
            raise RuntimeError(f"the {part} slab holds no {resolution} mm slice")
        slabs[part] = (int(inside[0]), int(inside[-1]) + 1)
    geometry = Case(id="mni152", image=t1[None], spacing=spacing, origin=origin, direction=direction, modality="MR")
    write_mni152_slabs(
        out_dir, t1, mask, slabs, geometry, {"background": 0, "brain": 1}, overwrite,
        name=f"MNI152_brain_{resolution}mm", samadapt_demo=kind,
        description=f"MNI152 2009 T1 template resampled by nilearn to {resolution} mm, brain mask labels, cut "
                    "into the same physical axial slabs as the 1 mm demo (same subject: a resolution shift)",
        reference="Fonov et al. 2009/2011, ICBM 2009 nonlinear symmetric template, via nilearn",
    )
    return out_dir


# --- stardist nuclei ---------------------------------------------------------------------------------------------
def stardist_files() -> tuple[Path, Path]:
    """Paths of stardist's bundled ``img2d.tif`` and ``mask2d.tif`` (stardist is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("stardist")
    if spec is None or spec.origin is None:
        raise InputError("stardist", "package not installed (pip install --no-deps stardist)")
    folder = Path(spec.origin).parent / "data" / "images"
    img, mask = folder / "img2d.tif", folder / "mask2d.tif"
    for p in (img, mask):
        if not p.is_file():
            raise InputError(p, "stardist's bundled sample image is missing")
    return img, mask


def _read_tif(path: Path) -> np.ndarray:
    try:
        import tifffile

        return np.asarray(tifffile.imread(path))
    except ImportError:
        from PIL import Image

        with Image.open(path) as picture:
            return np.asarray(picture)


def build_nuclei(out_dir: str | os.PathLike, tile: int = 128, format: str = "nnunet", overwrite: bool = False) -> Path:
    """Write the stardist nuclei image cut into ``tile x tile`` tiles (binary nuclei) to ``out_dir``.

    ``format``: ``"nnunet"`` (2D PNG nnU-Net raw, default) or ``"folder2d"`` (images/ + masks/ in {0, 255}).
    """
    from PIL import Image

    if format not in ("nnunet", "folder2d"):
        raise ConfigError(f"nuclei format must be 'nnunet' or 'folder2d', got {format!r}")
    out_dir = Path(out_dir)
    kind = f"nuclei-{format}-{tile}"
    if format == "nnunet" and _existing(out_dir, kind, overwrite):
        return out_dir
    if format == "folder2d" and not overwrite and (out_dir / "images").is_dir() and (out_dir / "masks").is_dir():
        return out_dir
    img_path, mask_path = stardist_files()
    img, inst = _read_tif(img_path).astype(np.float32), _read_tif(mask_path)
    if img.shape != inst.shape:
        raise InputError(mask_path, f"mask size {inst.shape} differs from image size {img.shape}")
    top = float(np.percentile(img, 99.9)) or 1.0
    img8 = np.clip(img / top * 255.0, 0, 255).round().astype(np.uint8)
    mask = (inst > 0).astype(np.uint8)
    rows, cols = img.shape[0] // tile, img.shape[1] // tile
    if rows < 2 or cols < 2:
        raise ConfigError(f"tile {tile} is too large for a {img.shape} image")
    ids: dict[tuple[int, int], str] = {}
    with _atomic_dir(out_dir, overwrite) as tmp:
        img_dir, lab_dir = (tmp / "imagesTr", tmp / "labelsTr") if format == "nnunet" else (tmp / "images", tmp / "masks")
        img_dir.mkdir()
        lab_dir.mkdir()
        for r in range(rows):
            for c in range(cols):
                cid = f"nuclei_r{r}_c{c}"
                ids[(r, c)] = cid
                window = (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
                name = f"{cid}_0000.png" if format == "nnunet" else f"{cid}.png"
                Image.fromarray(img8[window]).save(img_dir / name)
                write_label_png(mask[window], lab_dir / f"{cid}.png", scale=1 if format == "nnunet" else 255)
        test = [ids[(rows - 1, c)] for c in range(cols)]
        val = [ids[(rows - 2, c)] for c in range(cols // 2, cols)]
        train = [cid for cid in ids.values() if cid not in test and cid not in val]
        if format == "nnunet":
            write_dataset_json(tmp, {"0": "gray"}, {"background": 0, "nucleus": 1}, len(ids), ".png",
                               name="StardistNuclei", samadapt_demo=kind,
                               description="stardist img2d.tif (fluorescence nuclei) cut into tiles; binary nuclei",
                               reference="stardist package sample data (Schmidt et al. 2018)")
        else:
            (tmp / "labels.json").write_text(json.dumps({"labels": {"background": 0, "nucleus": 1},
                                                         "modality": "natural"}, indent=2) + "\n")
        _write_splits(tmp, train, val, test)
    return out_dir


# --- InVesalius head CT ------------------------------------------------------------------------------------------
def invesalius_file() -> Path:
    """The InVesalius example project ``Cranium.inv3``; ``InputError`` with install advice when absent."""
    for candidate in INVESALIUS_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise InputError(INVESALIUS_CANDIDATES[0], "not found: install the Debian package invesalius-examples "
                                               "(sudo apt-get install invesalius-examples)")


def read_invesalius(path: str | os.PathLike | None = None) -> Case:
    """Read the CT volume of an InVesalius ``.inv3`` project (a gzipped tar: ``main.plist`` + raw ``matrix.dat``)."""
    path = Path(path) if path is not None else invesalius_file()
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise InputError(path, "no main.plist inside; not an InVesalius project")
            main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = main["matrix"]
            raw = tar.extractfile(members[matrix["filename"]]).read()
    except (tarfile.TarError, OSError, EOFError, KeyError, plistlib.InvalidFileException) as err:
        raise InputError(path, f"cannot read InVesalius project (unreadable or truncated file): {err}") from None
    shape = tuple(int(s) for s in matrix["shape"])
    dtype = np.dtype(matrix.get("dtype", "int16")).newbyteorder("<")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise InputError(path, f"matrix holds {len(raw)} bytes, expected {shape} x {dtype.itemsize}")
    volume = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.int16)
    sx, sy, sz = (float(v) for v in main.get("spacing", (1.0, 1.0, 1.0)))
    return Case(id="cranium", image=volume[None].astype(np.float32), spacing=(sz, sy, sx), source=str(path),
                modality=str(main.get("modality", "CT")), meta={"name": main.get("name", "")})


def build_invesalius_ct(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the InVesalius head CT with HU-threshold labels (1 soft tissue, 2 bone) to ``out_dir``."""
    out_dir = Path(out_dir)
    kind = "invesalius-ct"
    if _existing(out_dir, kind, overwrite):
        return out_dir
    case = read_invesalius()
    hu = case.image[0]
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[(hu >= -300) & (hu < 226)] = 1
    label[hu >= 226] = 2
    with _atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        write_image_like(hu.astype(np.int16), case, tmp / "imagesTr" / "cranium_0000.nii.gz")
        write_label_like(label, case, tmp / "labelsTr" / "cranium.nii.gz")
        write_dataset_json(tmp, {"0": "CT"}, {"background": 0, "soft_tissue": 1, "bone": 2}, 1, ".nii.gz",
                           name="InVesaliusCranium", samadapt_demo=kind,
                           description="InVesalius example head CT (ProMED CT 0051); labels are HU thresholds "
                                       "(soft tissue [-300, 226) HU, bone >= 226 HU)",
                           reference="Debian package invesalius-examples")
    return out_dir


DEMO_DATASETS: dict[str, Callable[..., Path]] = {
    "mni152-brain": partial(build_mni152, task="brain"),
    "mni152-tissue": partial(build_mni152, task="tissue"),
    "nuclei": build_nuclei,
    "invesalius-ct": build_invesalius_ct,
    "mni152-brain-2mm": partial(build_mni152_resolution, resolution=2),
    "mni152-brain-3mm": partial(build_mni152_resolution, resolution=3),
}
"""Demo dataset names -> builders; ``mni152-{brain,tissue}-{shift}`` for every shift of ``shifts.SHIFTS`` too."""
DEMO_DATASETS.update({f"mni152-{task}-{shift}": partial(build_mni152, task=task, shift=shift)
                      for task in ("brain", "tissue") for shift in SHIFTS})


def build_demo(name: str, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Build the demo dataset ``name`` (a key of ``DEMO_DATASETS``) into ``out_dir``."""
    if name not in DEMO_DATASETS:
        raise ConfigError(f"unknown demo dataset {name!r}; available: {', '.join(DEMO_DATASETS)}")
    return DEMO_DATASETS[name](out_dir, overwrite=overwrite)
