"""A fault corpus over every registered reader: each case is a small valid dataset of one format with one file
broken (truncated at several offsets, emptied, NaN/Inf, a wrong dtype, huge or zero declared dimensions, odd
spacing or direction, undeclared label values, an image/label size mismatch).

Each case asserts what a user meets: `samadapt data check` lists the problem naming the file (exit 1, no
traceback), and `samadapt train` (labelled formats) or `samadapt predict` (prediction-only formats) stops with one
line naming the file, exit 2, no traceback and nothing written in the output folder.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from typer.testing import CliRunner

from samadapt.cli import app
from samadapt.data.check import check_dataset
from samadapt.data.readers import READERS
from support import write_dicom_series

TRAIN = ["backbone.name=tiny", "method.name=decoder", "train.device=cpu", "data.cache=off", "train.epochs=1",
         "train.threads=1", "data.test_fraction=0", "data.val_fraction=0.34"]
SHAPE = (3, 16, 16)  # z, y, x of every volume


def _masked(shape=SHAPE, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[..., 4:12, 4:12] = 1
    return (rng.random(shape) * 100 + 200 * label).astype(np.float32), label


def _write_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:image.GetDimension()])
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith((".gz", ".nrrd")))
    return path


def _write_picture(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _pictures(images: Path, masks: Path | None, stems, ending=".png", mask_suffix="") -> dict[str, Path]:
    images.mkdir(parents=True)
    if masks is not None:
        masks.mkdir(parents=True)
    files = {}
    for i, stem in enumerate(stems):
        image, label = _masked((16, 16), i)
        files[f"image{i}"] = _write_picture(images / f"{stem}{ending}", np.stack([image.astype(np.uint8)] * 3, -1))
        if masks is not None:
            files[f"label{i}"] = _write_picture(masks / f"{stem}{mask_suffix}.png", label * 255)
    return files


# --- one valid dataset per reader: (path to give the CLI, {role: file}, the CLI that loads it) ---------------------
def nnunet(root: Path, ending: str = ".nii.gz"):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    files = {}
    for i in range(3):
        image, label = _masked(seed=i)
        files[f"image{i}"] = _write_volume(root / "imagesTr" / f"c{i}_0000{ending}", image)
        files[f"label{i}"] = _write_volume(root / "labelsTr" / f"c{i}{ending}", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                   "numTraining": 3, "file_ending": ending}))
    return root, files, "train"


def folder2d(root: Path, ending: str = ".png"):
    return root, _pictures(root / "images", root / "masks", ["a", "b", "c"], ending), "train"


def pranet(root: Path):
    files = _pictures(root / "TrainDataset" / "image", root / "TrainDataset" / "mask", ["1", "2", "3"])
    _pictures(root / "TestDataset" / "Kvasir" / "images", root / "TestDataset" / "Kvasir" / "masks", ["9"])
    return root, files, "train"


def isic2018(root: Path):
    files = _pictures(root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth",
                      ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"], ".jpg", "_segmentation")
    _pictures(root / "ISIC2018_Task1-2_Validation_Input", root / "ISIC2018_Task1_Validation_GroundTruth",
              ["ISIC_0012255"], ".jpg", "_segmentation")
    return root, files, "train"


def synapse(root: Path):
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists_Synapse").mkdir()
    files, names = {}, []
    for i in range(3):
        image, label = _masked((16, 16), i)
        names.append(f"case000{i}_slice000")
        files[f"image{i}"] = root / "train_npz" / f"{names[-1]}.npz"
        np.savez(files[f"image{i}"], image=image / 300, label=label)
    with h5py.File(root / "test_vol_h5" / "case0009.npy.h5", "w") as f:
        image, label = _masked()
        f["image"], f["label"] = image / 300, label.astype(np.float32)
    (root / "lists_Synapse" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "lists_Synapse" / "test_vol.txt").write_text("case0009\n")
    return root, files, "train"


def _site(site: Path) -> dict[str, Path]:
    site.mkdir(parents=True)
    files = {}
    for i in range(3):
        image, label = _masked(seed=i)
        files[f"image{i}"] = _write_volume(site / f"Case0{i}.nii.gz", image.astype(np.int16))
        files[f"label{i}"] = _write_volume(site / f"Case0{i}_segmentation.nii.gz", label)
    return files


def prostate_site(root: Path):
    return root / "RUNMC", _site(root / "RUNMC"), "train"


def prostate_sites(root: Path):
    files = [_site(root / name) for name in ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")]
    return root, files[0], "check"  # which sites train is a protocol's choice; data check reads every case


def npz(root: Path):
    root.mkdir(parents=True)
    files = {}
    for i in range(3):
        image, label = _masked(seed=i)
        files[f"image{i}"] = root / f"c{i}.npz"
        np.savez(files[f"image{i}"], imgs=image, gts=label)
    return root, files, "train"


def dicom(root: Path):
    image, _ = _masked((4, 16, 16))
    write_dicom_series(root, image.astype(np.int16), "1.2.826.0.1.3680043.2.1125.770")
    return root, {"image0": sorted(root.glob("*.dcm"))[1]}, "predict"


def volumes(root: Path, ending: str = ".nii.gz"):
    root.mkdir(parents=True)
    files = {f"image{i}": _write_volume(root / f"v{i}{ending}", _masked(seed=i)[0]) for i in range(2)}
    return root, files, "predict"


def single_file(root: Path, ending: str = ".nrrd"):
    root.mkdir(parents=True)
    if ending == ".png":
        path = _write_picture(root / "one.png", _masked((16, 16))[0].astype(np.uint8))
    else:
        path = _write_volume(root / f"one{ending}", _masked()[0])
    return path, {"image0": path}, "predict"


# builder name -> (the reader it makes a dataset for, the builder)
BUILDERS: dict[str, tuple[str, Callable]] = {
    "nnunet": ("nnunet", nnunet), "nnunet-mha": ("nnunet", lambda r: nnunet(r, ".mha")),
    "nnunet-nrrd": ("nnunet", lambda r: nnunet(r, ".nrrd")), "folder2d": ("folder2d", folder2d),
    "folder2d-tif": ("folder2d", lambda r: folder2d(r, ".tif")), "pranet": ("pranet", pranet),
    "isic2018": ("isic2018", isic2018), "synapse": ("synapse", synapse),
    "prostate-site": ("prostate-site", prostate_site), "prostate-sites": ("prostate-sites", prostate_sites),
    "npz": ("npz", npz), "dicom": ("dicom", dicom), "volumes": ("volumes", volumes),
    "volumes-nii": ("volumes", lambda r: volumes(r, ".nii")), "file": ("file", single_file),
    "file-png": ("file", lambda r: single_file(r, ".png")),
}


def test_the_corpus_covers_every_registered_reader(tmp_path):
    from samadapt.data.readers import detect_format

    assert set(READERS.names()) == {reader for reader, _ in BUILDERS.values()}
    for name, (reader, build) in BUILDERS.items():  # each builder makes a valid dataset of its reader
        assert detect_format(build(tmp_path / name)[0]) == reader, name


# --- the faults ----------------------------------------------------------------------------------------------------
def cut(fraction: float) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return apply


def keep(n: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:n])
    return apply


def drop_tail(n: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:-n])
    return apply


def _array_of(path: Path) -> tuple[np.ndarray, str]:
    """The pixel array of a volume, picture or npz file and the npz key it came from (None for others)."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            key = next(k for k in ("imgs", "image") if k in data)
            return data[key], key
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))), None


def rewrite(change: Callable[[np.ndarray], np.ndarray], spacing=None, direction=None) -> Callable[[Path], None]:
    """Rewrite the file with ``change(array)`` (and a given spacing / direction), in its own format."""
    def apply(path: Path) -> None:
        array, key = _array_of(path)
        new = change(array)
        if key is not None:
            with np.load(path) as data:
                content = dict(data)
            content[key] = new
            np.savez(path, **content)
            return
        image = sitk.ReadImage(str(path))
        out = sitk.GetImageFromArray(new)
        out.CopyInformation(image) if out.GetSize() == image.GetSize() else out.SetSpacing(image.GetSpacing())
        if spacing is not None:
            out.SetSpacing(spacing)
        if direction is not None:
            out.SetDirection(direction)
        sitk.WriteImage(out, str(path))
    return apply


def with_nonfinite(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    array.flat[3], array.flat[7] = np.nan, np.inf
    return array


def nifti_header_dims(dims: tuple[int, ...]) -> Callable[[Path], None]:
    """Patch the dim[] field of a NIfTI-1 header (a huge or zero size the data does not hold)."""
    def apply(path: Path) -> None:
        packed = path.name.endswith(".gz")
        data = bytearray(gzip.decompress(path.read_bytes()) if packed else path.read_bytes())
        data[40:56] = np.array([len(dims), *dims, *[1] * (7 - len(dims))], "<i2").tobytes()
        path.write_bytes(gzip.compress(bytes(data)) if packed else bytes(data))
    return apply


def mha_header(field: str, value: str) -> Callable[[Path], None]:
    """Replace one line of an .mha text header (DimSize, ElementSpacing, TransformMatrix ...)."""
    def apply(path: Path) -> None:
        data = path.read_bytes()
        end = data.index(b"ElementDataFile")
        lines = [line for line in data[:end].decode().splitlines() if not line.startswith(field)]
        path.write_bytes(("\n".join(lines + [f"{field} = {value}"]) + "\n").encode() + data[end:])
    return apply


ANY = ("nnunet", "nnunet-mha", "nnunet-nrrd", "folder2d", "folder2d-tif", "pranet", "isic2018", "synapse",
       "prostate-site", "prostate-sites", "npz", "dicom", "volumes", "volumes-nii", "file", "file-png")
VOLUMES = ("nnunet", "nnunet-mha", "nnunet-nrrd", "prostate-site", "volumes", "volumes-nii", "file")
LABELLED_VOLUMES = ("nnunet", "nnunet-mha", "nnunet-nrrd", "prostate-site")
# fault name -> (what it does to the victim file, the builders it applies to, the role of the victim)
FAULTS: dict[str, tuple[Callable, tuple[str, ...], str]] = {
    "empty": (keep(0), ANY, "image1"),
    "header-only": (keep(24), ANY, "image1"),
    "cut-at-half": (cut(0.5), ANY, "image1"),
    "cut-at-90%": (cut(0.9), ANY, "image1"),
    "last-16-bytes-cut": (drop_tail(16), ANY, "image1"),
    "label-empty": (keep(0), LABELLED_VOLUMES + ("folder2d", "pranet", "isic2018"), "label1"),
    "label-cut-at-half": (cut(0.5), LABELLED_VOLUMES + ("folder2d", "pranet", "isic2018"), "label1"),
    "nan-inf": (rewrite(with_nonfinite), VOLUMES + ("npz", "synapse"), "image1"),
    "complex-dtype": (rewrite(lambda a: a.astype(np.complex64)), ("npz", "synapse"), "image1"),
    "string-dtype": (rewrite(lambda a: a.astype(str)), ("npz", "synapse"), "image1"),
    "zero-size": (rewrite(lambda a: a[:0]), ("npz", "synapse"), "image1"),
    "huge-declared-dims": (nifti_header_dims((4096, 4096, 4096)), ("nnunet", "volumes-nii", "prostate-site"),
                           "image1"),
    "zero-declared-dim": (nifti_header_dims((16, 0, 3)), ("nnunet", "volumes-nii"), "image1"),
    "huge-mha-dims": (mha_header("DimSize", "100000 100000 100000"), ("nnunet-mha",), "image1"),
    "zero-spacing": (mha_header("ElementSpacing", "0 0.8 2"), ("nnunet-mha",), "image1"),
    "nan-spacing": (mha_header("ElementSpacing", "nan 0.8 2"), ("nnunet-mha",), "image1"),
    "singular-direction": (mha_header("TransformMatrix", "1 0 0 1 0 0 0 0 0"), ("nnunet-mha",), "image1"),
    "label-out-of-range": (rewrite(lambda a: np.where(a > 0, 7, 0).astype(a.dtype)), LABELLED_VOLUMES, "label1"),
    "label-non-integer": (rewrite(lambda a: a.astype(np.float32) * 0.5), LABELLED_VOLUMES, "label1"),
    "label-size-mismatch": (rewrite(lambda a: np.zeros((a.shape[0], 12, 12), a.dtype)), LABELLED_VOLUMES, "label1"),
    "label-spacing-mismatch": (rewrite(lambda a: a, spacing=(0.5, 0.5, 5.0)), LABELLED_VOLUMES, "label1"),
    "mask-out-of-range": (lambda p: _write_picture(p, np.full((16, 16), 7, np.uint8)), ("folder2d",), "label1"),
    "mask-size-mismatch": (lambda p: _write_picture(p, np.zeros((12, 16), np.uint8)), ("folder2d", "isic2018"),
                           "label1"),
    "npz-mask-negative": (lambda p: _rewrite_npz(p, "gts", lambda a: -a), ("npz",), "image1"),
    "npz-empty-image-and-mask": (lambda p: _rewrite_npz(p, "imgs", lambda a: a[:0], gts=np.zeros((0, 16, 16))),
                                 ("npz",), "image1"),
    "npz-zero-spacing": (lambda p: _rewrite_npz(p, "imgs", lambda a: a, spacing=np.array([0.0, 1.0, 1.0])),
                         ("npz",), "image1"),
    "npz-nan-spacing": (lambda p: _rewrite_npz(p, "imgs", lambda a: a, spacing=np.array([1.0, np.nan, 1.0])),
                        ("npz",), "image1"),
    "npz-mask-size-mismatch": (lambda p: _rewrite_npz(p, "gts", lambda a: a[..., :8]), ("npz",), "image1"),
}


def _rewrite_npz(path: Path, key: str, change: Callable[[np.ndarray], np.ndarray], **more: np.ndarray) -> None:
    """Rewrite array ``key`` of an npz file as ``change(it as int32)``, adding or replacing the arrays ``more``."""
    with np.load(path) as data:
        content = dict(data)
    content[key] = change(content[key].astype(np.int32))
    np.savez(path, **{**content, **more})


CASES = [(builder, fault) for fault, (_, builders, _) in FAULTS.items() for builder in builders]


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """A one-epoch tiny run to predict with (the prediction-only formats)."""
    root = tmp_path_factory.mktemp("fuzz_run")
    data = folder2d(root / "data")[0]
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(root / "run")] +
                                [a for s in TRAIN for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.mark.parametrize("builder,fault", CASES, ids=[f"{b}:{f}" for b, f in CASES])
def test_a_broken_file_is_named_in_one_line_and_nothing_is_written(builder, fault, tmp_path, model_run, capfd):
    path, files, cli = BUILDERS[builder][1](tmp_path / "data")
    apply, _, role = FAULTS[fault]
    victim = files.get(role, files["image0"])  # one-file inputs: their only file
    apply(victim)
    report = check_dataset(path)
    assert not report["ok"] and any(victim.name in f"{e['file']} {e['problem']}" for e in report["errors"]), report
    runner = CliRunner()
    check = runner.invoke(app, ["data", "check", str(path)])
    assert check.exit_code == 1 and "Traceback" not in check.output, check.output
    out = tmp_path / "out"
    if cli == "train":
        result = runner.invoke(app, ["train", "--data", str(path), "--out", str(out)] +
                               [a for s in TRAIN for a in ("--set", s)])
    elif cli == "predict":
        result = runner.invoke(app, ["predict", str(path), "--run", str(model_run), "--out", str(out), "--device",
                                     "cpu"])
    else:
        return
    errors = [line for line in result.output.splitlines() if line.startswith("error")]  # after predict's own notes
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1], result.output
    assert victim.name in errors[0] and "Traceback" not in result.output, result.output
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert "Traceback" not in capfd.readouterr().err

