"""The PraNet polyp and ISIC-2018 readers on small generated folders: layout detection, named test sets, case ids
that stay unique across sets, the fixed split, grey-level masks, and bad input naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samadapt.data.readers import detect_format, open_dataset
from samadapt.data.readers.isic import ISIC2018Source
from samadapt.data.readers.pranet import PraNetSource
from samadapt.errors import InputError


def write_pictures(images: Path, masks: Path | None, stems: list[str], seed: int, image_ext=".png",
                   mask_suffix="", grey_edges=False) -> dict[str, np.ndarray]:
    """RGB pictures 20 x 24 with one bright square each; masks {0, 255} (with ``grey_edges``: a ring of 200 inside
    and 60 outside the square, as once-JPEG masks have). Returns the binary truth per stem."""
    images.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for stem in stems:
        y, x = rng.integers(2, 8), rng.integers(2, 10)
        m = np.zeros((20, 24), np.uint8)
        m[y:y + 8, x:x + 10] = 255
        img = np.stack([(40 + 0.6 * m + rng.integers(0, 20, m.shape)).astype(np.uint8)] * 3, axis=-1)
        Image.fromarray(img).save(images / f"{stem}{image_ext}")
        truth[stem] = (m > 0).astype(np.uint8)
        if masks is not None:
            stored = m.copy()
            if grey_edges:
                stored[y, x:x + 10] = 200  # inside, grey: foreground
                stored[y - 1, x:x + 10] = 60  # outside, grey: background
            Image.fromarray(stored).save(masks / f"{stem}{mask_suffix}.png")
    return truth


@pytest.fixture
def pranet_root(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "polyp"
    truth = {"train": write_pictures(root / "TrainDataset" / "image", root / "TrainDataset" / "mask",
                                     ["1", "2", "3", "4", "cju0a"], seed=0)}  # PraNet's singular folder names
    for i, name in enumerate(("CVC-300", "Kvasir")):
        truth[name] = write_pictures(root / "TestDataset" / name / "images", root / "TestDataset" / name / "masks",
                                     ["1", "7"], seed=i + 1, grey_edges=name == "Kvasir")
    return root, truth


def test_pranet_layout_named_test_sets_and_split(pranet_root):
    root, truth = pranet_root
    assert detect_format(root) == "pranet"
    src = open_dataset(root)
    assert isinstance(src, PraNetSource)
    assert src.test_sets == {"CVC-300": ["CVC-300__1", "CVC-300__7"], "Kvasir": ["Kvasir__1", "Kvasir__7"]}
    assert sorted(src.case_ids) == sorted(["1", "2", "3", "4", "cju0a", "CVC-300__1", "CVC-300__7", "Kvasir__1",
                                           "Kvasir__7"])
    assert src.num_classes == 1 and src.modality == "natural" and src.test_case_ids == []
    # the same stem in three folders: three different cases
    train_1, cvc_1, kvasir_1 = (src.load(c) for c in ("1", "CVC-300__1", "Kvasir__1"))
    assert kvasir_1.id == "Kvasir__1" and "Kvasir" in kvasir_1.source
    np.testing.assert_array_equal(train_1.label[0], truth["train"]["1"])
    np.testing.assert_array_equal(cvc_1.label[0], truth["CVC-300"]["1"])
    np.testing.assert_array_equal(kvasir_1.label[0], truth["Kvasir"]["1"])  # grey edges thresholded at 128
    assert not np.array_equal(train_1.label, cvc_1.label)
    # the split never mixes training and test folders; test_fraction does not apply
    split = src.make_split(val_fraction=0.2, test_fraction=0.5, seed=3)
    assert sorted(split.train + split.val) == ["1", "2", "3", "4", "cju0a"] and len(split.val) == 1
    assert split.test == ["CVC-300__1", "CVC-300__7", "Kvasir__1", "Kvasir__7"]
    assert split.extra["test_sets"] == {"CVC-300": 2, "Kvasir": 2}
    folds = src.make_split(folds=5, fold=0)
    assert len(folds.val) == 1 and folds.test == split.test
    # an explicit splits.json beside the sets overrides the fixed split
    (root / "splits.json").write_text(json.dumps({"train": ["1", "2"], "val": ["3"], "test": ["Kvasir__7"]}))
    assert open_dataset(root).make_split().test == ["Kvasir__7"]


def test_pranet_bad_inputs(tmp_path, pranet_root):
    root, _ = pranet_root
    (root / "TestDataset" / "Kvasir" / "masks" / "7.png").unlink()
    with pytest.raises(InputError, match="7.png.*no mask"):
        open_dataset(root)
    empty = tmp_path / "empty"
    (empty / "TrainDataset").mkdir(parents=True)
    (empty / "TestDataset").mkdir()
    write_pictures(empty / "TrainDataset" / "images", empty / "TrainDataset" / "masks", ["a", "b"], seed=0)
    with pytest.raises(InputError, match="TestDataset.*no test set folders"):
        open_dataset(empty)
    with pytest.raises(InputError, match="not the PraNet polyp layout"):
        PraNetSource(tmp_path / "elsewhere")


def test_isic2018_layout(tmp_path):
    root = tmp_path / "isic"
    stems = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]
    truth = write_pictures(root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth",
                           stems, seed=0, image_ext=".jpg", mask_suffix="_segmentation")
    write_pictures(root / "ISIC2018_Task1-2_Validation_Input", root / "ISIC2018_Task1_Validation_GroundTruth",
                   ["ISIC_0012255"], seed=1, image_ext=".jpg", mask_suffix="_segmentation")
    write_pictures(root / "ISIC2018_Task1-2_Test_Input", None, ["ISIC_0036309"], seed=2, image_ext=".jpg")
    for folder in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"):
        (root / folder / "LICENSE.txt").write_text("CC-BY-NC")  # shipped in the archives; not a picture
    assert detect_format(root) == "isic2018"
    src = open_dataset(root)
    assert isinstance(src, ISIC2018Source)
    assert src.test_sets == {"validation": ["validation__ISIC_0012255"]}
    assert src.test_case_ids == ["test__ISIC_0036309"]  # no ground truth: a case to predict
    case = src.load("ISIC_0000001")
    assert case.image.shape == (3, 1, 20, 24)
    np.testing.assert_array_equal(case.label[0], truth["ISIC_0000001"])
    assert src.load("test__ISIC_0036309").label is None
    split = src.make_split(val_fraction=0.34)
    assert sorted(split.train + split.val) == stems and split.test == ["validation__ISIC_0012255"]
    (root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000003_segmentation.png").unlink()
    with pytest.raises(InputError, match="ISIC_0000003.jpg.*no mask"):
        open_dataset(root)


def test_isic2018_needs_training_ground_truth(tmp_path):
    write_pictures(tmp_path / "ISIC2018_Task1-2_Training_Input", None, ["ISIC_0000000"], seed=0, image_ext=".jpg")
    with pytest.raises(InputError, match="ISIC2018_Task1_Training_GroundTruth.*not found"):
        open_dataset(tmp_path)


def test_compare_reports_each_named_test_set(pranet_root, tmp_path):
    from samadapt.evaluation.compare import ModelSpec, compare

    root, _ = pranet_root
    rows = compare(root, [ModelSpec("box", "box_prompt_whole", ["backbone.name=tiny"])], tmp_path / "cmp",
                   overlays=False)
    assert {(r["case"], r["test_set"]) for r in rows} == {
        ("CVC-300__1", "CVC-300"), ("CVC-300__7", "CVC-300"), ("Kvasir__1", "Kvasir"), ("Kvasir__7", "Kvasir")}
    summary = (tmp_path / "cmp" / "report" / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| model | test set | class | n | dice")
    assert [line.split(" | ")[1:4] for line in summary[2:]] == [["CVC-300", "1", "2"], ["Kvasir", "1", "2"]]
