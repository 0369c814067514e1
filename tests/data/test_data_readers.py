"""Readers on small files written here: nnU-Net raw (3D NIfTI/NRRD/MHA and 2D PNG), 2D folders, npz, DICOM, and
every bad input of issue 3 (each must raise InputError naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from samadapt.data.cases import write_label_like
from samadapt.data.readers import READERS, detect_format, load_case, open_dataset
from samadapt.errors import InputError
from support import write_dicom_series

ROT = 0.5  # radians about z, then a tilt about x: a rotated, non-axis-aligned direction
_cz, _sz, _cx, _sx = np.cos(ROT), np.sin(ROT), np.cos(0.2), np.sin(0.2)
DIRECTION = tuple((np.array([[_cz, -_sz, 0], [_sz, _cz, 0], [0, 0, 1]]) @
                   np.array([[1, 0, 0], [0, _cx, -_sx], [0, _sx, _cx]])).ravel().tolist())
SPACING_XYZ = (0.7, 0.8, 3.0)
ORIGIN = (10.5, -20.25, 33.0)


def sitk_image(arr: np.ndarray, spacing=SPACING_XYZ, origin=ORIGIN, direction=DIRECTION):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def volume_pair(shape=(6, 20, 24), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 5:12, 6:15] = 1
    label[2:5, 14:18, 3:9] = 2
    return image, label


def write_nnunet(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], ending=".nii.gz",
                 labels=None, channels=None, test_cases=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for cid, (image, label) in cases.items():
        sitk.WriteImage(sitk_image(image), str(root / "imagesTr" / f"{cid}_0000{ending}"))
        sitk.WriteImage(sitk_image(label), str(root / "labelsTr" / f"{cid}{ending}"))
    for cid, image in (test_cases or {}).items():
        (root / "imagesTs").mkdir(exist_ok=True)
        sitk.WriteImage(sitk_image(image), str(root / "imagesTs" / f"{cid}_0000{ending}"))
    meta = {"channel_names": channels or {"0": "CT"},
            "labels": labels or {"background": 0, "liver": 1, "spleen": 2},
            "numTraining": len(cases), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def nnunet_dir(tmp_path):
    return write_nnunet(tmp_path / "Dataset001_Test", {"a": volume_pair(seed=0), "b": volume_pair(seed=1)},
                        test_cases={"t": volume_pair(seed=2)[0]})


def test_registry_lists_builtin_readers():
    assert {"nnunet", "folder2d", "npz", "dicom", "file"} <= set(READERS.names())


def test_nnunet_reads_cases_labels_and_geometry(nnunet_dir):
    ds = open_dataset(nnunet_dir)
    assert ds.format == "nnunet"
    assert ds.case_ids == ["a", "b"] and ds.test_case_ids == ["t"]
    assert ds.labels == {"background": 0, "liver": 1, "spleen": 2} and ds.num_classes == 2
    assert ds.class_names == ["liver", "spleen"] and ds.modality == "CT"
    case = ds.load("a")
    image, label = volume_pair(seed=0)
    assert case.image.shape == (1, 6, 20, 24) and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.image[0], image.astype(np.float32))
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == pytest.approx((3.0, 0.8, 0.7))  # z, y, x
    np.testing.assert_allclose(case.origin, ORIGIN)
    np.testing.assert_allclose(case.direction, DIRECTION, atol=1e-6)  # NIfTI stores float32
    test_case = ds.load("t")
    assert test_case.label is None and test_case.modality == "CT"


def test_prediction_written_back_has_identical_geometry(nnunet_dir, tmp_path):
    """Anisotropic, rotated volume: the written prediction must overlay the input exactly."""
    case = open_dataset(nnunet_dir).load("b")
    prediction = (case.label == 2).astype(np.uint8)
    out = write_label_like(prediction, case, tmp_path / "pred" / "b.nii.gz")
    written = sitk.ReadImage(str(out))
    source = sitk.ReadImage(str(nnunet_dir / "imagesTr" / "b_0000.nii.gz"))
    assert written.GetSize() == source.GetSize()
    assert written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin()
    assert written.GetDirection() == source.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), prediction)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_nnunet_other_volume_formats(tmp_path, ending):
    root = write_nnunet(tmp_path / "ds", {"c": volume_pair()}, ending=ending)
    case = open_dataset(root).load("c")
    assert case.file_ending == ending and case.spacing == pytest.approx((3.0, 0.8, 0.7))
    np.testing.assert_array_equal(case.label, volume_pair()[1])
    out = write_label_like(case.label, case, tmp_path / f"pred{ending}")
    assert sitk.ReadImage(str(out)).GetSpacing() == pytest.approx(SPACING_XYZ)


def test_nnunet_multichannel_and_channel_modality(tmp_path):
    root = write_nnunet(tmp_path / "ds", {"p": volume_pair()}, channels={"0": "T2", "1": "ADC"},
                        labels={"background": 0, "pz": 1, "tz": 2})
    sitk.WriteImage(sitk_image(volume_pair(seed=5)[0]), str(root / "imagesTr" / "p_0001.nii.gz"))
    ds = open_dataset(root)
    case = ds.load("p")
    assert ds.modality == "MR" and case.image.shape == (2, 6, 20, 24) and case.channel_names == ["T2", "ADC"]


def test_nnunet_2d_png(tmp_path):
    root = tmp_path / "ds2d"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 1
    Image.fromarray(rgb).save(root / "imagesTr" / "x_0000.png")
    Image.fromarray(mask).save(root / "labelsTr" / "x.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"},
                                                   "labels": {"background": 0, "road": 1}, "numTraining": 1,
                                                   "file_ending": ".png"}))
    case = open_dataset(root).load("x")
    assert case.is_2d and case.image.shape == (3, 1, 30, 40) and case.modality == "natural"
    np.testing.assert_array_equal(case.image[:, 0].transpose(1, 2, 0), rgb)
    np.testing.assert_array_equal(case.label[0], mask)
    out = write_label_like(case.label[0], case, tmp_path / "pred.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), mask)


# --- nnU-Net bad input ---------------------------------------------------------------------------------------------
def test_mask_size_differs_from_image(tmp_path):
    image, label = volume_pair()
    root = write_nnunet(tmp_path / "ds", {"a": (image, label[:, :-2])})
    with pytest.raises(InputError) as err:
        open_dataset(root).load("a")
    assert "labelsTr/a.nii.gz" in str(err.value) and "size" in str(err.value)


def test_mask_geometry_differs_from_image(tmp_path):
    image, label = volume_pair()
    root = write_nnunet(tmp_path / "ds", {"a": (image, label)})
    sitk.WriteImage(sitk_image(label, spacing=(1.0, 1.0, 1.0)), str(root / "labelsTr" / "a.nii.gz"))
    with pytest.raises(InputError, match=r"labelsTr/a\.nii\.gz.*spacing"):
        open_dataset(root).load("a")


def test_undeclared_label_value(tmp_path):
    image, label = volume_pair()
    label[0, 0, 0] = 7
    root = write_nnunet(tmp_path / "ds", {"a": (image, label)})
    with pytest.raises(InputError) as err:
        open_dataset(root).load("a")
    assert "labelsTr/a.nii.gz" in str(err.value) and "[7]" in str(err.value) and "dataset.json" in str(err.value)


def test_missing_0000_channel(tmp_path):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()})
    (root / "imagesTr" / "a_0000.nii.gz").rename(root / "imagesTr" / "a.nii.gz")
    with pytest.raises(InputError, match=r"a_0000\.nii\.gz.*missing channel"):
        open_dataset(root)


def test_missing_second_channel(tmp_path):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()}, channels={"0": "T1", "1": "T2"})
    with pytest.raises(InputError, match=r"a_0001\.nii\.gz.*missing channel file 0001"):
        open_dataset(root)


@pytest.mark.parametrize("which", ["imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz"])
def test_truncated_nifti(tmp_path, which):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()})
    path = root / which
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        open_dataset(root).load("a")
    assert which in str(err.value) and "truncated" in str(err.value)


def test_unreadable_file(tmp_path):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()})
    (root / "imagesTr" / "a_0000.nii.gz").write_bytes(b"not an image at all" * 20)
    with pytest.raises(InputError, match=r"a_0000\.nii\.gz"):
        open_dataset(root).load("a")


@pytest.mark.parametrize("meta,problem", [
    ({"labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz"}, "channel_names"),
    ({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}, "labels"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 2}, "file_ending": ".nii.gz"}, "consecutive"),
    ({"channel_names": {"0": "CT"}, "labels": {"x": 1}, "file_ending": ".nii.gz"}, "background"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": [1, 2]}, "file_ending": ".nii.gz"},
     "region-based"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}}, "file_ending"),
])
def test_bad_dataset_json(tmp_path, meta, problem):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as err:
        open_dataset(root)
    assert "dataset.json" in str(err.value) and problem in str(err.value)


def test_invalid_json(tmp_path):
    root = write_nnunet(tmp_path / "ds", {"a": volume_pair()})
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json: invalid JSON"):
        open_dataset(root)


# --- 2D folders ------------------------------------------------------------------------------------------------
def write_folder2d(root: Path, n=3, size=(30, 40), rgb=True, mask_ext=".png", mask_suffix="", scale=255):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = {}
    for i in range(n):
        shape = size + (3,) if rgb else size
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
        m = np.zeros(size, np.uint8)
        m[3 + i: 15, 5: 20 + i] = 1
        masks[f"img{i}"] = m
        Image.fromarray(m * scale).save(root / "masks" / f"img{i}{mask_suffix}{mask_ext}")
    return masks


def test_folder2d_binary_255(tmp_path):
    masks = write_folder2d(tmp_path / "polyps")
    ds = open_dataset(tmp_path / "polyps")
    assert ds.format == "folder2d" and ds.case_ids == ["img0", "img1", "img2"] and ds.num_classes == 1
    case = ds.load("img1")
    assert case.image.shape == (3, 1, 30, 40) and case.modality == "natural" and case.is_2d
    np.testing.assert_array_equal(case.label[0], masks["img1"])
    out = write_label_like(case.label, case, tmp_path / "out" / "img1.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), masks["img1"] * 255)  # same convention back


def test_folder2d_isic_suffix_and_jpeg_masks(tmp_path):
    masks = write_folder2d(tmp_path / "isic", rgb=False, mask_ext=".jpg", mask_suffix="_segmentation")
    case = open_dataset(tmp_path / "isic").load("img2")
    assert case.image.shape == (1, 1, 30, 40)
    np.testing.assert_array_equal(case.label[0], masks["img2"])


def test_folder2d_integer_ids_with_labels_json(tmp_path):
    root = tmp_path / "multi"
    write_folder2d(root, scale=1)
    m = np.zeros((30, 40), np.uint8)
    m[:5] = 2
    Image.fromarray(m).save(root / "masks" / "img0.png")
    with pytest.raises(InputError, match=r"img0\.png.*\[2\].*labels\.json"):
        open_dataset(root).load("img0")
    (root / "labels.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    ds = open_dataset(root)
    assert ds.num_classes == 2
    np.testing.assert_array_equal(ds.load("img0").label[0], m)


def test_folder2d_bad_inputs(tmp_path):
    root = tmp_path / "bad"
    write_folder2d(root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "img0.png")
    with pytest.raises(InputError) as err:
        open_dataset(root).load("img0")
    assert "masks/img0.png" in str(err.value) and "differs from image size" in str(err.value)
    (root / "images" / "img1.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(InputError, match=r"img1\.jpg.*cannot read"):
        open_dataset(root).load("img1")
    (root / "masks" / "img2.png").unlink()
    with pytest.raises(InputError, match=r"img2\.jpg.*no mask"):
        open_dataset(root)
    (root / "masks" / "img2.png").write_bytes(b"")
    (root / "masks" / "orphan.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"orphan\.png.*no image"):
        open_dataset(root)


def test_folder2d_images_only_gives_test_cases(tmp_path):
    (tmp_path / "pred" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pred" / "images" / "q.png")
    ds = open_dataset(tmp_path / "pred")
    assert ds.case_ids == [] and ds.test_case_ids == ["q"] and ds.load("q").label is None
    bare = open_dataset(tmp_path / "pred" / "images")  # a bare folder of pictures works too
    assert bare.format == "folder2d" and bare.test_case_ids == ["q"]


# --- npz -------------------------------------------------------------------------------------------------------
def test_npz_volume_and_2d(tmp_path):
    image, label = volume_pair()
    np.savez_compressed(tmp_path / "vol.npz", imgs=image, gts=label, spacing=np.array(SPACING_XYZ))
    np.savez(tmp_path / "pic.npz", image=np.zeros((12, 16, 3), np.uint8), mask=np.ones((12, 16), np.uint8))
    ds = open_dataset(tmp_path)
    assert ds.format == "npz" and ds.case_ids == ["pic", "vol"] and ds.num_classes == 2
    vol = ds.load("vol")
    assert vol.image.shape == (1, 6, 20, 24) and vol.spacing == pytest.approx((3.0, 0.8, 0.7)) and vol.modality == "CT"
    np.testing.assert_array_equal(vol.label, label)
    pic = ds.load("pic")
    assert pic.is_2d and pic.image.shape == (3, 1, 12, 16) and pic.modality == "natural"
    single = load_case(tmp_path / "vol.npz")
    np.testing.assert_array_equal(single.label, label)


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "a.npz", imgs=np.zeros((4, 8, 8)), gts=np.zeros((4, 8, 7), np.uint8))
    with pytest.raises(InputError, match=r"a\.npz.*mask size"):
        open_dataset(tmp_path / "a.npz").load("a")
    np.savez(tmp_path / "b.npz", pixels=np.zeros((4, 8, 8)))
    with pytest.raises(InputError, match=r"b\.npz.*no image array"):
        open_dataset(tmp_path / "b.npz").load("b")
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"c\.npz.*truncated"):
        open_dataset(tmp_path / "c.npz")


# --- DICOM and single files --------------------------------------------------------------------------------------


def test_dicom_series_one_and_several(tmp_path):
    vol = volume_pair(shape=(4, 16, 18))[0]
    write_dicom_series(tmp_path / "ct", vol, "1.2.826.0.1.3680043.2.1.100")
    assert detect_format(tmp_path / "ct") == "dicom"
    case = load_case(tmp_path / "ct")
    assert case.image.shape == (1, 4, 16, 18) and case.modality == "CT" and case.label is None
    np.testing.assert_allclose(case.spacing, (2.5, 0.8, 0.8))
    np.testing.assert_array_equal(case.image[0], vol)
    out = write_label_like((case.image[0] > 0).astype(np.uint8), case, tmp_path / "ct_pred.nii.gz")
    written = sitk.ReadImage(str(out))
    np.testing.assert_allclose(written.GetOrigin(), case.origin)
    write_dicom_series(tmp_path / "ct", vol, "1.2.826.0.1.3680043.2.1.200")
    with pytest.raises(InputError) as err:
        open_dataset(tmp_path / "ct")
    assert str(tmp_path / "ct") in str(err.value) and "2 DICOM series" in str(err.value)


def test_single_file_input(tmp_path):
    image = volume_pair()[0]
    sitk.WriteImage(sitk_image(image), str(tmp_path / "scan.nrrd"))
    case = load_case(tmp_path / "scan.nrrd")
    assert case.id == "scan" and case.modality == "CT" and case.file_ending == ".nrrd"
    with pytest.raises(InputError, match="cannot tell the format"):
        open_dataset(tmp_path / "nothing.txt") if (tmp_path / "nothing.txt").write_text("x") else None


def test_folder_of_volumes_for_prediction(tmp_path):
    image = volume_pair()[0]
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in ("p1_0000", "p1_0001", "p2_0000", "p2_0001"):
        sitk.WriteImage(sitk_image(image), str(folder / f"{name}.nii.gz"))
    ds = open_dataset(folder)
    assert ds.format == "volumes" and ds.test_case_ids == ["p1", "p2"]
    case = ds.load("p2")
    assert case.image.shape == (2, 6, 20, 24) and case.modality == "CT"
    (folder / "p1_0000.nii.gz").unlink()
    with pytest.raises(InputError, match=r"p1_0001\.nii\.gz.*no _0000"):
        open_dataset(folder)


def test_palette_pictures_image_colours_mask_indices(tmp_path):
    root = tmp_path / "voc"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    palette = [0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (256 * 3 - 9)
    idx = np.zeros((6, 8), np.uint8)
    idx[2:4, 2:6] = 1
    for folder in ("images", "masks"):
        pic = Image.fromarray(idx, mode="P")
        pic.putpalette(palette)
        pic.save(root / folder / "a.png")
    case = open_dataset(root).load("a")
    assert case.image.shape == (3, 1, 6, 8) and case.image[0, 0, 2, 2] == 200  # colours, not indices
    np.testing.assert_array_equal(case.label[0], idx)  # indices are the class ids
