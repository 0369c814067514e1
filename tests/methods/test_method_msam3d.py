"""3D M-SAM on the tiny 3D SAM-Med3D: iteration shapes, what trains, loss falls with voxel clicks, and whole-volume
prediction through the sliding window written with the case's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.backbones.sam_med3d import SamMed3D
from samadapt.data.cases import Case
from samadapt.data.volume3d import predict_case_volume
from samadapt.errors import ConfigError
from samadapt.methods.msam3d import MSAM3D

TINY = {"input_size": 32, "patch": 8, "width": 24, "depth": 2, "heads": 2, "out": 48, "window": 3,
        "global_blocks": (1,), "decoder_mlp": 32, "iou_hidden": 16}


def sphere_batch(b: int = 2, size: int = 32) -> dict:
    z, y, x = np.mgrid[:size, :size, :size]
    label = torch.zeros(b, size, size, size, dtype=torch.long)
    for i in range(b):
        c = 12 + 6 * i
        label[i] = torch.from_numpy(((z - c) ** 2 + (y - 16) ** 2 + (x - c) ** 2 < 36).astype(np.int64))
    image = torch.randn(b, 1, size, size, size, generator=torch.Generator().manual_seed(0)) * 0.3 + label[:, None]
    return {"image": image, "label": label}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MSAM3D(SamMed3D.build(**TINY), mea_heads=6, infer_iterations=2)


def test_iterations_have_the_low_res_shape_and_clicks_change_them(model):
    batch = sphere_batch()
    model.eval()
    with torch.no_grad():
        auto = model.refine(batch["image"], 2)
        clicked = model.refine(batch["image"], 2, batch["label"], "center")
    assert [o.shape for o in auto] == [(2, 1, 16, 16, 16)] * 2
    assert not torch.allclose(auto[0], clicked[0])  # the first click (positive, inside the sphere) is a prompt
    probs = model.predict_patch(batch["image"], clicks=2, label=batch["label"])
    assert probs.shape == (2, 32, 32, 32) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    with pytest.raises(ConfigError, match="need the label"):
        model.predict_patch(batch["image"], clicks=1)


def test_only_lora_mea_prompt_encoder_and_decoder_train_and_loss_falls(model):
    groups = model.param_groups(1e-3)
    trained = {id(p) for g in groups for p in g["params"]}
    assert all(not p.requires_grad for p in model.backbone.parameters())
    frozen = [n for n, p in model.image_encoder.named_parameters() if id(p) not in trained]
    assert frozen and all("lora_" not in n for n in frozen) and len(model.lora_layers) == TINY["depth"]
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    batch = sphere_batch()
    model.train()
    losses = []
    for _ in range(4):
        torch.manual_seed(1)  # the same random clicks each step
        loss = model.training_loss(batch["image"], batch["label"], iterations=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.mea.parameters())


def test_whole_volume_prediction_through_the_sliding_window(model, tmp_path):
    image = np.random.default_rng(0).normal(0, 1, (1, 40, 36, 30)).astype(np.float32)
    case = Case("v1", image, spacing=(1.5, 1.0, 1.0), modality="MR")
    model.eval()
    path = predict_case_volume(case, model.patch_predictor(), 32, overlap=0.5, out_path=tmp_path / "v1.nii.gz")
    assert path.exists()
    label = predict_case_volume(case, model.patch_predictor(), 32)
    assert label.shape == (40, 36, 30) and label.dtype == np.uint8


def test_needs_the_3d_backbone():
    with pytest.raises(ConfigError, match="sam_med3d"):
        MSAM3D(build_backbone("tiny"))
